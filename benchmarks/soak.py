"""Soak: mixed puts, gets, deletes and consumes from several client processes for a while,
with the server's memory, threads and open descriptors sampled throughout.

Each client process runs its own ``torch_tq.Client`` and, at random, puts a matrix (1 KiB to
``--max-item``), gets one, deletes one, or consumes a few ids as a consumer group and acks
them; one of every few calls is malformed or aimed at nothing (a missing key, a bad name),
as a careless client's are. After the run every matrix is deleted, the consumer groups are
dropped, and the server sits idle for a few seconds. The headline is the drift: the last
idle sample against the baseline taken after warm-up, before the soak.

    python benchmarks/soak.py --minutes 5 --clients 4
    python benchmarks/soak.py --minutes 2 --storage disk --transport same-host
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import tempfile
import time

TYPES = ("prompt", "resp", "reward")
IDS = 400  # each client's own range of index_ids


def sample(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def client_loop(location: str, transport: str, index: int, seconds: float, max_item: int,
                queue: mp.Queue) -> None:
    import torch

    import torch_tq

    rng = random.Random(index)
    counts: dict[str, int] = {}
    base = 1_000_000 * (index + 1)
    group = f"soak-{index % 2}"
    with torch_tq.Client(location, transport=transport, retry_deadline=5) as c:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            op = rng.choices(["put", "get", "delete", "consume", "bad"], [4, 4, 1, 2, 1])[0]
            index_id = base + rng.randrange(IDS)
            try:
                if op == "put":
                    numel = rng.randint(256, max_item // 4)
                    c.put(index_id, rng.choice(TYPES), torch.rand(numel))
                elif op == "get":
                    c.get(index_id, rng.choice(TYPES))
                elif op == "delete":
                    c.delete(index_id)
                elif op == "consume":
                    lease = c.consume(group, types=["prompt"], max_items=4, timeout=0.05)
                    if lease.index_ids:
                        c.ack(group, lease.index_ids)
                else:
                    rng.choice([
                        lambda: c.get(index_id, "no_such_type"),
                        lambda: c.put(index_id, "bad/name", torch.ones(4)),
                        lambda: c.get(2**64 - 1, "prompt"),
                        lambda: c.delete(base + IDS + 7),
                    ])()
                key = op
            except torch_tq.TQError as e:
                key = f"{op}:{e.code}"
            counts[key] = counts.get(key, 0) + 1
    queue.put(counts)


def run(args) -> dict:
    import torch_tq

    data_dir = tempfile.mkdtemp(prefix="tq-soak-") if args.storage == "disk" else None
    kwargs = {"data_dir": data_dir} if data_dir else {}
    env = dict(item.split("=", 1) for item in args.server_env)
    try:
        with torch_tq.start_server(storage=args.storage, qps=0, env=env, **kwargs) as srv:
            admin = torch_tq.Client(srv.location, transport="grpc")
            # warm-up: every kind of call once, so that lazily made things exist
            warm = torch_tq.Client(srv.location, transport=args.transport)
            import torch

            for i in range(20):
                warm.put(i, "prompt", torch.rand(1024))
                warm.get(i, "prompt")
                warm.consume("warm", types=["prompt"], max_items=4, timeout=0.01)
            for i in range(20):
                warm.delete(i)
            warm.delete_group("warm")
            warm.close()
            time.sleep(2)
            baseline = sample(srv.pid)

            ctx = mp.get_context("spawn")
            queue: mp.Queue = ctx.Queue()
            procs = [ctx.Process(target=client_loop, args=(
                srv.location, args.transport, i, args.minutes * 60, args.max_item, queue))
                for i in range(args.clients)]
            start = time.monotonic()
            for p in procs:
                p.start()
            samples = []
            while any(p.is_alive() for p in procs):
                samples.append({"t": round(time.monotonic() - start, 1), **sample(srv.pid)})
                time.sleep(args.sample_s)
            counts: dict[str, int] = {}
            for _ in procs:
                for k, v in queue.get(timeout=60).items():
                    counts[k] = counts.get(k, 0) + v
            for p in procs:
                p.join()
            elapsed = time.monotonic() - start

            # empty the store and the groups, then let the server sit idle
            for i in range(args.clients):
                base = 1_000_000 * (i + 1)
                for index_id in range(base, base + IDS):
                    try:
                        admin.delete(index_id)
                    except torch_tq.NotFound:
                        pass
            for g in ("soak-0", "soak-1"):
                try:
                    admin.delete_group(g)
                except torch_tq.NotFound:
                    pass
            stats = admin.server_stats()
            admin.close()
            time.sleep(args.idle_s)
            final = sample(srv.pid)
            alive = srv.alive
    finally:
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    calls = sum(counts.values())
    return {
        "storage": args.storage, "transport": args.transport, "clients": args.clients,
        "seconds": round(elapsed, 1), "calls": calls, "calls_per_s": round(calls / elapsed, 1),
        "outcomes": dict(sorted(counts.items())),
        "baseline": baseline, "final": final,
        "peak": {k: max(s[k] for s in samples) for k in ("rss_mib", "threads", "fds")}
        if samples else baseline,
        "median_during": {k: statistics.median(s[k] for s in samples)
                          for k in ("rss_mib", "threads", "fds")} if samples else baseline,
        "drift": {k: round(final[k] - baseline[k], 1) for k in baseline},
        "server_alive": alive,
        "server_errors": stats["errors"],
        "calls_in_flight_after": stats["calls_in_flight"] - 1,  # less the Stats call itself
        "stored_after": {"matrices": stats["matrices"], "bytes": stats["bytes"],
                         "groups": stats["groups"]},
        "samples": samples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--storage", choices=["memory", "disk"], default="memory")
    p.add_argument("--transport", choices=["grpc", "same-host", "ucx", "auto"], default="grpc")
    p.add_argument("--max-item", type=int, default=1 << 20, help="largest matrix in bytes")
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--idle-s", type=float, default=5.0, help="idle time before the last sample")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server process (repeatable)")
    p.add_argument("--json", help="write the full result (with every sample) to this file")
    args = p.parse_args()
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"soak: {result['clients']} clients, {result['storage']} store over "
          f"{result['transport']}, {result['seconds']} s, {result['calls']} calls "
          f"({result['calls_per_s']}/s)")
    print("outcomes:", json.dumps(result["outcomes"]))
    print("server errors by code:", json.dumps(result["server_errors"]))
    print(f"{'':10}{'baseline':>10}{'median':>10}{'peak':>10}{'final':>10}{'drift':>10}")
    for k in ("rss_mib", "threads", "fds"):
        print(f"{k:10}{result['baseline'][k]:>10.1f}{result['median_during'][k]:>10.1f}"
              f"{result['peak'][k]:>10.1f}{result['final'][k]:>10.1f}{result['drift'][k]:>+10.1f}")
    b, f = result["baseline"], result["final"]
    print(f"drift: rss {f['rss_mib'] / b['rss_mib']:.2f}x baseline "
          f"({result['drift']['rss_mib']:+.1f} MiB), threads {result['drift']['threads']:+.0f}, "
          f"fds {result['drift']['fds']:+.0f}; server alive: {result['server_alive']}")


if __name__ == "__main__":
    main()
