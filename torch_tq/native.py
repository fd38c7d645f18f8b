"""The native layer (:mod:`torch_tq._C`) as Python sees it, with pure-Python fallbacks.

:func:`tensor_over` turns any buffer (an Arrow buffer received from Flight, a pinned block)
into a torch tensor that shares its memory, through a DLPack capsule whose deleter keeps the
buffer's owner alive for as long as the tensor lives. It covers every torch_tq dtype,
bfloat16 and bool included (which pyarrow's own ``__dlpack__`` refuses), and refuses a
misaligned address with :class:`BufferError` rather than build a tensor over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

try:
    from torch_tq import _C
except ImportError:  # a source checkout without the built extension: pure Python
    _C = None

# DLPack type codes: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6.
_DLPACK = {
    "bool": (6, 8),
    "uint8": (1, 8),
    "int8": (0, 8),
    "int16": (0, 16),
    "int32": (0, 32),
    "int64": (0, 64),
    "float16": (2, 16),
    "bfloat16": (4, 16),
    "float32": (2, 32),
    "float64": (2, 64),
}


def available() -> bool:
    """Whether the compiled extension is importable."""
    return _C is not None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_over(buffer: Any, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0
                ) -> torch.Tensor:
    """A CPU tensor of ``dtype`` and ``shape`` over ``buffer``'s memory from byte ``offset``:
    no copy; the tensor keeps the buffer alive.

    Raises:
        BufferError: the address is not aligned to the item size (copy instead).
        ValueError: the buffer is too small, or the dtype is not one torch_tq carries.
    """
    import torch

    name = _name(dtype)
    if name not in _DLPACK:
        raise ValueError(f"no DLPack export for dtype {dtype}")
    if _C is not None:
        code, bits = _DLPACK[name]
        return torch.from_dlpack(_C.to_dlpack(buffer, code, bits, tuple(shape), offset))
    # Pure Python: torch.frombuffer over a memoryview (which keeps the buffer alive).
    view = memoryview(buffer).cast("B")
    itemsize = dtype.itemsize
    count = 1
    for d in shape:
        count *= d
    if offset + count * itemsize > len(view):
        raise ValueError(f"buffer of {len(view)} bytes is too small for {count} x {itemsize} "
                         f"bytes at offset {offset}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    import numpy as np

    address = np.frombuffer(view, np.uint8).ctypes.data + offset
    if address % itemsize:
        raise BufferError(f"address {address:#x} is not aligned to the {itemsize}-byte item size")
    return torch.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
