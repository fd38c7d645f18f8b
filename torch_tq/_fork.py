"""gRPC and ``fork()`` do not mix (RELIABILITY.md section 9).

A process forked from one that had already started gRPC (a Flight client or server) inherits
gRPC's threads and locks in whatever state they were in, and a connection opened there can
hang. torch_tq records the first process that starts gRPC and refuses, with a clear error,
to open a connection in a process forked from it.
"""

from __future__ import annotations

import os

from torch_tq.errors import ForkedProcessError

# The pid of the first process that opened a Flight connection. A process forked from it
# inherits gRPC's threads and locks in whatever state they were, and a connection opened
# there can hang: refuse with a clear error instead.
_grpc_pid: int | None = None


def note_grpc_use() -> None:
    """Records that this process is starting gRPC (a client or a server)."""
    global _grpc_pid
    if _grpc_pid is None:
        _grpc_pid = os.getpid()


def check_fork_safe() -> None:
    """Raises :class:`ForkedProcessError` in a process forked after gRPC was in use."""
    pid = os.getpid()
    if _grpc_pid is not None and _grpc_pid != pid:
        raise ForkedProcessError(
            f"process {pid} was forked from process {_grpc_pid} after that process had used "
            "gRPC (a torch_tq or pyarrow.flight client), and a new connection here could hang. "
            "Fix: dataset.loader(batch_size=..., num_workers=...) builds the DataLoader "
            "right (or pass DataLoader(..., multiprocessing_context='forkserver')); other "
            "processes: start them with 'spawn' or 'forkserver', or fork before the first "
            "torch_tq call"
        )


# What a DataLoader worker imports anyway: a forkserver that holds them already hands each
# worker a process with them loaded (importing torch takes seconds, in every worker of every
# epoch otherwise). Importing opens no connection, so the forkserver stays free of gRPC.
_WORKER_MODULES = ("torch", "torch.utils.data", "torch_tq.integrations.dataset")


def preload_in_forkserver() -> None:
    """Adds the modules a DataLoader worker needs to what the forkserver imports when it
    starts (the modules it was told to preload are kept). Has no effect once this
    process's forkserver runs."""
    import multiprocessing
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is not None:
        return
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    missing = [m for m in _WORKER_MODULES if m not in current]
    if missing:
        multiprocessing.set_forkserver_preload(current + missing)
