"""The cost of one small call: torch_tq against plain pyarrow.flight and against the floor
of any Python Flight server that knows its callers.

Three servers, each in its own process on loopback, measured in one run:

* ``plain``: pyarrow.flight with no middleware; a put is ``do_put`` + ``write_table`` +
  ``close``, a get ``read_all()``. Issue 16's baseline.
* ``floor``: the same server plus what every torch_tq call needs and pyarrow offers only
  in Python: a server middleware per call (the only way a handler sees the call's
  headers: the client id its quotas key on; gRPC tells it when a call ends, also a
  cancelled one) and a JSON command parsed. A put is acknowledged by the call's status
  (torch_tq's client asks for no acknowledgement message). Nothing else: no limits, no
  store.
* ``torch_tq``: ``Client.put`` / ``Client.get`` over gRPC against a memory-store server with
  the QPS quota off (a client making one call after another would otherwise measure the
  quota).

Each figure is the p50 of ``--calls`` calls after a warm-up, and the median of that over
``--runs`` rounds; rounds alternate the order of the servers. The last lines are the
ratios against ``plain``.

Example:
    python benchmarks/call_floor.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import pyarrow as pa

os.environ.setdefault("TORCH_TQ_TRANSPORT", "grpc")  # the gRPC path, like its baselines
# the plain baseline's get makes a tensor over Arrow's read-only buffer, as a user would
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

import torch_tq  # noqa: E402
from torch_tq._config import parse_size  # noqa: E402
from torch_tq.tools.bench import FlightBaseline  # noqa: E402


def _p50(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(size: int, calls: int, runs: int, warmup: int) -> dict[str, float]:
    import torch  # here: the baselines' spawned servers import this file, and need no torch

    values = np.random.default_rng(0).standard_normal(max(1, size // 4)).astype(np.float32)
    table = pa.table({"data": pa.array(values)})
    tensor = torch.from_numpy(values.copy())
    plain, floor = FlightBaseline(), FlightBaseline(floor=True)
    try:
        with torch_tq.start_server(storage="memory", qps=0) as srv:
            client = torch_tq.Client(srv.location, transport="grpc")
            for base in (plain, floor):
                base.put(table)
            client.put(1, "call", tensor)
            assert torch.equal(client.get(1, "call"), tensor)
            assert np.array_equal(plain.get_read_all().numpy(), values)
            assert np.array_equal(floor.get_read_all().numpy(), values)
            methods = {
                "plain put": lambda: plain.put(table),
                "floor put": lambda: floor.put(table),
                "torch_tq put": lambda: client.put(1, "call", tensor),
                "plain get": plain.get_read_all,
                "floor get": floor.get_read_all,
                "torch_tq get": lambda: client.get(1, "call"),
            }
            rounds: dict[str, list[float]] = {name: [] for name in methods}
            names = list(methods)
            for r in range(runs):
                for name in names if r % 2 == 0 else names[::-1]:
                    rounds[name].append(_p50(methods[name], calls, warmup))
            client.close()
    finally:
        plain.close()
        floor.close()
    out = {f"{name.replace(' ', '_')}_ms": statistics.median(v) * 1e3 for name, v in rounds.items()}
    for op in ("put", "get"):
        base = out[f"plain_{op}_ms"]
        out[f"floor_{op}_vs_plain"] = out[f"floor_{op}_ms"] / base
        out[f"torch_tq_{op}_vs_plain"] = out[f"torch_tq_{op}_ms"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--size", type=parse_size, default=1024, help="bytes (default 1KiB)")
    ap.add_argument("--calls", type=int, default=500, help="calls per p50 (default 500)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    figures = run(args.size, args.calls, args.runs, args.warmup)
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    print(f"{args.size} B, p50 of {args.calls} calls, median of {args.runs} rounds")
    print(f"{'':10}{'plain':>10}{'floor':>10}{'torch_tq':>10}   (ms)")
    for op in ("put", "get"):
        print(f"{op:10}" + "".join(f"{figures[f'{s}_{op}_ms']:>10.3f}"
                                   for s in ("plain", "floor", "torch_tq")))
    for op in ("put", "get"):
        print(f"{op}: floor {figures[f'floor_{op}_vs_plain']:.2f}x plain Flight, torch_tq "
              f"{figures[f'torch_tq_{op}_vs_plain']:.2f}x plain Flight (target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
