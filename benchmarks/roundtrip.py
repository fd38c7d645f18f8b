"""Put and get of one matrix through torch_tq.Client, against the baselines, in one run.

Baselines, each in its own server process on loopback:

* ``tcp``    raw TCP between two Python processes (``sendall`` / ``recv_into`` a reused buffer);
* ``flight`` plain pyarrow.flight at each ``--batch-sizes`` value: a server that keeps the
  uploaded table in memory and streams it back; the client writes with ``write_table`` and
  reads either with ``read_all()`` into a fresh tensor or batch by batch into a reused one.
  The best batch size and read form are the baseline: a first stage of ``--calibrate-runs``
  rounds picks them, and fresh rounds then measure that choice against torch_tq (picking the
  best of several noisy medians from the rounds being compared would flatter the baseline).

torch_tq runs on its own server (``--storage memory`` by default: RAM, like the plain Flight
server; ``--storage disk`` adds files and, unless ``--no-fsync``, an fsync per matrix).
Every method runs once per round, right after ``--warmup`` unmeasured calls of itself (so
each is measured warm); rounds alternate the order of the methods, and each figure is the
median over ``--runs`` rounds. The last line is the headline ratio.

Example:
    python benchmarks/roundtrip.py -n 256MiB --runs 5
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

import torch_tq

# This benchmark measures the gRPC path (its baselines are sockets): clients on this host
# would otherwise take the same-host path (benchmarks/transports.py compares the transports).
os.environ.setdefault("TORCH_TQ_TRANSPORT", "grpc")
from torch_tq._config import parse_size

# The baselines (raw TCP, plain pyarrow.flight) are torch_tq.tools.bench's, shared with
# `torch-tq bench` and benchmarks/transports.py.
from torch_tq.tools.bench import FlightBaseline, TcpBaseline  # noqa: E402

# ---------------------------------------------------------------------- the run


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    size = parse_size(args.size) // 4 * 4
    batch_sizes = [parse_size(b) for b in args.batch_sizes.split(",")]
    tensor = torch.randn(size // 4, generator=torch.Generator().manual_seed(0))
    flat = tensor.numpy()
    table = pa.table({"data": pa.Array.from_buffers(pa.float32(), len(flat), [None, pa.py_buffer(flat)])})
    reused = torch.empty_like(tensor)
    raw_out = np.empty(size, np.uint8)

    data_dir = None if args.storage == "memory" else tempfile.mkdtemp(prefix="tq-bench-")
    tcp = TcpBaseline(size)
    plain = FlightBaseline()
    ours_srv = torch_tq.start_server(storage=args.storage, data_dir=data_dir, durable=args.fsync)
    ours = torch_tq.Client(ours_srv.location, timeout=600)
    base: list[tuple[str, object]] = [
        ("tcp put", lambda: tcp.put(flat)),
        ("tcp get", lambda: tcp.get(raw_out)),
    ]
    plain_methods: dict[str, object] = {}
    for b in batch_sizes:
        plain_methods[f"flight[{_human(b)}] put"] = lambda b=b: plain.put(table, b)
        plain_methods[f"flight[{_human(b)}] get"] = lambda b=b: plain.get_read_all(b)
        plain_methods[f"flight[{_human(b)}] get_into"] = lambda b=b: plain.get_into(b, reused)
    ours_methods: list[tuple[str, object]] = [
        ("torch_tq put", lambda: ours.put(1, "prompt", tensor)),
        ("torch_tq get", lambda: ours.get(1, "prompt")),
        ("torch_tq get_into", lambda: ours.get(1, "prompt", out=reused)),
    ]
    try:
        plain.put(table, batch_sizes[0])  # something for the plain reads to read
        ours.put(1, "prompt", tensor)
        # Stage 1 picks plain Flight's best batch size (and read form). Stage 2 measures
        # that choice against torch_tq in fresh rounds: the best of several noisy medians,
        # taken from the very rounds it is compared in, would bias the baseline upward.
        calibration = _rounds(list(plain_methods.items()), args.calibrate_runs, args.warmup)
        crate = {n: size / statistics.median(ts) / 1e9 for n, ts in calibration.items()}
        best_put = max((r, n) for n, r in crate.items() if n.endswith(" put"))[1]
        best_get = max((r, n) for n, r in crate.items() if "get" in n)[1]
        best_fresh = max((r, n) for n, r in crate.items() if n.endswith(" get"))[1]
        chosen = list(dict.fromkeys([best_put, best_get, best_fresh]))
        measured = base + [(n, plain_methods[n]) for n in chosen] + ours_methods
        times = _rounds(measured, args.runs, args.warmup)
        if not torch.equal(ours.get(1, "prompt"), tensor):
            raise RuntimeError("torch_tq returned different data")
    finally:
        ours.close()
        ours_srv.stop()
        plain.close()
        tcp.close()
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    rate = {name: size / statistics.median(ts) / 1e9 for name, ts in times.items()}
    ours_get = max(rate["torch_tq get"], rate["torch_tq get_into"])
    return {
        "size_bytes": size,
        "runs": args.runs,
        "storage": args.storage,
        "calibration_gbps": crate,
        "gbps": rate,
        "best_flight_put": best_put,
        "best_flight_get": best_get,
        "ratio": {
            "put_vs_flight": rate["torch_tq put"] / rate[best_put],
            "get_vs_flight": ours_get / rate[best_get],
            "get_fresh_vs_flight_fresh": rate["torch_tq get"] / rate[best_fresh],
            "put_vs_tcp": rate["torch_tq put"] / rate["tcp put"],
            "get_vs_tcp": ours_get / rate["tcp get"],
        },
    }


def _rounds(methods: list[tuple[str, object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Runs every method once per round, each right after ``warmup`` unmeasured calls of
    itself (so it is measured warm). Methods interleave finely, so the drift of this shared
    machine falls on all of them alike; odd rounds run in reverse order."""
    times: dict[str, list[float]] = {}
    for round_no in range(runs):
        order = methods if round_no % 2 == 0 else methods[::-1]
        for name, fn in order:
            for _ in range(warmup):
                fn()
            times.setdefault(name, []).append(_timed(fn))
    return times


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--size", default="256MiB", help="matrix size (default 256MiB)")
    parser.add_argument("--runs", type=int, default=7,
                        help="measured runs of every method, one per round (default 7)")
    parser.add_argument("--calibrate-runs", type=int, default=3,
                        help="rounds that pick plain Flight's best batch size (default 3)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured calls right before each measured one (default 2)")
    parser.add_argument("--batch-sizes", default="1MiB,4MiB,16MiB",
                        help="plain Flight batch sizes to try (default 1MiB,4MiB,16MiB)")
    parser.add_argument("--storage", choices=["memory", "disk"], default="memory")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=None,
                        help="disk store: fsync before acknowledging (default on)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"roundtrip of {_human(result['size_bytes'])} float32, median of {args.runs} runs, "
          f"torch_tq storage={args.storage}")
    print(f"{'plain Flight, choosing its best batch size':<44}{'GB/s':>8}")
    for name, gbps in result["calibration_gbps"].items():
        print(f"  {name:<42}{gbps:>8.2f}")
    print(f"{'compared in fresh rounds':<44}{'GB/s':>8}")
    for name, gbps in result["gbps"].items():
        print(f"  {name:<42}{gbps:>8.2f}")
    r = result["ratio"]
    print(f"baseline: best plain Flight put = {result['best_flight_put']}, "
          f"get = {result['best_flight_get']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"ratio: put {r['put_vs_flight']:.2f}x flight, {r['put_vs_tcp']:.2f}x tcp | "
          f"get {r['get_vs_flight']:.2f}x flight, {r['get_vs_tcp']:.2f}x tcp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
