"""gRPC: Arrow Flight streams. Always available; carries every control call, and whatever
the other transports decline."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import xxhash

from torch_tq.client.connection import Connection
from torch_tq.client.devices import Want, pinned_out, tensor_from
from torch_tq.client.results import ItemResult
from torch_tq.client.transports.base import Capabilities
from torch_tq.codec import batch as batch_codec
from torch_tq.codec import tensors as codec
from torch_tq.codec import assemble
from torch_tq.codec import compression as packing
from torch_tq.errors import InternalError
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.errors import flight_errors

_EXPORT_WINDOW = 8 << 20  # bytes gRPC may buffer ahead of an export's writes


class GrpcTransport:
    """Puts as one DoPut stream, gets as one DoGet stream, batches as BatchWrite/BatchRead
    tables (docs/protocol.md)."""

    name = "grpc"
    can = Capabilities(zero_copy_reads=True)  # a one-buffer matrix becomes a tensor over it

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._read_pad: dict[int, int] = {}  # learnt: app_metadata padding that aligns
        # BatchRead items, per size class of a result batch (protocol.size_class)
        self._write_pad: dict[int, int] = {}  # and BatchWrite's, per size class of a batch

    def put(self, conn, key: Key, dtype: codec.DType, shape: tuple[int, ...], flat,
            compression: str | None = None) -> None:
        digest = None
        if self.connection.checksum:
            digest = xxhash.xxh3_64_hexdigest(memoryview(flat.view("uint8")))
        # no acknowledgement message: the call's OK status comes after the server stored
        # the matrix, and is one message and its parsing less per put
        command = protocol.write_command(key, shape, dtype.name, flat.nbytes, digest, ack=False)
        schema = packing.stream_schema(dtype, shape, compression)
        batches = (
            pa.RecordBatch.from_arrays([packing.pack(a, compression)], schema=schema)
            for a in codec.values_to_arrays(dtype, flat, self.connection.chunk_bytes)
        )
        self.connection.upload(conn, flight.FlightDescriptor.for_command(command), schema,
                               batches, f"put {key}", compression, acknowledged=False)

    def get(self, conn, key: Key, want: Want):
        what = f"get {key}"
        with flight_errors(what):
            ticket = flight.Ticket(protocol.read_command(key, want.compression))
            reader = conn.do_get(ticket, self.connection.options())
            dtype, shape = codec.parse_wire_schema(reader.schema)
            out = pinned_out(dtype, shape) if want.pinned else want.out
            assembler = assemble.TensorAssembler(dtype, shape, out, want.shared)
            for chunk in codec.chunks(reader):
                column = chunk.data.column(0)
                assembler.add(packing.unpack(column, dtype, reader.schema))
            result = assembler.finish()
            self.connection.count_get(assembler.copied_bytes)
            return want.place(result)

    def put_many(self, conn, group: list) -> list[dict]:
        table = batch_codec.write_batch_of(group)
        descriptor = flight.FlightDescriptor.for_command(
            protocol.dumps({"action": protocol.BATCH_WRITE}))
        what = f"BatchWrite of {len(group)} items"
        # pad + 1 bytes of app_metadata before the batch, the pad the server last said puts
        # its data 8-byte aligned there (it then keeps the items without copying them); it
        # depends on how many bytes the length of the message's body takes
        size_class = protocol.size_class(table.nbytes)
        pad = self._write_pad.get(size_class, 0)
        reply = self.connection.upload(conn, descriptor, table.schema,
                                       [(table, pa.py_buffer(b"\0" * (pad + 1)))],
                                       what, self.connection.compression)
        hint = reply.get("pad")
        if isinstance(hint, int) and 0 <= hint < 8:
            self._write_pad[size_class] = hint
        if len(reply.get("results", ())) != len(group):
            raise InternalError(
                f"{what}: the server answered for {len(reply.get('results', ()))} items")
        return reply["results"]

    def get_many(self, conn, keys: list[Key], max_inline_bytes: int | None) -> list[ItemResult]:
        what = f"BatchRead of {len(keys)} items"
        rows: list[ItemResult] = []
        compression = self.connection.compression
        with flight_errors(what):
            ticket = protocol.batch_read_command(keys, max_inline_bytes,
                                                 packing.for_batches(compression),
                                                 pad=self._read_pads())
            reader = conn.do_get(flight.Ticket(ticket), self.connection.options())
            for chunk in codec.chunks(reader):
                if chunk.app_metadata is not None:
                    self._learn_pad(chunk.data, chunk.app_metadata.size - 1)
                rows.extend(self._result_rows(chunk.data))
        if len(rows) != len(keys):
            raise InternalError(f"{what}: the server answered for {len(rows)} items")
        return rows

    def read_here(self, keys: list[Key]) -> None:
        return None  # every read is a call

    def close(self) -> None:
        pass  # the connections belong to the Connection

    def stream_values(self, key: Key, dtype_name: str, shape) -> Iterator[memoryview]:
        """The raw element bytes of a matrix (bool: one byte each), record batch by record
        batch: nothing is assembled (what a streaming export writes).

        Raises:
            InternalError: the matrix is no longer of ``dtype_name`` and ``shape``.
        """
        what = f"export {key}"
        # A connection of its own whose HTTP/2 window stays at 8 MiB: gRPC otherwise grows
        # it with the bandwidth-delay product and buffers ahead of a consumer that writes
        # to disk (~200 MiB for a 2 GiB export here), so memory would grow with the matrix.
        conn = self.connection.open(**{"grpc.http2.bdp_probe": 0,
                                       "grpc.http2.lookahead_bytes": _EXPORT_WINDOW})
        with contextlib.closing(conn):
            with flight_errors(what):
                ticket = flight.Ticket(protocol.read_command(key, None))
                reader = conn.do_get(ticket, self.connection.options())
                dtype, now = codec.parse_wire_schema(reader.schema)
                if dtype.name != dtype_name or tuple(now) != tuple(shape):
                    raise InternalError(f"{what}: the matrix changed during the export "
                                        f"(now {dtype.name} {list(now)}); export again")
                for chunk in codec.chunks(reader):
                    yield codec.element_bytes(chunk.data.column(0))

    def _read_pads(self) -> list[int]:
        pads = self._read_pad
        return [pads.get(c, 0) for c in range(1, max(pads) + 1)] if pads else []

    def _learn_pad(self, batch: pa.RecordBatch, pad: int) -> None:
        """Where gRPC put a result batch's data, given the padding the server put before
        it, tells the padding that puts it 8-byte aligned: constant for a process's gRPC and
        a size class of batch (the items of the batch follow it, each 8-byte aligned)."""
        data = batch.column("data")
        cls = protocol.size_class(batch.nbytes)
        if not len(data) or data.buffers()[2] is None or cls > protocol.MAX_SIZE_CLASSES:
            return
        misaligned = data.buffers()[2].address % 8
        self._read_pad[cls] = (pad - misaligned) % 8

    def _result_rows(self, batch: pa.RecordBatch) -> Iterator[ItemResult]:
        # each column to Python once (a scalar per row and column cost microseconds each)
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names
                if name != "data"}
        data = batch.column("data")
        offsets = np.frombuffer(data.buffers()[1], dtype=np.int64, count=len(data) + 1,
                                offset=data.offset * 8).tolist() if len(data) else None
        buf = data.buffers()[2] if len(data) else None
        for r in range(batch.num_rows):
            ok = cols["success"][r]
            index_id, mtype = cols["index_id"][r], cols["matrix_type"][r]
            code, message = cols["code"][r], cols["message"][r]
            tensor = None
            if ok and cols["inline"][r]:
                dtype = codec.DTYPES[cols["dtype"][r]]
                shape = tuple(cols["shape"][r])
                start, end = int(offsets[r]), int(offsets[r + 1])
                if end - start != codec.numel(shape) * dtype.itemsize:
                    raise InternalError(f"BatchRead row for index_id={index_id} has the wrong size")
                tensor = tensor_from(buf, start, dtype, shape)
                self.connection.count_get(
                    0 if tensor.untyped_storage().data_ptr() == buf.address + start
                    else end - start)
            yield ItemResult(index_id, mtype, ok, code, message, tensor)
