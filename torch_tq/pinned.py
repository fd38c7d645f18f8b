"""Page-locked (pinned) host memory, pooled, for true asynchronous host-to-GPU copies.

A :class:`PinnedPool` hands out :class:`PinnedBlock` s: whole ``cudaHostAlloc`` allocations
of at most 4 GiB each, reused across calls so the cost of page-locking is paid once, and
always freed (on :meth:`PinnedPool.close`, at interpreter exit, or when a block larger than
the pool keeps is returned). A block is plain memory with an address, a size and a lifetime,
not tied to Flight, so the UCX transport can register the same blocks for RDMA.

Without CUDA (or without the compiled extension) :func:`status` says why and
:func:`default_pool` returns ``None``; callers fall back to pageable memory with the same
results.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import TYPE_CHECKING

from torch_tq import native

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_BLOCK_BYTES = 4 << 30  # registrations kept <= 4 GiB each
_GRANULE = 2 << 20


def status() -> tuple[bool, str]:
    """``(True, "available")`` when pinned memory can be had here, else ``(False, why)``."""
    if not native.available():
        return False, "the torch_tq._C extension is not built"
    ok, why = native._C.cuda_status()
    return bool(ok), why


class PinnedBlock:
    """One page-locked allocation: ``address``, ``size``; back to its pool on :meth:`release`."""

    def __init__(self, pool: PinnedPool, address: int, size: int) -> None:
        self.pool = pool
        self.address = address
        self.size = size
        self._in_use = False

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A CPU tensor over the start of the block; it keeps the block out of the pool
        until the tensor is gone."""
        import torch

        code, bits = native._DLPACK[native._name(dtype)]
        holder = _Holder(self)
        capsule = native._C.pointer_to_dlpack(self.address, self.size, holder, code, bits,
                                              tuple(shape))
        return torch.from_dlpack(capsule)

    def release(self) -> None:
        self.pool._give_back(self)


class _Holder:
    """Owner of a block while a tensor views it: returns the block when the tensor dies."""

    def __init__(self, block: PinnedBlock) -> None:
        self.block = block

    def __del__(self) -> None:
        self.block.release()


class PinnedPool:
    """Reusable pinned blocks.

    Args:
        keep_bytes: free blocks kept for reuse, in total; beyond it, returned blocks are
            freed at once.
    """

    def __init__(self, keep_bytes: int = 2 << 30) -> None:
        ok, why = status()
        if not ok:
            raise OSError(f"pinned memory is not available: {why}")
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._free: list[PinnedBlock] = []
        self._all: dict[int, PinnedBlock] = {}
        self._closed = False
        self.allocations = 0  # cudaHostAlloc calls made (reuse keeps this low)

    def acquire(self, nbytes: int) -> PinnedBlock:
        """A block of at least ``nbytes`` (best fit among free ones, else a new allocation).

        Raises:
            ValueError: over 4 GiB (no single registration may be larger).
        """
        if nbytes > MAX_BLOCK_BYTES:
            raise ValueError(f"{nbytes} bytes is over the {MAX_BLOCK_BYTES}-byte block limit")
        size = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        with self._lock:
            if self._closed:
                raise OSError("the pinned pool is closed")
            fits = [b for b in self._free if b.size >= size]
            if fits:
                block = min(fits, key=lambda b: b.size)
                self._free.remove(block)
                block._in_use = True
                return block
        address = native._C.host_alloc(size)
        block = PinnedBlock(self, address, size)
        block._in_use = True
        with self._lock:
            self._all[address] = block
            self.allocations += 1
        return block

    def _give_back(self, block: PinnedBlock) -> None:
        free_now = None
        with self._lock:
            if not block._in_use:
                return
            block._in_use = False
            kept = sum(b.size for b in self._free)
            if self._closed or kept + block.size > self.keep_bytes:
                free_now = self._all.pop(block.address, None)
            else:
                self._free.append(block)
        if free_now is not None:
            native._C.free_host(free_now.address)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._all.values())

    def close(self) -> None:
        """Frees every free block now; blocks still in use are freed when returned."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            for b in free:
                self._all.pop(b.address, None)
        for b in free:
            native._C.free_host(b.address)


_default: PinnedPool | None = None
_default_lock = threading.Lock()


def default_pool() -> PinnedPool | None:
    """The process's pool, created on first use; ``None`` where pinned memory is unavailable."""
    global _default
    with _default_lock:
        if _default is None and status()[0]:
            _default = PinnedPool()
            atexit.register(_default.close)
        return _default
