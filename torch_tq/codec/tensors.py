"""torch.Tensor <-> Arrow: the canonical wire schema, flat values, chunking. Compression is
:mod:`.compression`, the forms a server accepts :mod:`.upload`, a received tensor
:mod:`.assemble`, the BatchWrite table :mod:`.batch`.

The canonical wire form of a matrix is one column ``data`` holding the flattened values,
with ``shape`` (JSON list) and ``dtype`` (torch dtype name) in the schema metadata, sent as
record batches of bounded size. bfloat16 has no Arrow type and travels as ``uint16`` with
``dtype=bfloat16``; bool travels as Arrow's bit-packed boolean.

This module knows nothing of the network or of files.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Iterator

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from torch_tq.errors import InternalError, InvalidArgument
from torch_tq.model import DTYPES, DType

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
    if not extra:
        return _plain_wire_schema(dtype, tuple(shape))
    return _wire_schema(dtype, shape, extra)


@functools.lru_cache(maxsize=1024)  # a pipeline sends a few shapes over and over
def _plain_wire_schema(dtype: DType, shape: tuple[int, ...]) -> pa.Schema:
    return _wire_schema(dtype, shape, None)


def _wire_schema(dtype: DType, shape: tuple[int, ...], extra: dict[str, str] | None) -> pa.Schema:
    metadata = {SHAPE_KEY: json.dumps(list(shape)).encode(), DTYPE_KEY: dtype.name.encode()}
    for k, v in (extra or {}).items():
        metadata[k.encode()] = v.encode()
    return pa.schema([pa.field("data", dtype.arrow, nullable=False)], metadata=metadata)


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


# --------------------------------------------------------------------------- streams


def chunks(reader) -> Iterator:
    """The chunks of a Flight stream (DoGet or DoPut reader) that carry a record batch."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        if chunk.data is not None:
            yield chunk


