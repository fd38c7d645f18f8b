"""``torch_tq.Client``: put and get torch tensors on a storage server.

One Flight connection per client and process, reused for every call; the connection is
rebuilt lazily after a ``fork()`` (a Flight client must not cross one) and when the client
is unpickled (it pickles as its recipe: location and settings).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
import os
import random
import threading
import time
import uuid
from typing import Any, NamedTuple

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import xxhash

from torch_tq import native

from torch_tq.codec import batch as batch_ops

from torch_tq.codec import tensors as codec

from torch_tq.protocol import commands as protocol
from torch_tq._config import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_S,
    parse_size,
    resolve,
)
from torch_tq._fork import check_fork_safe, note_grpc_use
from torch_tq._malloc import tune_malloc
from torch_tq.errors import (
    ForkedProcessError,
    InternalError,
    InvalidArgument,
    NotFound,
    TQError,
    Unavailable,
)
from torch_tq.protocol.commands import CLIENT_ID_HEADER, Key

if TYPE_CHECKING:
    import torch


class Lease(NamedTuple):
    """What :meth:`Client.consume` handed out."""

    index_ids: list[int]
    lease: str | None
    expires_at: int | None  # ms since the epoch
    finished: bool  # the group's types are finished and nothing is left for it
    drained: bool  # the types are finished and nothing is ready (others may hold leases)
    round: int | None = None  # rounds: which round this share belongs to
    left: int | None = None  # rounds, when empty: ready index_ids that fill no round


class ItemResult(NamedTuple):
    """The outcome of one item of :meth:`Client.put_many` / :meth:`Client.get_many`."""

    index_id: Any
    matrix_type: Any
    success: bool
    code: str  # "OK" or the seed error code (NOT_FOUND, INVALID_ARGUMENT, ...)
    message: str  # "success" or why it failed (the seed's message)
    tensor: Any = None  # get_many: the torch.Tensor read


class MatrixInfo(NamedTuple):
    """One stored matrix, as listed by :meth:`Client.list`."""

    index_id: int
    matrix_type: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def normalize_location(location: str) -> str:
    """``host:port``, ``grpc://host:port`` or ``grpc+tcp://host:port`` -> ``grpc://host:port``."""
    if not isinstance(location, str) or not location:
        raise InvalidArgument(f"location must be a string like grpc://HOST:PORT, got {location!r}")
    if "://" not in location:
        location = "grpc://" + location
    scheme, rest = location.split("://", 1)
    if scheme not in ("grpc", "grpc+tcp"):
        raise InvalidArgument(f"unsupported location scheme {scheme!r} (use grpc://HOST:PORT)")
    if not rest:
        raise InvalidArgument(f"location {location!r} names no host")
    has_port = ":" in rest and not rest.endswith("]") and rest.rsplit(":", 1)[1].isdigit()
    if not has_port:
        rest = f"{rest}:{DEFAULT_PORT}"
    return f"grpc://{rest}"


_DEFAULT: Any = object()  # "the client's setting"
log = logging.getLogger(__name__)


def _key(index_id: Any, matrix_type: Any) -> Key:
    return Key(protocol.validate_index_id(index_id), protocol.validate_matrix_type(matrix_type))


_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed",
                     "name resolution", "no route to host")


def _connect_failed(e: Unavailable) -> bool:
    """Whether the call never reached a server (nothing was done: safe to make again)."""
    text = e.message.lower()
    return any(marker in text for marker in _CONNECT_FAILURES)


def _retrying(method):
    """Retries a call the server turned away over a limit (an :class:`Unavailable` with a
    ``retry_after_ms`` hint: nothing was done), waiting the hint plus a growing random
    jitter, until ``retry_deadline`` seconds have passed; then raises that error. A call
    that could not reach the server at all (not started yet, restarting) is made again
    with exponential backoff for up to the client's ``connect_timeout``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        deadline = None
        attempt = 0
        connect_deadline = None
        backoff = 0.05
        while True:
            try:
                return method(self, *args, **kwargs)
            except Unavailable as e:
                if _connect_failed(e) and self.connect_timeout:
                    now = time.monotonic()
                    if connect_deadline is None:
                        connect_deadline = now + self.connect_timeout
                        log.warning("torch_tq: %s is not reachable yet; waiting up to %gs "
                                    "for it (connect_timeout)", self.location,
                                    self.connect_timeout)
                    if now >= connect_deadline:
                        raise Unavailable(
                            f"{e.message}; still unreachable after {self.connect_timeout:g}s "
                            "(the client's connect_timeout)") from None
                    time.sleep(min(backoff, connect_deadline - now))
                    backoff = min(2.0, backoff * 2)
                    continue
                hint = e.retry_after_ms
                if hint is None or not self.retry_deadline:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_deadline
                delay = hint / 1000 + random.uniform(0, min(0.25, 0.002 * 2**attempt))
                if now + delay > deadline:
                    raise Unavailable(
                        f"{e.message}; still turned away after {attempt + 1} attempt(s) "
                        f"within the client's retry_deadline of {self.retry_deadline:g}s"
                    ) from None
                self.stats["retries"] += 1
                time.sleep(delay)
                attempt += 1

    return wrapper


class Client:
    """A connection to one torch_tq storage server.

    Args:
        location: ``grpc://HOST:PORT`` (or ``HOST:PORT``); default ``TORCH_TQ_LOCATION`` or
            ``grpc://127.0.0.1:8080``. Or a list such as ``["ucx://HOST:8081",
            "grpc://HOST:8080"]`` (the seed's form; ``rdma://`` is accepted for ``ucx://``):
            UCX is preferred, the gRPC location is the control plane and the fallback.
        timeout: seconds each call may take (``None``: no limit); default 60.
        chunk_bytes: record batch size for uploads (default 4MiB).
        checksum: send an XXH3-64 digest with each upload, checked by the server before it
            publishes (end-to-end integrity at the cost of one more pass over the data).
        client_id: who this client is to the server's quotas (the ``x-tq-client-id``
            header); default a random id, kept across reconnects and by pickled copies.
        retry_deadline: seconds to keep retrying a call the server turned away over a limit
            (it says when to retry); 0 raises :class:`Unavailable` at once. Default 30.
        connect_timeout: seconds a call waits for a server that cannot be reached (not
            started yet: torchrun, SLURM and Kubernetes start processes in no fixed order),
            retrying with exponential backoff; 0 fails at once. Default 30
            (``TORCH_TQ_CONNECT_TIMEOUT``).
        compression: ``"zstd"``, ``"lz4"`` or ``"snappy"`` on the wire for this client's
            puts and gets (each call may override it); off by default: on a fast network it
            costs more CPU than it saves (``benchmarks/compression.py``).
        transport: how matrices move (``TORCH_TQ_TRANSPORT``): ``"auto"`` (default) uses
            the same-host path when the server runs on this host with a disk store this
            process can see (:mod:`torch_tq.transport.same_host`), else UCX when a ``ucx://`` (or
            ``rdma://``) location is given and UCX works (:mod:`torch_tq.transport.ucx`), else gRPC,
            falling back to gRPC for good when a UCX transfer fails; ``"same-host"``,
            ``"ucx"`` or ``"grpc"`` insist on one (raising :class:`Unavailable` when it
            cannot be had). gRPC always carries the control calls.

    Example:
        >>> client = torch_tq.Client("grpc://127.0.0.1:8080")  # doctest: +SKIP
        >>> client.put(12345, "prompt", torch.randn(32, 512, 4096))
        >>> t = client.get(12345, "prompt")
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        chunk_bytes: int | str | None = None,
        checksum: bool = False,
        client_id: str | None = None,
        retry_deadline: float = 30.0,
        compression: str | None = None,
        transport: str | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self.location, self.ucx_locations = _split_locations(
            resolve(location, "LOCATION", f"grpc://127.0.0.1:{DEFAULT_PORT}"))
        self.timeout = timeout
        self.chunk_bytes = parse_size(resolve(chunk_bytes, "CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
        self.checksum = checksum
        # UCX receiving straight into CUDA memory (TORCH_TQ_UCX_CUDA=1): off by default until
        # measured on a GPU (benchmarks/gpu_check.py); a GPU get otherwise lands in pinned
        # host memory, then a non-blocking copy
        self._ucx_cuda = os.environ.get("TORCH_TQ_UCX_CUDA", "0") == "1"
        self.client_id = client_id if client_id is not None else uuid.uuid4().hex
        if not isinstance(self.client_id, str) or not 1 <= len(self.client_id) <= 128:
            raise InvalidArgument("client_id must be a string of 1-128 characters")
        self.retry_deadline = float(retry_deadline)
        self.connect_timeout = float(resolve(connect_timeout, "CONNECT_TIMEOUT",
                                             DEFAULT_CONNECT_TIMEOUT_S, float))
        if self.connect_timeout < 0:
            raise InvalidArgument(f"connect_timeout must be >= 0, got {self.connect_timeout}")
        self.compression = protocol.validate_compression(compression)
        self.transport_mode = resolve(transport, "TRANSPORT", "auto")
        if self.transport_mode not in _TRANSPORTS:
            raise InvalidArgument(
                f"transport must be one of {list(_TRANSPORTS)}, got {self.transport_mode!r}")
        self._route_state: tuple[int, str, Any] = (-1, "grpc", None)  # (pid, kind, state)
        self._headers = [(CLIENT_ID_HEADER.encode(), self.client_id.encode())]
        self._lock = threading.Lock()
        self._route_lock = threading.Lock()
        self._conn: flight.FlightClient | None = None
        self._pid = -1
        self._pool: list[flight.FlightClient] = []  # more connections, for parallel streams
        self._pool_pid = -1
        self._pad = 0  # learnt: app_metadata padding that aligns BatchRead items
        # What gets cost, for tuning and tests: calls, those that made no copy, bytes copied
        # out of received buffers (one copy at most per byte; none for a one-buffer matrix).
        self.stats = {"gets": 0, "zero_copy_gets": 0, "copied_bytes": 0, "retries": 0}

    # ------------------------------------------------------------------ plumbing

    def __reduce__(self):
        locations = [*self.ucx_locations, self.location] if self.ucx_locations else self.location
        return (_rebuild, (locations, self.timeout, self.chunk_bytes, self.checksum,
                           self.client_id, self.retry_deadline, self.compression,
                           self.transport_mode, self.connect_timeout))

    def __repr__(self) -> str:
        return f"Client({self.location!r})"

    @property
    def _flight(self) -> flight.FlightClient:
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            with self._lock:
                if self._conn is None or self._pid != pid:
                    # After a fork the inherited connection belongs to the parent: drop it
                    # without closing (closing would touch the parent's gRPC state).
                    check_fork_safe()
                    note_grpc_use()
                    tune_malloc()
                    self._conn = flight.FlightClient(self.location)
                    self._pid = pid
        return self._conn

    def _options(self, extra_timeout: float = 0.0, **kwargs) -> flight.FlightCallOptions:
        timeout = self.timeout + extra_timeout if self.timeout is not None else None
        return flight.FlightCallOptions(timeout=timeout, headers=self._headers, **kwargs)

    def _route(self) -> tuple[str, Any]:
        """How this process moves matrices: ``("same-host", LocalStore)``, ``("ucx", the
        server's worker addresses)`` or ``("grpc", None)``; decided once per process."""
        pid, kind, state = self._route_state
        if pid == os.getpid():
            return kind, state
        with self._route_lock:
            pid, kind, state = self._route_state
            if pid != os.getpid():
                kind, state = self._choose()
                self._route_state = (os.getpid(), kind, state)
        return kind, state

    def _choose(self) -> tuple[str, Any]:
        mode = self.transport_mode
        reasons = []
        if mode in ("auto", "same-host"):
            store, reason = self._try_same_host()
            if store is not None:
                log.info("torch_tq client %s: transport same-host (%s)", self.location,
                         store.root)
                return "same-host", store
            if mode == "same-host":
                raise Unavailable(f"transport='same-host', but the server cannot be reached "
                                  f"that way: {reason}")
            reasons.append(f"same-host: {reason}")
        if mode == "ucx" or (mode == "auto" and self.ucx_locations):
            try:
                from torch_tq.transport import ucx

                rt = ucx.runtime()
                info = self._action(protocol.UCX_INFO, {}, "ucx info")
                # the server's lanes this process pairs with its own
                peers = ucx.decode_addresses(info.get("addresses", info.get("address")))
                peers = peers[: rt.lanes]
                rt.connect(peers)
                log.info("torch_tq client %s: transport ucx (%d lanes)", self.location,
                         len(peers))
                return "ucx", peers
            except ForkedProcessError:
                raise  # not a UCX problem: no connection may be made here at all
            except TQError as e:
                if mode == "ucx":
                    raise Unavailable(f"transport='ucx', but UCX cannot be used: {e}") from None
                log.warning("torch_tq client %s: UCX unavailable (%s); using gRPC",
                            self.location, e)
        return "grpc", None

    def _try_same_host(self) -> tuple[Any, str]:
        from torch_tq.transport import same_host as local

        try:
            info = self._action(protocol.LOCAL_INFO, {"host_id": local.host_id()}, "local info")
        except InvalidArgument:
            return None, "the server has no same-host access"
        store = local.attach(info, self.chunk_bytes)
        if store is None:
            return None, info.get("reason") or "its directory is not visible here"
        return store, ""

    def _local(self):
        kind, state = self._route()
        return state if kind == "same-host" else None

    def _ucx_peers(self) -> list[bytes] | None:
        kind, state = self._route()
        return state if kind == "ucx" else None

    def _ucx_failed(self, error: BaseException) -> None:
        """A UCX transfer failed (the endpoint died, a timeout): gRPC from now on."""
        log.warning("torch_tq client %s: UCX transfer failed (%s); falling back to gRPC",
                    self.location, error)
        self._route_state = (os.getpid(), "grpc", None)

    @property
    def transport(self) -> str:
        """How this client moves matrices now: ``"same-host"``, ``"ucx"`` or ``"grpc"``."""
        return self._route()[0]

    @contextlib.contextmanager
    def _pooled(self) -> Iterator[flight.FlightClient]:
        """A connection of the pool for one call of a batch (opened on first need, reused
        afterwards, never shared by two calls at once)."""
        pid = os.getpid()
        with self._lock:
            if self._pool_pid != pid:
                self._pool, self._pool_pid = [], pid  # a parent's connections are not ours
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            check_fork_safe()
            note_grpc_use()
            tune_malloc()
            conn = flight.FlightClient(self.location)
        try:
            yield conn
        finally:
            with self._lock:
                if self._pool_pid == pid:
                    self._pool.append(conn)

    def close(self) -> None:
        """Closes the connections (a later call opens new ones)."""
        with self._lock:
            mine = os.getpid()
            conns = [self._conn] if self._conn is not None and self._pid == mine else []
            if self._pool_pid == mine:
                conns += self._pool
            self._conn, self._pool = None, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_retrying
    def _action(
        self, name: str, body: dict[str, Any], what: str, wait: float = 0.0, extra: int = 0
    ) -> dict[str, Any]:
        """One DoAction; its JSON answer (with ``extra``: and up to that many more results,
        as buffers, under ``"_extra"``)."""
        options = self._options(wait)
        try:
            results = list(
                self._flight.do_action(flight.Action(name, protocol.dumps(body)), options)
            )
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None
        if not 1 <= len(results) <= 1 + extra:
            raise InternalError(f"{what}: expected one result, got {len(results)}")
        reply = json.loads(results[0].body.to_pybytes())
        if extra:
            reply["_extra"] = [r.body for r in results[1:]]
        return reply

    # ------------------------------------------------------------------ data

    @_retrying
    def put(self, index_id: int, matrix_type: str, tensor: torch.Tensor, *,
            compression: str | None = _DEFAULT) -> None:
        """Stores ``tensor`` under ``(index_id, matrix_type)``, replacing any previous value.

        Returns once the server has durably published the matrix (the write is atomic:
        readers see the old value or the new one, never a mix).

        Args:
            index_id: an integer in ``[0, 2**64 - 1]``.
            matrix_type: a name such as ``prompt`` (case-insensitive).
            tensor: any shape (0-d included), dtype bool, (u)int8, int16/32/64,
                float16, bfloat16, float32 or float64; any device and layout.
            compression: this call's wire compression (default: the client's).

        Raises:
            InvalidArgument: bad key, dtype, or a matrix over the server's size limit.
            Unavailable: the server is unreachable or out of space.
            InternalError: the server failed.
        """
        key = _key(index_id, matrix_type)
        dtype, shape, flat = codec.tensor_values(tensor)
        self._put_routed(self._flight, key, dtype, shape, flat, self._compression(compression))

    def _put_routed(self, conn, key: Key, dtype: codec.DType, shape, flat, compression) -> None:
        """A put on this process's transport (falling back to gRPC over ``conn``)."""
        kind, state = self._route()
        # a small matrix into a disk store: one gRPC upload is quicker than staging a file
        # and asking the server to publish it, and the file it makes is as readable here
        if kind == "same-host" and (state.partial or flat.nbytes > _LOCAL_SMALL_BYTES):
            try:
                self._put_local(state, key, dtype, shape, flat)
                return
            except Unavailable:
                if not state.partial:
                    raise  # the disk is full: so it is for gRPC too
                # a memory store's /dev/shm is full (containers often give it 64 MB): the
                # server's heap may still have room
                log.debug("same-host put of %s: /dev/shm is full; using gRPC", key)
        if kind == "ucx":
            try:
                self._put_ucx(state, key, dtype, shape, flat)
                return
            except _UcxTransferError as e:
                self._ucx_failed(e.__cause__ or e)
        self._put_to(conn, key, dtype, shape, flat, compression)

    def _put_ucx(self, peers: list[bytes], key: Key, dtype: codec.DType, shape, flat) -> None:
        from torch_tq.transport import ucx

        if flat.nbytes <= _UCX_INLINE_BYTES:  # small: one gRPC upload beats two messages
            self._put_to(self._flight, key, dtype, shape, flat, self.compression)
            return
        rt = ucx.runtime()
        raw = flat.view(np.uint8).reshape(-1) if flat.size else np.empty(0, np.uint8)
        sizes = ucx.split(raw.nbytes, max(self.chunk_bytes, ucx.PART_BYTES))
        parts = ucx.views(raw, sizes)
        tag = random.getrandbits(64)
        sending = rt.start("send", peers, tag, parts)
        body = {"index_id": key.index_id, "matrix_type": key.matrix_type, "shape": list(shape),
                "dtype": dtype.name, "nbytes": raw.nbytes, "parts": sizes,
                "addresses": rt.addresses_b64[: len(peers)], "tag": tag}
        if self.checksum:
            body["xxh3"] = xxhash.xxh3_64_hexdigest(memoryview(raw))
        try:
            self._action(protocol.UCX_PUT, body, f"put {key}")
        except Unavailable as e:
            sending.cancel()
            if e.retry_after_ms is not None:
                raise
            raise _UcxTransferError(str(e)) from e
        except BaseException:
            sending.cancel()  # refused: the server received nothing
            raise
        try:
            sending.result(ucx.DEFAULT_TIMEOUT_S)
        except Exception as e:  # the server stored it, so the bytes did arrive
            log.debug("UCX send of %s reported %s after the server's ack", key, e)

    def _get_ucx(self, peers: list[bytes], key: Key, out, shared, pinned: bool = False,
                 cuda=None):
        """A get over UCX, received straight into the result: a tensor on the CUDA device
        ``cuda`` when given (UCX writes GPU memory), else a pooled pinned block when
        ``pinned`` (the host side of a copy to a GPU), else host memory."""
        from torch_tq.transport import ucx

        rt = ucx.runtime()
        tag = random.getrandbits(64)
        body = {"index_id": key.index_id, "matrix_type": key.matrix_type,
                "addresses": rt.addresses_b64[: len(peers)], "tag": tag,
                "inline_max": _UCX_INLINE_BYTES}
        reply = self._action(protocol.UCX_GET, body, f"get {key}", extra=1)
        dtype, shape = codec.DTYPES[reply["dtype"]], tuple(reply["shape"])
        if pinned and out is None and not shared:
            out = _pinned_out(dtype, shape)
        assembler = codec.TensorAssembler(dtype, shape, out, shared)
        if reply.get("inline"):  # small: the bytes came with the answer
            (data,) = reply["_extra"] or [pa.py_buffer(b"")]
            if data.size != codec.numel(shape) * dtype.itemsize:
                raise InternalError(f"get {key}: the server sent {data.size} bytes")
            if data.size:
                assembler.add(codec.raw_values(data, dtype))
            result = assembler.finish()
            self._count_get(assembler.copied_bytes)
            return result
        if cuda is not None:
            import torch

            result = torch.empty(shape, dtype=dtype.torch, device=cuda)
            whole = result.reshape(-1).view(torch.uint8)  # views of it carry the CUDA
            # array interface, which ucxx hands to UCX as GPU memory
        else:
            result = assembler.allocate()
            whole = codec._byte_view(result) if result.numel() else np.empty(0, np.uint8)
        nbytes = codec.numel(shape) * dtype.itemsize
        if sum(reply["parts"]) != nbytes:
            raise InternalError(f"get {key}: the server announced {sum(reply['parts'])} bytes "
                                f"for {nbytes}")
        views = ucx.views(whole, reply["parts"])
        try:
            rt.run("recv", peers, tag, views)
        except Exception as e:
            rt.forget(peers)
            raise _UcxTransferError(str(e)) from e
        self._count_get(0)
        return result

    def _put_local(self, store, key: Key, dtype: codec.DType, shape, flat) -> None:
        try:
            name = store.stage(key, dtype, shape, flat)
        except OSError as e:
            raise Unavailable(f"put {key}: could not stage the file ({e})") from None
        try:
            body = {"index_id": key.index_id, "matrix_type": key.matrix_type, "file": name}
            self._action(protocol.PUBLISH_LOCAL, body, f"put {key}")
        except BaseException:
            store.discard(name)  # refused or not reached: leave nothing behind
            raise

    def _compression(self, value) -> str | None:
        return self.compression if value is _DEFAULT else protocol.validate_compression(value)

    def _put_to(self, conn, key: Key, dtype: codec.DType, shape: tuple[int, ...], flat,
                compression: str | None = None) -> None:
        nbytes = flat.nbytes
        digest = None
        if self.checksum:
            digest = xxhash.xxh3_64_hexdigest(memoryview(flat.view("uint8")))
        command = protocol.write_command(key, shape, dtype.name, nbytes, digest)
        snappy = compression == "snappy"
        schema = codec.snappy_schema(dtype, shape) if snappy else codec.wire_schema(dtype, shape)
        batches = (
            pa.RecordBatch.from_arrays([codec.snappy_pack(a) if snappy else a], schema=schema)
            for a in codec.values_to_arrays(dtype, flat, self.chunk_bytes)
        )
        reply = self._upload(conn, flight.FlightDescriptor.for_command(command), schema, batches,
                             f"put {key}", compression)
        if not reply.get("success"):
            raise InternalError(f"put {key}: {reply.get('message', 'not acknowledged')}")

    def _upload(self, conn, descriptor, schema, batches, what: str,
                compression: str | None = None) -> dict:
        """One DoPut: streams ``batches`` and returns the server's JSON acknowledgement."""
        options = self._options(write_options=codec.ipc_options(compression))
        ack = None
        try:
            writer, acks = conn.do_put(descriptor, schema, options)
            try:
                for batch in batches:
                    writer.write_batch(batch)
                writer.done_writing()
                ack = acks.read()
            finally:
                # close() reports the server's status when the call failed.
                writer.close()
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None
        if ack is None:
            raise InternalError(f"{what}: the server closed the upload without acknowledging it")
        return json.loads(ack.to_pybytes())

    @_retrying
    def get(
        self,
        index_id: int,
        matrix_type: str,
        *,
        out: torch.Tensor | None = None,
        shared: bool = False,
        device: str | torch.device | None = None,
        pin_memory: bool = False,
        non_blocking: bool = False,
        compression: str | None = _DEFAULT,
    ) -> torch.Tensor:
        """Reads a matrix as a CPU tensor.

        A matrix that arrives in one buffer becomes a tensor without a copy; a larger one is
        copied once, as it streams in, into a tensor allocated for it (or into ``out``).

        Args:
            index_id, matrix_type: the key.
            out: a contiguous CPU tensor of the matrix's exact dtype and shape to fill.
            shared: allocate the result in shared memory (what a DataLoader worker sends to
                the main process without another copy).
            device: e.g. ``"cuda"``: receive into a pooled page-locked buffer and copy it to
                the device with a non-blocking copy on a side stream; the tensor is ready when
                the call returns. Without pinned memory (no CUDA, no extension) the same
                result through pageable memory.
            pin_memory: return a CPU tensor in page-locked memory (from the pool; it goes
                back when the tensor is freed); pageable where pinned memory is unavailable.
            non_blocking: with ``device="cuda"``, return before the copy to the device ends:
                the caller's current stream waits for it (an event), so kernels queued there
                see the data; the host does not wait. The pinned block goes back to the pool
                once the event has completed.
            compression: this call's wire compression (default: the client's).

        Raises:
            NotFound: no such matrix.
            InvalidArgument: bad key, or ``out`` does not match the matrix.
            Unavailable: the server is unreachable.
            InternalError: the stored data failed its checksum, or the server failed.
        """
        key = _key(index_id, matrix_type)
        kind, state = self._route()
        if kind == "same-host":
            # to a GPU or pinned: copied once from the mapping into a pooled pinned block
            to_pinned = (pin_memory or (device is not None and _is_cuda(device))) \
                and out is None and not shared
            try:
                result, copied = state.read(key, out, shared, _pinned_out if to_pinned else None)
            except NotFound:
                if not state.partial:
                    raise
                kind = "grpc"  # a memory store's matrix that came over the network
            else:
                self._count_get(copied)
                if device is not None:
                    result = _to_device(result, device, non_blocking)
                return result
        if kind == "ucx":
            to_cuda = device is not None and _is_cuda(device)
            direct = to_cuda and out is None and not shared and self._ucx_cuda
            try:
                result = self._get_ucx(state, key, out, shared, pin_memory or to_cuda,
                                       device if direct else None)
            except _UcxTransferError as e:
                if direct:  # CUDA memory as the receive buffer failed: pinned from now on
                    log.warning("torch_tq client %s: UCX into CUDA memory failed (%s); "
                                "receiving into pinned host memory", self.location, e)
                    self._ucx_cuda = False
                    return self.get(index_id, matrix_type, device=device,
                                    non_blocking=non_blocking, compression=compression)
                self._ucx_failed(e.__cause__ or e)
            else:
                if device is not None and not direct:
                    result = _to_device(result, device, non_blocking)
                return result
        return self._get_from(self._flight, key, out, shared, device, pin_memory, non_blocking,
                              self._compression(compression))

    def _get_from(self, conn, key: Key, out=None, shared=False, device=None, pin_memory=False,
                  non_blocking=False, compression=None):
        what = f"get {key}"
        try:
            ticket = flight.Ticket(protocol.read_command(key, compression))
            reader = conn.do_get(ticket, self._options())
            dtype, shape = codec.parse_wire_schema(reader.schema)
            snappy = codec.is_snappy(reader.schema)
            to_cuda = device is not None and _is_cuda(device)
            if (to_cuda or pin_memory) and out is None and not shared:
                out = _pinned_out(dtype, shape)
            assembler = codec.TensorAssembler(dtype, shape, out, shared)
            for chunk in codec.chunks(reader):
                column = chunk.data.column(0)
                assembler.add(codec.snappy_unpack(column, dtype) if snappy else column)
            result = assembler.finish()
            self._count_get(assembler.copied_bytes)
            if device is not None:
                result = _to_device(result, device, non_blocking)
            return result
        except TQError:
            raise
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None

    def _count_get(self, copied: int) -> None:
        with self._lock:
            self.stats["gets"] += 1
            self.stats["copied_bytes"] += copied
            if copied == 0:
                self.stats["zero_copy_gets"] += 1

    # ------------------------------------------------------------------ batches

    def put_many(
        self,
        items: Mapping[tuple[int, str], torch.Tensor] | Iterable[tuple[int, str, torch.Tensor]],
        *,
        concurrency: int = 4,
        batch_items: int = 100,
        small_bytes: int = 1 << 20,
    ) -> list[ItemResult]:
        """Stores many matrices; each item succeeds or fails on its own.

        Matrices of up to ``small_bytes`` travel together in BatchWrite calls of up to
        ``batch_items`` items; larger ones as a ``put`` does on this client's transport (a
        stream, a UCX transfer, or a same-host file). Up to ``concurrency`` calls run at
        once, each on a connection of this client's pool (reused by later batches).

        Args:
            items: ``{(index_id, matrix_type): tensor}`` or ``(index_id, matrix_type,
                tensor)`` triples.

        Returns:
            One :class:`ItemResult` per item, in order (``success``, ``code``, ``message``).
        """
        entries = _entries(items, 3, "(index_id, matrix_type, tensor)")
        results: list[ItemResult | None] = [None] * len(entries)
        small: list[list] = []
        held = 0
        tasks = []
        for i, item in enumerate(entries):
            try:
                if isinstance(item, BaseException):
                    raise item
                index_id, matrix_type, tensor = item
                key = _key(index_id, matrix_type)
                dtype, shape, flat = codec.tensor_values(tensor)
            except TQError as e:
                results[i] = _item_failure(item, e)
                continue
            if flat.nbytes > small_bytes:
                tasks.append(functools.partial(self._put_one_task, results, i, key, dtype, shape, flat))
                continue
            if not small or len(small[-1]) >= batch_items or held + flat.nbytes > _BATCH_BYTES:
                small.append([])
                held = 0
            small[-1].append((i, key, dtype, shape, flat))
            held += flat.nbytes
        for group in small:
            tasks.append(functools.partial(self._batch_write_task, results, group))
        self._run(tasks, concurrency)
        return results  # type: ignore[return-value]

    def get_many(
        self,
        items: Iterable[tuple[int, str]],
        *,
        concurrency: int = 4,
        batch_items: int = 100,
        max_inline_bytes: int | None = None,
    ) -> list[ItemResult]:
        """Reads many matrices; each item succeeds or fails on its own (a missing one gets
        ``success=False, code="NOT_FOUND"``, the others their tensors).

        On the same-host path each item is read from its file (no call). Otherwise items
        travel in BatchRead streams of up to ``batch_items`` items, spread over up to
        ``concurrency`` parallel streams on this client's pooled connections; a matrix too
        large to travel inline (over ``max_inline_bytes``, by default the server's 256 MiB,
        or 1 MiB on the UCX path) is read with its own stream, or its own UCX transfer.

        Returns:
            One :class:`ItemResult` per item, in order, with ``tensor`` set on success.
        """
        entries = _entries(items, 2, "(index_id, matrix_type)")
        results: list[ItemResult | None] = [None] * len(entries)
        valid = []
        for i, item in enumerate(entries):
            try:
                if isinstance(item, BaseException):
                    raise item
                valid.append((i, _key(*item)))
            except TQError as e:
                results[i] = _item_failure(item, e)
        kind, store = self._route() if valid else ("grpc", None)
        if kind == "same-host":  # each item straight from its file; no call at all
            remote = []
            for i, key in valid:
                try:
                    tensor, copied = store.read(key)
                except NotFound as e:
                    if store.partial:  # a memory store's matrix from the network
                        remote.append((i, key))
                        continue
                    results[i] = ItemResult(key.index_id, key.matrix_type, False, e.code,
                                            e.message)
                except TQError as e:
                    results[i] = ItemResult(key.index_id, key.matrix_type, False, e.code,
                                            e.message)
                else:
                    self._count_get(copied)
                    results[i] = ItemResult(key.index_id, key.matrix_type, True, "OK",
                                            "success", tensor)
            valid = remote
        if valid and kind == "ucx" and max_inline_bytes is None:
            # the bytes of what is not small go over UCX, one transfer per matrix
            max_inline_bytes = _UCX_INLINE_BYTES
        if valid:
            groups = max(math.ceil(len(valid) / batch_items), min(concurrency, len(valid)))
            size = math.ceil(len(valid) / groups)
            tasks = [
                functools.partial(self._batch_read_task, results, valid[g : g + size],
                                  max_inline_bytes)
                for g in range(0, len(valid), size)
            ]
            self._run(tasks, concurrency)
        return results  # type: ignore[return-value]

    def _run(self, tasks: list, concurrency: int) -> None:
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, got {concurrency}")
        if len(tasks) <= 1 or concurrency == 1:
            for task in tasks:
                task()
            return
        with ThreadPoolExecutor(min(concurrency, len(tasks)), "torch_tq-batch") as pool:
            for future in [pool.submit(task) for task in tasks]:
                future.result()

    def _retry(self, fn, *args):
        return _retrying(lambda _self: fn(*args))(self)

    def _put_one_task(self, results, i, key, dtype, shape, flat) -> None:
        try:
            with self._pooled() as conn:
                self._retry(self._put_routed, conn, key, dtype, shape, flat, self.compression)
            results[i] = ItemResult(key.index_id, key.matrix_type, True, "OK", "success")
        except TQError as e:
            results[i] = ItemResult(key.index_id, key.matrix_type, False, e.code, e.message)

    def _batch_write_task(self, results, group) -> None:
        try:
            with self._pooled() as conn:
                reply = self._retry(self._batch_write_to, conn, group)
        except TQError as e:
            for i, key, *_ in group:
                results[i] = ItemResult(key.index_id, key.matrix_type, False, e.code, e.message)
            return
        for (i, key, *_), r in zip(group, reply):
            results[i] = ItemResult(key.index_id, key.matrix_type, r["success"], r["code"],
                                    r["message"])

    def _batch_write_to(self, conn, group) -> list[dict]:
        table = batch_ops.write_batch_of(group)
        descriptor = flight.FlightDescriptor.for_command(protocol.dumps({"action": protocol.BATCH_WRITE}))
        what = f"BatchWrite of {len(group)} items"
        reply = self._upload(conn, descriptor, table.schema, [table], what, self.compression)
        if len(reply.get("results", ())) != len(group):
            raise InternalError(f"{what}: the server answered for {len(reply.get('results', ()))} items")
        return reply["results"]

    def _batch_read_task(self, results, group, max_inline_bytes) -> None:
        try:
            with self._pooled() as conn:
                rows = self._retry(self._batch_read_from, conn, group, max_inline_bytes)
                for (i, key), row in zip(group, rows):
                    if row.success and row.tensor is None:  # too large to travel inline
                        try:
                            t = self._retry(self._get_large, conn, key)
                            row = row._replace(tensor=t, message="success")
                        except TQError as e:
                            row = row._replace(success=False, code=e.code, message=e.message)
                    results[i] = row
        except TQError as e:
            for i, key in group:
                if results[i] is None:
                    results[i] = ItemResult(key.index_id, key.matrix_type, False, e.code, e.message)

    def _get_large(self, conn, key: Key):
        """A matrix a BatchRead left out: over UCX on that route, else its own stream."""
        kind, state = self._route()
        if kind == "ucx":
            try:
                return self._get_ucx(state, key, None, False)
            except _UcxTransferError as e:
                self._ucx_failed(e.__cause__ or e)
        return self._get_from(conn, key, compression=self.compression)

    def _batch_read_from(self, conn, group, max_inline_bytes=None) -> list[ItemResult]:
        keys = [key for _, key in group]
        what = f"BatchRead of {len(keys)} items"
        rows: list[ItemResult] = []
        try:
            pad = self._pad
            # batches compress with Arrow IPC's codecs (zstd, lz4); snappy frames single
            # matrices only, so a snappy client's batches travel uncompressed
            packed = self.compression if self.compression != "snappy" else None
            ticket = protocol.batch_read_command(keys, max_inline_bytes, packed, pad=pad)
            reader = conn.do_get(flight.Ticket(ticket), self._options())
            for chunk in codec.chunks(reader):
                if chunk.app_metadata is not None and chunk.data.num_rows == 1:
                    self._learn_pad(chunk.data, chunk.app_metadata.size - 1)
                rows.extend(self._result_rows(chunk.data))
        except TQError:
            raise
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None
        if len(rows) != len(keys):
            raise InternalError(f"{what}: the server answered for {len(rows)} items")
        return rows

    def _learn_pad(self, batch: pa.RecordBatch, pad: int) -> None:
        """Where gRPC put a lone item's bytes, given the padding the server put before them,
        tells the padding that puts them 8-byte aligned (constant for a process's gRPC)."""
        data = batch.column("data")
        if len(data) != 1 or data.buffers()[2] is None:
            return
        misaligned = data.buffers()[2].address % 8
        self._pad = (pad - misaligned) % 8

    def _result_rows(self, batch: pa.RecordBatch) -> Iterator[ItemResult]:
        cols = {name: batch.column(name) for name in batch.schema.names}
        data = cols["data"]
        offsets = np.frombuffer(data.buffers()[1], dtype=np.int64, count=len(data) + 1,
                                offset=data.offset * 8) if len(data) else None
        buf = data.buffers()[2] if len(data) else None
        for r in range(batch.num_rows):
            ok = cols["success"][r].as_py()
            index_id, mtype = cols["index_id"][r].as_py(), cols["matrix_type"][r].as_py()
            code, message = cols["code"][r].as_py(), cols["message"][r].as_py()
            tensor = None
            if ok and cols["inline"][r].as_py():
                dtype = codec.DTYPES[cols["dtype"][r].as_py()]
                shape = tuple(cols["shape"][r].as_py())
                start, end = int(offsets[r]), int(offsets[r + 1])
                if end - start != codec.numel(shape) * dtype.itemsize:
                    raise InternalError(f"BatchRead row for index_id={index_id} has the wrong size")
                tensor = _tensor_from(buf, start, dtype, shape)
                self._count_get(0 if tensor.untyped_storage().data_ptr() == buf.address + start
                                else end - start)
            yield ItemResult(index_id, mtype, ok, code, message, tensor)

    # ------------------------------------------------------------------ catalog

    def delete(self, index_id: int, matrix_type: str | None = None) -> list[str]:
        """Deletes one matrix, or every type of ``index_id`` when ``matrix_type`` is None.

        Returns:
            The matrix types deleted.

        Raises:
            NotFound: nothing to delete.
        """
        body: dict[str, Any] = {"index_id": protocol.validate_index_id(index_id)}
        if matrix_type is not None and matrix_type != "":
            body["matrix_type"] = protocol.validate_matrix_type(matrix_type)
        return self._action(protocol.DELETE_MATRIX, body, f"delete index_id={index_id}")["deleted"]

    def metadata(self, index_id: int) -> dict[str, Any]:
        """The seed's GetMetadata response: ``types``, ``dimensions``, ``created_at`` (ms), ...

        Raises:
            NotFound: no matrix is stored under ``index_id``.
        """
        body = {"index_id": protocol.validate_index_id(index_id)}
        return self._action(protocol.GET_METADATA, body, f"metadata index_id={index_id}")

    @_retrying
    def list(self, index_id: int | None = None) -> list[MatrixInfo]:
        """Every stored matrix (of ``index_id`` only, when given), sorted by key."""
        criteria = b""
        if index_id is not None:
            criteria = protocol.dumps({"index_id": protocol.validate_index_id(index_id)})
        try:
            infos = list(self._flight.list_flights(criteria, self._options()))
        except Exception as e:
            raise protocol.from_flight_error(e, "list") from None
        out = []
        for info in infos:
            key = protocol.parse_ticket(info.endpoints[0].ticket.ticket)
            dtype, shape = codec.parse_wire_schema(info.schema)
            out.append(MatrixInfo(key.index_id, key.matrix_type, shape, dtype.name, info.total_bytes))
        return out

    # ------------------------------------------------------------------ safetensors

    def export_safetensors(self, path, index_ids, types=None, *,
                           progress=None) -> dict[str, Any]:
        """Writes the matrices of ``index_ids`` (all types, or those in ``types``) to one
        ``.safetensors`` file, streaming: memory stays at a few record batches whatever the
        matrices' sizes. Tensors are named ``"<index_id>/<matrix_type>"``; the header's
        ``__metadata__["torch_tq"]`` holds index_id, type, created_at and updated_at of each.
        The file appears (renamed into place) only once complete.

        Args:
            path: the file to write (replaced if it exists).
            index_ids: one or more index_ids (an int, or an iterable of them).
            types: matrix types to export (default: all of each index_id).
            progress: called with each number of bytes written (e.g. a progress bar's
                ``update``).

        Returns:
            ``{"path", "matrices", "bytes", "keys"}``.

        Raises:
            NotFound: an index_id has nothing (of ``types``) to export.
            InternalError: a matrix changed shape or dtype during the export.
        """
        from torch_tq.client import safetensors_io

        ids = [index_ids] if isinstance(index_ids, int) else list(index_ids)
        return safetensors_io.export_safetensors(self, path, ids, types, progress)

    def import_safetensors(self, path, index_id: int | None = None, *,
                           progress=None) -> list[tuple[int, str]]:
        """Stores every tensor of a ``.safetensors`` file; returns their keys in file order.

        Keys come from the file's torch_tq metadata (a file :meth:`export_safetensors`
        wrote), else from tensor names ``"<index_id>/<type>"``, else the tensor names are
        the matrix types under ``index_id`` (a file ``safetensors.torch.save_file`` wrote).
        The whole header is checked before anything is stored; each tensor is put straight
        from a read-only mapping of the file.

        Raises:
            InvalidArgument: not a safetensors file, an unsupported dtype, or a tensor
                without a valid key (nothing is stored).
        """
        from torch_tq.client import safetensors_io

        return safetensors_io.import_safetensors(self, path, index_id, progress)

    def _stream_values(self, key: Key, dtype_name: str, shape) -> Iterator[memoryview]:
        """The raw element bytes of a matrix (bool: one byte each), record batch by record
        batch, over gRPC: nothing is assembled.

        Raises:
            InternalError: the matrix is no longer of ``dtype_name`` and ``shape``.
        """
        what = f"export {key}"
        self._flight  # noqa: B018 - the fork check and malloc tuning a connection gets
        # A connection of its own whose HTTP/2 window stays at 8 MiB: gRPC otherwise grows
        # it with the bandwidth-delay product and buffers ahead of a consumer that writes
        # to disk (~200 MiB for a 2 GiB export here), so memory would grow with the matrix.
        conn = flight.FlightClient(self.location, generic_options=[
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", _EXPORT_WINDOW)])
        with contextlib.closing(conn):
            try:
                ticket = flight.Ticket(protocol.read_command(key, None))
                reader = conn.do_get(ticket, self._options())
                dtype, now = codec.parse_wire_schema(reader.schema)
                if dtype.name != dtype_name or tuple(now) != tuple(shape):
                    raise InternalError(f"{what}: the matrix changed during the export "
                                        f"(now {dtype.name} {list(now)}); export again")
                for chunk in codec.chunks(reader):
                    yield codec.element_bytes(chunk.data.column(0))
            except TQError:
                raise
            except Exception as e:
                raise protocol.from_flight_error(e, what) from None

    # ------------------------------------------------------------------ consumer groups

    def consume(
        self,
        group: str,
        types: list[str] | None = None,
        *,
        max_items: int = 1,
        timeout: float = 0.0,
        lease: float = 60.0,
        ack: list[int] | tuple[int, ...] = (),
        delete: bool = False,
        rounds: Mapping[str, Any] | None = None,
    ) -> Lease:
        """Leases up to ``max_items`` index_ids that have every type of ``types`` and that
        ``group`` has not consumed, waiting up to ``timeout`` seconds (at most 60) for one.

        An index_id not acknowledged (:meth:`ack`) within ``lease`` seconds is handed out
        again. ``types`` is required when the group is new and must match afterwards.
        ``ack`` acknowledges earlier index_ids in the same round trip.

        With ``rounds`` (``{"rank": r, "world_size": w, "dp_rank": d, "dp_size": s,
        "share": b, "unit": "matrix"|"sample", "group_by": n, "balance_by": type}``, all but
        rank and world_size optional) the server deals the group in rounds that give every
        data-parallel rank a share of the same weight (see :mod:`torch_tq.store.rounds`): the
        lease is this rank's next share, ``max_items`` does not apply, and once no further
        round can be filled the lease is empty and drained, with ``left`` the ready
        index_ids that stay in the group.

        Returns:
            A :class:`Lease`; empty with ``drained=True`` once producers have finished
            every type (:meth:`finish`) and nothing is ready, and ``finished=True`` too once
            nothing is leased either.

        Raises:
            NotFound: an unknown group and no ``types``.
            InvalidArgument: ``types`` differ from the group's.
        """
        body: dict[str, Any] = {
            "group": group,
            "max_items": max_items,
            "timeout_ms": int(round(timeout * 1000)),
            "lease_ms": int(round(lease * 1000)),
        }
        if types is not None:
            body["types"] = list(types)
        if ack:
            body["ack"] = list(ack)
            body["delete"] = delete
        if rounds is not None:
            body["rounds"] = dict(rounds)
        reply = self._action(protocol.CONSUME, body, f"consume group={group}", wait=timeout)
        return Lease(reply["items"], reply["lease"], reply["lease_expires_at"], reply["finished"],
                     reply["drained"], reply.get("round"), reply.get("left"))

    def ack(self, group: str, index_ids: list[int], *, delete: bool = False,
            rank: int | None = None) -> dict[str, Any]:
        """Consumes ``index_ids`` for ``group`` for good; with ``delete``, also deletes every
        matrix of them (for the last stage of a pipeline). ``rank``: the acknowledging rank,
        for index_ids dealt in rounds to a dp rank of several members (consumed once each
        member has acknowledged them).

        Returns:
            ``acked`` (newly), ``already`` (before), ``unknown`` (never handed to the group:
            nothing changed for them), ``deleted`` (matrices), and ``waiting`` (acknowledged
            by this rank, not yet by every member of its dp rank) when there are such.
        """
        body: dict[str, Any] = {"group": group, "index_ids": list(index_ids), "delete": delete}
        if rank is not None:
            body["rank"] = rank
        return self._action(protocol.ACK, body, f"ack group={group}")

    def renew(self, group: str, index_ids: list[int], lease: float = 60.0, *,
              dp_rank: int | None = None) -> list[int]:
        """Extends the leases of ``index_ids`` to ``lease`` seconds from now (a heartbeat for
        what a consumer still holds); returns those that were leased. With ``dp_rank``, the
        shares dealt to that data-parallel rank and not yet taken are kept too."""
        body: dict[str, Any] = {"group": group, "index_ids": list(index_ids),
                                "lease_ms": int(round(lease * 1000))}
        if dp_rank is not None:
            body["dp_rank"] = dp_rank
        return self._action(protocol.RENEW, body, f"renew group={group}")["renewed"]

    def release(self, group: str, index_ids: list[int]) -> list[int]:
        """Hands leased ``index_ids`` back at once; returns those that were leased."""
        body = {"group": group, "index_ids": list(index_ids)}
        return self._action(protocol.RELEASE, body, f"release group={group}")["released"]

    def finish(self, types: list[str]) -> list[str]:
        """Marks ``types`` finished: no more of them will be written. Returns every finished
        type."""
        body = {"types": list(types)}
        return self._action(protocol.FINISH_STREAM, body, "finish")["finished_types"]

    def reopen(self, types: list[str]) -> list[str]:
        """Clears the finished mark of ``types`` (a new round of production)."""
        body = {"types": list(types)}
        return self._action(protocol.REOPEN_STREAM, body, "reopen")["finished_types"]

    def group_status(self, group: str) -> dict[str, Any]:
        """``ready``, ``leased``, ``consumed``, ``incomplete`` counts and ``finished``."""
        return self._action(protocol.GROUP_STATUS, {"group": group}, f"status group={group}")

    def delete_group(self, group: str) -> None:
        """Forgets ``group`` and what it consumed."""
        self._action(protocol.DELETE_GROUP, {"group": group}, f"delete group={group}")

    def server_stats(self) -> dict[str, Any]:
        """The server's Stats action: Health plus ``calls`` per method, ``errors`` per code,
        ``bytes_in``/``bytes_out``, ``active_calls`` and ``peak_active_calls``."""
        return self._action(protocol.STATS, {}, "stats")

    def health(self) -> dict[str, Any]:
        """The server's Health action: status, matrices and bytes stored, version."""
        return self._action(protocol.HEALTH, {}, "health")


_BATCH_BYTES = 16 << 20  # bytes of small matrices per BatchWrite call



def _entries(items, arity: int, form: str) -> list:
    """The items of a batch call as a list; a malformed one becomes its own error."""
    if isinstance(items, Mapping):
        if arity == 3:
            items = [(*k, v) if isinstance(k, tuple) else (k, v) for k, v in items.items()]
        else:
            items = list(items)
    out = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == arity:
            out.append(tuple(item))
        else:
            out.append(InvalidArgument(f"each item must be {form}, got {type(item).__name__}"))
    return out


def _item_failure(item, error: TQError) -> ItemResult:
    index_id = matrix_type = None
    if isinstance(item, tuple):
        index_id, matrix_type = item[0], item[1]
    return ItemResult(index_id, matrix_type, False, error.code, error.message)


def _tensor_from(buf: pa.Buffer, start: int, dtype: codec.DType, shape: tuple[int, ...]):
    """A tensor over ``buf[start:]`` (no copy when aligned), else a copy of it."""
    import torch

    nbytes = codec.numel(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype.torch)
    if (buf.address + start) % dtype.itemsize == 0:
        return native.tensor_over(buf, dtype.torch, shape, start)
    out = codec.empty_tensor(dtype, shape)
    codec._byte_view(out)[:] = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
    return out


def _is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def _pinned_out(dtype: codec.DType, shape: tuple[int, ...]):
    """A tensor over a pooled pinned block for the result, or None (no pinned memory here,
    or larger than one block may be)."""
    from torch_tq import pinned

    pool = pinned.default_pool()
    nbytes = codec.numel(shape) * dtype.itemsize
    if pool is None or nbytes == 0 or nbytes > pinned.MAX_BLOCK_BYTES:
        return None
    return pool.acquire(nbytes).tensor(dtype.torch, shape)


_streams: dict = {}
_in_flight: list = []  # (event, pinned source) of non-blocking copies not known to be done
_in_flight_lock = threading.Lock()


def _to_device(t, device, non_blocking: bool = False):
    """Copies ``t`` to ``device``. From pinned memory the copy is non-blocking on a side
    stream; then either the host waits for that stream (the result is ready on return and
    ``t``'s block goes back to the pool), or, with ``non_blocking``, the caller's current
    stream waits for it through an event and ``t`` is kept until the event completes."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not t.is_pinned():
        return t.to(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _streams.get(device)
    if stream is None:
        stream = _streams.setdefault(device, torch.cuda.Stream(device=device))
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        moved = t.to(device, non_blocking=True)
    # the memory was allocated on the side stream: tell the allocator the caller's stream
    # uses it too, so it is not handed out again while the caller's kernels read it
    moved.record_stream(current)
    if not non_blocking:
        stream.synchronize()
        return moved
    done = stream.record_event()
    current.wait_event(done)
    with _in_flight_lock:
        # drop the sources of copies that have finished (their blocks return to the pool)
        _in_flight[:] = [(e, src) for e, src in _in_flight if not e.query()]
        _in_flight.append((done, t))
    return moved


def _rebuild(location, timeout: float | None, chunk_bytes: int, checksum: bool,
             client_id: str | None = None, retry_deadline: float = 30.0,
             compression: str | None = None, transport: str = "auto",
             connect_timeout: float | None = None) -> Client:
    return Client(location, timeout=timeout, chunk_bytes=chunk_bytes, checksum=checksum,
                  client_id=client_id, retry_deadline=retry_deadline, compression=compression,
                  transport=transport, connect_timeout=connect_timeout)


_TRANSPORTS = ("auto", "grpc", "ucx", "same-host")
# Up to this size a UCX client's matrix travels with the gRPC call itself: a control round
# trip plus a UCX transfer costs more than one gRPC round trip below ~1.5 MiB here
# (torch_tq.tools.bench: a 1 MiB get 1.3 ms over gRPC, 2.0 ms over UCX; 2 MiB: 2.4 vs 1.7 ms).
_UCX_INLINE_BYTES = 1 << 20
# Up to this size a put into a disk store on this host goes over gRPC, not through a file.
_LOCAL_SMALL_BYTES = 64 << 10
_EXPORT_WINDOW = 8 << 20  # bytes gRPC may buffer ahead of an export's writes


class _UcxTransferError(Exception):
    """The UCX data plane failed (not the server's answer): retry over gRPC."""


def _split_locations(location) -> tuple[str, list[str]]:
    """``"grpc://h:p"`` or a list of gRPC and ``ucx://``/``rdma://`` locations -> (the gRPC
    control location, the UCX locations)."""
    if isinstance(location, str):
        location = [location]
    if not isinstance(location, (list, tuple)) or not location:
        raise InvalidArgument(f"location must be a string or a list of them, got {location!r}")
    grpc_locs, ucx_locs = [], []
    for loc in location:
        if isinstance(loc, str) and loc.split("://", 1)[0] in ("ucx", "rdma") and "://" in loc:
            ucx_locs.append("ucx://" + loc.split("://", 1)[1])
        else:
            grpc_locs.append(normalize_location(loc))
    if len(grpc_locs) > 1:
        raise InvalidArgument(f"more than one gRPC location: {grpc_locs}")
    if not grpc_locs:  # only UCX named: the control plane is on the same host, default port
        host = ucx_locs[0].split("://", 1)[1].rsplit(":", 1)[0]
        grpc_locs.append(normalize_location(f"{host}:{DEFAULT_PORT}"))
    return grpc_locs[0], ucx_locs
