"""Many hosts, simulated: every storage node in a network namespace of its own and the
clients in another, joined through a bridge (``benchmarks/netns.py``), so the cluster client
reaches its nodes by address over a real network, and a node can be cut off (its link down:
silence, not a refused connection) or killed and restarted.

Needs root (skipped with the reason elsewhere); every namespace is removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import netns  # noqa: E402

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=str(netns.available()))

TYPES = ["prompt", "reward"]
ITEMS = 60

# runs on the clients' host: writes the items, then streams the group through TQDataset,
# printing each index_id as it is read
CONSUMER = r"""
import json, sys, time
import torch
import torch_tq
from torch_tq import Cluster, TensorSink, TQDataset

spec, items = sys.argv[1], int(sys.argv[2])
cluster = Cluster.from_env(spec)
options = {"transport": "grpc", "timeout": 5, "connect_timeout": 0, "retry_deadline": 0}
with TensorSink(cluster, client_options=options) as sink:
    for i in range(items):
        sink.write(i, {"prompt": torch.full((64,), float(i)), "reward": torch.tensor([i])})
    sink.finish()
client = cluster.client(**options)
per_node = {name: sorted(i for i in range(items) if cluster.node_of(i) == name)
            for name in cluster.names}
print(json.dumps({"per_node": per_node}), flush=True)
# a client whose map lacks a node: the real owner's neighbour refuses its puts
stale = Cluster({k: v for k, v in cluster.nodes.items() if k != "n2"}).client(**options)
moved = next(i for i in range(10**6, 2 * 10**6) if cluster.node_of(i) == "n2")
try:
    stale.put(moved, "prompt", torch.ones(1))
    print(json.dumps({"stale": "stored"}), flush=True)
except torch_tq.WrongNode as e:
    print(json.dumps({"stale": e.code}), flush=True)
sys.stdin.readline()  # the test says when to start
ds = TQDataset(cluster, ["prompt", "reward"], group="g", poll=0.5, lease=8,
               client_options=options)
for item in ds.loader(batch_size=None):
    i = int(item["index_id"])
    assert torch.equal(item["prompt"], torch.full((64,), float(i)))
    print(json.dumps({"id": i}), flush=True)
    time.sleep(0.05)  # a training step
print(json.dumps({"end": True}), flush=True)
"""


def test_a_cluster_across_hosts_survives_a_partition_and_a_kill(tmp_path):
    """Three node hosts and a client host. The client writes through a TensorSink, then
    streams a consumer group; mid-stream node n1 is cut off and node n2 (a disk node) is
    killed. Node n0 goes on delivering; the stream does not end while n1 and n2 are away;
    after n1's link is back and n2 has restarted from its journal, every id arrives exactly
    once and the stream ends. A client with a stale map (no n2) is refused."""
    names = ["n0", "n1", "n2"]
    with netns.network(3) as net:
        data = [tmp_path / n for n in names]
        procs = [netns.start_node(prefix, addr, name, names, "--storage", "disk",
                                  "--data-dir", str(d))
                 for prefix, addr, name, d in zip(net.nodes, net.addresses, names, data)]
        try:
            spec = ",".join(f"{n}={loc}" for n, (_, loc) in zip(names, procs))
            script = tmp_path / "consumer.py"
            script.write_text(CONSUMER)
            consumer = subprocess.Popen(net.client + [sys.executable, str(script), spec,
                                                      str(ITEMS)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
            lines: list[dict] = []
            got_line = threading.Condition()

            def read() -> None:
                for line in consumer.stdout:
                    with got_line:
                        lines.append(json.loads(line))
                        got_line.notify_all()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()

            def wait_for(check, timeout: float, what: str) -> None:
                deadline = time.monotonic() + timeout
                with got_line:
                    while not check():
                        left = deadline - time.monotonic()
                        if left <= 0 or consumer.poll() is not None:
                            pytest.fail(f"{what}: {lines[-5:]}\n{consumer.stderr.read()[-3000:]}"
                                        if consumer.poll() is not None else
                                        f"{what}: {lines[-5:]}")
                        got_line.wait(min(left, 0.5))

            def ids() -> list[int]:
                return [line["id"] for line in lines if "id" in line]

            wait_for(lambda: any("stale" in line for line in lines), 60, "the writes")
            per_node = next(line["per_node"] for line in lines if "per_node" in line)
            assert all(per_node[n] for n in names)
            assert next(line["stale"] for line in lines if "stale" in line) == \
                "FAILED_PRECONDITION"
            consumer.stdin.write("go\n")
            consumer.stdin.flush()
            wait_for(lambda: len(ids()) >= 6, 60, "the first items")
            net.cut(1)  # a partition: n1 runs on, unreachable
            procs[2][0].kill()
            procs[2][0].wait()
            cut_at = len(ids())
            # n0 goes on delivering what it owns
            wait_for(lambda: set(per_node["n0"]) <= set(ids()), 60, "n0's items meanwhile")
            time.sleep(2)
            assert not any("end" in line for line in lines)  # not ended while nodes are away
            assert len(ids()) > cut_at
            net.cut(1, False)
            procs[2] = netns.start_node(net.nodes[2], net.addresses[2], "n2", names,
                                        "--storage", "disk", "--data-dir", str(data[2]))
            wait_for(lambda: any("end" in line for line in lines), 120, "the end")
            assert consumer.wait(30) == 0, consumer.stderr.read()[-3000:]
            assert sorted(ids()) == list(range(ITEMS))  # every id, exactly once
        finally:
            for proc, _ in procs:
                proc.kill()
                proc.wait()
            if consumer.poll() is None:
                consumer.kill()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tqc" not in leftover
