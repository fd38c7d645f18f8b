"""What security costs: a large get and put and small calls over TLS against plaintext, and
token checks against no authentication, all in one run (alternating servers, medians).

Three memory-store servers run side by side: plaintext, TLS (certificates made for the
run), and plaintext with a token file; clients use gRPC. Large transfers alternate server
by server; small calls go one to each server in turn. Prints per-figure medians and the
ratios as its last lines (targets from issue 17: token checks cost <= 5% on 1 KiB calls;
plain pyarrow.flight measured TLS ~2.1x slower on a 256 MiB get here).

    python benchmarks/security.py [--big 256MiB] [--small 1KiB] [--calls 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import torch_tq
from torch_tq._config import parse_size

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.certs import make_pki  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved_p50_ms(fns: dict, calls: int) -> dict[str, float]:
    """p50 of ``calls`` timings of each of ``fns``, one call of each in turn (the order
    rotating), so that the machine's drift falls on all of them alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(calls):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(_timed(fns[name]))
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=parse_size, default=256 << 20)
    ap.add_argument("--small", type=parse_size, default=1024)
    ap.add_argument("--calls", type=int, default=300, help="small calls per figure and run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="tq-security-")
    pki = make_pki(tmp)
    tokens = os.path.join(tmp, "tokens")
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"bench admin {TOKEN}\n")
    options = {"storage": "memory", "qps": 0, "same_host": False, "ucx": False}
    big = torch.randn(args.big // 4)
    small = torch.randn(max(1, args.small // 4))
    with torch_tq.start_server(**options) as plain, \
            torch_tq.start_server(tls_cert=pki["server_pem"], tls_key=pki["server_key"],
                                  **options) as tls, \
            torch_tq.start_server(auth_tokens=tokens, **options) as authed:
        clients = {
            "plaintext": torch_tq.Client(plain.location, transport="grpc"),
            "tls": torch_tq.Client(tls.location, transport="grpc", tls_root_certs=pki["ca_pem"]),
            "tokens": torch_tq.Client(authed.location, transport="grpc", token=TOKEN),
        }
        for client in clients.values():  # warm: connections, the first upload
            client.put(1, "big", big)
            assert torch.equal(client.get(1, "big"), big)
            client.put(2, "small", small)
        figures: dict[str, list[float]] = {}
        for run in range(args.runs):
            order = list(clients) if run % 2 == 0 else list(clients)[::-1]
            for name in order:
                client = clients[name]
                for fig, fn in (("big put s", lambda c=client: c.put(1, "big", big)),
                                ("big get s", lambda c=client: c.get(1, "big"))):
                    figures.setdefault(f"{name} {fig}", []).append(_timed(fn))
            for fig, call in (("small put ms", lambda c: c.put(2, "small", small)),
                              ("small get ms", lambda c: c.get(2, "small"))):
                p50 = _interleaved_p50_ms(
                    {name: (lambda c=client: call(c)) for name, client in clients.items()},
                    args.calls)
                for name, value in p50.items():
                    figures.setdefault(f"{name} {fig}", []).append(value)
    med = {k: statistics.median(v) for k, v in figures.items()}
    gb = args.big / 1e9
    print(f"memory store, gRPC, medians of {args.runs} alternating runs "
          f"({args.calls} small calls each)")
    for name in clients:
        print(f"  {name:<10} put {gb / med[f'{name} big put s']:.2f} GB/s  get "
              f"{gb / med[f'{name} big get s']:.2f} GB/s   {args.small} B put "
              f"{med[f'{name} small put ms']:.3f} ms  get {med[f'{name} small get ms']:.3f} ms "
              "(p50)")
    ratios = {}
    for kind in ("big put s", "big get s", "small put ms", "small get ms"):
        ratios[f"tls/plaintext {kind.split()[0]} {kind.split()[1]}"] = \
            med[f"tls {kind}"] / med[f"plaintext {kind}"]
    for kind in ("small put ms", "small get ms"):
        ratios[f"tokens/none small {kind.split()[1]}"] = \
            med[f"tokens {kind}"] / med[f"plaintext {kind}"]
    if args.json:
        print(json.dumps({"medians": med, "ratios": ratios}))
    for name, value in ratios.items():
        target = " (target <= 1.05)" if name.startswith("tokens") else ""
        print(f"ratio {name}: {value:.2f}x time{target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
