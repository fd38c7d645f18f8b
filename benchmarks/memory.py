"""Does a memory-store server's memory follow its data? RSS before, while holding, and after
deleting, in one run.

A memory-store server (its own process, default limits but no QPS quota) starts; once it
has answered a first call its RSS is the **baseline**. A client then puts ``--total``
bytes (default 1 GiB) over ``--transport`` (gRPC by default) in the shape of
``--shape``:

* ``matrices``: matrices of ``--matrix-bytes`` (default 256 MiB) with ``put``;
* ``items``: items of ``--item-bytes`` (default 256 KiB) with ``put_many`` in batches of
  ``--batch`` (32), the RL pipeline's shape;

overwrites all of it ``--overwrites`` times (1), as a pipeline reuses its keys, waits for
the server to be quiet (``--settle`` seconds, 3: it gives freed memory back once it has
been quiet for a second) and reads its RSS (**holding**), then deletes everything, waits
again and reads it (**after**). Medians of ``--runs`` fresh servers. The last lines
compare them with the targets of issue 16: holding N bytes costs at most 1.15 N above the
baseline, and after the deletes at most 64 MiB are left above it.

Example:
    python benchmarks/memory.py --runs 3
    python benchmarks/memory.py --shape items --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import torch_tq  # noqa: E402
from torch_tq._config import parse_size  # noqa: E402

MiB = 1 << 20


def rss_bytes(pid: int) -> int:
    """A process's resident set (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def one_run(args) -> tuple[int, int, int]:
    """(baseline, holding, after) RSS of a fresh server, in bytes."""
    with torch_tq.start_server(storage="memory", qps=0, stderr=open(os.devnull, "w")) as srv:
        c = torch_tq.Client(srv.location, transport=args.transport)
        c.health()
        time.sleep(0.5)
        base = rss_bytes(srv.pid)
        if args.shape == "matrices":
            n = max(1, args.total // args.matrix_bytes)
            values = torch.randn(args.matrix_bytes // 4)
            for _ in range(1 + args.overwrites):
                for i in range(n):
                    c.put(i, "m", values)
        else:
            n = max(1, args.total // args.item_bytes)
            values = torch.randn(args.item_bytes // 4)
            for _ in range(1 + args.overwrites):
                for start in range(0, n, args.batch):
                    batch = {(i, "m"): values for i in range(start, min(n, start + args.batch))}
                    failed = [r for r in c.put_many(batch, batch_items=args.batch)
                              if not r.success]
                    if failed:
                        raise SystemExit(f"put_many failed: {failed[0]}")
        held = c.health()["bytes"]
        time.sleep(args.settle)
        holding = rss_bytes(srv.pid)
        for i in range(n):
            c.delete(i)
        assert c.health()["bytes"] == 0
        time.sleep(args.settle)
        after = rss_bytes(srv.pid)
        c.close()
        if held != n * (args.matrix_bytes if args.shape == "matrices" else args.item_bytes):
            raise SystemExit(f"the server held {held} bytes")
        return base, holding, after


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=parse_size, default=1 << 30)
    ap.add_argument("--shape", choices=["matrices", "items"], default="matrices")
    ap.add_argument("--matrix-bytes", type=parse_size, default=256 * MiB)
    ap.add_argument("--item-bytes", type=parse_size, default=256 << 10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--overwrites", type=int, default=1)
    ap.add_argument("--transport", default="grpc", help="grpc (default) or same-host")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    runs = [one_run(args) for _ in range(args.runs)]
    base, holding, after = (statistics.median(r[i] for r in runs) for i in range(3))
    size = args.matrix_bytes if args.shape == "matrices" else args.item_bytes
    held = max(1, args.total // size) * size
    print(f"memory store, {args.shape} ({args.transport}), {held / MiB:.0f} MiB held, "
          f"{args.overwrites} overwrite(s), medians of {args.runs} fresh servers")
    print(f"  baseline RSS       {base / MiB:8.0f} MiB")
    print(f"  holding, above it  {(holding - base) / MiB:8.0f} MiB")
    print(f"  after deleting     {(after - base) / MiB:8.0f} MiB above the baseline")
    print(f"held RSS vs bytes held: {(holding - base) / held:.2f}x (target <= 1.15)")
    print(f"left after deleting everything: {(after - base) / MiB:.0f} MiB (target <= 64)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
