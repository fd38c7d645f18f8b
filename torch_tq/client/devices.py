"""Where a result lands: tensors over received buffers, pooled pinned blocks, GPU copies."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from torch_tq import native
from torch_tq.codec import tensors as codec
from torch_tq.codec import assemble


@dataclass(frozen=True)
class Want:
    """What a get should make of a matrix (see :meth:`torch_tq.Client.get`)."""

    out: Any = None  # a tensor to fill
    shared: bool = False  # allocate in shared memory
    device: Any = None  # e.g. "cuda"
    pin_memory: bool = False
    non_blocking: bool = False
    compression: str | None = None  # on the wire

    @property
    def to_cuda(self) -> bool:
        return self.device is not None and is_cuda(self.device)

    @property
    def pinned(self) -> bool:
        """Whether the result should be received into a pooled pinned block."""
        return (self.pin_memory or self.to_cuda) and self.out is None and not self.shared

    def place(self, t):
        """``t`` (a CPU tensor) on the wanted device."""
        return to_device(t, self.device, self.non_blocking) if self.device is not None else t


def tensor_from(buf: pa.Buffer, start: int, dtype: codec.DType, shape: tuple[int, ...]):
    """A tensor over ``buf[start:]`` (no copy when aligned), else a copy of it."""
    import torch

    nbytes = codec.numel(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype.torch)
    if (buf.address + start) % dtype.itemsize == 0:
        return native.tensor_over(buf, dtype.torch, shape, start)
    out = assemble.empty_tensor(dtype, shape)
    assemble._byte_view(out)[:] = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
    return out


def is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def pinned_out(dtype: codec.DType, shape: tuple[int, ...]):
    """A tensor over a pooled pinned block for the result, or None (no pinned memory here,
    or larger than one block may be)."""
    from torch_tq import pinned

    pool = pinned.default_pool()
    nbytes = codec.numel(shape) * dtype.itemsize
    if pool is None or nbytes == 0 or nbytes > pinned.MAX_BLOCK_BYTES:
        return None
    return pool.acquire(nbytes).tensor(dtype.torch, shape)


_streams: dict = {}
_in_flight: list = []  # (event, pinned source) of non-blocking copies not known to be done
_in_flight_lock = threading.Lock()


def to_device(t, device, non_blocking: bool = False):
    """Copies ``t`` to ``device``. From pinned memory the copy is non-blocking on a side
    stream; then either the host waits for that stream (the result is ready on return and
    ``t``'s block goes back to the pool), or, with ``non_blocking``, the caller's current
    stream waits for it through an event and ``t`` is kept until the event completes."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not t.is_pinned():
        return t.to(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _streams.get(device)
    if stream is None:
        stream = _streams.setdefault(device, torch.cuda.Stream(device=device))
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        moved = t.to(device, non_blocking=True)
    # the memory was allocated on the side stream: tell the allocator the caller's stream
    # uses it too, so it is not handed out again while the caller's kernels read it
    moved.record_stream(current)
    if not non_blocking:
        stream.synchronize()
        return moved
    done = stream.record_event()
    current.wait_event(done)
    with _in_flight_lock:
        # drop the sources of copies that have finished (their blocks return to the pool)
        _in_flight[:] = [(e, src) for e, src in _in_flight if not e.query()]
        _in_flight.append((done, t))
    return moved
