"""Batch reads and writes against one call per item, in the same run.

1. **Large items**: ``Client.get_many`` of ``--items`` matrices of ``--item-bytes`` (default
   64 x 4 MiB) against as many sequential ``Client.get`` calls. get_many spreads the items
   over ``--concurrency`` parallel BatchRead streams on pooled connections.
2. **Small items**: ``put_many`` / ``get_many`` of ``--small-items`` matrices of
   ``--small-bytes`` (default 2000 x 1 KiB) against sequential ``put`` / ``get``, in items/s.
3. **A batch against one matrix of its bytes**: ``put_many`` / ``get_many`` of
   ``--group-items`` x ``--group-bytes`` (default 32 x 256 KiB) against one ``put`` /
   ``get`` of a matrix of the same 8 MiB; the ratios are one call's time over the batch's
   (1.0: a batch moves its bytes as fast as one matrix does).

The server runs in its own process (``--storage memory`` by default) with the QPS quota
switched off (``qps=0``): the sequential side of the small-item comparison makes a call
per item, and at the default 1,000 calls/s per client it would measure the quota. The
transport is gRPC unless ``--transport`` (or ``TORCH_TQ_TRANSPORT``) names another.

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


def _batch_vs_one(client, n: int, size: int, runs: int) -> dict[str, float]:
    """put_many/get_many of ``n`` items of ``size`` bytes against one put/get of a matrix of
    all their bytes, alternating, medians of ``runs`` (after a warm-up of each)."""
    items = {(200_000 + i, "grp"): torch.randn(size // 4) for i in range(n)}
    one = torch.cat([t for t in items.values()])
    keys = list(items)

    def group_put() -> None:
        assert all(r.success for r in client.put_many(items, batch_items=n))

    def one_put() -> None:
        client.put(300_000, "one", one)

    def group_get() -> None:
        got = client.get_many(keys, batch_items=n)
        assert all(r.success for r in got)

    def one_get() -> None:
        client.get(300_000, "one")

    group_put(), one_put()
    assert all(torch.equal(r.tensor, items[k]) for r, k in
               zip(client.get_many(keys, batch_items=n), keys))
    assert torch.equal(client.get(300_000, "one"), one)
    t = {name: [] for name in ("group_put", "one_put", "group_get", "one_get")}
    for run in range(max(runs, 5)):
        for pair in ([("group_put", group_put), ("one_put", one_put)],
                     [("group_get", group_get), ("one_get", one_get)]):
            for name, fn in pair if run % 2 == 0 else pair[::-1]:
                t[name].append(_timed(fn))
    ms = {name: statistics.median(v) * 1e3 for name, v in t.items()}
    return {"group_put_ms": ms["group_put"], "one_put_ms": ms["one_put"],
            "group_get_ms": ms["group_get"], "one_get_ms": ms["one_get"],
            "group_put_vs_one": ms["one_put"] / ms["group_put"],
            "group_get_vs_one": ms["one_get"] / ms["group_get"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--item-bytes", type=parse_size, default=4 << 20)
    ap.add_argument("--small-items", type=int, default=2000)
    ap.add_argument("--small-bytes", type=parse_size, default=1024)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--storage", choices=["memory", "disk"], default="memory")
    ap.add_argument("--group-items", type=int, default=32)
    ap.add_argument("--group-bytes", type=parse_size, default=256 << 10)
    ap.add_argument("--transport", default=None,
                    help="grpc (default), same-host or ucx")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)
    if args.transport:
        os.environ["TORCH_TQ_TRANSPORT"] = args.transport

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch_tq.start_server(
        storage=args.storage, data_dir=tmp if args.storage == "disk" else None, qps=0,
        stderr=open("/dev/null", "w"),
    ) as srv:
        where = srv.location
        if os.environ["TORCH_TQ_TRANSPORT"] == "ucx":
            where = [f"ucx://{srv.location.split('://', 1)[1].rsplit(':', 1)[0]}:8081", where]
        client = torch_tq.Client(where)
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
        del small
        figures.update(_batch_vs_one(client, args.group_items, args.group_bytes, args.runs))
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
    print(f"batch of {args.group_items} x {args.group_bytes} B vs one matrix of its bytes "
          f"({client.transport}): put_many {figures['group_put_ms']:.2f} ms vs put "
          f"{figures['one_put_ms']:.2f} ms, get_many {figures['group_get_ms']:.2f} ms vs get "
          f"{figures['one_get_ms']:.2f} ms")
    print(f"put_many vs one put of its bytes: {figures['group_put_vs_one']:.2f}x (target >= 0.9)")
    print(f"get_many vs one get of its bytes: {figures['group_get_vs_one']:.2f}x (target >= 0.9)")
    print(f"get_many vs sequential get, {args.items} x {args.item_bytes} B: "
          f"{figures['large_get_many_vs_seq']:.2f}x (target >= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
