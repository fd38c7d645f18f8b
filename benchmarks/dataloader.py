"""DataLoader(TQDataset) against Client.get in a plain loop, in one run.

Part 1, throughput: ``--count`` matrices of ``--size`` (256 MiB by default) float32 are read
in full passes, either by ``Client.get`` in a plain loop (the baseline) or by iterating
``DataLoader(TQDataset(index_ids=...), batch_size=None)`` (``num_workers=0``: the zero-copy
path with its prefetch thread; ``--workers`` adds a loader with persistent worker processes,
which receive into shared memory that DataLoader hands to the main process). Passes alternate; each figure is the
median over ``--runs`` passes after one warm-up pass. Ratio: TQDataset / plain loop.

Part 2, per-item overhead of streaming mode for small items (``--small`` bytes):

* *backlog*: ``--items`` matrices are ready; the median time per item of
  ``TQDataset(group=...)`` minus the median time of one ``Client.get`` of such an item;
* *live*: a producer writes one item at a time while the dataset long-polls; the latency
  from the producer's acknowledged ``put`` to the item reaching the loop, minus one
  ``Client.get`` (what any reader pays to fetch it), median and p90 over the items.

The last line holds the headline figures.

    python benchmarks/dataloader.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import itertools
import json
import statistics
import sys
import threading
import time

import torch
from torch.utils.data import DataLoader

import torch_tq

# This benchmark measures the gRPC path (its baselines are sockets): clients on this host
# would otherwise take the same-host path (benchmarks/transports.py compares the transports).
os.environ.setdefault("TORCH_TQ_TRANSPORT", "grpc")
from torch_tq._config import parse_size


def _pass_plain(client: torch_tq.Client, ids: list[int]) -> float:
    t0 = time.perf_counter()
    for i in ids:
        t = client.get(i, "prompt")
        del t
    return time.perf_counter() - t0


def _pass_loader(loader: DataLoader) -> float:
    t0 = time.perf_counter()
    for item in loader:
        del item
    return time.perf_counter() - t0


def throughput(location: str, args: argparse.Namespace) -> dict:
    size = parse_size(args.size) // 4 * 4
    ids = list(range(args.count))
    client = torch_tq.Client(location, timeout=600)
    src = torch.randn(size // 4)
    for i in ids:
        client.put(i, "prompt", src)
    methods = {
        "Client.get loop": lambda: _pass_plain(client, ids),
        "DataLoader(TQDataset) workers=0": lambda: _pass_loader(DataLoader(
            torch_tq.TQDataset(location, ["prompt"], index_ids=ids), batch_size=None)),
    }
    if args.workers:
        # one loader with persistent workers, so passes measure transfer, not worker start-up
        workers_loader = DataLoader(
            torch_tq.TQDataset(location, ["prompt"], index_ids=ids), batch_size=None,
            num_workers=args.workers, multiprocessing_context="forkserver",
            persistent_workers=True)
        methods[f"DataLoader(TQDataset) workers={args.workers}"] = lambda: _pass_loader(
            workers_loader)
    times: dict[str, list[float]] = {}
    items = list(methods.items())
    for _ in range(1):  # warm-up
        for _, fn in items:
            fn()
    for r in range(args.runs):
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            times.setdefault(name, []).append(fn())
    for i in ids:
        client.delete(i)
    out = {}
    for name, ts in times.items():
        per_pass = statistics.median(ts)
        out[name] = {"items_per_s": len(ids) / per_pass, "gbps": len(ids) * size / per_pass / 1e9}
    return out


def streaming_overhead(location: str, args: argparse.Namespace) -> dict:
    client = torch_tq.Client(location)
    n = args.items
    small = torch.zeros(max(1, parse_size(args.small) // 4))
    base = 10_000_000
    # the cost of one plain get of such an item, for reference
    client.put(base - 1, "small", small)
    gets = []
    for _ in range(max(50, n)):
        t0 = time.perf_counter()
        client.get(base - 1, "small")
        gets.append(time.perf_counter() - t0)
    get_s = statistics.median(gets)

    # backlog: everything is ready before the loop starts
    for i in range(n):
        client.put(base + i, "small", small)
    client.finish(["small"])
    ds = torch_tq.TQDataset(location, ["small"], group="bench_backlog", batch_items=16)
    stamps = []
    for _item in ds:
        stamps.append(time.perf_counter())
    per_item = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    client.reopen(["small"])

    # live: one item at a time, the dataset long-polling for it
    acked: dict[int, float] = {}
    received: dict[int, float] = {}
    ds = torch_tq.TQDataset(location, ["small2"], group="bench_live", batch_items=1, poll=10)

    def produce():
        for i in range(n):
            client.put(base + n + i, "small2", small)
            acked[base + n + i] = time.perf_counter()
            time.sleep(0.005)
        client.finish(["small2"])

    th = threading.Thread(target=produce)
    th.start()
    for item in ds:
        received[int(item["index_id"])] = time.perf_counter()
    th.join()
    client.reopen(["small2"])
    # (the loop may see an item a hair before the producer's put call has returned)
    lat = sorted(received[i] - acked[i] for i in received)
    return {
        "small_bytes": small.numel() * 4,
        "items": n,
        "get_ms": get_s * 1e3,
        "backlog_per_item_ms": per_item * 1e3,
        "backlog_added_ms": (per_item - get_s) * 1e3,
        "live_latency_p50_ms": statistics.median(lat) * 1e3,
        "live_latency_p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3,
        "live_added_p50_ms": (statistics.median(lat) - get_s) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--size", default="256MiB", help="matrix size (default 256MiB)")
    parser.add_argument("--count", type=int, default=4, help="matrices per pass (default 4)")
    parser.add_argument("--runs", type=int, default=5, help="measured passes (default 5)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also measure a DataLoader with this many workers (default 0: no)")
    parser.add_argument("--small", default="4KiB", help="small item size (default 4KiB)")
    parser.add_argument("--items", type=int, default=300, help="small items (default 300)")
    parser.add_argument("--storage", choices=["memory", "disk"], default="memory")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    with torch_tq.start_server(storage=args.storage) as server:
        tp = throughput(server.location, args)
        so = streaming_overhead(server.location, args)
    base = tp["Client.get loop"]
    print(f"throughput over {args.count} x {args.size} float32, median of {args.runs} passes, "
          f"{args.storage} store")
    for name, r in tp.items():
        print(f"  {name:<36}{r['gbps']:7.2f} GB/s {r['items_per_s']:8.2f} items/s "
              f"{r['gbps'] / base['gbps']:6.2f}x")
    print(f"streaming mode, {so['items']} items of {so['small_bytes']} B "
          f"(one Client.get: {so['get_ms']:.3f} ms)")
    print(f"  backlog: {so['backlog_per_item_ms']:.3f} ms per item "
          f"(added {so['backlog_added_ms']:+.3f} ms)")
    print(f"  live: put-to-loop latency p50 {so['live_latency_p50_ms']:.3f} ms, "
          f"p90 {so['live_latency_p90_ms']:.3f} ms (added p50 {so['live_added_p50_ms']:+.3f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": tp, "streaming": so}, f, indent=2)
    ratio = tp["DataLoader(TQDataset) workers=0"]["gbps"] / base["gbps"]
    print(f"ratio: dataloader {ratio:.2f}x Client.get loop | streaming added p50 "
          f"{so['live_added_p50_ms']:.3f} ms live, {so['backlog_added_ms']:.3f} ms backlog")
    return 0


if __name__ == "__main__":
    sys.exit(main())
