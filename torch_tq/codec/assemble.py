"""Received Arrow values into a torch tensor: without a copy when the matrix arrived as one
aligned buffer, else copied once into the result (the client's side of the codec)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from torch_tq import native
from torch_tq.codec.tensors import DType, numel
from torch_tq.errors import InternalError, InvalidArgument

if TYPE_CHECKING:
    import torch


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
