"""The Flight storage server.

:class:`TQFlightServer` maps the seed's Flight methods onto the :mod:`~torch_tq.store.engine`:
DoPut (WriteMatrix, BatchWrite), DoGet (ReadMatrix, BatchRead), GetFlightInfo, GetSchema,
ListFlights, DoAction (every action of :mod:`torch_tq.protocol.actions`, one handler each in
:mod:`torch_tq.server.actions`) and ListActions. :mod:`torch_tq.server.run` builds and runs it.

Every handler runs inside :func:`~torch_tq.server.admission.guard`: torch_tq errors leave as Flight statuses that carry
the seed code and message; anything unexpected is logged here with its traceback and leaves
as a bare ``INTERNAL_ERROR`` with a reference number. ``serve()`` sets
``sys.tracebacklimit = 0`` so that even the Arrow status built from our NOT_FOUND and
INVALID_ARGUMENT exceptions holds no traceback (RELIABILITY.md §4).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from torch_tq._config import DEFAULT_STAGING_TIMEOUT_S, resolve
from torch_tq._fork import check_fork_safe, note_grpc_use
from torch_tq._malloc import GIVE_BACK_AFTER_BYTES, give_back_memory
from torch_tq._version import __version__
from torch_tq.codec import tensors as codec
from torch_tq.codec import compression as packing
from torch_tq.codec import upload
from torch_tq.errors import InvalidArgument, Unavailable
from torch_tq.protocol import actions as registry
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.errors import unimplemented
from torch_tq.server import actions
from torch_tq.server import batch as batch_ops
from torch_tq.server.admission import (
    MIDDLEWARE,
    CallMiddlewareFactory,
    grant_of,
    guard,
    guard_iter,
)
from torch_tq.server.auth import HandshakeOnly
from torch_tq.server.limits import Limiter, Limits
from torch_tq.server.same_host import SameHostService
from torch_tq.server.security import Security
from torch_tq.server.stats import ServerStats
from torch_tq.server.ucx import UcxService
from torch_tq.store.engine import Entry, Store
from torch_tq.store.groups import Queue

log = logging.getLogger(__name__)


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


class TQFlightServer(flight.FlightServerBase):
    """A torch_tq storage server on one gRPC location.

    Args:
        location: ``grpc://HOST:PORT`` (port 0 picks a free one; see :attr:`port`).
        store: the storage engine it serves.
    """

    def __init__(self, location: str, store: Store, limits: Limits | None = None,
                 ucx_enabled: bool = True, same_host: bool = True,
                 security: Security | None = None, **kwargs) -> None:
        self.store = store
        self.started = time.monotonic()
        self.stats = ServerStats()
        self.security = security or Security()
        auth = self.security.auth
        self.ucx = UcxService(store, self.stats, ucx_enabled, digests=auth is not None)
        self.limits = limits or Limits()
        self.limiter = Limiter(self.limits)
        kwargs.setdefault("middleware", {})[MIDDLEWARE] = CallMiddlewareFactory(
            self.limiter, auth, self.stats)
        if auth is not None:
            kwargs["auth_handler"] = HandshakeOnly()  # basic credentials: the middleware's
        kwargs.update(self.security.tls)
        state_dir = None
        if store.storage == "disk":
            state_dir = os.path.join(store.backend.root, "queue")
        self.queue = Queue(store, state_dir, durable=store.backend.durable)
        self.same_host = SameHostService(store, same_host)
        self.membership = None  # a cluster node's name and epoch (server.membership)
        self.stopping = threading.Event()
        check_fork_safe()
        note_grpc_use()
        super().__init__(location, **kwargs)  # serves from here on
        threading.Thread(target=self._housekeeping, daemon=True,
                         name="torch_tq-housekeeping").start()

    # ------------------------------------------------------------------ DoPut

    @guard
    def do_put(self, context, descriptor, reader, writer):
        cmd = protocol.parse_put_request(descriptor)
        if isinstance(cmd, protocol.BatchWriteCommand):
            return self._batch_write(context, reader, writer)
        decoder = upload.UploadDecoder(reader.schema, cmd.dtype, cmd.shape)
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
        if not cmd.ack:
            return  # the call's OK status, which follows the commit, acknowledges it
        ack = protocol.ok(index_id=entry.key.index_id, matrix_type=entry.key.matrix_type,
                          **entry.describe())
        writer.write(pa.py_buffer(protocol.dumps(ack)))

    def _batch_write(self, context, reader, writer) -> None:
        lim = self.limits
        batches = []
        rows = held = 0
        pad = None
        for chunk in codec.chunks(reader):
            rows += chunk.data.num_rows
            held += chunk.data.nbytes
            self.stats.add_bytes(received=chunk.data.nbytes)
            batch_ops.check_batch_limits(lim, self.limiter, rows, held, "BatchWrite")
            batches.append(chunk.data)
            if pad is None:
                pad = batch_ops.aligning_pad(chunk)
        if context.is_cancelled():
            raise Unavailable("BatchWrite was cancelled by the client: nothing was stored")
        results = batch_ops.write_items(self.store, batches, reader.schema, self.stats)
        reply = protocol.ok(results=results)
        if pad is not None:
            reply["pad"] = pad
        writer.write(pa.py_buffer(protocol.dumps(reply)))

    # ------------------------------------------------------------------ reads

    @guard
    def do_get(self, context, ticket):
        request = protocol.parse_get_ticket(ticket.ticket, self.limits.max_batch_items)
        if isinstance(request, protocol.BatchReadCommand):
            if request.compression == "snappy":
                raise InvalidArgument("BatchRead supports zstd or lz4 compression (snappy is "
                                      "framed for ReadMatrix streams only)")
            return flight.GeneratorStream(
                batch_ops.RESULT_SCHEMA,
                guard_iter(batch_ops.read_items(self.store, request, self.store.chunk_bytes),
                            "BatchRead", self.stats),
                options=packing.ipc_options(request.compression),
            )
        key = request.key
        options = packing.ipc_options(request.compression)
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
            schema = packing.stream_schema(matrix.dtype, matrix.entry.shape, "snappy")
            batches = (pa.RecordBatch.from_arrays([packing.pack(b.column(0), "snappy")],
                                                  schema=schema)
                       for b in batches)
        return flight.GeneratorStream(schema, guard_iter(batches, "do_get", self.stats),
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

    @guard
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

    @guard
    def get_schema(self, context, descriptor):
        key = protocol.parse_read_descriptor(descriptor)
        entry = self.store.get(key)
        return flight.SchemaResult(codec.wire_schema(codec.DTYPES[entry.dtype], entry.shape))

    @guard
    def list_flights(self, context, criteria):
        index_id = protocol.parse_list_criteria(criteria)
        entries = sorted(self.store.entries(index_id), key=lambda e: e.key)
        # Built eagerly: errors must surface inside the guard, not while gRPC iterates.
        return iter([self._flight_info(e) for e in entries])

    # ------------------------------------------------------------------ actions

    @guard
    def do_action(self, context, action):
        return actions.dispatch(self, action, grant_of(context))

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
        while not self.stopping.wait(0.5):
            try:
                if time.monotonic() >= next_sweep:
                    self.same_host.sweep(staging_timeout)
                    next_sweep = time.monotonic() + sweep_every
                freed = self.store.freed_bytes
                # only on a quiet node: trimming locks glibc's arenas, and pages given back
                # are faulted in again by the next upload (a busy node reuses them instead)
                if freed - trimmed >= GIVE_BACK_AFTER_BYTES and self.limiter.quiet_for() >= 1.0:
                    trimmed = freed
                    give_back_memory()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("housekeeping failed: %s", e)

    def health(self) -> dict:
        return protocol.ok(**{
            "status": "SERVING",
            "version": __version__,
            "storage": self.store.storage,
            "matrices": self.store.count(),
            "bytes": self.store.total_bytes(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "groups": self.queue.groups(),
            **({"node": self.membership.describe()} if self.membership is not None else {}),
        })

    @guard
    def list_actions(self, context):
        return registry.descriptions()

    @guard
    def do_exchange(self, context, descriptor, reader, writer):
        raise unimplemented("DoExchange")
