"""The Flight storage server and the ways to run it.

:class:`TQFlightServer` maps the seed's Flight methods onto the :mod:`~torch_tq.store.engine`:
DoPut (WriteMatrix), DoGet (ReadMatrix ticket), GetFlightInfo, GetSchema, ListFlights,
DoAction (DeleteMatrix, GetMetadata, Health) and ListActions.

Every handler runs inside :func:`_guard`: torch_tq errors leave as Flight statuses that carry
the seed code and message; anything unexpected is logged here with its traceback and leaves
as a bare ``INTERNAL_ERROR`` with a reference number. ``serve()`` sets
``sys.tracebacklimit = 0`` so that even the Arrow status built from our NOT_FOUND and
INVALID_ARGUMENT exceptions holds no traceback (RELIABILITY.md §4).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from torch_tq.server import batch as batch_ops

from torch_tq.codec import tensors as codec

from torch_tq.transport import same_host as local

from torch_tq.protocol import commands as protocol

from torch_tq.transport import ucx
from torch_tq._config import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_HOST,
    DEFAULT_MAX_MATRIX_BYTES,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_GRACE_S,
    DEFAULT_STAGING_TIMEOUT_S,
    parse_bool,
    parse_size,
    resolve,
)
from torch_tq._version import __version__
from torch_tq.errors import InvalidArgument, TQError, Unavailable
from torch_tq._fork import check_fork_safe, note_grpc_use
from torch_tq._malloc import give_back_memory, tune_malloc
from torch_tq.server.errors import internal_error
from torch_tq.server.launch import ALLOCATOR_ENV, allocator_for
from torch_tq.server.limits import Limiter, Limits, client_identity, limits_from, peer_host
from torch_tq.store.groups import Queue
from torch_tq.store.backends import first_line
from torch_tq.store.engine import Entry, Store
from torch_tq.server.ucx_probe import AddressProbe

log = logging.getLogger(__name__)


def _wire(e: BaseException, where: str) -> Exception:
    if isinstance(e, TQError):
        return protocol.to_wire_error(e)
    if isinstance(e, (flight.FlightError, *protocol.WIRE_ERRORS)):
        # pyarrow's own Flight errors (e.g. a cancelled call) carry no traceback.
        return e
    return protocol.to_wire_error(internal_error(e, where, log))


class ServerStats:
    """What a server has done, for the ``Stats`` action: calls per method, failures per
    error code, bytes in and out, handlers running now (and the most at once).

    What it cannot see: connections as such (gRPC accepts them below Python), and the part
    of a memory-store DoGet that Arrow streams in C++ after the handler returned (its bytes
    are counted when the stream is handed over)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.active = 0
        self.peak_active = 0

    def begin(self, method: str) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def end(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.active -= 1
        if error is not None:
            self.error(error)

    def error(self, error: BaseException) -> None:
        code = error.code if isinstance(error, TQError) else "INTERNAL_ERROR"
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def add_bytes(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.bytes_in += received
            self.bytes_out += sent

    def count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "calls": dict(sorted(self.calls.items())),
                "errors": dict(sorted(self.errors.items())),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "active_calls": self.active,
                "peak_active_calls": self.peak_active,
            }


class _CallMiddleware(flight.ServerMiddleware):
    """Per call: who the caller is and whether the limiter admitted it; tells the limiter
    when the call has completed (also after a cancelled or broken stream)."""

    def __init__(self, limiter: Limiter, headers: dict) -> None:
        self.limiter = limiter
        self.headers = headers
        self.client: str | None = None
        self.host = ""

    def call_completed(self, exception) -> None:
        if self.client is not None:
            self.limiter.release(self.client, self.host)
            self.client = None


class _CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def start_call(self, info, headers):
        return _CallMiddleware(self.limiter, headers)


_MIDDLEWARE = "torch_tq"
_TRIM_AFTER_BYTES = 64 << 20  # freed since the last trim


_UCX_ACTIONS = {"ucxget", "ucx_get", "ucxput", "ucx_put"}


def _admit(server, context, method: str, args) -> None:
    mw = context.get_middleware(_MIDDLEWARE)
    if mw is None:  # no middleware: nothing could release the call, so nothing is admitted
        return
    peer = context.peer()
    client = client_identity(mw.headers, peer)
    host = peer_host(peer or "")
    # a transfer over UCX draws on the client's UCX quota (the seed's 10,000/s)
    ucx_call = method == "do_action" and args and args[0].type.lower() in _UCX_ACTIONS
    try:
        server.limiter.admit(client, ucx=bool(ucx_call), host=host)
    except Unavailable:
        if ucx_call and args[0].type.lower() in ("ucxput", "ucx_put"):
            server.drain_refused_ucx_put(args[0].body)
        raise
    mw.client, mw.host = client, host


def _caller(context) -> str | None:
    mw = context.get_middleware(_MIDDLEWARE)
    return mw.client if mw is not None else None


def _guard(method):
    """Runs a handler so that only clean Flight errors reach the client; counts it and
    admits it against the limits first."""

    @functools.wraps(method)
    def wrapper(self, context, *args, **kwargs):
        self.stats.begin(method.__name__)
        error = None
        try:
            _admit(self, context, method.__name__, args)
            return method(self, context, *args, **kwargs)
        except Exception as e:
            error = e
            raise _wire(e, method.__name__) from None
        finally:
            self.stats.end(error)

    return wrapper


def _sliced(batches: Iterator[pa.RecordBatch], chunk_bytes: int) -> Iterator[pa.RecordBatch]:
    """Stored batches as Flight messages of at most about ``chunk_bytes`` (zero-copy slices):
    files staged by same-host clients hold batches of up to 2**31 elements, which gRPC
    could not carry as one message."""
    for batch in batches:
        width = max(1, batch.column(0).type.bit_width // 8)
        step = max(64, (chunk_bytes // width) // 64 * 64)
        if batch.num_rows <= step:
            yield batch
            continue
        for start in range(0, batch.num_rows, step):
            yield batch.slice(start, step)


def _log_ucx_failure(future, rt, peers: list[bytes], what: str) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        rt.forget(peers)
        log.warning("%s: UCX send failed (%s); the client falls back to gRPC",
                    what, type(error).__name__)


def _guard_iter(it: Iterator, where: str, stats: ServerStats | None = None) -> Iterator:
    try:
        for item in it:  # a RecordBatch, or (RecordBatch, app_metadata)
            if stats is not None:
                stats.add_bytes(sent=(item[0] if isinstance(item, tuple) else item).nbytes)
            yield item
    except Exception as e:
        if stats is not None:
            stats.error(e)
        raise _wire(e, where) from None


_ACTIONS = {
    "deletematrix": protocol.DELETE_MATRIX,
    "delete_matrix": protocol.DELETE_MATRIX,
    "getmetadata": protocol.GET_METADATA,
    "get_metadata": protocol.GET_METADATA,
    "health": protocol.HEALTH,
    "stats": protocol.STATS,
    "ucxinfo": protocol.UCX_INFO,
    "ucx_info": protocol.UCX_INFO,
    "ucxget": protocol.UCX_GET,
    "ucx_get": protocol.UCX_GET,
    "ucxput": protocol.UCX_PUT,
    "ucx_put": protocol.UCX_PUT,
    "localinfo": protocol.LOCAL_INFO,
    "local_info": protocol.LOCAL_INFO,
    "publishlocal": protocol.PUBLISH_LOCAL,
    "publish_local": protocol.PUBLISH_LOCAL,
    "batchread": protocol.BATCH_READ,
    "batch_read": protocol.BATCH_READ,
    "batchwrite": protocol.BATCH_WRITE,
    "batch_write": protocol.BATCH_WRITE,
}
_QUEUE_ACTIONS = {
    protocol.CONSUME: lambda q, a: q.consume(
        a["group"], a.get("types"), a["max_items"], a["wait_s"], a["lease_s"],
        a.get("ack", []), a.get("delete", False), a.get("rounds")),
    protocol.ACK: lambda q, a: q.ack(a["group"], a["index_ids"], a.get("delete", False),
                                     a.get("rank")),
    protocol.RELEASE: lambda q, a: q.release(a["group"], a["index_ids"]),
    protocol.RENEW: lambda q, a: q.renew(a["group"], a["index_ids"], a["lease_s"],
                                         a.get("dp_rank")),
    protocol.FINISH_STREAM: lambda q, a: q.finish(a["types"], True),
    protocol.REOPEN_STREAM: lambda q, a: q.finish(a["types"], False),
    protocol.GROUP_STATUS: lambda q, a: q.status(a["group"]),
    protocol.DELETE_GROUP: lambda q, a: q.delete_group(a["group"]),
}
for _name in _QUEUE_ACTIONS:
    _ACTIONS[_name.lower()] = _name
    _ACTIONS["".join("_" + c.lower() if c.isupper() else c for c in _name).lstrip("_")] = _name



class TQFlightServer(flight.FlightServerBase):
    """A torch_tq storage server on one gRPC location.

    Args:
        location: ``grpc://HOST:PORT`` (port 0 picks a free one; see :attr:`port`).
        store: the storage engine it serves.
    """

    def __init__(self, location: str, store: Store, limits: Limits | None = None,
                 ucx_enabled: bool = True, same_host: bool = True, **kwargs) -> None:
        self.store = store
        self.ucx_enabled = ucx_enabled
        self.ucx_probe = AddressProbe()  # its process starts with the first UCX client
        self.started = time.monotonic()
        self.stats = ServerStats()
        self.limits = limits or Limits()
        self.limiter = Limiter(self.limits)
        kwargs.setdefault("middleware", {})[_MIDDLEWARE] = _CallMiddlewareFactory(self.limiter)
        state_dir = None
        if store.storage == "disk":
            state_dir = os.path.join(store.backend.root, "queue")
        self.queue = Queue(store, state_dir, durable=store.backend.durable)
        self.host_id = local.host_id()
        self.local_root = None
        if same_host:
            self.local_root = (store.backend.root if store.storage == "disk"
                               else getattr(store.backend, "shared_root", None))
        self.probe = local.prepare_server_dir(self.local_root) if self.local_root else None
        self._stopping = threading.Event()
        check_fork_safe()
        note_grpc_use()
        super().__init__(location, **kwargs)  # serves from here on
        threading.Thread(target=self._housekeeping, daemon=True,
                         name="torch_tq-housekeeping").start()

    # ------------------------------------------------------------------ DoPut

    @_guard
    def do_put(self, context, descriptor, reader, writer):
        cmd = protocol.parse_put_request(descriptor)
        if isinstance(cmd, protocol.BatchWriteCommand):
            return self._batch_write(context, reader, writer)
        decoder = codec.UploadDecoder(reader.schema, cmd.dtype, cmd.shape)
        dtype = decoder.dtype
        shape = decoder.declared_shape
        expected = codec.numel(shape) if shape is not None else None
        if cmd.nbytes is not None:
            if cmd.nbytes % dtype.itemsize:
                raise InvalidArgument(
                    f"nbytes {cmd.nbytes} is not a multiple of the {dtype.name} item size"
                )
            by_bytes = cmd.nbytes // dtype.itemsize
            if expected is not None and by_bytes != expected:
                raise InvalidArgument(
                    f"nbytes {cmd.nbytes} contradicts shape {list(shape)} of {dtype.name}"
                )
            expected = by_bytes
        declared = expected is not None
        session = self.store.begin_put(cmd.key, dtype, expected, cmd.xxh3)
        try:
            batches = 0
            for chunk in codec.chunks(reader):
                batch = chunk.data
                batches += 1
                if not declared and batches > 1:
                    raise InvalidArgument(
                        f"upload of {cmd.key} sent more than one record batch without declaring "
                        "its size: add 'shape' (or 'nbytes') to the command"
                    )
                self.stats.add_bytes(received=batch.nbytes)
                session.append(decoder.flatten(batch.column(0)))
            if context.is_cancelled():
                raise Unavailable(f"upload of {cmd.key} was cancelled by the client")
            if not declared and batches == 0:
                raise InvalidArgument(
                    f"upload of {cmd.key} carried no record batch: send the matrix as one "
                    "batch or declare its 'shape'"
                )
            if shape is None:  # nothing declared, or only 'nbytes': the form tells
                shape = decoder.shape_for(session.count)
            entry = session.commit(shape)
        finally:
            session.abort()  # no-op after a commit
        ack = {"success": True, "message": "success", "index_id": entry.key.index_id,
               "matrix_type": entry.key.matrix_type, **entry.describe()}
        writer.write(pa.py_buffer(protocol.dumps(ack)))

    def _batch_write(self, context, reader, writer) -> None:
        lim = self.limits
        batches = []
        rows = held = 0
        for chunk in codec.chunks(reader):
            rows += chunk.data.num_rows
            held += chunk.data.nbytes
            self.stats.add_bytes(received=chunk.data.nbytes)
            if lim.max_batch_items and rows > lim.max_batch_items:
                self.limiter.count_rejection("batch_items")
                raise InvalidArgument(
                    f"BatchWrite of more than {lim.max_batch_items} items; the limit is "
                    f"{lim.max_batch_items} per call (split the batch): nothing was stored"
                )
            if lim.max_batch_bytes and held > lim.max_batch_bytes:
                self.limiter.count_rejection("batch_bytes")
                raise InvalidArgument(
                    f"BatchWrite of more than {lim.max_batch_bytes} bytes; the limit is "
                    f"{lim.max_batch_bytes} per call (send large matrices with WriteMatrix): "
                    "nothing was stored"
                )
            batches.append(chunk.data)
        if context.is_cancelled():
            raise Unavailable("BatchWrite was cancelled by the client: nothing was stored")
        client = _caller(context)
        if client is not None:
            self.limiter.charge(client, rows - 1)
        results = batch_ops.write_items(self.store, batches, reader.schema)
        reply = {"success": True, "message": "success", "results": results}
        writer.write(pa.py_buffer(protocol.dumps(reply)))

    # ------------------------------------------------------------------ reads

    @_guard
    def do_get(self, context, ticket):
        request = protocol.parse_get_ticket(ticket.ticket, self.limits.max_batch_items)
        if isinstance(request, protocol.BatchReadCommand):
            client = _caller(context)
            if client is not None:
                self.limiter.charge(client, len(request.items) - 1)
            if request.compression == "snappy":
                raise InvalidArgument("BatchRead supports zstd or lz4 compression (snappy is "
                                      "framed for ReadMatrix streams only)")
            return flight.GeneratorStream(
                batch_ops.RESULT_SCHEMA,
                _guard_iter(batch_ops.read_items(self.store, request, self.store.chunk_bytes),
                            "BatchRead", self.stats),
                options=codec.ipc_options(request.compression),
            )
        key = request.key
        options = codec.ipc_options(request.compression)
        matrix = self.store.open(key)
        if not matrix.verifies and request.compression != "snappy":
            # nothing to check batch by batch: let Arrow stream the table in C++
            table = matrix.table()
            self.stats.add_bytes(sent=table.nbytes)
            return flight.RecordBatchStream(table, options=options)
        try:
            schema = matrix.schema()
        except BaseException:
            matrix.close()
            raise
        batches = _sliced(matrix.batches(), self.store.chunk_bytes)
        if request.compression == "snappy":
            schema = codec.snappy_schema(matrix.dtype, matrix.entry.shape)
            batches = (pa.RecordBatch.from_arrays([codec.snappy_pack(b.column(0))], schema=schema)
                       for b in batches)
        return flight.GeneratorStream(schema, _guard_iter(batches, "do_get", self.stats),
                                      options=options)

    def _flight_info(self, entry: Entry, descriptor=None) -> flight.FlightInfo:
        command = protocol.read_command(entry.key)
        schema = codec.wire_schema(codec.DTYPES[entry.dtype], entry.shape)
        return flight.FlightInfo(
            schema,
            descriptor or flight.FlightDescriptor.for_command(command),
            [flight.FlightEndpoint(command, [])],
            codec.numel(entry.shape),
            entry.nbytes,
        )

    @_guard
    def get_flight_info(self, context, descriptor):
        if descriptor.descriptor_type == flight.DescriptorType.CMD:
            request = protocol.parse_get_ticket(descriptor.command, self.limits.max_batch_items)
            if isinstance(request, protocol.BatchReadCommand):
                return flight.FlightInfo(
                    batch_ops.RESULT_SCHEMA, descriptor,
                    [flight.FlightEndpoint(descriptor.command, [])], len(request.items), -1,
                )
        key = protocol.parse_read_descriptor(descriptor)
        return self._flight_info(self.store.get(key), descriptor)

    @_guard
    def get_schema(self, context, descriptor):
        key = protocol.parse_read_descriptor(descriptor)
        entry = self.store.get(key)
        return flight.SchemaResult(codec.wire_schema(codec.DTYPES[entry.dtype], entry.shape))

    @_guard
    def list_flights(self, context, criteria):
        index_id = protocol.parse_list_criteria(criteria)
        entries = sorted(self.store.entries(index_id), key=lambda e: e.key)
        # Built eagerly: errors must surface inside the guard, not while gRPC iterates.
        return iter([self._flight_info(e) for e in entries])

    # ------------------------------------------------------------------ actions

    @_guard
    def do_action(self, context, action):
        name = _ACTIONS.get(action.type.lower()) if len(action.type) <= 64 else None
        body = action.body.to_pybytes() if action.body is not None else b""
        self.stats.count(f"action:{name or 'unknown'}")
        if name == protocol.DELETE_MATRIX:
            index_id, mtype = protocol.parse_delete_body(body)
            deleted = self.store.delete(index_id, mtype)
            result = {"success": True, "message": "success", "index_id": index_id, "deleted": deleted}
        elif name == protocol.GET_METADATA:
            result = self.store.metadata(protocol.parse_metadata_body(body))
        elif name == protocol.HEALTH:
            protocol.parse_empty_body(body, "Health body")
            result = self.health()
        elif name == protocol.STATS:
            protocol.parse_empty_body(body, "Stats body")
            result = {**self.health(), **self.stats.snapshot(), **self.limiter.snapshot()}
            pool = getattr(self.store.backend, "pool", None)
            if pool is not None:  # a memory store's recycled same-host files
                result["recycle"] = pool.describe()
            result["ucx_address_probe"] = self.ucx_probe.describe()
            memory = self.store.memory()
            if memory is not None:
                result["memory"] = memory
        elif name == protocol.UCX_INFO:
            protocol.parse_empty_body(body, "UcxInfo body")
            addresses = self._ucx_runtime().addresses_b64
            result = {"success": True, "message": "success", "address": addresses[0],
                      "addresses": addresses}
        elif name == protocol.UCX_GET:
            result, inline = self._ucx_get(protocol.parse_ucx_body(body, name))
            if inline is not None:  # a small matrix comes back with the answer itself
                return [flight.Result(pa.py_buffer(protocol.dumps(result))), flight.Result(inline)]
        elif name == protocol.UCX_PUT:
            result = self._ucx_put(context, protocol.parse_ucx_body(body, name))
        elif name == protocol.LOCAL_INFO:
            result = self._local_info(protocol.parse_local_info_body(body))
        elif name == protocol.PUBLISH_LOCAL:
            key, staged = protocol.parse_publish_local_body(body)
            if self.probe is None:
                raise InvalidArgument("this server takes no same-host uploads")
            path = os.path.join(self.local_root, local.STAGING, staged)
            try:
                entry = self.store.publish_staged(key, path)
            except BaseException:
                local.discard(path)  # refused: a staged file is garbage once answered
                raise
            result = {"success": True, "message": "success", "index_id": key.index_id,
                      "matrix_type": key.matrix_type, **entry.describe()}
        elif name in (protocol.BATCH_READ, protocol.BATCH_WRITE):
            raise InvalidArgument(
                f"{name} carries matrices, so it is not an action: send BatchRead as a DoGet "
                'ticket {"action": "BatchRead", "items": [...]}, BatchWrite as a DoPut with the '
                'command {"action": "BatchWrite"} and a table of items (see the README)'
            )
        elif name in _QUEUE_ACTIONS:
            args = protocol.parse_queue_body(body, name)
            result = {"success": True, "message": "success", **_QUEUE_ACTIONS[name](self.queue, args)}
        else:
            raise InvalidArgument(
                f"unknown action {action.type[:64]!r}; available: "
                f"{', '.join(protocol.ACTION_DESCRIPTIONS)}"
            )
        return [flight.Result(pa.py_buffer(protocol.dumps(result)))]

    def _housekeeping(self) -> None:
        """While the server runs: removes abandoned same-host staged files, and gives the
        memory of deleted and replaced matrices back to the system once enough of it is
        free and the node has been quiet for a second (a memory store's matrices are
        received buffers from many threads' glibc arenas, which glibc otherwise keeps:
        850 MiB stayed after a soak emptied the store)."""
        staging_timeout = resolve(None, "STAGING_TIMEOUT", DEFAULT_STAGING_TIMEOUT_S, float)
        sweep_every = min(30.0, max(0.2, staging_timeout / 2))
        next_sweep = time.monotonic() + sweep_every
        trimmed = self.store.freed_bytes
        while not self._stopping.wait(0.5):
            try:
                if self.probe is not None and time.monotonic() >= next_sweep:
                    local.sweep_staging(self.local_root, staging_timeout)
                    next_sweep = time.monotonic() + sweep_every
                freed = self.store.freed_bytes
                # only on a quiet node: trimming locks glibc's arenas, and pages given back
                # are faulted in again by the next upload (a busy node reuses them instead)
                if freed - trimmed >= _TRIM_AFTER_BYTES and self.limiter.quiet_for() >= 1.0:
                    trimmed = freed
                    give_back_memory()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("housekeeping failed: %s", e)

    def _ucx_runtime(self):
        if not self.ucx_enabled:
            raise Unavailable("UCX is switched off on this server (--no-ucx)")
        return ucx.runtime()  # started on the first UCX client

    def _ucx_peers(self, rt, req: dict) -> list[bytes]:
        """The client's lanes a request names (no more than this server runs), with an
        endpoint to each. An address met for the first time is checked against UCX's
        layout, then tried in a probe process (:mod:`torch_tq.server.ucx_probe`) before this
        process lets UCX near it.

        Raises:
            InvalidArgument: a malformed address, or one UCX cannot make an endpoint to.
        """
        peers = ucx.decode_addresses(req["addresses"])
        if len(peers) > rt.lanes:
            raise InvalidArgument(f"{len(peers)} UCX lanes named; this server runs {rt.lanes}")
        unknown = rt.unknown(peers)
        if unknown:
            for address in unknown:
                self.ucx_probe.check(address)
            try:
                rt.connect(peers)
            except Unavailable as e:
                raise InvalidArgument(f"the client's UCX lanes cannot be reached: {e.message}") \
                    from None
        return peers

    def _ucx_get(self, req: dict) -> tuple[dict, pa.Buffer | None]:
        rt = self._ucx_runtime()
        peers = self._ucx_peers(rt, req)
        key = req["key"]
        matrix = self.store.open(key)
        entry = matrix.entry
        # Runs of the stored bytes: consecutive batches that are slices of one buffer (a
        # matrix that came in one piece) make one run, so that a transfer has few parts.
        runs: list = []  # [buffer, start, end] or a finished memoryview
        for batch in matrix.batches():  # verified before anything is sent
            column = batch.column(0)
            if column.type == pa.bool_():
                runs.append(memoryview(codec.element_bytes(column)))
            elif len(column):
                width = column.type.byte_width
                buf = column.buffers()[1]
                start, end = column.offset * width, (column.offset + len(column)) * width
                last = runs[-1] if runs else None
                if isinstance(last, list) and last[0].address == buf.address and last[2] == start:
                    last[2] = end
                else:
                    runs.append([buf, start, end])
        parts = []
        step = max(self.store.chunk_bytes, ucx.PART_BYTES)
        for run in runs:
            raw = memoryview(run[0])[run[1]:run[2]] if isinstance(run, list) else run
            whole = np.frombuffer(raw, dtype=np.uint8)
            # pieces of a bounded size: the lanes share even a one-batch matrix
            parts.extend(ucx.views(whole, ucx.split(whole.nbytes, step)))
        self.stats.add_bytes(sent=entry.nbytes)
        reply = {"success": True, "message": "success", "index_id": key.index_id,
                 "matrix_type": key.matrix_type, **entry.describe()}
        if entry.nbytes <= req["inline_max"]:
            # one round trip instead of a control call and a UCX transfer
            data = np.concatenate(parts) if parts else np.empty(0, np.uint8)
            return {**reply, "parts": [], "inline": True}, pa.py_buffer(data)
        future = rt.start("send", peers, req["tag"], parts)
        future.add_done_callback(lambda f: _log_ucx_failure(f, rt, peers, f"UcxGet {key}"))
        return {**reply, "parts": [p.nbytes for p in parts]}, None

    def _drain(self, rt, peers: list[bytes], req: dict) -> None:
        """A refused UcxPut: the client started sending before it called, so its messages
        wait at this server. A 1-byte receive per part takes each one without its bytes
        (UCX truncates it) and completes the client's send: nothing is left pending on
        either side."""
        scratch = np.empty(1, np.uint8)
        rt.start("recv", peers, req["tag"], [scratch] * len(req["parts"]))

    def drain_refused_ucx_put(self, body) -> None:
        """:meth:`_drain` for a UcxPut refused before its handler ran (a limit), if its body
        parses; best effort."""
        try:
            raw = body.to_pybytes() if body is not None else b""
            req = protocol.parse_ucx_body(raw, protocol.UCX_PUT)
            if self.ucx_enabled:
                rt = ucx.runtime()
                self._drain(rt, self._ucx_peers(rt, req), req)
        except Exception as e:  # noqa: BLE001 - the refusal is what the client gets
            log.debug("could not drain a refused UcxPut: %s", e)

    def _ucx_put(self, context, req: dict) -> dict:
        rt = self._ucx_runtime()
        peers = self._ucx_peers(rt, req)
        key, dtype = req["key"], codec.DTYPES[req["dtype"]]
        nbytes = req["nbytes"]
        try:
            if nbytes % dtype.itemsize or nbytes // dtype.itemsize != codec.numel(req["shape"]):
                raise InvalidArgument(
                    f"nbytes {nbytes} contradicts shape {list(req['shape'])} of {dtype.name}")
            session = self.store.begin_put(key, dtype, nbytes // dtype.itemsize, req["xxh3"])
        except TQError:
            self._drain(rt, peers, req)
            raise
        try:
            buf = pa.allocate_buffer(nbytes) if nbytes else pa.py_buffer(b"")
            whole = np.frombuffer(buf, dtype=np.uint8) if nbytes else None
            views = ucx.views(whole, req["parts"])
            try:
                rt.run("recv", peers, req["tag"], views)
            except Unavailable:
                rt.forget(peers)
                raise
            self.stats.add_bytes(received=nbytes)
            session.append(codec.raw_values(buf, dtype))
            entry = session.commit(req["shape"])
        finally:
            session.abort()  # no-op after a commit
        return {"success": True, "message": "success", "index_id": key.index_id,
                "matrix_type": key.matrix_type, **entry.describe()}

    def _local_info(self, client_host: str) -> dict:
        if client_host != self.host_id:
            return {"success": True, "message": "success", "same_host": False,
                    "reason": "another host"}
        if self.probe is None:
            return {"success": True, "message": "success", "same_host": False,
                    "reason": f"{self.store.storage} store without a same-host directory"}
        return {"success": True, "message": "success", "same_host": True,
                "root": self.local_root, "probe": self.probe, "storage": self.store.storage,
                "compression": self.store.compression,
                "max_matrix_bytes": self.store.max_matrix_bytes}

    def health(self) -> dict:
        return {
            "success": True,
            "message": "success",
            "status": "SERVING",
            "version": __version__,
            "storage": self.store.storage,
            "matrices": self.store.count(),
            "bytes": self.store.total_bytes(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "groups": self.queue.groups(),
        }

    @_guard
    def list_actions(self, context):
        return list(protocol.ACTION_DESCRIPTIONS.items())

    @_guard
    def do_exchange(self, context, descriptor, reader, writer):
        raise protocol.unimplemented("DoExchange")


# ---------------------------------------------------------------------- running it


def _location(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"grpc://{host}:{port}"


def make_server(
    host: str | None = None,
    port: int | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    *,
    durable: bool | None = None,
    chunk_bytes: int | str | None = None,
    max_matrix_bytes: int | str | None = None,
    compression: str | None = None,
    ucx: bool | None = None,
    same_host: bool | None = None,
    limits: Limits | None = None,
    max_memory: int | str | None = None,
    **limit_options,
) -> TQFlightServer:
    """Builds a running server (it serves from construction on); see :func:`serve`."""
    host = resolve(host, "HOST", DEFAULT_HOST)
    port = resolve(port, "PORT", DEFAULT_PORT, int)
    storage = resolve(storage, "STORAGE", "disk")
    durable = resolve(durable, "FSYNC", None, parse_bool)
    chunk = parse_size(resolve(chunk_bytes, "CHUNK_BYTES", DEFAULT_CHUNK_BYTES, parse_size))
    cap = parse_size(resolve(max_matrix_bytes, "MAX_MATRIX_BYTES", DEFAULT_MAX_MATRIX_BYTES, parse_size))
    if chunk < 1024 or chunk > (1 << 30):
        raise InvalidArgument(f"chunk_bytes must be within [1KiB, 1GiB], got {chunk}")
    if limits is None:
        limits = limits_from(**limit_options)
    elif limit_options:
        raise InvalidArgument("pass either limits= or individual limit options, not both")
    tune_malloc()
    compression = protocol.validate_compression(resolve(compression, "COMPRESSION", None))
    same_host = resolve(same_host, "SAME_HOST", True, parse_bool)
    memory_cap = resolve(max_memory, "MAX_MEMORY", None, parse_size)
    if memory_cap is not None:
        memory_cap = parse_size(memory_cap)
        if storage != "memory":
            raise InvalidArgument("max_memory is the capacity of a memory store (storage='memory')")
    try:
        store = Store(data_dir, storage, durable=durable, chunk_bytes=chunk,
                      max_matrix_bytes=cap, compression=compression, shared=same_host,
                      max_memory=memory_cap)
    except TQError:
        raise  # ours say what is wrong already (Unavailable is an OSError too)
    except OSError as e:
        raise InvalidArgument(f"data directory {data_dir or '(the default)'} cannot be used: "
                              f"{e.strerror or e}") from None
    try:
        ucx_enabled = resolve(ucx, "UCX", True, parse_bool)
        try:
            return TQFlightServer(_location(host, port), store, limits, ucx_enabled, same_host)
        except pa.ArrowException as e:  # gRPC could not bind: Arrow says no more than that
            raise Unavailable(f"cannot listen on {_location(host, port)} (is the port in use, "
                              f"or the address not this host's?): {first_line(e)}") from None
    except BaseException:
        store.close()
        raise


def serve(
    host: str | None = None,
    port: int | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    *,
    durable: bool | None = None,
    chunk_bytes: int | str | None = None,
    max_matrix_bytes: int | str | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S,
    compression: str | None = None,
    ucx: bool | None = None,
    same_host: bool | None = None,
    limits: Limits | None = None,
    max_memory: int | str | None = None,
    _watch_stdin: bool = False,
    **limit_options,
) -> None:
    """Runs a storage server until SIGINT/SIGTERM, then shuts it down within a deadline.

    Prints one line ``listening on grpc://HOST:PORT`` once it accepts calls.

    Args:
        host: address to bind (default ``127.0.0.1``; ``TORCH_TQ_HOST``).
        port: gRPC port (default 8080; 0 picks a free one; ``TORCH_TQ_PORT``).
        data_dir: the store's directory (default: the embedded default directory, see
            README; ``TORCH_TQ_DATA_DIR``).
        storage: ``"disk"`` (durable, default) or ``"memory"`` (``TORCH_TQ_STORAGE``).
        durable: fsync before acknowledging (default: on for ``disk``; ``TORCH_TQ_FSYNC``).
        chunk_bytes: record batch size of stored matrices (default 4MiB).
        max_matrix_bytes: per-matrix limit (default 10 GB).
        ucx: offer the UCX data plane (default on; it starts with the first UCX client and
            needs ``ucxx``; ``TORCH_TQ_UCX``).
        same_host: offer same-host access to clients on this host (default on; a memory
            store then keeps their matrices as files in /dev/shm; ``TORCH_TQ_SAME_HOST``).
        compression: ``"zstd"`` or ``"lz4"`` to compress the disk store's files (at rest;
            off by default; ``TORCH_TQ_COMPRESSION``). Clients choose wire compression
            per call.
        shutdown_grace: seconds in-flight calls get to finish before the process exits hard
            (safe: uploads are published atomically).
        max_memory: a memory store's capacity (default half the RAM;
            ``TORCH_TQ_MAX_MEMORY``): an upload whose declared size does not fit is refused
            with UNAVAILABLE before any byte is taken.
        limits: a :class:`torch_tq.Limits`, or its fields as keywords (``qps=1000``,
            ``qps_burst``, ``streams_per_client=100``, ``max_calls=1000``,
            ``max_batch_items=1000``, ``max_batch_bytes``; 0 switches one off;
            ``TORCH_TQ_QPS`` etc.).

    Example:
        >>> import torch_tq
        >>> torch_tq.serve(port=8080, data_dir="/nvme/tq")  # doctest: +SKIP
    """
    # No traceback may reach a client: Arrow formats the exceptions our handlers raise with
    # the traceback module, which honours this limit. Our own logs use
    # server.errors.format_exception().
    sys.tracebacklimit = 0
    server = make_server(
        host, port, data_dir, storage, durable=durable, chunk_bytes=chunk_bytes,
        max_matrix_bytes=max_matrix_bytes, compression=compression, ucx=ucx,
        same_host=same_host, limits=limits, max_memory=max_memory,
        **limit_options,
    )
    _check_allocator(server.store.storage)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    if _watch_stdin:
        threading.Thread(target=_wait_stdin_eof, args=(stop,), daemon=True).start()
    host_used = resolve(host, "HOST", DEFAULT_HOST)
    print(f"listening on {_location(host_used, server.port)}", flush=True)
    log.info("torch_tq %s serving: %s", __version__, server.store.describe())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        _shutdown(server, shutdown_grace)


def _check_allocator(storage: str) -> None:
    backend = pa.default_memory_pool().backend_name
    wanted = allocator_for(storage)
    if backend != wanted and not os.environ.get(ALLOCATOR_ENV):
        log.info("Arrow allocator is %s; %s=%s before Python starts suits a %s store better",
                 backend, ALLOCATOR_ENV, wanted, storage)


def _wait_stdin_eof(stop: threading.Event) -> None:
    """The parent of a background server holds our stdin: EOF means it is gone."""
    # os.read on the raw descriptor: a buffered sys.stdin read would hold a lock that
    # interpreter shutdown then waits on.
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    stop.set()


def _shutdown(server: TQFlightServer, grace: float) -> None:
    done = threading.Event()

    server._stopping.set()

    def run() -> None:
        try:
            server.queue.close()  # long-polling consumers return UNAVAILABLE now
            server.shutdown()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="torch_tq-shutdown").start()
    if not done.wait(grace):
        log.warning("calls still running %.1fs after shutdown began; exiting hard", grace)
        server.store.close()
        sys.stdout.flush()
        os._exit(0)
    server.queue.close()
    server.ucx_probe.close()
    server.store.close()
    log.info("server stopped")
