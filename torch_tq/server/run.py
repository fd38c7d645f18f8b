"""Running a server: :func:`make_server` builds one from options and the environment,
:func:`serve` runs it until SIGINT/SIGTERM and shuts it down within a deadline."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading

import pyarrow as pa

from torch_tq._config import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_HOST,
    DEFAULT_MAX_MATRIX_BYTES,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_GRACE_S,
    parse_bool,
    parse_size,
    resolve,
)
from torch_tq._malloc import cap_arenas, tune_malloc
from torch_tq._version import __version__
from torch_tq.errors import InvalidArgument, TQError, Unavailable
from torch_tq.protocol import commands as protocol
from torch_tq.server.flight import TQFlightServer
from torch_tq.server.launch import ALLOCATOR_ENV, allocator_for
from torch_tq.server.limits import Limits, limits_from
from torch_tq.server.membership import membership_from
from torch_tq.server.security import security_from
from torch_tq.store.errors import first_line
from torch_tq.store.engine import Store

log = logging.getLogger(__name__)


def _location(host: str, port: int, scheme: str = "grpc") -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def make_server(
    host: str | None = None,
    port: int | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    *,
    durable: bool | None = None,
    chunk_bytes: int | str | None = None,
    max_matrix_bytes: int | str | None = None,
    compression: str | None = None,
    ucx: bool | None = None,
    same_host: bool | None = None,
    limits: Limits | None = None,
    max_memory: int | str | None = None,
    auth_tokens: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    insecure: bool | None = None,
    session_ttl_s: float | None = None,
    node_name: str | None = None,
    cluster_nodes=None,
    placement_key: int | None = None,
    cluster_epoch: int | None = None,
    **limit_options,
) -> TQFlightServer:
    """Builds a running server (it serves from construction on); see :func:`serve`."""
    host = resolve(host, "HOST", DEFAULT_HOST)
    port = resolve(port, "PORT", DEFAULT_PORT, int)
    storage = resolve(storage, "STORAGE", "disk")
    durable = resolve(durable, "FSYNC", None, parse_bool)
    chunk = parse_size(resolve(chunk_bytes, "CHUNK_BYTES", DEFAULT_CHUNK_BYTES, parse_size))
    cap = parse_size(resolve(max_matrix_bytes, "MAX_MATRIX_BYTES", DEFAULT_MAX_MATRIX_BYTES, parse_size))
    if chunk < 1024 or chunk > (1 << 30):
        raise InvalidArgument(f"chunk_bytes must be within [1KiB, 1GiB], got {chunk}")
    if limits is None:
        limits = limits_from(**limit_options)
    elif limit_options:
        raise InvalidArgument("pass either limits= or individual limit options, not both")
    security = security_from(host, auth_tokens, tls_cert, tls_key, tls_client_ca, insecure,
                             session_ttl_s)
    membership = membership_from(node_name, cluster_nodes, placement_key, cluster_epoch)
    tune_malloc()
    cap_arenas()
    compression = protocol.validate_compression(resolve(compression, "COMPRESSION", None))
    same_host = resolve(same_host, "SAME_HOST", True, parse_bool)
    memory_cap = resolve(max_memory, "MAX_MEMORY", None, parse_size)
    if memory_cap is not None:
        memory_cap = parse_size(memory_cap)
        if storage != "memory":
            raise InvalidArgument("max_memory is the capacity of a memory store (storage='memory')")
    try:
        store = Store(data_dir, storage, durable=durable, chunk_bytes=chunk,
                      max_matrix_bytes=cap, compression=compression, shared=same_host,
                      max_memory=memory_cap)
    except TQError:
        raise  # ours say what is wrong already (Unavailable is an OSError too)
    except OSError as e:
        raise InvalidArgument(f"data directory {data_dir or '(the default)'} cannot be used: "
                              f"{e.strerror or e}") from None
    store.admits = membership.admits if membership is not None else None
    try:
        ucx_enabled = resolve(ucx, "UCX", True, parse_bool)
        try:
            server = TQFlightServer(_location(host, port, security.scheme), store, limits,
                                    ucx_enabled, same_host, security=security)
            server.membership = membership
            return server
        except pa.ArrowException as e:  # gRPC could not bind: Arrow says no more than that
            raise Unavailable(f"cannot listen on {_location(host, port)} (is the port in use, "
                              f"or the address not this host's, or the TLS key not the "
                              f"certificate's?): {first_line(e)}") from None
    except BaseException:
        store.close()
        raise


def serve(
    host: str | None = None,
    port: int | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    *,
    durable: bool | None = None,
    chunk_bytes: int | str | None = None,
    max_matrix_bytes: int | str | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S,
    compression: str | None = None,
    ucx: bool | None = None,
    same_host: bool | None = None,
    limits: Limits | None = None,
    max_memory: int | str | None = None,
    auth_tokens: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    insecure: bool | None = None,
    session_ttl_s: float | None = None,
    node_name: str | None = None,
    cluster_nodes=None,
    placement_key: int | None = None,
    cluster_epoch: int | None = None,
    metrics_port: int | None = None,
    _watch_stdin: bool = False,
    **limit_options,
) -> None:
    """Runs a storage server until SIGINT/SIGTERM, then shuts it down within a deadline.

    Prints one line ``listening on grpc://HOST:PORT`` once it accepts calls.

    Args:
        host: address to bind (default ``127.0.0.1``; ``TORCH_TQ_HOST``).
        port: gRPC port (default 8080; 0 picks a free one; ``TORCH_TQ_PORT``).
        data_dir: the store's directory (default: the embedded default directory, see
            README; ``TORCH_TQ_DATA_DIR``).
        storage: ``"disk"`` (durable, default) or ``"memory"`` (``TORCH_TQ_STORAGE``).
        durable: fsync before acknowledging (default: on for ``disk``; ``TORCH_TQ_FSYNC``).
        chunk_bytes: record batch size of stored matrices (default 4MiB).
        max_matrix_bytes: per-matrix limit (default 10 GB).
        ucx: offer the UCX data plane (default on; it starts with the first UCX client and
            needs ``ucxx``; ``TORCH_TQ_UCX``).
        same_host: offer same-host access to clients on this host (default on; a memory
            store then keeps their matrices as files in /dev/shm; ``TORCH_TQ_SAME_HOST``).
        compression: ``"zstd"`` or ``"lz4"`` to compress the disk store's files (at rest;
            off by default; ``TORCH_TQ_COMPRESSION``). Clients choose wire compression
            per call.
        shutdown_grace: seconds in-flight calls get to finish before the process exits hard
            (safe: uploads are published atomically).
        max_memory: a memory store's capacity (default half the RAM;
            ``TORCH_TQ_MAX_MEMORY``): an upload whose declared size does not fit is refused
            with UNAVAILABLE before any byte is taken.
        auth_tokens: a file of lines ``<identity> <role> <token>`` (roles ``read``,
            ``write``, ``admin``; mode 0600, else the server refuses to start; read again
            on SIGHUP; ``TORCH_TQ_AUTH_TOKENS``): every call must then carry a token of it
            (see docs/security.md). Default: no authentication.
        tls_cert, tls_key: PEM files: serve ``grpc+tls://`` (``TORCH_TQ_TLS_CERT``,
            ``TORCH_TQ_TLS_KEY``).
        tls_client_ca: PEM CA bundle: mutual TLS, every client presents a certificate it
            signed (``TORCH_TQ_TLS_CLIENT_CA``).
        insecure: allow a non-loopback ``host`` without ``auth_tokens`` (refused
            otherwise; ``TORCH_TQ_INSECURE``).
        session_ttl_s: how long a session token from Flight's basic-auth handshake lasts
            (default 3600; ``TORCH_TQ_SESSION_TTL``).
        node_name, cluster_nodes, placement_key, cluster_epoch: this node's name among
            every node's (a list, or comma-separated), the cluster's ``placement_key`` and
            membership epoch (``TORCH_TQ_NODE_NAME``, ``TORCH_TQ_CLUSTER_NODES``, ...): the
            node then refuses to store an index_id another node owns (``WrongNode``,
            FAILED_PRECONDITION). See docs/cluster.md.
        metrics_port: serve Prometheus metrics on ``http://HOST:PORT/metrics`` (0: a free
            port; ``TORCH_TQ_METRICS_PORT``; needs prometheus-client). Default: none.
        limits: a :class:`torch_tq.Limits`, or its fields as keywords (``qps=1000``,
            ``qps_burst``, ``streams_per_client=100``, ``max_calls=1000``,
            ``max_batch_items=1000``, ``max_batch_bytes``; 0 switches one off;
            ``TORCH_TQ_QPS`` etc.).

    Example:
        >>> import torch_tq
        >>> torch_tq.serve(port=8080, data_dir="/nvme/tq")  # doctest: +SKIP
    """
    # No traceback may reach a client: Arrow formats the exceptions our handlers raise with
    # the traceback module, which honours this limit. Our own logs use
    # server.errors.format_exception().
    sys.tracebacklimit = 0
    # what this server creates (stored files, staging, recycled shared memory) is its user's
    # alone (files 0600, directories 0700); same-host clients of that user still read it
    os.umask(0o077)
    server = make_server(
        host, port, data_dir, storage, durable=durable, chunk_bytes=chunk_bytes,
        max_matrix_bytes=max_matrix_bytes, compression=compression, ucx=ucx,
        same_host=same_host, limits=limits, max_memory=max_memory, auth_tokens=auth_tokens,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, insecure=insecure,
        session_ttl_s=session_ttl_s, node_name=node_name, cluster_nodes=cluster_nodes,
        placement_key=placement_key, cluster_epoch=cluster_epoch, **limit_options,
    )
    _check_allocator(server.store.storage)
    # what start-up made (modules, torch's and pyarrow's objects: ~70,000) is kept for good;
    # moved out of the collector's sight, a full collection walks ~30,000 objects instead
    # (the server's collections over a pipeline run: 41 -> 18 ms)
    gc.freeze()
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
        auth = server.security.auth
        if auth is not None and hasattr(signal, "SIGHUP"):
            # read on a thread of its own: a signal handler must not take the auth lock
            signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
                target=auth.reload, daemon=True, name="torch_tq-auth-reload").start())
    if _watch_stdin:
        threading.Thread(target=_wait_stdin_eof, args=(stop,), daemon=True).start()
    host_used = resolve(host, "HOST", DEFAULT_HOST)
    metrics_port = resolve(metrics_port, "METRICS_PORT", None, int)
    if metrics_port is not None:
        from torch_tq.server.metrics import start_metrics

        membership = server.membership
        node = membership.node if membership is not None else \
            _location(host_used, server.port, server.security.scheme)
        http = start_metrics(server, host_used, metrics_port, node)
        print(f"metrics on http://{_location(host_used, http.server_port).split('://')[1]}"
              "/metrics", flush=True)
    print(f"listening on {_location(host_used, server.port, server.security.scheme)}",
          flush=True)
    log.info("torch_tq %s serving: %s; %s", __version__, server.store.describe(),
             server.security.describe())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        _shutdown(server, shutdown_grace)


def _check_allocator(storage: str) -> None:
    backend = pa.default_memory_pool().backend_name
    wanted = allocator_for(storage)
    if backend != wanted and not os.environ.get(ALLOCATOR_ENV):
        log.info("Arrow allocator is %s; %s=%s before Python starts suits a %s store better",
                 backend, ALLOCATOR_ENV, wanted, storage)


def _wait_stdin_eof(stop: threading.Event) -> None:
    """The parent of a background server holds our stdin: EOF means it is gone."""
    # os.read on the raw descriptor: a buffered sys.stdin read would hold a lock that
    # interpreter shutdown then waits on.
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    stop.set()


def _shutdown(server: TQFlightServer, grace: float) -> None:
    done = threading.Event()

    server.stopping.set()

    def run() -> None:
        try:
            server.queue.close()  # long-polling consumers return UNAVAILABLE now
            server.shutdown()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="torch_tq-shutdown").start()
    if not done.wait(grace):
        log.warning("calls still running %.1fs after shutdown began; exiting hard", grace)
        server.store.close()
        sys.stdout.flush()
        os._exit(0)
    server.queue.close()
    server.ucx.close()
    server.store.close()
    log.info("server stopped")
