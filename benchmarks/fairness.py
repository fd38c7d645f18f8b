"""Fair shares under a flood: what a victim client keeps while another floods the node.

A flooder holds as many call slots as it can (long-polling ``Consume`` calls that each hold
a slot for a second, from many threads and connections, under one client id or a distinct id
per thread); a victim makes small put+get calls from a few threads with no retries. The
victim runs alone first, then during the flood, against the same server. The headline is the
victim's calls per second during the flood as a ratio of its rate alone, with the share of
its calls turned away.

``--netns`` puts the flooder on another host: a network namespace of its own joined to the
server's by a veth pair (needs root and ``ip``; both namespaces are removed at the end).
Without it, flooder and victim share 127.0.0.1.

    python benchmarks/fairness.py --seconds 5
    python benchmarks/fairness.py --seconds 5 --ids many --netns
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from netns import listening

HERE = os.path.abspath(__file__)


# --------------------------------------------------------------------------- roles


def flood(location: str, threads: int, ids: str, seconds: float) -> dict:
    import pyarrow as pa
    import pyarrow.flight as flight

    body = json.dumps({"group": "flood", "types": ["never_written"], "max_items": 1,
                       "timeout_ms": 1000}).encode()
    stop = time.monotonic() + seconds
    counts = {"admitted": 0, "refused": 0}
    lock = threading.Lock()

    def run(i: int) -> None:
        fc = flight.FlightClient(location)
        name = "flood" if ids == "one" else f"flood-{i}"
        opts = flight.FlightCallOptions(headers=[(b"x-tq-client-id", name.encode())])
        while time.monotonic() < stop:
            try:
                list(fc.do_action(flight.Action("Consume", body), opts))
                key = "admitted"
            except (flight.FlightError, pa.ArrowException):
                key = "refused"
                time.sleep(0.005)
            with lock:
                counts[key] += 1
        fc.close()

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    print("flooding", flush=True)
    for w in workers:
        w.join()
    return counts


def victim(location: str, threads: int, seconds: float) -> dict:
    import torch

    import torch_tq

    client = torch_tq.Client(location, transport="grpc", retry_deadline=0)
    value = torch.arange(256, dtype=torch.float32)
    stop = time.monotonic() + seconds
    ok, refused, latencies = [0], [0], []
    reasons: dict[str, int] = {}
    lock = threading.Lock()

    def run(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                client.put(900_000 + i * 100_000 + n % 1000, "victim", value)
                client.get(900_000 + i * 100_000 + n % 1000, "victim")
                with lock:
                    ok[0] += 1
                    latencies.append(time.perf_counter() - t0)
            except torch_tq.Unavailable as e:
                reason = str(e).split("(retry")[0][:90]
                with lock:
                    refused[0] += 1
                    reasons[reason] = reasons.get(reason, 0) + 1
            n += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    return {"ok": ok[0], "refused": refused[0], "seconds": seconds,
            "p50_ms": 1e3 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1e3 * p99, "reasons": reasons}


# --------------------------------------------------------------------------- hosts


@contextlib.contextmanager
def two_hosts():
    """Two network namespaces (server, flooder) joined by a veth pair; yields
    (server address, prefix to run a command on the server host, the same on the flooder's).
    """
    tag = f"{os.getpid() % 100000}"
    ns_s, ns_f = f"tqfs{tag}", f"tqff{tag}"
    octet = os.getpid() % 200 + 20
    addr_s, addr_f = f"10.{octet}.77.1", f"10.{octet}.77.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns_s)
        ip("netns", "add", ns_f)
        ip("link", "add", f"v{tag}s", "type", "veth", "peer", "name", f"v{tag}f")
        ip("link", "set", f"v{tag}s", "netns", ns_s)
        ip("link", "set", f"v{tag}f", "netns", ns_f)
        for ns, dev, addr in ((ns_s, f"v{tag}s", addr_s), (ns_f, f"v{tag}f", addr_f)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield addr_s, ["ip", "netns", "exec", ns_s], ["ip", "netns", "exec", ns_f]
    finally:
        for ns in (ns_s, ns_f):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def one_host():
    yield "127.0.0.1", [], []


def start_server(prefix: list[str], host: str, args) -> tuple[subprocess.Popen, str]:
    # --insecure: a test network inside namespaces of this run's own, no one else on it
    cmd = prefix + [sys.executable, "-m", "torch_tq", "serve", "--host", host, "--insecure",
                    "--port", "0",
                    "--storage", "memory", "--no-same-host", "--no-ucx", "--qps", "0",
                    "--max-calls", str(args.max_calls), "--streams-per-client", "100000",
                    "--slot-wait-s", str(args.slot_wait_s), "--watch-stdin"]
    return listening(cmd, "the server")


def run_role(prefix: list[str], *role_args: str) -> subprocess.Popen:
    return subprocess.Popen(prefix + [sys.executable, HERE, *role_args],
                            stdout=subprocess.PIPE, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="each victim phase (default 5)")
    p.add_argument("--flood-threads", type=int, default=120)
    p.add_argument("--victim-threads", type=int, default=4)
    p.add_argument("--ids", choices=["one", "many"], default="one",
                   help="the flooder's client ids: one for all its calls, or one per thread")
    p.add_argument("--netns", action="store_true", help="the flooder on another host")
    p.add_argument("--max-calls", type=int, default=40)
    p.add_argument("--slot-wait-s", type=float, default=2.0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--role", choices=["flooder", "victim"], help=argparse.SUPPRESS)
    p.add_argument("--location", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "flooder":
        print(json.dumps(flood(args.location, args.flood_threads, args.ids, args.seconds)))
        return
    if args.role == "victim":
        print(json.dumps(victim(args.location, args.victim_threads, args.seconds)))
        return

    with (two_hosts() if args.netns else one_host()) as (host, on_server, on_flooder):
        server, location = start_server(on_server, host, args)
        try:
            def victim_phase() -> dict:
                proc = run_role(on_server, "--role", "victim", "--location", location,
                                "--victim-threads", str(args.victim_threads),
                                "--seconds", str(args.seconds))
                out, _ = proc.communicate(timeout=args.seconds + 120)
                return json.loads(out.strip().splitlines()[-1])

            alone = victim_phase()
            flooder = run_role(on_flooder, "--role", "flooder", "--location", location,
                               "--flood-threads", str(args.flood_threads), "--ids", args.ids,
                               "--seconds", str(args.seconds + 4))
            assert flooder.stdout.readline().strip() == "flooding"
            time.sleep(2.0)  # the flood holds every slot it can before the victim comes
            during = victim_phase()
            flood_out, _ = flooder.communicate(timeout=args.seconds + 120)
            flood_counts = json.loads(flood_out.strip().splitlines()[-1])
        finally:
            server.stdin.close()
            server.terminate()
            server.wait(30)

    rate_alone = alone["ok"] / alone["seconds"]
    rate_during = during["ok"] / during["seconds"]
    total = during["ok"] + during["refused"]
    result = {
        "flooder": f"{args.flood_threads} threads, {args.ids} id(s), "
                   f"{'another host' if args.netns else 'the same host'}",
        "max_calls": args.max_calls,
        "victim_alone_calls_per_s": round(rate_alone, 1),
        "victim_during_flood_calls_per_s": round(rate_during, 1),
        "victim_refused_fraction": round(during["refused"] / total, 4) if total else 1.0,
        "victim_p99_ms_alone": round(alone["p99_ms"], 2),
        "victim_p99_ms_during": round(during["p99_ms"], 2),
        "victim_refusals": during["reasons"],
        "flooder_calls_admitted": flood_counts["admitted"],
        "flooder_calls_refused": flood_counts["refused"],
        "ratio": round(rate_during / rate_alone, 3) if rate_alone else 0.0,
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key != "ratio":
            print(f"{key:36} {value}")
    print(f"victim's rate during the flood / alone: {result['ratio']:.2f}x "
          f"({100 * result['victim_refused_fraction']:.1f}% of its calls turned away)")


if __name__ == "__main__":
    main()
