"""A server in its own process, for notebooks, tests and single-machine pipelines.

gRPC and ``fork()`` do not mix (RELIABILITY.md §9), so the server runs in a fresh
interpreter (``python -m torch_tq serve``), never in a forked copy of the caller. The child
watches its stdin: when the parent dies, the pipe closes and the server shuts down.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

from torch_tq._malloc import ARENAS_ENV, server_arenas_env
from torch_tq.errors import ERROR_CLASSES, Unavailable

_LISTENING = re.compile(r"listening on (grpc(?:\+tls)?://\S+)")
_METRICS = re.compile(r"metrics on (http://\S+)")
_ERROR = re.compile(r"error: (NOT_FOUND|INVALID_ARGUMENT|UNAVAILABLE|INTERNAL_ERROR|"
                    r"UNAUTHENTICATED|PERMISSION_DENIED|FAILED_PRECONDITION): (.*)")


ALLOCATOR_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def allocator_for(storage: str) -> str:
    """The Arrow allocator a server process should start with (pyarrow fixes it at import).

    Received batches come from Arrow's default pool. For the ``disk`` store, whose uploads
    only pass through, jemalloc gives freed upload buffers back: mimalloc (pyarrow's
    default) was measured keeping ~400 MiB after a 2 GiB upload, jemalloc ~100 MiB. The
    ``memory`` store keeps what it receives and frees a whole matrix on each overwrite;
    mimalloc reuses that memory for the next upload instead of faulting in fresh pages,
    which measured 0.85-0.92x plain Flight on put against 0.69-0.91x with jemalloc
    (benchmarks/roundtrip.py, three runs each, interleaved).
    """
    return "mimalloc" if storage == "memory" else "jemalloc"


class ServerHandle:
    """A running background server.

    Attributes:
        location: ``grpc://HOST:PORT`` (``grpc+tls://`` with TLS) to give to
            :class:`torch_tq.Client`.
        port: the port it listens on.
        pid: the server process id.
        data_dir: its data directory (``None``: the default or a temporary memory store).
        metrics_url: where its Prometheus metrics are (``metrics_port=``), else None.
    """

    def __init__(self, proc: subprocess.Popen, location: str, data_dir: str | None,
                 metrics_url: str | None = None) -> None:
        self._proc = proc
        self.location = location
        self.metrics_url = metrics_url
        self.port = int(location.rsplit(":", 1)[1])
        self.pid = proc.pid
        self.data_dir = data_dir

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """Stops the server (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_pipes()
        return self._proc.returncode

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited({self._proc.returncode})"
        return f"ServerHandle({self.location}, pid={self.pid}, {state})"


def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    data_dir: str | None = None,
    storage: str = "disk",
    *,
    durable: bool | None = None,
    chunk_bytes: int | str | None = None,
    max_matrix_bytes: int | str | None = None,
    startup_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    stderr=None,
    log_level: str = "WARNING",
    **options,
) -> ServerHandle:
    """Starts a storage server in its own process and waits until it accepts calls.

    Args:
        host, port, data_dir, storage, durable, chunk_bytes, max_matrix_bytes: as for
            :func:`torch_tq.serve` (``port`` defaults to 0: a free port).
        startup_timeout: seconds to wait for the server to listen.
        env: extra environment variables for the server process.
        stderr: where the server's log goes (default: this process's stderr).
        log_level: the server's logging level (default ``"WARNING"``: a notebook or a test
            sees problems, not every start and stop; ``"INFO"`` for the whole story).
        options: more ``torch-tq serve`` options by their Python names, e.g. ``qps=200``,
            ``streams_per_client=10``.

    Returns:
        A :class:`ServerHandle`; use it as a context manager to stop the server.

    Raises:
        Unavailable: the server did not start (its exit code and output are in the message).

    Example:
        >>> with torch_tq.start_server(storage="memory") as srv:  # doctest: +SKIP
        ...     client = torch_tq.Client(srv.location)
    """
    cmd = [sys.executable, "-m", "torch_tq", "--log-level", log_level, "serve", "--host", host,
           "--port", str(port), "--storage", storage, "--watch-stdin"]
    if data_dir is not None:
        cmd += ["--data-dir", os.fspath(data_dir)]
    if durable is not None:
        cmd += ["--fsync" if durable else "--no-fsync"]
    if chunk_bytes is not None:
        cmd += ["--chunk-bytes", str(chunk_bytes)]
    if max_matrix_bytes is not None:
        cmd += ["--max-matrix-bytes", str(max_matrix_bytes)]
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):  # a switch: --name / --no-name
            cmd.append(("--" if value else "--no-") + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):  # cluster_nodes=["n0", "n1"]
            cmd += ["--" + name.replace("_", "-"), ",".join(map(str, value))]
        else:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.setdefault(ALLOCATOR_ENV, allocator_for(storage))
    arenas = server_arenas_env(child_env)
    if arenas:
        child_env[ARENAS_ENV] = arenas
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=child_env,
        start_new_session=True,
    )
    lines: list[str] = []
    found: list[str] = []
    metrics_url: list[str] = []
    ready = threading.Event()

    stdout = proc.stdout  # a pipe: stdout=PIPE above

    def pump() -> None:
        # Reads the child's stdout for the whole of its life, so the pipe never fills.
        for raw in stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if not found:
                lines.append(line)
                metrics = _METRICS.search(line)
                if metrics:
                    metrics_url.append(metrics.group(1))
                match = _LISTENING.search(line)
                if match:
                    found.append(match.group(1))
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True, name=f"torch_tq-server-{proc.pid}").start()
    deadline = time.monotonic() + startup_timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            break
    if not found:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for line in lines:
            match = _ERROR.fullmatch(line)
            if match:
                raise ERROR_CLASSES[match.group(1)](match.group(2))
        tail = "\n".join(lines[-20:])
        raise Unavailable(
            f"torch_tq server did not start (exit code {proc.returncode}); output:\n{tail}"
        )
    return ServerHandle(proc, found[0], data_dir, metrics_url[0] if metrics_url else None)
