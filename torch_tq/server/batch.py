"""BatchWrite and BatchRead: many ``(index_id, matrix_type)`` items in one Flight call.

Matrices are binary data, so both travel as Arrow tables, one row per item (an action body
is JSON and size-limited):

* **BatchWrite** is a DoPut with the command ``{"action": "BatchWrite"}`` whose stream is a
  table with the columns ``index_id`` (any integer type), ``matrix_type`` (string),
  ``data`` (``binary``/``large_binary`` raw little-endian element bytes, or a ``list`` of
  values), and optionally ``dtype`` (string; required with binary data) and ``shape``
  (``list<int64>``; default one dimension). The server answers with one metadata message:
  ``{"success": true, "results": [{"index_id", "matrix_type", "success", "code",
  "message"}, ...]}`` in request order.
* **BatchRead** is a DoGet with the ticket ``{"action": "BatchRead", "items": [{"index_id",
  "matrix_type"}, ...]}`` (GetFlightInfo on the same command works too). The stream is
  :data:`RESULT_SCHEMA`, one row per item in request order: ``success``, ``code``,
  ``message`` (``"matrix not found: ..."``), ``dtype``, ``shape`` and ``data`` (raw element
  bytes; bool as one byte per element, bfloat16 as its 16 bits). A matrix larger than
  ``max_inline_bytes`` (default 256 MiB) comes back with ``inline: false`` and no data:
  read it with ReadMatrix.

Every item stands alone: a missing, invalid or oversized one fails with ``success: false``
and the others go ahead. The call as a whole fails only when it is malformed or over the
item cap (then nothing is stored).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from torch_tq.codec import tensors as codec

from torch_tq.protocol import commands as protocol
from torch_tq.codec.batch import RESULT_SCHEMA, VIEW_INLINE_BYTES
from torch_tq.server.errors import internal_error
from torch_tq.errors import InternalError, InvalidArgument, TQError
from torch_tq.protocol.commands import BadItem, Key

log = logging.getLogger(__name__)


_WRITE_COLUMNS = {"index_id", "matrix_type", "type", "data", "dtype", "shape"}


def _ok(key: Key) -> dict:
    return {"index_id": key.index_id, "matrix_type": key.matrix_type, "success": True,
            "code": "OK", "message": "success"}


def _failed(index_id, matrix_type, error: TQError) -> dict:
    return {"index_id": index_id, "matrix_type": matrix_type, "success": False,
            "code": error.code, "message": error.message}


def _unexpected(e: BaseException, where: str) -> InternalError:
    return internal_error(e, where, log)


# --------------------------------------------------------------------------- BatchWrite


def check_batch_limits(lim, limiter, rows: int, nbytes: int, what: str) -> None:
    """Refuses a batch call (``what``) of more items or bytes than the limits ``lim``
    allow, counting the refusal in ``limiter``.

    Raises:
        InvalidArgument: over ``max_batch_items`` or ``max_batch_bytes``; nothing stored.
    """
    if lim.max_batch_items and rows > lim.max_batch_items:
        limiter.count_rejection("batch_items")
        raise InvalidArgument(
            f"{what} of more than {lim.max_batch_items} items; the limit is "
            f"{lim.max_batch_items} per call (split the batch): nothing was stored"
        )
    if lim.max_batch_bytes and nbytes > lim.max_batch_bytes:
        limiter.count_rejection("batch_bytes")
        raise InvalidArgument(
            f"{what} of more than {lim.max_batch_bytes} bytes; the limit is "
            f"{lim.max_batch_bytes} per call (send large matrices with WriteMatrix): "
            "nothing was stored"
        )


class _WriteTable:
    """The columns of a BatchWrite upload, checked once for the whole call."""

    def __init__(self, schema: pa.Schema) -> None:
        names = schema.names
        unknown = set(names) - _WRITE_COLUMNS
        if unknown or len(set(names)) != len(names):
            raise InvalidArgument(
                f"BatchWrite columns must be distinct and among {sorted(_WRITE_COLUMNS)}, got {names}"
            )
        if "matrix_type" in names and "type" in names:
            raise InvalidArgument(
                "BatchWrite table has both a 'matrix_type' and a 'type' column: send one"
            )
        type_col = "matrix_type" if "matrix_type" in names else "type"
        for required in ("index_id", type_col, "data"):
            if required not in names:
                raise InvalidArgument(f"BatchWrite table has no {required!r} column"
                                      .replace("'type'", "'matrix_type'"))
        if not pa.types.is_integer(schema.field("index_id").type):
            raise InvalidArgument("BatchWrite column 'index_id' must be of an integer type")
        if not (pa.types.is_string(schema.field(type_col).type)
                or pa.types.is_large_string(schema.field(type_col).type)):
            raise InvalidArgument(f"BatchWrite column {type_col!r} must be a string column")
        data = schema.field("data").type
        self.binary = (pa.types.is_binary(data) or pa.types.is_large_binary(data)
                       or pa.types.is_binary_view(data))
        if not self.binary and not (pa.types.is_list(data) or pa.types.is_large_list(data)
                                    or pa.types.is_fixed_size_list(data)):
            raise InvalidArgument(
                "BatchWrite column 'data' must be binary, large_binary or binary_view (raw "
                f"element bytes, with a 'dtype' column) or a list of values, got {data}"
            )
        if self.binary and "dtype" not in names:
            raise InvalidArgument("BatchWrite with binary 'data' needs a 'dtype' column")
        if "dtype" in names and not pa.types.is_string(schema.field("dtype").type):
            raise InvalidArgument("BatchWrite column 'dtype' must be a string column")
        if "shape" in names:
            st = schema.field("shape").type
            if not ((pa.types.is_list(st) or pa.types.is_large_list(st))
                    and pa.types.is_integer(st.value_type)):
                raise InvalidArgument("BatchWrite column 'shape' must be a list of integers")
        self.type_col = type_col
        self.names = names


def aligning_pad(chunk) -> int | None:
    """For a BatchWrite batch with binary data sent after ``pad + 1`` bytes of
    ``app_metadata`` (torch_tq's client does): the pad that puts such a batch's data 8-byte
    aligned here, so that its items are kept without a copy. gRPC puts a message where it
    likes, but its body always as far into the message's buffer: the same pad holds for
    every batch of a size class (how many bytes the length of its body takes). None for a
    batch without such metadata or without binary data."""
    if chunk.app_metadata is None or chunk.app_metadata.size < 1:
        return None
    names = chunk.data.schema.names
    data = chunk.data.column("data") if "data" in names else None
    if data is None or not (pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type)
                            or pa.types.is_binary_view(data.type)):
        return None
    buffers = data.buffers()
    values = buffers[2] if len(buffers) > 2 else None  # binary_view: its first data buffer
    if values is None:
        return None
    return (chunk.app_metadata.size - 1 - values.address) % 8


def _binary_column(data: pa.Array) -> _BinaryColumn | _ViewColumn:
    return _ViewColumn(data) if pa.types.is_binary_view(data.type) else _BinaryColumn(data)


def _aligned(buf: pa.Buffer) -> pa.Buffer:
    """``buf``, or an 8-byte aligned copy of it. gRPC puts a message's body where it likes:
    one aligned copy of a whole buffer costs less than a copy of every item in it (2 ms
    of 5.5 ms for 32 x 256 KiB). It is numpy's (glibc's) memory, which the housekeeping
    gives back once freed; Arrow's mimalloc pool kept 1.2 GiB after a memory store holding
    1 GiB of such items was emptied."""
    if buf.address % 8 == 0:
        return buf
    return pa.py_buffer(np.frombuffer(buf, dtype=np.uint8).copy())


class _ViewColumn:
    """A ``binary_view`` data column's rows: each a slice of the data buffer its view
    names (a client sends every item as a buffer of its own, and so without a copy), or
    the up to 12 bytes held in the view itself."""

    def __init__(self, data: pa.Array) -> None:
        buffers = data.buffers()
        n = len(data)
        views = buffers[1]
        if n and (views is None or views.size < 16 * (data.offset + n)):
            raise InvalidArgument("BatchWrite binary_view column holds fewer views than rows")
        self.views = (np.frombuffer(views, dtype=np.int32, count=4 * (data.offset + n))
                      .reshape(-1, 4)[data.offset:].tolist() if n else [])
        self.view_bytes = views
        self.view_start = data.offset * 16
        self.realigned = 0
        self.data = []
        for buf in buffers[2:]:
            fixed = _aligned(buf)
            if fixed is not buf:
                self.realigned += buf.size
            self.data.append(fixed)
        self.valid = data.is_valid().to_pylist() if data.null_count else None

    def row(self, row: int) -> pa.Buffer | None:
        if self.valid is not None and not self.valid[row]:
            return None
        length, _, index, offset = self.views[row]
        if length < 0:
            raise InvalidArgument(f"item's view has a negative length ({length})")
        if length <= VIEW_INLINE_BYTES:
            start = self.view_start + row * 16 + 4
            return pa.py_buffer(self.view_bytes.slice(start, length).to_pybytes())
        if not 0 <= index < len(self.data) or offset < 0 or \
                offset + length > self.data[index].size:
            raise InvalidArgument("item's view names bytes outside the column's data buffers")
        return self.data[index].slice(offset, length)


class _BinaryColumn:
    """A binary ``data`` column's rows as slices of its one values buffer (a scalar per row
    cost ~8 us each time it was touched)."""

    def __init__(self, data: pa.Array) -> None:
        self.realigned = 0
        _, offsets, values = data.buffers()
        wide = pa.types.is_large_binary(data.type)
        self.offsets = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32,
                                     count=data.offset + len(data) + 1)[data.offset:].tolist()
        if values is not None and values.address % 8:
            values = _aligned(values)
            self.realigned = values.size
        self.values = values
        self.valid = data.is_valid().to_pylist() if data.null_count else None

    def row(self, row: int) -> pa.Buffer | None:
        if self.valid is not None and not self.valid[row]:
            return None
        start, end = self.offsets[row], self.offsets[row + 1]
        if self.values is None:
            return pa.py_buffer(b"")
        try:
            return self.values.slice(start, end - start)
        except (IndexError, pa.ArrowException):
            raise InvalidArgument("item's data offsets lie outside the column's values") \
                from None


def _item_values(batch: pa.RecordBatch, row: int, dtype_name: str | None,
                 binary: _BinaryColumn | _ViewColumn | None) -> tuple[codec.DType, pa.Array]:
    """One row's values: from ``binary`` (the raw-bytes form of the table), else from the
    ``data`` column's list of values."""
    if binary is not None:
        buf = binary.row(row)
        if buf is None:
            raise InvalidArgument("item has no data (null)")
        if dtype_name is None or dtype_name not in codec.DTYPES:
            raise InvalidArgument(
                f"unsupported dtype {dtype_name!r:.80}; supported: {', '.join(codec.DTYPES)}"
            )
        dtype = codec.DTYPES[dtype_name]
        if buf.address % dtype.itemsize:
            buf = pa.py_buffer(buf.to_pybytes())  # misaligned within the column: one copy
        return dtype, codec.raw_values(buf, dtype)
    scalar = batch.column("data")[row]
    if not scalar.is_valid:
        raise InvalidArgument("item has no data (null)")
    values = scalar.values
    if values is None:
        raise InvalidArgument("item has no data (null)")
    if values.null_count:
        raise InvalidArgument("uploads must not contain nulls")
    if dtype_name is not None:
        if dtype_name not in codec.DTYPES:
            raise InvalidArgument(
                f"unsupported dtype {dtype_name!r:.80}; supported: {', '.join(codec.DTYPES)}"
            )
        dtype = codec.DTYPES[dtype_name]
        if values.type != dtype.arrow:
            raise InvalidArgument(f"values of type {values.type} cannot carry dtype {dtype_name}")
        return dtype, values
    if values.type not in codec._BY_ARROW:
        raise InvalidArgument(f"unsupported value type {values.type}")
    return codec._BY_ARROW[values.type], values


def write_items(store, batches: list[pa.RecordBatch], schema: pa.Schema,
                stats=None) -> list[dict]:
    """Stores every row of a BatchWrite upload on its own; returns a result per row
    (``stats``: counts the bytes it had to copy to align)."""
    table = _WriteTable(schema)
    with store.notifying_once():  # waiting consumers lease the batch whole
        return _write_items(store, table, batches, stats)


def _write_items(store, table: _WriteTable, batches: list[pa.RecordBatch], stats) -> list[dict]:
    results: list[dict] = []
    for batch in batches:
        # each column to Python once, not a scalar per row and column
        ids = batch.column("index_id").to_pylist()
        types = batch.column(table.type_col).to_pylist()
        dtypes = batch.column("dtype").to_pylist() if "dtype" in table.names else None
        shapes = batch.column("shape") if "shape" in table.names else None
        shape_rows = shapes.to_pylist() if shapes is not None else None
        binary = _binary_column(batch.column("data")) if table.binary else None
        if binary is not None and binary.realigned and stats is not None:
            stats.add_realigned(binary.realigned)
        for row in range(batch.num_rows):
            raw_id = ids[row]
            raw_type = types[row]
            index_id = raw_id if raw_id is not None and 0 <= raw_id <= protocol.MAX_INDEX_ID else None
            mtype = raw_type if isinstance(raw_type, str) and len(raw_type) <= 64 else None
            try:
                if raw_id is None:
                    raise InvalidArgument("index_id is null")
                key = Key(protocol.validate_index_id(raw_id), protocol.validate_matrix_type(raw_type))
                mtype = key.matrix_type
                dtype, values = _item_values(
                    batch, row, dtypes[row] if dtypes is not None else None, binary
                )
                shape = (len(values),)
                if shape_rows is not None and shape_rows[row] is not None:
                    shape = protocol.validate_shape(shape_rows[row])
                    if codec.numel(shape) != len(values):
                        raise InvalidArgument(
                            f"shape {list(shape)} holds {codec.numel(shape)} elements, data has "
                            f"{len(values)}"
                        )
                _store(store, key, dtype, values, shape)
                results.append(_ok(key))
            except TQError as e:
                results.append(_failed(index_id, mtype, e))
            except Exception as e:  # one item's failure must not fail the others
                results.append(_failed(index_id, mtype, _unexpected(e, "BatchWrite item")))
    return results


def _store(store, key: Key, dtype: codec.DType, values: pa.Array, shape, pack=None) -> None:
    session = store.begin_put(key, dtype, len(values), pack=pack)
    try:
        session.append(values)
        session.commit(shape)
    finally:
        session.abort()


def write_pack(store, pack, items: list) -> list[dict]:
    """Stores every item of a same-host pack (PublishLocalBatch, a
    :class:`~torch_tq.store.memory.Pack`) on its own, each a slice of the pack's mapping;
    a result per item, as :func:`write_items` gives."""
    return write_slices(store, pack.buffer, items, "PublishLocalBatch", pack)


def write_slices(store, buffer: pa.Buffer, items: list, what: str, pack=None) -> list[dict]:
    """Stores every item (a :class:`~torch_tq.protocol.transfers.PackItem`, or a
    ``BadItem`` that fails alone) as a slice of ``buffer`` at its offset, a result per
    item in order. An item that lies at an offset its dtype cannot be read at is copied;
    ``pack``: the same-host pack ``buffer`` maps (tagged on each item)."""
    with store.notifying_once():  # waiting consumers lease the batch whole
        return _write_slices(store, buffer, items, what, pack)


def _write_slices(store, buffer: pa.Buffer, items: list, what: str, pack) -> list[dict]:
    results: list[dict] = []
    for item in items:
        if isinstance(item, BadItem):
            results.append(_failed(item.index_id, item.matrix_type, item.error))
            continue
        key = item.key
        try:
            end = item.offset + item.nbytes
            if end > buffer.size:
                raise InvalidArgument(f"item's bytes [{item.offset}, {end}) lie outside the "
                                      f"{buffer.size} bytes of the transfer")
            dtype = codec.DTYPES[item.dtype]
            data = buffer.slice(item.offset, item.nbytes)
            if data.address % dtype.itemsize:
                data = pa.py_buffer(data.to_pybytes())  # misaligned in the stream: a copy
            values = codec.raw_values(data, dtype)
            _store(store, key, dtype, values, item.shape,
                   (pack, item.offset) if pack is not None else None)
            results.append(_ok(key))
        except TQError as e:
            results.append(_failed(key.index_id, key.matrix_type, e))
        except Exception as e:  # one item's failure must not fail the others
            results.append(_failed(key.index_id, key.matrix_type,
                                   _unexpected(e, f"{what} item")))
    return results


# --------------------------------------------------------------------------- BatchRead


def _root(buf: pa.Buffer) -> pa.Buffer:
    while buf.parent is not None:
        buf = buf.parent
    return buf


def contiguous(pieces: list) -> pa.Buffer | None:
    """The buffer that holds ``pieces`` end to end, where they lie so in one allocation
    (one value; or items stored from one batch, read back in their order): no copy."""
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return None
    root = _root(pieces[0])
    end = pieces[0].address + pieces[0].size
    for p in pieces[1:]:
        if p.address != end:
            return None
        end += p.size
    last = _root(pieces[-1])
    if (last.address, last.size) != (root.address, root.size) or end > root.address + root.size:
        return None
    start = pieces[0].address - root.address
    return root.slice(start, end - pieces[0].address)


def _row_batch(rows: list[dict], pieces: list) -> pa.RecordBatch:
    """One record batch of result rows; ``pieces`` holds each row's data (buffers or None)."""
    n = len(rows)
    offsets = np.zeros(n + 1, dtype=np.int64)
    validity = np.zeros(n, dtype=bool)
    sizes = [sum(p.size for p in row) if row is not None else 0 for row in pieces]
    np.cumsum(sizes, out=offsets[1:])
    for i, row in enumerate(pieces):
        validity[i] = row is not None
    data_buf = contiguous([p for row in pieces for p in row or ()])
    if data_buf is None:
        # Arrow's pool, not a zeroed bytearray: 2.3x quicker for 32 x 256 KiB here
        data_buf = pa.allocate_buffer(int(offsets[-1]))
        out = np.frombuffer(data_buf, dtype=np.uint8)
        pos = 0
        for row in pieces:
            for p in row or ():
                out[pos : pos + p.size] = np.frombuffer(p, dtype=np.uint8)
                pos += p.size
    data = pa.Array.from_buffers(
        pa.large_binary(), n, [pa.array(validity).buffers()[1], pa.py_buffer(offsets), data_buf]
    )
    cols = [
        pa.array([r["index_id"] for r in rows], pa.uint64()),
        pa.array([r["matrix_type"] for r in rows], pa.string()),
        pa.array([r["success"] for r in rows], pa.bool_()),
        pa.array([r["code"] for r in rows], pa.string()),
        pa.array([r["message"] for r in rows], pa.string()),
        pa.array([r.get("dtype") for r in rows], pa.string()),
        pa.array([r.get("shape") for r in rows], pa.list_(pa.int64())),
        pa.array([r.get("inline", False) for r in rows], pa.bool_()),
        data,
    ]
    return pa.RecordBatch.from_arrays(cols, schema=RESULT_SCHEMA)


def read_one(store, key: Key, max_inline: int) -> tuple[dict, list | None]:
    reader = store.open(key)
    entry = reader.entry
    row = {**_ok(key), "dtype": entry.dtype, "shape": list(entry.shape)}
    if entry.nbytes > max_inline:
        reader.close()
        row["message"] = (
            f"matrix of {entry.nbytes} bytes is over max_inline_bytes={max_inline}: read it "
            "with ReadMatrix"
        )
        return row, None
    row["inline"] = True
    pieces = []
    for batch in reader.batches():  # verified; closes the reader at the end
        column = batch.column(0)
        if column.type == pa.bool_():
            pieces.append(pa.py_buffer(codec.element_bytes(column)))
        elif len(column):
            width = column.type.byte_width
            pieces.append(column.buffers()[1].slice(column.offset * width, len(column) * width))
    return row, pieces


def read_items(store, cmd: protocol.BatchReadCommand, chunk_bytes: int) -> Iterator[pa.RecordBatch]:
    """Yields result rows in request order, cut into record batches of about
    ``chunk_bytes``; an item of that size or more goes alone (and without a copy). Smaller
    items are packed with one copy: alone, 32 items of 256 KiB took 2.4x as long to read
    (a gRPC message each), even though the client then made each a tensor without a copy."""
    rows: list[dict] = []
    pieces: list = []
    held = 0
    for item in cmd.items:
        if isinstance(item, BadItem):
            row, data = _failed(item.index_id, item.matrix_type, item.error), None
        else:
            try:
                row, data = read_one(store, item, cmd.max_inline_bytes)
            except TQError as e:
                row, data = _failed(item.index_id, item.matrix_type, e), None
            except Exception as e:
                err = _unexpected(e, "BatchRead item")
                row, data = _failed(item.index_id, item.matrix_type, err), None
        size = sum(p.size for p in data) if data is not None else 0
        if size >= chunk_bytes:
            if rows:
                yield _padded(cmd, _row_batch(rows, pieces))
                rows, pieces, held = [], [], 0
            yield _padded(cmd, _row_batch([row], [data]))  # alone in its batch
            continue
        rows.append(row)
        pieces.append(data)
        held += size
        if held >= chunk_bytes or len(rows) >= 4096:
            yield _padded(cmd, _row_batch(rows, pieces))
            rows, pieces, held = [], [], 0
    if rows or not cmd.items:
        yield _padded(cmd, _row_batch(rows, pieces))


def _padded(cmd: protocol.BatchReadCommand, batch: pa.RecordBatch) -> tuple:
    """A result batch with ``pad + 1`` bytes of app_metadata before its body: the padding
    the client asked for, for a batch of its size class, so that the data lands 8-byte
    aligned in its receive buffer (and every item becomes a tensor without a copy)."""
    return batch, pa.py_buffer(b"\0" * (cmd.pad_for(batch.nbytes) + 1))
