"""The RL pipeline's real shape: many small per-sample items, written in batches by a producer
process and read in batches by a consumer process as soon as each batch is stored.

For each item size (default 4 KiB, 64 KiB, 256 KiB and 1 MiB, float32) and each transport
(gRPC, same-host, and UCX when ucxx is installed), a fresh server (``--storage``, default
memory, default limits unless ``--qps`` is given) and two spawned processes:

* the **producer** writes ``--items`` items with ``put_many`` in batches of ``--batch`` and,
  after each batch is stored, sends its keys to the consumer;
* the **consumer** reads each batch with ``get_many`` as soon as it hears of it (with
  ``--dataloader``: ``DataLoader(TQDataset(group=...))`` streaming instead, ended by the
  producer's ``finish``).

The clock runs from the moment both are connected and ready to the consumer's last item;
after it stops, the consumer checks every item byte for byte. Baselines, measured in the
same run on the same bytes: raw loopback **TCP** between two Python processes (one batch of
bytes per message) and **memcpy** of a batch into a reused buffer. Figures are medians of
``--runs``; the last lines are the ratios. ``--cpu`` also prints, per batch, the CPU time
(user + system) and minor page faults of the producer, the server and the consumer over
the timed run: where the time goes when the machine is the limit.

Example:
    python benchmarks/pipeline.py --runs 3
    python benchmarks/pipeline.py --sizes 256KiB --transports grpc --dataloader
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_tq._config import parse_size  # noqa: E402
from torch_tq.tools.bench import TcpBaseline, human_size, median_time  # noqa: E402

TYPE = "sample"
WARM = 1 << 40  # index_ids of the warm-up calls, outside the workload's


def _where(location: str, transport: str):
    """How a client names the server to use ``transport``."""
    if transport == "ucx":
        host = location.split("://", 1)[1].rsplit(":", 1)[0]
        return [f"ucx://{host}:8081", location]
    return location


def _client(location: str, transport: str):
    import torch_tq

    return torch_tq.Client(_where(location, transport), transport=transport)


def _item(index_id: int, n: int):
    import torch

    return torch.arange(n, dtype=torch.float32) + float(index_id)


def _usage() -> tuple[float, float, int]:
    """This process's user and system CPU seconds and minor page faults so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime, ru.ru_minflt


def _spent(before: tuple, after: tuple | None = None) -> tuple:
    """What was spent since ``before`` (until ``after``; default: now, in this process)."""
    return tuple(b - a for a, b in zip(before, after if after is not None else _usage()))


def _server_usage(pid: int) -> tuple[float, float, int]:
    """The server process's user and system CPU seconds and minor faults (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def _producer(location, transport, items, n, batch, keys_q, ready, go, dataloader) -> None:
    os.environ["TORCH_TQ_TRANSPORT"] = transport
    client = _client(location, transport)
    tensors = {i: _item(i, n) for i in range(items)}
    # warm: the transport chosen, the pool's connections open (a first batch call in a
    # process opens them, which took 250-450 ms here), as in a pipeline that runs on
    warm = {(WARM + i, TYPE): tensors[i % items] for i in range(batch)}
    client.put_many(warm, batch_items=batch)
    for i in range(batch):
        client.delete(WARM + i)
    ready.put("producer")
    go.wait()
    before = _usage()
    for start in range(0, items, batch):
        ids = list(range(start, min(items, start + batch)))
        results = client.put_many({(i, TYPE): tensors[i] for i in ids}, batch_items=batch)
        failed = [r for r in results if not r.success]
        if failed:
            raise SystemExit(f"put_many failed: {failed[0]}")
        keys_q.put(ids)
    if dataloader:
        client.finish([TYPE])
    spent = _spent(before)
    keys_q.put(None)
    ready.put((client.stats["retries"], spent))


def _consumer(location, transport, items, n, batch, keys_q, ready, go, done_q, dataloader,
              group) -> None:
    import torch

    os.environ["TORCH_TQ_TRANSPORT"] = transport
    client = _client(location, transport)
    client.get_many([(WARM + i, "warm") for i in range(batch)], batch_items=batch)  # warm
    received: dict[int, torch.Tensor] = {}
    if dataloader:
        from torch_tq import TQDataset

        ds = TQDataset(_where(location, transport), [TYPE], group=group, batch_items=batch,
                       idle_timeout=120, client_options={"transport": transport})
        ready.put("consumer")
        go.wait()
        t0, before = time.perf_counter(), _usage()
        for item in ds.loader(batch_size=None):
            received[int(item["index_id"])] = item[TYPE]
        t1, spent = time.perf_counter(), _spent(before)
    else:
        ready.put("consumer")
        go.wait()
        t0, before = time.perf_counter(), _usage()
        while True:
            ids = keys_q.get()
            if ids is None:
                break
            for r in client.get_many([(i, TYPE) for i in ids], batch_items=batch):
                if not r.success:
                    raise SystemExit(f"get_many failed: {r}")
                received[r.index_id] = r.tensor
        t1, spent = time.perf_counter(), _spent(before)
    # after the clock: every item, byte for byte
    exact = len(received) == items and all(
        torch.equal(received[i], _item(i, n)) for i in range(items))
    done_q.put((t0, t1, exact, spent))


def pipeline_run(transport: str, size: int, items: int, batch: int, storage: str,
                 dataloader: bool, qps: float | None, run: int) -> tuple[float, bool, int, dict]:
    """Seconds from go to the consumer's last item, whether every byte was right, the
    producer's retries (calls the server's quota turned away), and each process's CPU
    seconds (user, system) and minor page faults over the run."""
    import tempfile

    import torch_tq

    n = size // 4
    options = {"storage": storage}
    if storage == "disk":
        options["data_dir"] = tempfile.mkdtemp(prefix="tq-pipeline-")
    if qps is not None:
        options["qps"] = qps
    ctx = mp.get_context("spawn")
    with torch_tq.start_server(**options) as srv:
        keys_q, ready, done_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        go = ctx.Event()
        group = f"pipeline-{os.getpid()}-{run}"
        prod = ctx.Process(target=_producer, args=(srv.location, transport, items, n, batch,
                                                   keys_q, ready, go, dataloader))
        cons = ctx.Process(target=_consumer, args=(srv.location, transport, items, n, batch,
                                                   keys_q, ready, go, done_q, dataloader, group))
        prod.start()
        cons.start()
        try:
            for _ in range(2):
                ready.get(timeout=300)
            server_before = _server_usage(srv.pid)
            go.set()
            t0, t1, exact, consumer_spent = done_q.get(timeout=1800)
            server_spent = _spent(server_before, _server_usage(srv.pid))
            retries, producer_spent = ready.get(timeout=300)
        finally:
            prod.join(60)
            cons.join(60)
            for p in (prod, cons):
                if p.is_alive():
                    p.kill()
        if prod.exitcode or cons.exitcode:
            raise SystemExit(f"{transport} {human_size(size)}: producer exit {prod.exitcode}, "
                             f"consumer exit {cons.exitcode}")
    usage = {"producer": producer_spent, "consumer": consumer_spent, "server": server_spent}
    return t1 - t0, exact, retries, usage



def baselines(size: int, items: int, batch: int, runs: int) -> dict[str, float]:
    """GB/s of raw loopback TCP and memcpy moving the workload's bytes, a batch at a time."""
    nbytes = size * batch
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    batches = -(-items // batch)
    tcp = TcpBaseline(nbytes)
    try:
        t = median_time(lambda: [tcp.put(src) for _ in range(batches)], runs)
        tcp_gbps = nbytes * batches / t / 1e9
    finally:
        tcp.close()
    t = median_time(lambda: [np.copyto(dst, src) for _ in range(batches)], max(runs, 5))
    return {"tcp": tcp_gbps, "memcpy": nbytes * batches / t / 1e9}


def _transports(wanted: str | None) -> list[str]:
    if wanted:
        return [t.strip() for t in wanted.split(",") if t.strip()]
    try:
        import ucxx  # noqa: F401 - installed: UCX is one of the transports

        return ["grpc", "same-host", "ucx"]
    except ImportError:
        return ["grpc", "same-host"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--sizes", default="4KiB,64KiB,256KiB,1MiB")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--transports", default=None, help="default: every one this machine has")
    ap.add_argument("--storage", choices=["memory", "disk"], default="memory")
    ap.add_argument("--qps", type=float, default=None,
                    help="the server's per-client QPS quota (default: the server's default)")
    ap.add_argument("--dataloader", action="store_true",
                    help="the consumer reads through DataLoader(TQDataset(group=...))")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    ap.add_argument("--cpu", action="store_true",
                    help="also print each process's CPU time and page faults per batch")
    args = ap.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    transports = _transports(args.transports)
    consumer = "DataLoader(TQDataset)" if args.dataloader else "get_many"
    print(f"{args.items} items per run, batches of {args.batch}, {args.storage} store, "
          f"consumer {consumer}, medians of {args.runs} runs")
    figures: dict[str, float] = {}
    ratios = []
    for size in sizes:
        base = baselines(size, args.items, args.batch, args.runs)
        total = size * args.items
        figures[f"{size}:tcp_GBps"], figures[f"{size}:memcpy_GBps"] = base["tcp"], base["memcpy"]
        print(f"{human_size(size)} items: raw TCP {base['tcp']:.2f} GB/s, memcpy "
              f"{base['memcpy']:.2f} GB/s")
        for transport in transports:
            results = [pipeline_run(transport, size, args.items, args.batch, args.storage,
                                    args.dataloader, args.qps, r) for r in range(args.runs)]
            if not all(exact for _, exact, _, _ in results):
                raise SystemExit(f"{transport} {human_size(size)}: items did not arrive intact")
            seconds = statistics.median(s for s, _, _, _ in results)
            retries = max(r for _, _, r, _ in results)
            items_s, gbps = args.items / seconds, total / seconds / 1e9
            figures[f"{size}:{transport}_items_per_s"] = items_s
            figures[f"{size}:{transport}_GBps"] = gbps
            print(f"  {transport:<10} {items_s:10.0f} items/s {gbps:7.3f} GB/s   "
                  f"(byte-exact; producer retries up to {retries})")
            if args.cpu:
                batches = -(-args.items // args.batch)
                parts = []
                for who in ("producer", "server", "consumer"):
                    user = statistics.median(u[who][0] for *_, u in results) / batches * 1e3
                    system = statistics.median(u[who][1] for *_, u in results) / batches * 1e3
                    faults = statistics.median(u[who][2] for *_, u in results) / batches
                    parts.append(f"{who} {user:.1f}+{system:.1f} ms, {faults:.0f} faults")
                print("    per batch (user+system CPU, minor page faults): " + "; ".join(parts))
            ratios.append(f"ratio {human_size(size)} {transport}: {gbps / base['tcp']:.3f}x tcp, "
                          f"{gbps / base['memcpy']:.3f}x memcpy, {items_s:.0f} items/s")
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()
