"""torch.Tensor <-> Arrow: dtypes, shapes, chunking, upload forms and zero-copy receive.

The canonical wire form of a matrix is one column ``data`` holding the flattened values,
with ``shape`` (JSON list) and ``dtype`` (torch dtype name) in the schema metadata, sent as
record batches of bounded size. bfloat16 has no Arrow type and travels as ``uint16`` with
``dtype=bfloat16``; bool travels as Arrow's bit-packed boolean.

This module knows nothing of the network or of files.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torch_tq import native
from torch_tq.errors import InternalError, InvalidArgument
from torch_tq.model import DTYPES, DType, validate_shape  # noqa: F401 - codec.DTYPES

if TYPE_CHECKING:  # torch is imported lazily: a storage server never needs it
    import torch

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
SHAPE_KEY = b"shape"
DTYPE_KEY = b"dtype"
COMPRESSION_KEY = b"compression"

# torch.frombuffer over a received Arrow buffer: Arrow marks it read-only, but the memory is
# ours alone (a fresh receive buffer), so a writable tensor over it is safe.
warnings.filterwarnings(
    "ignore", message="The given buffer is not writable", category=UserWarning, module=__name__
)


# Arrow value type -> dtype, for uploads that do not name their dtype (uint16 only as bf16).
_BY_ARROW = {d.arrow: d for d in DTYPES.values() if d.name != "bfloat16"}


def dtype_of_tensor(t: torch.Tensor) -> DType:
    try:
        return DTYPES[str(t.dtype).removeprefix("torch.")]
    except KeyError:
        raise InvalidArgument(
            f"unsupported tensor dtype {t.dtype}; supported: {', '.join(DTYPES)}"
        ) from None


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def chunk_elements(dtype: DType, chunk_bytes: int) -> int:
    """Elements per record batch: about ``chunk_bytes``, a multiple of 64 (bool bytes stay whole)."""
    return max(64, (chunk_bytes // dtype.itemsize) // 64 * 64)


# --------------------------------------------------------------------------- schemas


def wire_schema(dtype: DType, shape: tuple[int, ...], extra: dict[str, str] | None = None) -> pa.Schema:
    metadata = {SHAPE_KEY: json.dumps(list(shape)).encode(), DTYPE_KEY: dtype.name.encode()}
    for k, v in (extra or {}).items():
        metadata[k.encode()] = v.encode()
    return pa.schema([pa.field("data", dtype.arrow, nullable=False)], metadata=metadata)


# --------------------------------------------------------------------------- compression
#
# zstd and lz4 are Arrow IPC's own buffer codecs: a writer compresses each record batch's
# buffers, every Arrow reader decompresses them (nothing of ours in the format). Snappy has no
# IPC codec, so torch_tq frames it itself: the column ``data`` becomes ``binary``, each value
# one chunk of raw element bytes (bool: one byte per element) compressed with raw snappy
# (cramjam), and the schema metadata says ``compression=snappy`` beside shape and dtype.


def ipc_options(compression: str | None) -> pa.ipc.IpcWriteOptions | None:
    """IPC write options for zstd/lz4 (None: none, or snappy, which is framed instead)."""
    if compression in ("zstd", "lz4"):
        return pa.ipc.IpcWriteOptions(compression=compression)
    return None


def _cramjam():
    try:
        import cramjam
    except ImportError:
        raise InvalidArgument(
            "snappy compression needs the cramjam package: pip install 'torch_tq[snappy]'"
        ) from None
    return cramjam


def snappy_schema(dtype: DType, shape: tuple[int, ...]) -> pa.Schema:
    return pa.schema([pa.field("data", pa.binary(), nullable=False)], metadata={
        SHAPE_KEY: json.dumps(list(shape)).encode(), DTYPE_KEY: dtype.name.encode(),
        COMPRESSION_KEY: b"snappy"})


def snappy_pack(values: pa.Array) -> pa.Array:
    """One snappy-compressed binary value holding the raw bytes of flat ``values``."""
    raw = element_bytes(values)
    return pa.array([bytes(_cramjam().snappy.compress_raw(raw))], pa.binary())


def snappy_unpack(column: pa.Array, dtype: DType) -> pa.Array:
    """The flat values of a snappy-framed ``data`` column (one batch)."""
    cj = _cramjam()
    out = []
    for value in column:
        if not value.is_valid:
            raise InvalidArgument("snappy-framed data must not contain nulls")
        try:
            raw = cj.snappy.decompress_raw(value.as_buffer())
        except Exception as e:  # cramjam raises its own DecompressionError
            raise InvalidArgument(f"snappy data does not decompress: {e}") from None
        out.append(raw_values(pa.py_buffer(raw), dtype))
    if not out:
        return pa.array([], type=dtype.arrow)
    return out[0] if len(out) == 1 else pa.concat_arrays(out)


def raw_values(buf: pa.Buffer, dtype: DType) -> pa.Array:
    """Flat values over raw element bytes (bool: bytes 0 or 1)."""
    if buf.size % dtype.itemsize:
        raise InvalidArgument(f"{buf.size} bytes are not a whole number of {dtype.name} values")
    n = buf.size // dtype.itemsize
    if dtype.name == "bool":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidArgument("bool data must hold bytes 0 or 1")
        return pa.array(raw.view(np.bool_), type=pa.bool_())
    return pa.Array.from_buffers(dtype.arrow, n, [None, buf])


def is_snappy(schema: pa.Schema) -> bool:
    return (schema.metadata or {}).get(COMPRESSION_KEY) == b"snappy"


def parse_wire_schema(schema: pa.Schema) -> tuple[DType, tuple[int, ...]]:
    """Reads dtype and shape from a canonical schema (what a torch_tq server sends)."""
    md = schema.metadata or {}
    if len(schema) != 1 or SHAPE_KEY not in md or DTYPE_KEY not in md:
        raise InternalError("server sent a schema without torch_tq shape/dtype metadata")
    try:
        dtype = DTYPES[md[DTYPE_KEY].decode()]
        shape = tuple(int(d) for d in json.loads(md[SHAPE_KEY]))
    except (KeyError, ValueError, TypeError):
        raise InternalError("server sent unreadable shape/dtype metadata") from None
    expected = pa.binary() if md.get(COMPRESSION_KEY) == b"snappy" else dtype.arrow
    if schema.field(0).type != expected:
        raise InternalError(f"server sent {schema.field(0).type} values for dtype {dtype.name}")
    return dtype, shape


# --------------------------------------------------------------------------- tensor -> Arrow


def tensor_values(t: torch.Tensor) -> tuple[DType, tuple[int, ...], np.ndarray]:
    """A flat numpy view (or one contiguous copy) of ``t``'s values on the CPU."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"expected a torch.Tensor, got {type(t).__name__}")
    dtype = dtype_of_tensor(t)
    shape = tuple(t.shape)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if dtype.name == "bfloat16":
        flat = t.view(torch.int16).numpy().view(np.uint16)
    else:
        flat = t.numpy()
    return dtype, shape, flat


def values_to_arrays(
    dtype: DType, flat: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pa.Array]:
    """Yields Arrow arrays over consecutive chunks of ``flat`` (zero-copy except bool)."""
    step = chunk_elements(dtype, chunk_bytes)
    for start in range(0, len(flat), step):
        part = flat[start : start + step]
        if dtype.name == "bool":
            yield pa.array(part, type=pa.bool_())
        else:
            yield pa.Array.from_buffers(dtype.arrow, len(part), [None, pa.py_buffer(part)])


def element_bytes(arr: pa.Array) -> memoryview:
    """The raw element bytes of a flat array: what digests cover (bool as one byte 0/1)."""
    if len(arr) == 0:
        return memoryview(b"")
    if arr.type == pa.bool_():
        return memoryview(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).view(np.uint8))
    width = arr.type.byte_width
    buf = arr.buffers()[1]
    return memoryview(buf)[arr.offset * width : (arr.offset + len(arr)) * width]


# --------------------------------------------------------------------------- uploads


def chunks(reader) -> Iterator:
    """The chunks of a Flight stream (DoGet or DoPut reader) that carry a record batch."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        if chunk.data is not None:
            yield chunk


class UploadDecoder:
    """Turns the record batches of any accepted upload form into flat value arrays.

    Forms: a flat primitive column (canonical), ``list``/``large_list``/``fixed_size_list`` of a
    primitive (the seed's Python and Rust examples), and ``arrow.fixed_shape_tensor``.

    Args:
        schema: the upload's schema.
        declared_dtype: the command's ``dtype``, if any.
        declared_shape: the command's ``shape``, if any.

    Raises:
        InvalidArgument: a schema of any other form, or contradicting declarations.
    """

    def __init__(
        self,
        schema: pa.Schema,
        declared_dtype: str | None = None,
        declared_shape: tuple[int, ...] | None = None,
    ) -> None:
        if len(schema) != 1:
            raise InvalidArgument(
                f"upload schema must have exactly one column (e.g. 'data'), got {len(schema)}"
            )
        md = schema.metadata or {}
        meta_dtype = md.get(DTYPE_KEY, b"").decode("utf-8", "replace") or None
        meta_shape = None
        if SHAPE_KEY in md:

            try:
                raw = json.loads(md[SHAPE_KEY])
            except ValueError:
                raise InvalidArgument("schema metadata 'shape' is not JSON") from None
            meta_shape = validate_shape(raw)
        if declared_shape is not None and meta_shape is not None and declared_shape != meta_shape:
            raise InvalidArgument(
                f"command shape {list(declared_shape)} contradicts schema shape {list(meta_shape)}"
            )
        if declared_dtype and meta_dtype and declared_dtype != meta_dtype:
            raise InvalidArgument(
                f"command dtype {declared_dtype!r} contradicts schema dtype {meta_dtype!r}"
            )
        self.declared_shape = declared_shape if declared_shape is not None else meta_shape
        named = declared_dtype or meta_dtype

        field_type = schema.field(0).type
        if md.get(COMPRESSION_KEY) not in (None, b"snappy"):
            raise InvalidArgument(
                f"unsupported compression {md[COMPRESSION_KEY][:20]!r} in the schema: snappy "
                "is framed by torch_tq; zstd and lz4 travel as Arrow IPC compression"
            )
        if md.get(COMPRESSION_KEY) == b"snappy":
            if field_type != pa.binary() or not named or named not in DTYPES:
                raise InvalidArgument(
                    "a snappy-framed upload is a binary 'data' column with its dtype named"
                )
            self.form = "snappy"
            self.dtype = DTYPES[named]
            self.tensor_shape = ()
            self.rows = 0
            self.row_length = None
            self.ragged = False
            return
        self.form = "flat"
        self.tensor_shape: tuple[int, ...] = ()
        value_type = field_type
        if isinstance(field_type, pa.FixedShapeTensorType):
            permutation = field_type.permutation
            if permutation is not None and list(permutation) != list(range(len(permutation))):
                raise InvalidArgument("fixed_shape_tensor uploads with a permutation are not supported")
            self.form = "tensor"
            self.tensor_shape = tuple(field_type.shape)
            value_type = field_type.value_type
        elif isinstance(field_type, pa.BaseExtensionType):
            raise InvalidArgument(f"unsupported extension type {field_type}")
        elif pa.types.is_list(field_type) or pa.types.is_large_list(field_type) or (
            pa.types.is_fixed_size_list(field_type)
        ):
            self.form = "list"
            value_type = field_type.value_type
        if named is not None:
            if named not in DTYPES:
                raise InvalidArgument(f"unsupported dtype {named!r}; supported: {', '.join(DTYPES)}")
            self.dtype = DTYPES[named]
            if value_type != self.dtype.arrow:
                raise InvalidArgument(
                    f"values of type {value_type} cannot carry dtype {named} "
                    f"(expected {self.dtype.arrow})"
                )
        else:
            if value_type not in _BY_ARROW:
                raise InvalidArgument(
                    f"unsupported column type {field_type}: send one column of bool, (u)int8, "
                    "int16/32/64 or float16/32/64 values, a list of them, or a fixed_shape_tensor"
                )
            self.dtype = _BY_ARROW[value_type]
        self.rows = 0
        self.row_length: int | None = None
        self.ragged = False

    def flatten(self, column: pa.Array) -> pa.Array:
        """The flat values of one batch's column; checks for nulls."""
        if column.null_count:
            raise InvalidArgument("uploads must not contain nulls")
        if self.form == "flat":
            return column
        if self.form == "snappy":
            return snappy_unpack(column, self.dtype)
        if self.form == "tensor":
            column = column.storage
        self.rows += len(column)
        if isinstance(column, pa.FixedSizeListArray):
            length = column.type.list_size
            if len(column):
                self._note_row_length(length)
        else:
            lengths = column.value_lengths()
            if len(lengths):
                lo, hi = pc.min_max(lengths).values()
                self._note_row_length(lo.as_py())
                if lo.as_py() != hi.as_py():
                    self.ragged = True
        values = column.flatten()
        if values.null_count:
            raise InvalidArgument("uploads must not contain nulls")
        return values

    def _note_row_length(self, length: int) -> None:
        if self.row_length is None:
            self.row_length = length
        elif self.row_length != length:
            self.ragged = True

    def shape_for(self, count: int) -> tuple[int, ...]:
        """The matrix shape after ``count`` values arrived with no declared shape."""
        if self.form in ("flat", "snappy"):
            return (count,)
        if self.form == "tensor":
            return (self.rows, *self.tensor_shape)
        if self.rows == 1 or self.rows == 0:
            return (count,)
        if self.ragged:
            raise InvalidArgument(
                f"{self.rows} list rows of different lengths: declare 'shape' in the command"
            )
        return (self.rows, self.row_length or 0)


# --------------------------------------------------------------------------- Arrow -> tensor


def _aligned(address: int, itemsize: int) -> bool:
    return address % max(itemsize, 1) == 0


class TensorAssembler:
    """Builds one tensor from the flat arrays of a stream.

    Without ``out``, a stream that arrives as one suitably aligned buffer becomes a tensor
    over that buffer (no copy); otherwise the values are copied once, as they arrive, into a
    tensor allocated from the schema's shape (or into ``out``). ``shared`` allocates that
    tensor in shared memory (always, with the one copy), so a DataLoader worker hands it to
    the main process without copying it again.
    """

    def __init__(
        self,
        dtype: DType,
        shape: tuple[int, ...],
        out: torch.Tensor | None = None,
        shared: bool = False,
    ):
        self.dtype = dtype
        self.shared = shared
        self.shape = shape
        self.numel = numel(shape)
        self.count = 0
        self.copied_bytes = 0  # bytes copied out of the received buffers (0: zero-copy)
        self.result: torch.Tensor | None = None
        self._dst: np.ndarray | None = None
        if out is not None:
            check_out(out, dtype, shape)
            self.result = out
            self._dst = _byte_view(out)

    def allocate(self) -> torch.Tensor:
        """The result tensor: ``out``, else allocated now, in shared memory (a shared
        storage from the start: ``share_memory_()`` would copy into one) or from the pool.
        :meth:`add` copies into it; a caller may also fill its bytes itself."""
        import torch

        if self.result is None:
            if self.shared:
                storage = torch.UntypedStorage._new_shared(
                    max(1, self.numel * self.dtype.itemsize))
                self.result = torch.empty(0, dtype=self.dtype.torch).set_(storage, 0, self.shape)
            else:
                self.result = empty_tensor(self.dtype, self.shape)
        return self.result

    def add(self, arr: pa.Array) -> None:
        n = len(arr)
        if self.count + n > self.numel:
            raise InternalError(
                f"stream carries more than the {self.numel} elements its schema declares"
            )
        if n == 0:
            return
        if self._dst is None:
            if n == self.numel and self.dtype.name != "bool" and not self.shared:
                width = self.dtype.itemsize
                buf = arr.buffers()[1]
                if _aligned(buf.address + arr.offset * width, width):
                    # The tensor shares the received Arrow buffer (a DLPack capsule whose
                    # deleter keeps it alive); a misaligned one is copied below instead.
                    self.result = native.tensor_over(
                        buf, self.dtype.torch, self.shape, arr.offset * width
                    )
                    self.count = n
                    return
            self._dst = _byte_view(self.allocate())
        if self.dtype.name == "bool":
            src = arr.to_numpy(zero_copy_only=False).view(np.uint8)
            self._dst[self.count : self.count + n] = src
            self.copied_bytes += n
        else:
            width = self.dtype.itemsize
            src = np.frombuffer(
                arr.buffers()[1], dtype=np.uint8, count=n * width, offset=arr.offset * width
            )
            self._dst[self.count * width : (self.count + n) * width] = src
            self.copied_bytes += n * width
        self.count += n

    def finish(self) -> torch.Tensor:
        if self.count != self.numel:
            raise InternalError(
                f"stream ended after {self.count} of {self.numel} elements"
            )
        if self.result is None:  # zero elements
            import torch

            self.result = torch.empty(self.shape, dtype=self.dtype.torch)
        return self.result


def empty_tensor(dtype: DType, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor whose memory comes from Arrow's default pool.

    A fresh 256 MiB ``torch.empty`` is filled at ~1.7 GB/s here (every page faults in anew);
    the pool (mimalloc by default) hands back memory freed by earlier results, filled at
    ~12 GB/s. The tensor keeps the pool buffer alive through a writable memoryview.
    """
    import torch

    nbytes = numel(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype.torch)
    buf = pa.allocate_buffer(nbytes)
    return torch.frombuffer(memoryview(buf), dtype=torch.uint8).view(dtype.torch).reshape(shape)


def check_out(out: torch.Tensor, dtype: DType, shape: tuple[int, ...]) -> None:
    import torch

    if not isinstance(out, torch.Tensor):
        raise InvalidArgument(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype.torch or tuple(out.shape) != shape:
        raise InvalidArgument(
            f"out is {out.dtype} {list(out.shape)}, the matrix is {dtype.torch} {list(shape)}"
        )
    if out.device.type != "cpu" or not out.is_contiguous():
        raise InvalidArgument("out must be a contiguous CPU tensor")


def _byte_view(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.reshape(-1).view(torch.uint8).numpy()
