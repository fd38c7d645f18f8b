"""Which transport a process uses, and the one fallback policy.

The choice is made once per process (again after a ``fork()``), on first need:
``transport="auto"`` tries each of :data:`CANDIDATES` that applies, in order, and takes the
first that opens; a named transport is insisted on (:class:`Unavailable` when it cannot be
had). Then every call goes to the chosen transport, and:

* :class:`~torch_tq.client.transports.base.Decline` (this call is not for it: a small
  matrix, a memory store's matrix that came over the network) makes that call over gRPC;
* :class:`~torch_tq.client.transports.base.TransportFailed` (its data plane broke) makes
  that call over gRPC and every later one in this process;
* a :class:`~torch_tq.errors.TQError` is the server's answer, for the caller.
"""

from __future__ import annotations

import logging
import os
import threading

from torch_tq.client.connection import Connection
from torch_tq.client.devices import Want
from torch_tq.client.results import ItemResult
from torch_tq.client.transports.base import Decline, Transport, TransportFailed
from torch_tq.client.transports.grpc import GrpcTransport
from torch_tq.client.transports.same_host import SameHostTransport
from torch_tq.client.transports.ucx import UcxTransport
from torch_tq.errors import Unavailable
from torch_tq.model import Key

log = logging.getLogger(__name__)

# The fast paths "auto" tries, in order of preference; gRPC is the last resort of all.
CANDIDATES = (SameHostTransport, UcxTransport)
MODES = ("auto", "grpc", *(t.name for t in CANDIDATES))


class Router:
    """The transport of this process, and the calls made through it."""

    def __init__(self, connection: Connection, mode: str, ucx_locations: list[str]) -> None:
        self.connection = connection
        self.mode = mode
        self.ucx_locations = ucx_locations
        self.grpc = GrpcTransport(connection)
        self._lock = threading.Lock()
        self._state: tuple[int, Transport] = (-1, self.grpc)  # (pid, transport)

    @property
    def transport(self) -> Transport:
        pid, transport = self._state
        if pid == os.getpid():
            return transport
        with self._lock:
            pid, transport = self._state
            if pid != os.getpid():
                self.grpc = GrpcTransport(self.connection)  # a parent's learnt state is not ours
                transport = self._choose()
                self._state = (os.getpid(), transport)
        return transport

    def _choose(self) -> Transport:
        for candidate in CANDIDATES:
            if self.mode not in ("auto", candidate.name):
                continue
            if self.mode == "auto" and not candidate.wanted(self.ucx_locations):
                continue
            transport, reason = candidate.open(self.connection, self.grpc)
            if transport is not None:
                return transport
            if self.mode == candidate.name:
                raise Unavailable(f"transport={self.mode!r}, but {candidate.refusal}: {reason}")
            if candidate.warn_if_unavailable:
                log.warning("torch_tq client %s: %s unavailable (%s); using gRPC",
                            self.connection.location, candidate.name.upper(), reason)
        return self.grpc

    def _failed(self, transport: Transport, error: BaseException) -> None:
        """``transport``'s data plane failed (an endpoint died, a timeout): gRPC from now on."""
        log.warning("torch_tq client %s: %s transfer failed (%s); falling back to gRPC",
                    self.connection.location, transport.name.upper(), error)
        transport.close()
        with self._lock:
            self._state = (os.getpid(), self.grpc)

    def _call(self, op: str, *args):
        transport = self.transport
        if transport is not self.grpc:
            try:
                return getattr(transport, op)(*args)
            except Decline:
                pass
            except TransportFailed as e:
                self._failed(transport, e.__cause__ or e)
        return getattr(self.grpc, op)(*args)

    def put(self, conn, key: Key, dtype, shape, flat, compression) -> None:
        self._call("put", conn, key, dtype, shape, flat, compression)

    def get(self, conn, key: Key, want: Want):
        return self._call("get", conn, key, want)

    def put_many(self, conn, group: list) -> list[dict]:
        return self._call("put_many", conn, group)

    def get_many(self, conn, keys: list[Key], max_inline_bytes: int | None) -> list[ItemResult]:
        return self._call("get_many", conn, keys, max_inline_bytes)

    def read_here(self, keys: list[Key]) -> list[ItemResult | None] | None:
        return self.transport.read_here(keys)

    def close(self) -> None:
        pid, transport = self._state
        if pid == os.getpid():
            transport.close()
