"""A real ``torchrun`` DDP job (2 ranks, gloo) over TQDataset: equal steps, nothing lost.

Runs ``examples/ddp_train.py`` as a user would, against a server of the test's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import torch_tq

from .conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMS, BATCH = 21, 2  # odd: a stream of 21 fills 5 rounds of 2 ranks x 2 and leaves 1


def torchrun(location, tmp_path, *args, timeout=150):
    report = tmp_path / "report"
    where = ["--nodes", location] if "=" in location else ["--location", location]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           os.path.join(ROOT, "examples", "ddp_train.py"), *where,
           "--items", str(ITEMS), "--batch-size", str(BATCH), "--report", str(report), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, proc


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_ddp_job_ends_every_rank_at_the_same_step(tmp_path, workers):
    with torch_tq.start_server(storage="memory") as srv:
        ranks, proc = torchrun(srv.location, tmp_path, "--mode", "stream",
                               "--workers", str(workers), "--group", "g")
        steps = [r["steps"] for r in ranks]
        counts = [len(r["ids"]) for r in ranks]
        print(f"streaming, {workers} workers: steps {steps}, items per rank {counts}")
        assert steps == [5, 5] and counts == [10, 10]
        dealt = ranks[0]["ids"] + ranks[1]["ids"]
        assert len(set(dealt)) == len(dealt) == 20  # no id reached two ranks
        assert "1 ready index_id(s) could not fill a last round" in proc.stderr
        # the remainder stays in the group, for a later run
        with torch_tq.Client(srv.location) as c:
            status = c.group_status("g")
            assert (status["consumed"], status["ready"], status["leased"]) == (20, 1, 0)
            rest = c.consume("g", max_items=10)
            assert rest.index_ids == sorted(set(range(ITEMS)) - set(dealt))


def test_streaming_ddp_job_over_a_cluster_ends_every_rank_at_the_same_step(tmp_path):
    """The same job over a cluster of three nodes: each node deals its own rounds; the
    ranks still take the same number of steps, and no id reaches two ranks."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        servers = [stack.enter_context(torch_tq.start_server(storage="memory"))
                   for _ in range(3)]
        nodes = ",".join(f"n{i}={srv.location}" for i, srv in enumerate(servers))
        ranks, proc = torchrun(nodes, tmp_path, "--mode", "stream", "--workers", "0",
                               "--group", "g", "--items", "40")
        steps = [r["steps"] for r in ranks]
        assert steps[0] == steps[1] > 0, steps
        dealt = ranks[0]["ids"] + ranks[1]["ids"]
        assert len(set(dealt)) == len(dealt) == 4 * steps[0]
        cluster = torch_tq.Cluster.from_env(nodes)
        client = cluster.client()
        # per node, what fills no round (less than 2 ranks x 2) stays in the group
        left = client.group_status("g")
        assert left["consumed"] == len(dealt) and left["ready"] == 40 - len(dealt)
        assert all(status["ready"] < 4 for status in left["nodes"].values())
        client.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_ddp_job_gives_both_ranks_the_same_count(tmp_path, workers):
    with torch_tq.start_server(storage="memory") as srv:
        ranks, _ = torchrun(srv.location, tmp_path, "--mode", "fixed",
                            "--workers", str(workers))
    counts = [len(r["ids"]) for r in ranks]
    steps = [r["steps"] for r in ranks]
    print(f"fixed, {workers} workers: steps {steps}, items per rank {counts}")
    assert counts == [11, 11]  # 21 padded to 22, as DistributedSampler pads
    assert steps == [6, 6]  # 11 in batches of 2 (with 2 workers: 6 + 5 items, 3 + 3 batches)
    everything = ranks[0]["ids"] + ranks[1]["ids"]
    assert set(everything) == set(range(ITEMS))
