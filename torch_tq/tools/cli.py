"""The ``torch-tq`` command line: ``serve`` a storage node, run the ``demo``, and the tools
around one: ``ls``, ``info``, ``rm``, ``stats``, ``export``/``import`` (safetensors), ``env``.

Exit codes: 0 success; 1 NOT_FOUND; 2 bad usage or INVALID_ARGUMENT; 3 UNAVAILABLE (the
server is unreachable, over a limit, or full); 4 INTERNAL_ERROR; 5 UNAUTHENTICATED (no valid
``--token``); 6 PERMISSION_DENIED (the token's role does not allow it); 7 FAILED_PRECONDITION
(a cluster node that does not own the id); 130 interrupted.
``--json`` prints what scripts read; errors go to stderr as ``torch-tq: CODE: message``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

from torch_tq._config import DEFAULT_SHUTDOWN_GRACE_S, parse_size
from torch_tq._version import __version__
from torch_tq.tools.bench import human_size
from torch_tq.errors import InvalidArgument, TQError
from torch_tq.server.limits import LIMIT_OPTIONS


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    import pyarrow as pa

    from torch_tq._config import resolve
    from torch_tq.server.run import serve
    from torch_tq._malloc import ARENAS_ENV, server_arenas_env
    from torch_tq.server.launch import ALLOCATOR_ENV, allocator_for

    wanted = allocator_for(resolve(args.storage, "STORAGE", "disk"))
    again = False
    if ALLOCATOR_ENV not in os.environ and pa.default_memory_pool().backend_name != wanted:
        # pyarrow fixed its allocator when it loaded: start again (same process id) with the
        # one that suits this store (see server.allocator_for).
        os.environ[ALLOCATOR_ENV] = wanted
        again = True
    arenas = server_arenas_env()
    if arenas:
        # glibc reads it when the process starts, before any thread has made an arena
        os.environ[ARENAS_ENV] = arenas
        again = True
    if again:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "torch_tq", *argv])

    serve(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        storage=args.storage,
        durable=args.fsync,
        chunk_bytes=args.chunk_bytes,
        max_matrix_bytes=args.max_matrix_bytes,
        compression=args.compression,
        ucx=args.ucx,
        same_host=args.same_host,
        max_memory=args.max_memory,
        auth_tokens=args.auth_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        insecure=args.insecure,
        session_ttl_s=args.session_ttl_s,
        node_name=args.node_name,
        cluster_nodes=args.cluster_nodes,
        placement_key=args.placement_key,
        cluster_epoch=args.cluster_epoch,
        metrics_port=args.metrics_port,
        **{name: getattr(args, name) for name in LIMIT_OPTIONS},
        shutdown_grace=args.shutdown_grace,
        _watch_stdin=args.watch_stdin,
    )
    return 0


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from torch_tq.client.client import Client
    from torch_tq.server.launch import start_server

    shape = tuple(int(d) for d in args.shape.split(","))
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="torch_tq-demo-")
    print(f"torch_tq {__version__} demo")
    log_path = os.path.join(tempfile.gettempdir(), f"torch_tq-demo-{os.getpid()}.log")
    log_file = open(log_path, "wb")  # the server's log, shown only if something fails
    ok = False
    try:
        with start_server(data_dir=data_dir, storage=args.storage, stderr=log_file) as srv:
            print(f"server    {srv.location}  ({args.storage} store in {data_dir}, pid {srv.pid})")
            client = Client(srv.location, transport=args.transport)
            print(f"transport {client.transport}")
            tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            size = tensor.numel() * tensor.element_size()
            desc = f"index_id=12345 type=prompt float32{list(shape)} {size / 2**20:.1f} MiB"
            puts, gets, same = [], [], True
            for _ in range(1 + args.repeat):  # the first round also pays one-time set-up
                t0 = time.perf_counter()
                client.put(12345, "prompt", tensor)
                puts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                back = client.get(12345, "prompt")
                gets.append(time.perf_counter() - t0)
                same = same and torch.equal(back, tensor)
                del back
            for name, times in (("put", puts), ("get", gets)):
                line = f"{name:<9} {desc} in {times[0]:.3f} s ({size / times[0] / 1e9:.2f} GB/s)"
                if len(times) > 1:
                    warm = statistics.median(times[1:])
                    line += f"; then {warm:.3f} s ({size / warm / 1e9:.2f} GB/s, median of {len(times) - 1})"
                print(line)
            print(f"bit-exact {'yes' if same else 'NO'}")
            meta = client.metadata(12345)
            print(f"metadata  types={meta['types']} dimensions={json.dumps(meta['dimensions'])}")
            client.close()
            ok = same
            return 0 if same else 1
    finally:
        log_file.close()
        if not ok:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
        os.unlink(log_path)
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


EXIT_CODES = {"NOT_FOUND": 1, "INVALID_ARGUMENT": 2, "UNAVAILABLE": 3, "INTERNAL_ERROR": 4,
              "UNAUTHENTICATED": 5, "PERMISSION_DENIED": 6, "FAILED_PRECONDITION": 7}


def _client(args: argparse.Namespace):
    from torch_tq.client.client import Client

    options = {"timeout": args.timeout, "transport": "grpc", "token": args.token,
               "tls_root_certs": args.tls_root_certs,
               "retry_deadline": 0 if args.no_retry else args.timeout,
               "connect_timeout": 0 if args.no_retry else args.timeout}
    if getattr(args, "nodes", None):
        from torch_tq.cluster.cluster import Cluster

        if args.location:
            raise InvalidArgument("give --location (one node) or --nodes (a cluster), not both")
        return Cluster.from_env(args.nodes).client(**options)
    return Client(args.location, **options)


def _emit(args: argparse.Namespace, data, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _group(args: argparse.Namespace, argv: list[str]) -> int:
    with _client(args) as client:
        if args.action == "reset":
            client.delete_group(args.name)
            _emit(args, {"group": args.name, "reset": True},
                  f"group {args.name} reset: its next consumer starts afresh")
            return 0
        status = client.group_status(args.name)
    _emit(args, status, "\n".join(f"{k}: {v}" for k, v in status.items()
                                   if k not in ("success", "message")))
    return 0


def _stats(args: argparse.Namespace, argv: list[str]) -> int:
    with _client(args) as client:
        stats = client.server_stats()
    if getattr(args, "nodes", None):  # {node: its Stats}: the totals, then each node
        stats = {"nodes": stats, **_totals(stats)}
    lines = []
    for key, value in stats.items():  # one line a figure; nested ones as compact JSON
        if key in ("success", "message"):
            continue
        lines.append(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    _emit(args, stats, "\n".join(lines))
    return 0


def _totals(per_node: dict) -> dict:
    """What adds up across nodes: matrices, bytes, bytes in and out, calls and errors."""
    totals: dict = {"nodes_serving": sum(1 for s in per_node.values()
                                         if s.get("status") == "SERVING")}
    for stats in per_node.values():
        for key in ("matrices", "bytes", "bytes_in", "bytes_out"):
            if isinstance(stats.get(key), int):
                totals[key] = totals.get(key, 0) + stats[key]
        for key in ("calls", "errors"):
            for name, n in (stats.get(key) or {}).items():
                totals.setdefault(key, {})[name] = totals.get(key, {}).get(name, 0) + n
    return totals


def _ls(args: argparse.Namespace, argv: list[str]) -> int:
    from torch_tq.protocol.commands import validate_matrix_type

    with _client(args) as client:
        items = client.list(args.index_id)
    if args.type:
        wanted = {validate_matrix_type(t) for t in args.type.split(",")}
        items = [m for m in items if m.matrix_type in wanted]
    rows = [{"index_id": m.index_id, "matrix_type": m.matrix_type, "dtype": m.dtype,
             "shape": list(m.shape), "nbytes": m.nbytes} for m in items]
    lines = [f"{'INDEX_ID':>20}  {'TYPE':<16} {'DTYPE':<9} {'SHAPE':<20} {'SIZE':>10}"]
    lines += [f"{r['index_id']:>20}  {r['matrix_type']:<16} {r['dtype']:<9} "
              f"{'x'.join(map(str, r['shape'])) or '()':<20} {human_size(r['nbytes']):>10}"
              for r in rows]
    total = sum(r["nbytes"] for r in rows)
    lines.append(f"{len(rows)} matrices, {human_size(total)}")
    _emit(args, rows, "\n".join(lines))
    return 0


def _info(args: argparse.Namespace, argv: list[str]) -> int:
    with _client(args) as client:
        meta = client.metadata(args.index_id)
    _emit(args, meta, "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items()
                                 if k not in ("success", "message")))
    return 0


def _rm(args: argparse.Namespace, argv: list[str]) -> int:
    with _client(args) as client:
        deleted = client.delete(args.index_id, args.type)
    _emit(args, {"index_id": args.index_id, "deleted": deleted},
          f"deleted index_id={args.index_id}: {', '.join(deleted)}")
    return 0


def _progress(args: argparse.Namespace, total: int | None, what: str):
    """A tqdm bar when tqdm is installed, stderr is a terminal and ``--progress`` is not
    ``never``; else None."""
    if args.progress == "never" or (args.progress == "auto" and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                file=sys.stderr)


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    ids = [int(i) for i in args.ids.split(",") if i.strip()]
    types = args.types.split(",") if args.types else None
    with _client(args) as client:
        total = sum(m.nbytes for i in ids for m in client.list(i)
                    if types is None or m.matrix_type in types)
        bar = _progress(args, total, "export")
        try:
            summary = client.export_safetensors(args.path, ids, types,
                                                progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
    summary["keys"] = [list(k) for k in summary["keys"]]
    _emit(args, summary, f"exported {summary['matrices']} matrices "
                         f"({human_size(summary['bytes'])}) to {summary['path']}")
    return 0


def _import(args: argparse.Namespace, argv: list[str]) -> int:
    from torch_tq.client import safetensors_io

    plan, _ = safetensors_io.plan_import(args.path, args.index_id)  # checked before connecting
    total = sum(spec["data_offsets"][1] - spec["data_offsets"][0] for _, _, spec in plan)
    with _client(args) as client:
        bar = _progress(args, total, "import")
        try:
            keys = client.import_safetensors(args.path, args.index_id,
                                             progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
    _emit(args, {"path": args.path, "keys": [list(k) for k in keys], "bytes": total},
          f"imported {len(keys)} matrices ({human_size(total)}) from {args.path}")
    return 0


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from torch_tq.tools import bench

    sizes = [parse_size(x) for x in args.sizes.split(",") if x.strip()]
    transports = args.transports.split(",") if args.transports else None
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    rows = bench.suite(sizes, transports, runs=args.runs, storage=args.storage,
                       progress=(lambda line: print(line, file=sys.stderr)) if show else None)
    _emit(args, rows, bench.table(rows))
    return 0


def environment() -> dict:
    """Versions and what this machine offers (CUDA, UCX, the extension), for bug reports."""
    import platform

    info: dict = {"torch_tq": __version__, "python": platform.python_version(),
                  "platform": platform.platform()}
    from torch_tq.transport import ucx  # its settings before ucxx loads UCX

    ucx.installed()
    for name in ("torch", "pyarrow", "numpy", "xxhash", "cramjam", "ucxx", "safetensors",
                 "tqdm"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", None) or getattr(module, "VERSION", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: say so
            info[name] = None
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["cuda_devices"] = torch.cuda.device_count() if info["cuda"] else 0
        info["torch_cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        info["cuda"] = False
    try:
        from torch_tq import native

        info["extension"] = bool(native.available())
    except Exception:  # noqa: BLE001
        info["extension"] = False
    info["ucx_usable"] = info.get("ucxx") is not None
    info["cpus"] = os.cpu_count()
    return info


def _env(args: argparse.Namespace, argv: list[str]) -> int:
    info = environment()
    _emit(args, info, "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-tq", description=__doc__.replace("``", ""))
    parser.add_argument("--version", action="version", version=f"torch_tq {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a storage server until SIGINT/SIGTERM")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="gRPC port (default 8080; 0: any free)")
    s.add_argument("--data-dir", default=None, help="store directory (default: embedded default)")
    s.add_argument("--storage", choices=["disk", "memory"], default=None, help="default disk")
    fsync = s.add_mutually_exclusive_group()
    fsync.add_argument("--fsync", dest="fsync", action="store_true", default=None,
                       help="fsync before acknowledging (default for disk)")
    fsync.add_argument("--no-fsync", dest="fsync", action="store_false",
                       help="acknowledge without fsync (faster, not crash-safe against power loss)")
    s.add_argument("--chunk-bytes", type=parse_size, default=None, help="record batch size (4MiB)")
    s.add_argument("--max-matrix-bytes", type=parse_size, default=None,
                   help="per-matrix limit (default 10GB)")
    u = s.add_mutually_exclusive_group()
    u.add_argument("--ucx", dest="ucx", action="store_true", default=None,
                   help="offer the UCX data plane (default; needs ucxx)")
    u.add_argument("--no-ucx", dest="ucx", action="store_false",
                   help="do not offer the UCX data plane")
    sh = s.add_mutually_exclusive_group()
    sh.add_argument("--same-host", dest="same_host", action="store_true", default=None,
                    help="offer same-host access to clients on this host (default)")
    sh.add_argument("--no-same-host", dest="same_host", action="store_false",
                    help="do not offer same-host access")
    s.add_argument("--compression", choices=["zstd", "lz4", "none"], default=None,
                   help="compress the disk store's files (default none)")
    s.add_argument("--max-memory", type=parse_size, default=None,
                   help="a memory store's capacity (default half the RAM)")
    sec = s.add_argument_group("security (docs/security.md)")
    sec.add_argument("--auth-tokens", default=None, metavar="PATH",
                     help="file of '<identity> <role> <token>' lines (mode 0600; re-read on "
                          "SIGHUP): every call must carry one of its tokens")
    sec.add_argument("--tls-cert", default=None, metavar="PEM", help="serve grpc+tls://")
    sec.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's key")
    sec.add_argument("--tls-client-ca", default=None, metavar="PEM",
                     help="mutual TLS: clients must present a certificate this CA signed")
    sec.add_argument("--insecure", action="store_true", default=None,
                     help="serve a non-loopback --host without --auth-tokens (refused "
                          "otherwise)")
    sec.add_argument("--session-ttl-s", type=float, default=None,
                     help="seconds a basic-auth handshake's session token lasts (3600)")
    cl = s.add_argument_group("cluster (docs/cluster.md)")
    cl.add_argument("--node-name", default=None, help="this node's name in its cluster")
    cl.add_argument("--cluster-nodes", default=None, metavar="N0,N1,...",
                    help="every node's name: this node refuses ids another one owns")
    cl.add_argument("--placement-key", type=int, default=None,
                    help="the cluster's placement_key (default 1)")
    cl.add_argument("--cluster-epoch", type=int, default=None,
                    help="the membership's epoch, for messages (default 0)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: any free; needs "
                        "prometheus-client)")
    lim = s.add_argument_group("limits (0 switches one off)")
    lim.add_argument("--qps", type=float, default=None, help="calls/s per client over TCP (1000)")
    lim.add_argument("--qps-ucx", type=float, default=None, help="calls/s per client over UCX (10000)")
    lim.add_argument("--qps-burst", type=float, default=None,
                     help="calls a client may make at once (default qps/10)")
    lim.add_argument("--streams-per-client", type=int, default=None,
                     help="concurrent calls per client (100)")
    lim.add_argument("--max-calls", type=int, default=None, help="concurrent calls per node (1000)")
    lim.add_argument("--max-batch-items", type=int, default=None,
                     help="items per BatchWrite/BatchRead (1000)")
    lim.add_argument("--max-batch-bytes", type=parse_size, default=None,
                     help="bytes per BatchWrite call (1GiB)")
    lim.add_argument("--slot-wait-s", type=float, default=None,
                     help="seconds a call within its fair share waits for a slot of a full "
                          "node (1)")
    s.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help="seconds in-flight calls get at shutdown (default 5)")
    s.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="start a server, write and read a matrix, print timings")
    d.add_argument("--shape", default="32,512,4096", help="matrix shape (default 32,512,4096)")
    d.add_argument("--storage", choices=["disk", "memory"], default="disk")
    d.add_argument("--data-dir", default=None, help="default: a temporary directory")
    d.add_argument("--repeat", type=int, default=3, help="warm rounds after the first (default 3)")
    d.add_argument("--transport", choices=["auto", "grpc", "same-host", "ucx"], default="auto",
                   help="how the client moves the bytes (default auto: same-host here)")
    d.set_defaults(func=_demo)

    def remote(name: str, helptext: str, func, json_flag: bool = True):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--location", default=None,
                       help="grpc://HOST:PORT (default TORCH_TQ_LOCATION or grpc://127.0.0.1:8080)")
        p.add_argument("--nodes", default=None, metavar="N0=LOC,N1=LOC",
                       help="a cluster instead of --location (the TORCH_TQ_NODES form): "
                            "ls, stats, info, rm and group over every node")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        p.add_argument("--token", default=None,
                       help="bearer token of an authenticating server (default TORCH_TQ_TOKEN)")
        p.add_argument("--tls-root-certs", default=None, metavar="PEM",
                       help="CA bundle that signed a grpc+tls:// server's certificate")
        p.add_argument("--no-retry", action="store_true",
                       help="fail at once when the server is unreachable or over a limit")
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
        p.set_defaults(func=func)
        return p

    remote("stats", "a server's Stats: calls, errors, bytes, limits, rejections", _stats)
    grp = remote("group", "a consumer group: 'status NAME' (ready, leased, consumed, ...) or "
                 "'reset NAME' (forget what it consumed, so that a re-run reads it all again)",
                 _group)
    grp.add_argument("action", choices=["status", "reset"])
    grp.add_argument("name", help="the consumer group")
    ls = remote("ls", "list stored matrices: keys, dtypes, shapes, sizes", _ls)
    ls.add_argument("--index-id", type=int, default=None, help="only this index_id")
    ls.add_argument("--type", default=None, help="only these types (comma-separated)")
    info = remote("info", "the seed's metadata of an index_id", _info)
    info.add_argument("index_id", type=int)
    rm = remote("rm", "delete an index_id's matrices (or one type)", _rm)
    rm.add_argument("index_id", type=int)
    rm.add_argument("--type", default=None, help="only this matrix type")
    ex = remote("export", "write index_ids' matrices to a .safetensors file (streaming)",
                _export)
    ex.add_argument("path")
    ex.add_argument("--ids", required=True, help="index_ids, comma-separated")
    ex.add_argument("--types", default=None, help="matrix types, comma-separated (default all)")
    im = remote("import", "store every tensor of a .safetensors file", _import)
    im.add_argument("path")
    im.add_argument("--index-id", type=int, default=None,
                    help="for files whose tensor names are bare matrix types")
    for p in (ex, im):
        p.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                       help="a progress bar on stderr (needs tqdm; auto: when a terminal)")
    b = sub.add_parser("bench", help="time put/get on every transport against memcpy, raw TCP "
                                     "and plain pyarrow.flight, in one run; print the table")
    b.add_argument("--sizes", default="1KiB,64KiB,1MiB,16MiB,256MiB",
                   help="matrix sizes, comma-separated (default 1KiB,64KiB,1MiB,16MiB,256MiB)")
    b.add_argument("--runs", type=int, default=3, help="timings per figure (median; default 3)")
    b.add_argument("--transports", default=None,
                   help="grpc,same-host,ucx (default: those available here)")
    b.add_argument("--storage", choices=["memory", "disk"], default="memory")
    b.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="a line per figure on stderr (auto: when a terminal)")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.set_defaults(func=_bench)
    e = sub.add_parser("env", help="versions, CUDA and UCX availability (for bug reports)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_env)
    for command in sub.choices.values():  # --log-level before or after the command
        command.add_argument("--log-level", default=argparse.SUPPRESS,
                             help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args, argv)
    except TQError as e:
        print(f"torch-tq: {e.code}: {e}", file=sys.stderr)
        if getattr(args, "watch_stdin", False):
            # launched by start_server(): it reads stdout and re-raises this, typed.
            print(f"error: {e.code}: {e}", flush=True)
        return EXIT_CODES.get(e.code, 4)
    except OSError as e:  # a local path: a missing directory, an unwritable file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"torch-tq: INVALID_ARGUMENT: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_CODES["INVALID_ARGUMENT"]
    except KeyboardInterrupt:
        return 130
