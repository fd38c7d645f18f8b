"""Batch reads and writes against one call per item, in the same run.

1. **Large items**: ``Client.get_many`` of ``--items`` matrices of ``--item-bytes`` (default
   64 x 4 MiB) against as many sequential ``Client.get`` calls. get_many spreads the items
   over ``--concurrency`` parallel BatchRead streams on pooled connections.
2. **Small items**: ``put_many`` / ``get_many`` of ``--small-items`` matrices of
   ``--small-bytes`` (default 2000 x 1 KiB) against sequential ``put`` / ``get``, in items/s.

The server runs in its own process (``--storage memory`` by default) with the QPS quota
switched off (``qps=0``): with the seed's default of 1,000 calls/s per client, and a batch
charging one call per item, both sides of the small-item comparison would be held to
1,000 items/s and the figure would measure the quota, not the protocol.

Every figure is the median over ``--runs`` rounds; each round runs both methods, in
alternating order, after one unmeasured warm-up round. The headline is the last line.

Example:
    python benchmarks/batch.py --runs 7
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import tempfile
import time

import torch

import torch_tq

# This benchmark measures the gRPC path (its baselines are sockets): clients on this host
# would otherwise take the same-host path (benchmarks/transports.py compares the transports).
os.environ.setdefault("TORCH_TQ_TRANSPORT", "grpc")
from torch_tq._config import parse_size


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--item-bytes", type=parse_size, default=4 << 20)
    ap.add_argument("--small-items", type=int, default=2000)
    ap.add_argument("--small-bytes", type=parse_size, default=1024)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--storage", choices=["memory", "disk"], default="memory")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch_tq.start_server(
        storage=args.storage, data_dir=tmp if args.storage == "disk" else None, qps=0,
        stderr=open("/dev/null", "w"),
    ) as srv:
        client = torch_tq.Client(srv.location)
        n_el = args.item_bytes // 4
        big = {(i, "big"): torch.randn(n_el) for i in range(args.items)}
        failed = [r for r in client.put_many(big, concurrency=args.concurrency) if not r.success]
        assert not failed, failed
        keys = list(big)

        def seq_get() -> None:
            for k in keys:
                client.get(*k)

        def many_get() -> None:
            results = client.get_many(keys, concurrency=args.concurrency)
            assert all(r.success for r in results)

        # correctness once, then warm-up
        for r, k in zip(client.get_many(keys, concurrency=args.concurrency), keys):
            assert torch.equal(r.tensor, big[k])
        seq_get(), many_get()
        seq_t, many_t = [], []
        for run in range(args.runs):
            pair = [(seq_t, seq_get), (many_t, many_get)]
            for times, fn in pair if run % 2 == 0 else pair[::-1]:
                times.append(_timed(fn))
        total = args.items * args.item_bytes
        figures["large_seq_get_GBps"] = total / statistics.median(seq_t) / 1e9
        figures["large_get_many_GBps"] = total / statistics.median(many_t) / 1e9
        figures["large_get_many_vs_seq"] = statistics.median(seq_t) / statistics.median(many_t)
        del big

        n_small = args.small_items
        small = {(100_000 + i, "small"): torch.randn(max(1, args.small_bytes // 4))
                 for i in range(n_small)}
        skeys = list(small)

        def seq_put() -> None:
            for (i, t), v in small.items():
                client.put(i, t, v)

        def many_put() -> None:
            assert all(r.success for r in client.put_many(small, concurrency=args.concurrency))

        def seq_get_small() -> None:
            for k in skeys:
                client.get(*k)

        def many_get_small() -> None:
            assert all(r.success for r in client.get_many(skeys, concurrency=args.concurrency))

        many_put(), seq_put(), many_get_small(), seq_get_small()  # warm-up
        t = {name: [] for name in ("seq_put", "many_put", "seq_get", "many_get")}
        for run in range(args.runs):
            pairs = [[("seq_put", seq_put), ("many_put", many_put)],
                     [("seq_get", seq_get_small), ("many_get", many_get_small)]]
            for pair in pairs:
                for name, fn in pair if run % 2 == 0 else pair[::-1]:
                    t[name].append(_timed(fn))
        for name, times in t.items():
            figures[f"small_{name}_items_per_s"] = n_small / statistics.median(times)
        figures["small_put_many_vs_seq"] = (figures["small_many_put_items_per_s"]
                                            / figures["small_seq_put_items_per_s"])
        figures["small_get_many_vs_seq"] = (figures["small_many_get_items_per_s"]
                                            / figures["small_seq_get_items_per_s"])
        client.close()

    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
    print(f"storage={args.storage} concurrency={args.concurrency} runs={args.runs} (medians)")
    print(f"large: {args.items} x {args.item_bytes} B   sequential get "
          f"{figures['large_seq_get_GBps']:.2f} GB/s   get_many "
          f"{figures['large_get_many_GBps']:.2f} GB/s")
    print(f"small: {n_small} x {args.small_bytes} B items/s   put {figures['small_seq_put_items_per_s']:.0f}"
          f" -> put_many {figures['small_many_put_items_per_s']:.0f} "
          f"({figures['small_put_many_vs_seq']:.1f}x)   get {figures['small_seq_get_items_per_s']:.0f}"
          f" -> get_many {figures['small_many_get_items_per_s']:.0f} "
          f"({figures['small_get_many_vs_seq']:.1f}x)")
    print(f"get_many vs sequential get, {args.items} x {args.item_bytes} B: "
          f"{figures['large_get_many_vs_seq']:.2f}x (target >= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
