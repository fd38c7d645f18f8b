"""What dealing a consumer group in rounds costs per item, against today's streaming, in the
same run.

``--ranks`` consumers (threads, one Client each: data-parallel ranks) drain a consumer group
of ``--items`` ready index_ids, acknowledging each lease in the next request, as TQDataset
does:

* **streaming**: ``consume(max_items=--batch)``, whichever rank asks first;
* **rounds**: ``consume(rounds={"rank": r, "world_size": ranks, "share": --batch})``, every
  rank the same number of shares;
* **TQDataset** (``--dataset``): the same two through ``TQDataset`` with the matrices read
  too, the way a trainer sees it.

The server runs in its own process (memory store, QPS quota off: the figure is the dealing,
not the quota). Each figure is the median of ``--runs`` rounds (alternating order, after a
warm-up). The last line is the headline: rounds' cost per item as a ratio to streaming.

Example:
    python benchmarks/rounds.py --items 4000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

import torch_tq

os.environ.setdefault("TORCH_TQ_TRANSPORT", "grpc")


def _fill(client: torch_tq.Client, mtype: str, ids: range) -> None:
    client.put_many({(i, mtype): torch.tensor([i]) for i in ids})
    client.finish([mtype])


def _drain(location: str, group: str, mtype: str, ranks: int, batch: int,
           rounds: bool) -> tuple[float, list[int]]:
    """Seconds for ``ranks`` threads to drain the group; items per rank."""
    counts = [0] * ranks
    clients = [torch_tq.Client(location) for _ in range(ranks)]
    start = threading.Barrier(ranks + 1)

    def rank(r: int) -> None:
        c = clients[r]
        spec = {"rank": r, "world_size": ranks, "share": batch} if rounds else None
        acks: list[int] = []
        start.wait()
        while True:
            lease = c.consume(group, [mtype], max_items=batch, timeout=5, ack=acks,
                              rounds=spec)
            if lease.drained:
                if acks:
                    c.ack(group, acks, rank=r if rounds else None)
                return
            counts[r] += len(lease.index_ids)
            acks = lease.index_ids

    elapsed = _timed_ranks(rank, ranks, start)
    for c in clients:
        c.close()
    return elapsed, counts


def _timed_ranks(rank, ranks: int, start: threading.Barrier) -> float:
    """Runs ``rank(r)`` in a thread per rank; seconds from the start barrier to the last."""
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _dataset(location: str, group: str, mtype: str, ranks: int, batch: int,
             rounds: bool) -> tuple[float, list[int]]:
    counts = [0] * ranks
    start = threading.Barrier(ranks + 1)

    def rank(r: int) -> None:
        ds = torch_tq.TQDataset(location, [mtype], group=group, rank=r, world_size=ranks,
                                rounds=rounds, batch_size=batch if rounds else None,
                                batch_items=batch, warn_after=None)
        start.wait()
        for _ in ds:
            counts[r] += 1

    return _timed_ranks(rank, ranks, start), counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="items per lease / share")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dataset", action="store_true", help="also through TQDataset")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)

    ways = {"streaming": (_drain, False), "rounds": (_drain, True)}
    if args.dataset:
        ways.update({"TQDataset streaming": (_dataset, False),
                     "TQDataset rounds": (_dataset, True)})
    times: dict[str, list[float]] = {w: [] for w in ways}
    spread: dict[str, list[int]] = {}
    with torch_tq.start_server(storage="memory", qps=0) as srv, \
            torch_tq.Client(srv.location) as client:
        for run in range(args.runs + 1):  # run 0 warms up
            order = list(ways) if run % 2 else list(reversed(ways))
            for n, way in enumerate(order):
                fn, rounds = ways[way]
                mtype = f"r{run}_{n}"
                _fill(client, mtype, range(args.items))
                elapsed, counts = fn(srv.location, f"bench{run}_{n}", mtype, args.ranks,
                                     args.batch, rounds)
                client.delete_group(f"bench{run}_{n}")
                if run:
                    times[way].append(elapsed)
                    spread[way] = counts
    per_item = {w: statistics.median(t) / args.items * 1e6 for w, t in times.items()}
    print(f"{args.items} items, {args.ranks} ranks, batch {args.batch}, median of {args.runs}")
    print(f"{'way':24} {'us/item':>9} {'items per rank'}")
    for w in ways:
        print(f"{w:24} {per_item[w]:9.1f} {spread[w]}")
    ratio = per_item["rounds"] / per_item["streaming"]
    figures = {"us_per_item": per_item, "per_rank": spread, "rounds_vs_streaming": ratio}
    if args.dataset:
        figures["dataset_rounds_vs_streaming"] = (per_item["TQDataset rounds"]
                                                  / per_item["TQDataset streaming"])
        print(f"TQDataset rounds vs streaming, per item: "
              f"{figures['dataset_rounds_vs_streaming']:.2f}x")
    if args.json:
        print(json.dumps(figures))
    print(f"rounds vs streaming, cost per item: {ratio:.2f}x "
          f"({per_item['rounds'] - per_item['streaming']:+.1f} us/item)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
