"""``torch_tq.Client``: put and get torch tensors on a storage server.

One Flight connection per client and process, reused for every call; the connection is
rebuilt lazily after a ``fork()`` (a Flight client must not cross one) and when the client
is unpickled (it pickles as its recipe: location and settings).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, NamedTuple

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.flight as flight
import xxhash

from torch_tq import codec, protocol
from torch_tq._config import DEFAULT_CHUNK_BYTES, DEFAULT_PORT, DEFAULT_TIMEOUT_S, parse_size, resolve
from torch_tq._fork import check_fork_safe, note_grpc_use
from torch_tq.errors import InternalError, InvalidArgument, TQError
from torch_tq.protocol import Key

if TYPE_CHECKING:
    import torch


class Lease(NamedTuple):
    """What :meth:`Client.consume` handed out."""

    index_ids: list[int]
    lease: str | None
    expires_at: int | None  # ms since the epoch
    finished: bool  # the group's types are finished and nothing is left for it
    drained: bool  # the types are finished and nothing is ready (others may hold leases)


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


def _key(index_id: Any, matrix_type: Any) -> Key:
    return Key(protocol.validate_index_id(index_id), protocol.validate_matrix_type(matrix_type))


class Client:
    """A connection to one torch_tq storage server.

    Args:
        location: ``grpc://HOST:PORT`` (or ``HOST:PORT``); default ``TORCH_TQ_LOCATION`` or
            ``grpc://127.0.0.1:8080``.
        timeout: seconds each call may take (``None``: no limit); default 60.
        chunk_bytes: record batch size for uploads (default 4MiB).
        checksum: send an XXH3-64 digest with each upload, checked by the server before it
            publishes (end-to-end integrity at the cost of one more pass over the data).

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
    ) -> None:
        self.location = normalize_location(
            resolve(location, "LOCATION", f"grpc://127.0.0.1:{DEFAULT_PORT}")
        )
        self.timeout = timeout
        self.chunk_bytes = parse_size(resolve(chunk_bytes, "CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
        self.checksum = checksum
        self._lock = threading.Lock()
        self._conn: flight.FlightClient | None = None
        self._pid = -1
        # What gets cost, for tuning and tests: calls, those that made no copy, bytes copied
        # out of received buffers (one copy at most per byte; none for a one-buffer matrix).
        self.stats = {"gets": 0, "zero_copy_gets": 0, "copied_bytes": 0}

    # ------------------------------------------------------------------ plumbing

    def __reduce__(self):
        return (_rebuild, (self.location, self.timeout, self.chunk_bytes, self.checksum))

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
                    self._conn = flight.FlightClient(self.location)
                    self._pid = pid
        return self._conn

    def _options(self) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(timeout=self.timeout)

    def close(self) -> None:
        """Closes the connection (a later call opens a new one)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _action(
        self, name: str, body: dict[str, Any], what: str, wait: float = 0.0
    ) -> dict[str, Any]:
        options = self._options()
        if wait and self.timeout is not None:
            options = flight.FlightCallOptions(timeout=self.timeout + wait)
        try:
            results = list(
                self._flight.do_action(flight.Action(name, protocol.dumps(body)), options)
            )
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None
        if len(results) != 1:
            raise InternalError(f"{what}: expected one result, got {len(results)}")
        return json.loads(results[0].body.to_pybytes())

    # ------------------------------------------------------------------ data

    def put(self, index_id: int, matrix_type: str, tensor: torch.Tensor) -> None:
        """Stores ``tensor`` under ``(index_id, matrix_type)``, replacing any previous value.

        Returns once the server has durably published the matrix (the write is atomic:
        readers see the old value or the new one, never a mix).

        Args:
            index_id: an integer in ``[0, 2**64 - 1]``.
            matrix_type: a name such as ``prompt`` (case-insensitive).
            tensor: any shape (0-d included), dtype bool, (u)int8, int16/32/64,
                float16, bfloat16, float32 or float64; any device and layout.

        Raises:
            InvalidArgument: bad key, dtype, or a matrix over the server's size limit.
            Unavailable: the server is unreachable or out of space.
            InternalError: the server failed.
        """
        key = _key(index_id, matrix_type)
        dtype, shape, flat = codec.tensor_values(tensor)
        nbytes = flat.nbytes
        digest = None
        if self.checksum:
            digest = xxhash.xxh3_64_hexdigest(memoryview(flat.view("uint8")))
        command = protocol.write_command(key, shape, dtype.name, nbytes, digest)
        schema = codec.wire_schema(dtype, shape)
        what = f"put {key}"
        try:
            writer, acks = self._flight.do_put(
                flight.FlightDescriptor.for_command(command), schema, self._options()
            )
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None
        ack = None
        try:
            try:
                for arr in codec.values_to_arrays(dtype, flat, self.chunk_bytes):
                    writer.write_batch(pa.RecordBatch.from_arrays([arr], schema=schema))
                writer.done_writing()
                ack = acks.read()
            finally:
                # close() reports the server's status when the call failed.
                writer.close()
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None
        if ack is None:
            raise InternalError(f"{what}: the server closed the upload without acknowledging it")
        reply = json.loads(ack.to_pybytes())
        if not reply.get("success"):
            raise InternalError(f"{what}: {reply.get('message', 'not acknowledged')}")

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

        Raises:
            NotFound: no such matrix.
            InvalidArgument: bad key, or ``out`` does not match the matrix.
            Unavailable: the server is unreachable.
            InternalError: the stored data failed its checksum, or the server failed.
        """
        key = _key(index_id, matrix_type)
        what = f"get {key}"
        try:
            reader = self._flight.do_get(flight.Ticket(protocol.read_command(key)), self._options())
            dtype, shape = codec.parse_wire_schema(reader.schema)
            to_cuda = device is not None and _is_cuda(device)
            if (to_cuda or pin_memory) and out is None and not shared:
                out = _pinned_out(dtype, shape)
            assembler = codec.TensorAssembler(dtype, shape, out, shared)
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                if chunk.data is not None:
                    assembler.add(chunk.data.column(0))
            result = assembler.finish()
            self.stats["gets"] += 1
            self.stats["copied_bytes"] += assembler.copied_bytes
            if assembler.copied_bytes == 0:
                self.stats["zero_copy_gets"] += 1
            if device is not None:
                result = _to_device(result, device, non_blocking)
            return result
        except TQError:
            raise
        except Exception as e:
            raise protocol.from_flight_error(e, what) from None

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
    ) -> Lease:
        """Leases up to ``max_items`` index_ids that have every type of ``types`` and that
        ``group`` has not consumed, waiting up to ``timeout`` seconds (at most 60) for one.

        An index_id not acknowledged (:meth:`ack`) within ``lease`` seconds is handed out
        again. ``types`` is required when the group is new and must match afterwards.
        ``ack`` acknowledges earlier index_ids in the same round trip.

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
        reply = self._action(protocol.CONSUME, body, f"consume group={group}", wait=timeout)
        return Lease(reply["items"], reply["lease"], reply["lease_expires_at"], reply["finished"],
                     reply["drained"])

    def ack(self, group: str, index_ids: list[int], *, delete: bool = False) -> dict[str, Any]:
        """Consumes ``index_ids`` for ``group`` for good; with ``delete``, also deletes every
        matrix of them (for the last stage of a pipeline).

        Returns:
            ``acked`` (newly), ``already`` (before), ``unknown`` (never handed to the group:
            nothing changed for them) and ``deleted`` (matrices).
        """
        body = {"group": group, "index_ids": list(index_ids), "delete": delete}
        return self._action(protocol.ACK, body, f"ack group={group}")

    def renew(self, group: str, index_ids: list[int], lease: float = 60.0) -> list[int]:
        """Extends the leases of ``index_ids`` to ``lease`` seconds from now (a heartbeat for
        what a consumer still holds); returns those that were leased."""
        body = {"group": group, "index_ids": list(index_ids), "lease_ms": int(round(lease * 1000))}
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


def _rebuild(location: str, timeout: float | None, chunk_bytes: int, checksum: bool) -> Client:
    return Client(location, timeout=timeout, chunk_bytes=chunk_bytes, checksum=checksum)
