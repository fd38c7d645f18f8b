"""One client's connections to its server, and how its calls are made and retried.

A :class:`Connection` holds the settings every call needs (location, timeouts, the quota
identity header, retry policy, chunk size, checksums, compression), the process's main
Flight connection (rebuilt lazily after a ``fork()``: a Flight client must not cross one)
and a pool of further connections for the parallel streams of batch calls. Every Flight
error becomes a :class:`~torch_tq.errors.TQError` here, through
:func:`torch_tq.protocol.errors.flight_errors`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.flight as flight

from torch_tq._fork import check_fork_safe, note_grpc_use
from torch_tq._malloc import tune_malloc
from torch_tq.client.credentials import Credentials
from torch_tq.codec import compression as packing
from torch_tq.errors import InternalError, InvalidArgument, Unavailable
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.errors import flight_errors

log = logging.getLogger(__name__)

_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed",
                     "name resolution", "no route to host")


_RECONNECT = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.min_reconnect_backoff_ms": 100,
              "grpc.max_reconnect_backoff_ms": 2000}


def connect_failed(e: Unavailable) -> bool:
    """Whether the call never reached a server (nothing was done: safe to make again)."""
    text = e.message.lower()
    return any(marker in text for marker in _CONNECT_FAILURES)


_CONNECTION_LOST = ("socket closed", "stream removed", "connection reset", "broken pipe")


def connection_lost(e: Unavailable) -> bool:
    """Whether the call's connection broke under it (the server may or may not have done
    it: only a call that changes nothing may simply be made again)."""
    text = e.message.lower()
    return any(marker in text for marker in _CONNECTION_LOST)


def call_with_retries(conn: Connection, fn, *args, **kwargs):
    """Calls ``fn``, making it again while the server turns it away over a limit (an
    :class:`Unavailable` with a ``retry_after_ms`` hint: nothing was done), waiting the
    hint plus a growing random jitter, until ``conn.retry_deadline`` seconds have passed;
    then raises that error. A call that could not reach the server at all (not started
    yet, restarting) is made again with exponential backoff for up to
    ``conn.connect_timeout``."""
    deadline = None
    attempt = 0
    connect_deadline = None
    backoff = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Unavailable as e:
            if connect_failed(e) and conn.connect_timeout:
                now = time.monotonic()
                if connect_deadline is None:
                    connect_deadline = now + conn.connect_timeout
                    log.warning("torch_tq: %s is not reachable yet; waiting up to %gs "
                                "for it (connect_timeout)", conn.location, conn.connect_timeout)
                if now >= connect_deadline:
                    raise Unavailable(
                        f"{e.message}; still unreachable after {conn.connect_timeout:g}s "
                        "(the client's connect_timeout)") from None
                time.sleep(min(backoff, connect_deadline - now))
                backoff = min(2.0, backoff * 2)
                continue
            hint = e.retry_after_ms
            if hint is None:
                raise
            conn.throttled(e)
            if not conn.retry_deadline:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + conn.retry_deadline
            delay = hint / 1000 + random.uniform(0, min(0.25, 0.002 * 2**attempt))
            if now + delay > deadline:
                raise Unavailable(
                    f"{e.message}; still turned away after {attempt + 1} attempt(s) "
                    f"within the client's retry_deadline of {conn.retry_deadline:g}s"
                ) from None
            with conn.lock:
                conn.stats["retries"] += 1
            time.sleep(delay)
            attempt += 1


def retrying(method):
    """A method of an object with a ``connection`` (or of a :class:`Connection`) made with
    :func:`call_with_retries`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return call_with_retries(getattr(self, "connection", self), method, self, *args,
                                 **kwargs)

    return wrapper


class Connection:
    """Settings, connections and the two generic calls (DoAction, DoPut) of one client."""

    def __init__(self, location: str, *, timeout: float | None, chunk_bytes: int,
                 checksum: bool, client_id: str, retry_deadline: float,
                 connect_timeout: float, compression: str | None,
                 credentials: Credentials | None = None) -> None:
        self.location = location
        self.credentials = credentials or Credentials()
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.checksum = checksum
        self.client_id = client_id
        self.retry_deadline = retry_deadline
        self.connect_timeout = connect_timeout
        self.compression = compression
        self.headers = [(protocol.CLIENT_ID_HEADER.encode(), client_id.encode()),
                        *self.credentials.headers()]
        self.lock = threading.Lock()
        self._conn: flight.FlightClient | None = None
        self._pid = -1
        self._pool: list[flight.FlightClient] = []  # more connections, for parallel streams
        self._pool_pid = -1
        # What gets cost, for tuning and tests: calls, those that made no copy, bytes copied
        # out of received buffers (one copy at most per byte; none for a one-buffer matrix).
        # throttled: calls the server turned away over a limit (each retry of one counts).
        self.stats = {"gets": 0, "zero_copy_gets": 0, "copied_bytes": 0, "retries": 0,
                      "throttled": 0}
        self._said_throttled = False

    @property
    def flight(self) -> flight.FlightClient:
        """This process's main connection."""
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            with self.lock:
                if self._conn is None or self._pid != pid:
                    # After a fork the inherited connection belongs to the parent: drop it
                    # without closing (closing would touch the parent's gRPC state).
                    self._conn = self.open()
                    self._pid = pid
        return self._conn

    def open(self, **generic_options) -> flight.FlightClient:
        """A new connection of this process (checked to be safe after a fork)."""
        check_fork_safe()
        note_grpc_use()
        tune_malloc()
        tls = self.credentials.client_options()
        # a server that restarts (a cluster node, a pod) is reached again within a second
        # or two: gRPC's reconnect backoff otherwise grows to two minutes after failures
        options = {**_RECONNECT, **generic_options}
        return flight.FlightClient(self.location, generic_options=list(options.items()), **tls)

    @contextlib.contextmanager
    def pooled(self) -> Iterator[flight.FlightClient]:
        """A connection of the pool for one call of a batch (opened on first need, reused
        afterwards, never shared by two calls at once)."""
        pid = os.getpid()
        with self.lock:
            if self._pool_pid != pid:
                self._pool, self._pool_pid = [], pid  # a parent's connections are not ours
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self.open()
        try:
            yield conn
        finally:
            with self.lock:
                if self._pool_pid == pid:
                    self._pool.append(conn)

    def close(self) -> None:
        """Closes the connections (a later call opens new ones)."""
        with self.lock:
            mine = os.getpid()
            conns = [self._conn] if self._conn is not None and self._pid == mine else []
            if self._pool_pid == mine:
                conns += self._pool
            self._conn, self._pool = None, []
        for conn in conns:
            conn.close()

    def options(self, extra_timeout: float = 0.0, **kwargs) -> flight.FlightCallOptions:
        timeout = self.timeout + extra_timeout if self.timeout is not None else None
        return flight.FlightCallOptions(timeout=timeout, headers=self.headers, **kwargs)

    def compression_of(self, value, default) -> str | None:
        """A call's wire compression: the client's when ``value`` is ``default``."""
        return self.compression if value is default else protocol.validate_compression(value)

    @retrying
    def action(self, name: str, body: dict[str, Any], what: str, wait: float = 0.0,
               extra: int = 0) -> dict[str, Any]:
        """One DoAction; its JSON answer (with ``extra``: and up to that many more results,
        as buffers, under ``"_extra"``)."""
        options = self.options(wait)
        with flight_errors(what):
            results = list(self.flight.do_action(flight.Action(name, protocol.dumps(body)),
                                                 options))
        if not 1 <= len(results) <= 1 + extra:
            raise InternalError(f"{what}: expected one result, got {len(results)}")
        reply = json.loads(results[0].body.to_pybytes())
        if extra:
            reply["_extra"] = [r.body for r in results[1:]]
        return reply

    def upload(self, conn: flight.FlightClient, descriptor, schema, batches, what: str,
               compression: str | None = None, acknowledged: bool = True) -> dict | None:
        """One DoPut: streams ``batches`` (record batches, or ``(batch, app_metadata)``
        pairs) and returns the server's JSON acknowledgement (``acknowledged=False``: the
        command asked for none, and the call's OK status is the acknowledgement)."""
        options = self.options(write_options=packing.ipc_options(compression))
        ack = None
        with flight_errors(what):
            writer, acks = conn.do_put(descriptor, schema, options)
            try:
                for batch in batches:
                    if isinstance(batch, tuple):
                        writer.write_with_metadata(*batch)
                    else:
                        writer.write_batch(batch)
                writer.done_writing()
                if acknowledged:
                    ack = acks.read()
            finally:
                # close() waits for the server's status and raises it when the call failed
                writer.close()
        if not acknowledged:
            return None
        if ack is None:
            raise InternalError(f"{what}: the server closed the upload without acknowledging it")
        return json.loads(ack.to_pybytes())

    def throttled(self, e: Unavailable) -> None:
        """Counts a call the server turned away over a limit; the first one is logged."""
        with self.lock:
            self.stats["throttled"] += 1
            first, self._said_throttled = not self._said_throttled, True
        if first:
            log.warning("torch_tq client %s: the server turned a call away (%s); it is "
                        "retried within retry_deadline=%gs. Said once per client; "
                        "client.stats['throttled'] counts them all", self.location,
                        e.message, self.retry_deadline)

    def count_get(self, copied: int) -> None:
        with self.lock:
            self.stats["gets"] += 1
            self.stats["copied_bytes"] += copied
            if copied == 0:
                self.stats["zero_copy_gets"] += 1


def check_concurrency(concurrency: int) -> None:
    if concurrency < 1:
        raise InvalidArgument(f"concurrency must be >= 1, got {concurrency}")
