"""The data model every layer shares: a matrix's key, its shape, its element types.

A matrix is addressed by ``Key(index_id, matrix_type)``; its values have one of
:data:`DTYPES` and a shape of at most :data:`MAX_DIMS` dimensions. The checks here are the
ones every entry point applies (the wire protocol, the client, the store); this module
imports neither Arrow Flight nor torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from torch_tq.errors import InvalidArgument, NotFound

MAX_INDEX_ID = 2**64 - 1
MAX_DIMS = 32
_MATRIX_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}", re.ASCII)
GROUP_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}", re.ASCII)  # a consumer group's name


class Key(NamedTuple):
    """The address of one matrix."""

    index_id: int
    matrix_type: str

    def __str__(self) -> str:
        return f"index_id={self.index_id}, type={self.matrix_type}"


def not_found(key: Key) -> NotFound:
    return NotFound(f"matrix not found: {key}")


def validate_index_id(value: Any) -> int:
    """Returns ``value`` if it is a JSON integer in ``[0, 2**64 - 1]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            f"index_id must be an integer in [0, 2**64-1], got {type(value).__name__}"
        )
    if value < 0 or value > MAX_INDEX_ID:
        raise InvalidArgument(f"index_id {value} is outside [0, 2**64-1]")
    return value


def validate_matrix_type(value: Any) -> str:
    """Returns the canonical (lower-case) matrix type name.

    Names match ``[A-Za-z][A-Za-z0-9_]{0,63}`` (ASCII only, checked before lowering so
    look-alikes such as the Kelvin sign never become ASCII letters).
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"matrix_type must be a string, got {type(value).__name__}")
    if not _MATRIX_TYPE_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid matrix_type {value[:80]!r}: use 1-64 ASCII letters, digits or '_', "
            "starting with a letter"
        )
    return value.lower()


def validate_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidArgument(f"shape must be a list of integers, got {type(value).__name__}")
    if len(value) > MAX_DIMS:
        raise InvalidArgument(f"shape has {len(value)} dimensions; the limit is {MAX_DIMS}")
    dims = []
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 2**62:
            raise InvalidArgument(f"shape entries must be integers >= 0, got {d!r:.80}")
        dims.append(d)
    if math.prod(dims) > 2**62:
        raise InvalidArgument(f"shape {dims} has too many elements")
    return tuple(dims)


@dataclass(frozen=True)
class DType:
    """One supported element type and its three spellings."""

    name: str  # also the torch.dtype attribute name
    arrow: pa.DataType  # the Arrow type the values travel and rest as
    numpy: np.dtype  # the numpy view of the raw values (bool: one byte per element)
    itemsize: int  # bytes per element in a tensor

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("bool", pa.bool_(), np.dtype(np.bool_), 1),
        DType("uint8", pa.uint8(), np.dtype(np.uint8), 1),
        DType("int8", pa.int8(), np.dtype(np.int8), 1),
        DType("int16", pa.int16(), np.dtype(np.int16), 2),
        DType("int32", pa.int32(), np.dtype(np.int32), 4),
        DType("int64", pa.int64(), np.dtype(np.int64), 8),
        DType("float16", pa.float16(), np.dtype(np.float16), 2),
        DType("bfloat16", pa.uint16(), np.dtype(np.uint16), 2),
        DType("float32", pa.float32(), np.dtype(np.float32), 4),
        DType("float64", pa.float64(), np.dtype(np.float64), 8),
    )
}
