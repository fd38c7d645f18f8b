"""Compression on the wire, in one place.

zstd and lz4 are Arrow IPC's own buffer codecs: a writer compresses each record batch's
buffers, every Arrow reader decompresses them (nothing of ours in the format). Snappy has no
IPC codec, so torch_tq frames it itself: the column ``data`` becomes ``binary``, each value
one chunk of raw element bytes (bool: one byte per element) compressed with raw snappy
(cramjam), and the schema metadata says ``compression=snappy`` beside shape and dtype.

A BatchRead/BatchWrite table compresses with the IPC codecs only (snappy frames single
matrices), so a snappy client's batches travel uncompressed.
"""

from __future__ import annotations

import json

import pyarrow as pa

from torch_tq.codec.tensors import (
    COMPRESSION_KEY,
    DTYPE_KEY,
    SHAPE_KEY,
    DType,
    element_bytes,
    raw_values,
    wire_schema,
)
from torch_tq.errors import InvalidArgument

COMPRESSIONS = ("zstd", "lz4", "snappy")


def validate(value) -> str | None:
    """A compression name, lower-cased, or None (``None``/``""``/``"none"``).

    Raises:
        InvalidArgument: an unknown codec.
    """
    if value is None or value == "" or value == "none":
        return None
    if not isinstance(value, str) or value.lower() not in COMPRESSIONS:
        raise InvalidArgument(f"compression must be one of {list(COMPRESSIONS)} or none, got {value!r:.40}")
    return value.lower()


def for_batches(compression: str | None) -> str | None:
    """What a BatchRead/BatchWrite of a client with ``compression`` uses."""
    return compression if compression != "snappy" else None


def stream_schema(dtype: DType, shape: tuple[int, ...], compression: str | None) -> pa.Schema:
    """The schema a single matrix streams with under ``compression``."""
    return snappy_schema(dtype, shape) if compression == "snappy" else wire_schema(dtype, shape)


def pack(values: pa.Array, compression: str | None) -> pa.Array:
    """One record batch's column under ``compression`` (IPC codecs compress later)."""
    return snappy_pack(values) if compression == "snappy" else values


def unpack(column: pa.Array, dtype: DType, schema: pa.Schema) -> pa.Array:
    """The flat values of a received column, whatever the stream's framing."""
    return snappy_unpack(column, dtype) if is_snappy(schema) else column


_IPC_OPTIONS: dict[str | None, pa.ipc.IpcWriteOptions] = {}


def ipc_options(compression: str | None) -> pa.ipc.IpcWriteOptions:
    """IPC write options: zstd/lz4 buffer compression, else none (also for snappy, which is
    framed instead). Made once each (a new one reads the environment: ~5 us a call)."""
    key = compression if compression in ("zstd", "lz4") else None
    options = _IPC_OPTIONS.get(key)
    if options is None:
        options = _IPC_OPTIONS.setdefault(key, pa.ipc.IpcWriteOptions(compression=key))
    return options


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


def is_snappy(schema: pa.Schema) -> bool:
    return (schema.metadata or {}).get(COMPRESSION_KEY) == b"snappy"
