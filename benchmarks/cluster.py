"""Many nodes as one: aggregate put and get throughput of a Cluster with 1, 2 and 4 nodes
and as many client processes, each node behind a link shaped to the same bandwidth, so that
the network, not this machine's cores, is the limit (issue 18: target >= 0.8*N x one node
at N = 4).

Every node runs in a network namespace of its own, joined with the clients' namespace by
veth pairs to a bridge in a namespace of its own; ``tc tbf`` shapes each node's link, both
ways. Needs root and ``ip``/``tc``; every namespace is removed at the end.

    python benchmarks/cluster.py [--nodes 1,2,4] [--rate 50mbit] [--mb 96] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from netns import network, start_node

HERE = os.path.abspath(__file__)
ITEM_BYTES = 256 << 10


def client_role(nodes_spec: str, first_id: int, items: int, barrier_path: str) -> None:
    """One client process: waits for the start file, puts ``items`` items, reads them back;
    prints its timings as JSON."""
    import torch

    import torch_tq

    cluster = torch_tq.Cluster.from_env(nodes_spec)
    client = cluster.client(transport="grpc")
    data = {(first_id + i, "b"): torch.randn(ITEM_BYTES // 4) for i in range(items)}
    client.health()  # connections open before the clock
    print("ready", flush=True)
    while not os.path.exists(barrier_path):
        time.sleep(0.001)
    t0 = time.time()
    results = client.put_many(data, batch_items=32)
    t1 = time.time()
    got = client.get_many(list(data), batch_items=32)
    t2 = time.time()
    ok = all(r.success for r in results) and all(
        r.success and torch.equal(r.tensor, data[(r.index_id, r.matrix_type)]) for r in got)
    print(json.dumps({"put": [t0, t1], "get": [t1, t2], "ok": ok}), flush=True)


def items(n: int, total_mb: int) -> int:
    """Items per client (client ``k`` writes ids ``k * 10**7 ...``)."""
    return max(1, (total_mb << 20) // ITEM_BYTES // n)


def busiest(n: int, total_mb: int) -> int:
    """How many of a run's ids the busiest of ``n`` nodes owns."""
    import collections

    import torch_tq

    cluster = torch_tq.Cluster({f"n{i}": f"grpc://127.0.0.1:{9000 + i}" for i in range(n)})
    per = items(n, total_mb)
    return max(collections.Counter(cluster.node_of(k * 10_000_000 + i)
                                   for k in range(n) for i in range(per)).values())


def ceiling(n: int, total_mb: int) -> float:
    """The most ``n`` equal links can give over one, with these ids' placement."""
    return items(n, total_mb) * n / busiest(n, total_mb)


def measure(n: int, rate: str, total_mb: int, run: int) -> dict:
    items_per_client = items(n, total_mb)
    with network(n, rate) as net:
        addresses, node_prefixes, client_prefix = net.addresses, net.nodes, net.client
        names = [f"n{i}" for i in range(n)]
        nodes = [start_node(p, a, name, names)
                 for p, a, name in zip(node_prefixes, addresses, names)]
        try:
            spec = ",".join(f"{name}={loc}" for name, (_, loc) in zip(names, nodes))
            barrier = f"/tmp/tq-cluster-bench-{os.getpid()}-{run}-{n}"
            clients = [subprocess.Popen(client_prefix + [
                sys.executable, HERE, "--client", spec, str(k * 10_000_000),
                str(items_per_client), barrier], stdout=subprocess.PIPE, text=True)
                for k in range(n)]
            for c in clients:
                assert c.stdout.readline().strip() == "ready"
            open(barrier, "w").close()
            outs = [json.loads(c.stdout.readline()) for c in clients]
            for c in clients:
                c.wait(60)
            os.unlink(barrier)
        finally:
            for proc, _ in nodes:
                proc.kill()
                proc.wait()
    if not all(o["ok"] for o in outs):
        raise SystemExit(f"{n} nodes: a client read back wrong bytes")
    total = items_per_client * n * ITEM_BYTES
    put_s = max(o["put"][1] for o in outs) - min(o["put"][0] for o in outs)
    get_s = max(o["get"][1] for o in outs) - min(o["get"][0] for o in outs)
    return {"put_MBps": total / put_s / 1e6, "get_MBps": total / get_s / 1e6,
            "bytes": total}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        client_role(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated")
    ap.add_argument("--rate", default="50mbit",
                    help="each node's link, for tc tbf (50 Mbit/s: four nodes stay under the "
                         "~32 MB/s that this 2-core machine's eight processes move)")
    ap.add_argument("--mb", type=int, default=96, help="MiB put and read back per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("cluster.py needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.nodes.split(",")]
    figures: dict[int, dict] = {}
    for n in counts:
        runs = [measure(n, args.rate, args.mb, r) for r in range(args.runs)]
        figures[n] = {k: statistics.median(r[k] for r in runs) for k in ("put_MBps", "get_MBps")}
    base = figures[counts[0]]
    print(f"each node's link {args.rate}, {args.mb} MiB of 256 KiB items per run, medians of "
          f"{args.runs} runs, as many clients as nodes")
    ratios = {}
    for n in counts:
        f = figures[n]
        ratios[n] = {op: f[f"{op}_MBps"] / base[f"{op}_MBps"] for op in ("put", "get")}
        print(f"  {n} node(s): put {f['put_MBps']:.1f} MB/s, get {f['get_MBps']:.1f} MB/s")
    if args.json:
        print(json.dumps({"figures": figures, "ratios": ratios}))
    for n in counts[1:]:
        for op in ("put", "get"):
            print(f"ratio {n} nodes {op}: {ratios[n][op]:.2f}x {counts[0]} node(s) "
                  f"(target >= {0.8 * n / counts[0]:.1f})")
    for n in counts:
        print(f"  {n} node(s): placement allows at most {ceiling(n, args.mb):.2f}x one node "
              "(a run lasts as long as its busiest node; these ids put "
              f"{busiest(n, args.mb)} of {items(n, args.mb) * n} on it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
