"""glibc malloc settings for processes that move large messages through gRPC."""

from __future__ import annotations

import ctypes
import os

_tuned: bool | None = None  # once per process


# freed memory worth handing back to the system at once: glibc's trim threshold, and what
# a server frees (deletes, an aborted upload) before it calls give_back_memory()
GIVE_BACK_AFTER_BYTES = 64 << 20

_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _mallopt():
    """glibc's ``mallopt``, or None off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def tune_malloc() -> bool:
    """Keeps glibc from handing gRPC's receive buffers back to the kernel after every message.

    Servers call it at start, clients when they first connect (both receive through gRPC).

    gRPC receives each message into buffers from glibc's malloc, which by default unmaps or
    trims freed multi-MiB blocks, so the next message faults in fresh pages while the kernel
    copies into them: 13-21 thousand page faults per 256 MiB upload here, a quarter of the
    server's CPU. Fixed mmap and trim thresholds (32 MiB, 64 MiB retained at most) and a
    16 MiB top pad bring that to a few hundred (benchmarks/roundtrip.py: put 2.0 -> 2.5 GB/s
    in an A/B of two servers). Skipped where the user set any ``MALLOC_*`` tunable, where
    ``TORCH_TQ_TUNE_MALLOC=0``, and off glibc. Returns whether it applied the settings.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("TORCH_TQ_TUNE_MALLOC", "1") == "0" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    _tuned = all(
        mallopt(param, value) == 1
        for param, value in (
            (m_mmap_threshold, 32 << 20),
            (m_trim_threshold, GIVE_BACK_AFTER_BYTES),
            (m_top_pad, 16 << 20),
        )
    )
    return _tuned


# A server's arenas: what a memory store holds are gRPC's receive buffers, spread over
# glibc's arenas. Once they are freed, malloc_trim gives back the free pages of every arena
# except the top of each thread arena, which glibc shrinks only once it reaches the trim
# threshold, 64 MiB above, and a thread arena is 64 MiB at most: so each kept up to 64 MiB
# for good (memory.py: 114-196 MiB left above the baseline after deleting 1 GiB of
# matrices). With two arenas 37-46 MiB were left (one arena: 8-9 MiB); the server's
# Python runs under the GIL, and its gRPC threads allocate a buffer per message, so two
# arenas are not contended.
SERVER_ARENAS = 2


ARENAS_ENV = "MALLOC_ARENA_MAX"


def server_arenas_env(env=None) -> str | None:
    """What a server process's environment ``env`` (default this process's) should set
    ``MALLOC_ARENA_MAX`` to (glibc reads it at start, before threads made arenas of their
    own); None where it sets it already, or ``TORCH_TQ_TUNE_MALLOC=0``."""
    env = os.environ if env is None else env
    if env.get("TORCH_TQ_TUNE_MALLOC", "1") == "0" or ARENAS_ENV in env:
        return None
    return str(SERVER_ARENAS)


def cap_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Caps this server process at ``arenas`` glibc arenas from now on (the arenas its
    threads made already stay; ``start_server`` and ``torch-tq serve`` set
    ``MALLOC_ARENA_MAX`` in the server's environment instead). Skipped where the user set
    ``MALLOC_ARENA_MAX``, where ``TORCH_TQ_TUNE_MALLOC=0``, and off glibc; never in a
    client (a trainer's threads would contend for them). Returns whether it applied."""
    if server_arenas_env() is None:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_arena_max = -8
    return mallopt(m_arena_max, arenas) == 1


def give_back_memory() -> None:
    """Returns freed memory to the system now: Arrow's pool's unused memory, then glibc's
    free pages in every arena (gRPC's receive buffers come from glibc, on many threads'
    arenas, which trimming at the top of the heap alone does not reach)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_later_lock = None
_later_pending = False


def give_back_memory_soon(delay_s: float = 0.5) -> None:
    """:func:`give_back_memory` now and once more ``delay_s`` later: the buffers of a call
    that is failing are freed only after its handler has returned."""
    import threading

    global _later_lock, _later_pending
    give_back_memory()
    if _later_lock is None:
        _later_lock = threading.Lock()
    with _later_lock:
        if _later_pending:
            return
        _later_pending = True

    def later() -> None:
        global _later_pending
        with _later_lock:
            _later_pending = False
        give_back_memory()

    timer = threading.Timer(delay_s, later)
    timer.daemon = True
    timer.start()
