"""When does wire compression pay? Throughput against compression ratio, per codec and data.

For three kinds of data a trainer moves (random float32 activations, bfloat16 of the same,
int64 token ids below a 32k vocabulary), and each codec (none, lz4, zstd, snappy), it puts
and gets one ``-n`` matrix through a memory-store server on loopback and reports:

* ``ratio``: compressed bytes / raw bytes (the codec run locally over the same chunks);
* put and get GB/s, and their ratio against no compression measured in the same run;
* ``pays below``: the link speed under which the codec wins a put + get round trip. On
  loopback the network is free, so the extra time a codec takes is its CPU cost ``c``;
  on a link of ``L`` bytes/s it saves ``(1 - ratio) * 2 * size / L``; it pays when
  ``L < (1 - ratio) * 2 * size / c`` (printed in Gbit/s; "never" when it saves nothing).

Each figure is the median over ``--runs`` rounds; in each round every codec runs once, in
a rotating order, after one unmeasured warm-up call. Compression is off by default in
torch_tq because on this loopback it always loses.

Example:
    python benchmarks/compression.py -n 64MiB --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import cramjam
import numpy as np
import pyarrow as pa
import torch

import torch_tq

# This benchmark measures the gRPC path (its baselines are sockets): clients on this host
# would otherwise take the same-host path (benchmarks/transports.py compares the transports).
os.environ.setdefault("TORCH_TQ_TRANSPORT", "grpc")
from torch_tq._config import parse_size

CODECS = [None, "lz4", "zstd", "snappy"]


def _data(kind: str, nbytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "float32":
        return torch.randn(nbytes // 4, generator=g)
    if kind == "bfloat16":
        return torch.randn(nbytes // 2, generator=g).bfloat16()
    if kind == "int64_tokens":
        return torch.randint(0, 32000, (nbytes // 8,), generator=g)
    raise ValueError(kind)


def _ratio(t: torch.Tensor, codec: str | None, chunk: int) -> float:
    if codec is None:
        return 1.0
    raw = t.reshape(-1).view(torch.uint8).numpy()
    packed = 0
    for start in range(0, raw.size, chunk):
        part = raw[start : start + chunk]
        if codec == "snappy":
            packed += len(cramjam.snappy.compress_raw(part))
        else:
            packed += pa.compress(pa.py_buffer(part), codec="lz4" if codec == "lz4" else "zstd",
                                  asbytes=False).size
    return packed / raw.size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--size", type=parse_size, default=64 << 20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kinds", default="float32,bfloat16,int64_tokens")
    args = ap.parse_args(argv)
    chunk = 4 << 20

    print(f"{args.size} bytes per matrix, memory store on loopback, medians of {args.runs} runs")
    print(f"{'data':<13}{'codec':<8}{'ratio':>7}{'put GB/s':>10}{'vs none':>9}"
          f"{'get GB/s':>10}{'vs none':>9}{'pays below':>14}")
    with torch_tq.start_server(storage="memory", qps=0, stderr=open("/dev/null", "w")) as srv:
        clients = {c: torch_tq.Client(srv.location, compression=c) for c in CODECS}
        for kind in args.kinds.split(","):
            t = _data(kind, args.size)
            times: dict = {c: {"put": [], "get": []} for c in CODECS}
            for c in CODECS:  # warm-up, and a check that each codec round-trips
                clients[c].put(1, kind, t)
                assert torch.equal(clients[c].get(1, kind).view(torch.uint8),
                                   t.view(torch.uint8))
            for run in range(args.runs):
                order = CODECS[run % len(CODECS):] + CODECS[: run % len(CODECS)]
                for c in order:
                    cl = clients[c]
                    t0 = time.perf_counter()
                    cl.put(1, kind, t)
                    t1 = time.perf_counter()
                    cl.get(1, kind)
                    t2 = time.perf_counter()
                    times[c]["put"].append(t1 - t0)
                    times[c]["get"].append(t2 - t1)
            med = {c: {op: statistics.median(v) for op, v in d.items()} for c, d in times.items()}
            base = med[None]
            for c in CODECS:
                ratio = _ratio(t, c, chunk)
                put_gbps = args.size / med[c]["put"] / 1e9
                get_gbps = args.size / med[c]["get"] / 1e9
                extra = (med[c]["put"] + med[c]["get"]) - (base["put"] + base["get"])
                saved = (1 - ratio) * 2 * args.size
                if c is None:
                    pays = "-"
                elif saved <= 0:
                    pays = "never"
                elif extra <= 0:
                    pays = "always"
                else:
                    pays = f"{saved / extra * 8 / 1e9:.1f} Gbit/s"
                print(f"{kind:<13}{c or 'none':<8}{ratio:>7.3f}{put_gbps:>10.2f}"
                      f"{base['put'] / med[c]['put']:>8.2f}x{get_gbps:>10.2f}"
                      f"{base['get'] / med[c]['get']:>8.2f}x{pays:>14}")
        for cl in clients.values():
            cl.close()
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
