"""Many nodes used as one: placement, the Cluster recipe, and a client that fans out over
real server processes."""

from __future__ import annotations

import collections
import pickle
from contextlib import ExitStack

import pytest
import torch

import torch_tq
from torch_tq import Cluster, InvalidArgument

FOUR = {f"n{i}": f"grpc://127.0.0.1:{9100 + i}" for i in range(4)}


def test_placement_is_fixed_for_good():
    """Where an id lives must never change between versions: stored data would be lost to
    every client that computes the new place."""
    cluster = Cluster(FOUR)
    assert [cluster.node_of(i) for i in range(12)] == [
        "n0", "n0", "n1", "n3", "n1", "n0", "n1", "n0", "n3", "n3", "n3", "n2"]
    grouped = Cluster(FOUR, placement_key=16)
    assert [grouped.node_of(i) for i in (0, 15, 16, 31, 32, 2**64 - 1)] == [
        "n0", "n0", "n0", "n0", "n1", "n2"]
    # the order nodes are given in, and their locations, do not matter: only their names
    shuffled = Cluster({name: f"grpc://10.0.0.{i}:8080" for i, name in
                        enumerate(reversed(list(FOUR)))})
    assert all(shuffled.node_of(i) == cluster.node_of(i) for i in range(1000))


def test_placement_spreads_ids_and_a_new_node_takes_only_its_share():
    ids = range(20_000)
    before = Cluster(FOUR)
    counts = collections.Counter(before.node_of(i) for i in ids)
    assert all(4_500 <= n <= 5_500 for n in counts.values()), counts
    after = Cluster({**FOUR, "n4": "grpc://127.0.0.1:9104"})
    moved = [i for i in ids if after.node_of(i) != before.node_of(i)]
    assert all(after.node_of(i) == "n4" for i in moved)  # only to the new node
    assert 0.17 <= len(moved) / len(ids) <= 0.23  # ~1/(N+1) = 0.2
    grouped = Cluster(FOUR, placement_key=16)
    for group in range(0, 1600, 16):
        assert len({grouped.node_of(i) for i in range(group, group + 16)}) == 1


def test_the_cluster_recipe():
    cluster = Cluster({"a": ["ucx://h0:8081", "grpc://h0:8080"], "b": "h1:8080"},
                      placement_key=8)
    again = pickle.loads(pickle.dumps(cluster))
    assert again == cluster and again.placement_key == 8 and again.names == ["a", "b"]
    assert Cluster.from_env("a=ucx://h0:8081|grpc://h0:8080, b=h1:8080",
                            placement_key=8) == cluster
    assert Cluster.from_env('{"a": ["ucx://h0:8081", "grpc://h0:8080"], "b": "h1:8080"}',
                            placement_key=8) == cluster
    for bad, why in (({}, "mapping"), ({"-x": "h:1"}, "node name"), ({"a": "h:1", "b": "h:1"},
                     "same location"), ({"a": "ftp://h:1"}, "scheme")):
        with pytest.raises(InvalidArgument, match=why):
            Cluster(bad)
    for bad in ("", "a", "a=h:1,a=h:2", "{bad json"):
        with pytest.raises(InvalidArgument):
            Cluster.from_env(bad)
    with pytest.raises(InvalidArgument, match="placement_key"):
        Cluster(FOUR, placement_key=0)
    with pytest.raises(InvalidArgument, match="index_id"):
        cluster.node_of(-1)


@pytest.fixture(scope="module")
def three():
    with ExitStack() as stack:
        servers = [stack.enter_context(torch_tq.start_server(storage="memory", qps=0))
                   for _ in range(3)]
        yield servers


def test_a_cluster_client_places_each_id_on_its_node(three, unique_id):
    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    client = cluster.client(transport="grpc")
    ids = [unique_id + i for i in range(90)]
    items = {(i, t): torch.full((8,), float(i % 1000)) + (t == "resp")
             for i in ids for t in ("prompt", "resp")}
    results = client.put_many(items)
    assert [(r.index_id, r.matrix_type, r.success) for r in results] == \
        [(i, t, True) for i, t in items]
    odd = client.put_many({5: torch.ones(1), (unique_id + 501, "prompt"): torch.ones(1)})
    assert [r.code for r in odd] == ["INVALID_ARGUMENT", "OK"]
    client.put(unique_id + 500, "prompt", torch.ones(3))
    keys = [*items, (unique_id + 999, "prompt"), ("bad", "prompt")]
    got = client.get_many(keys)
    assert [r.code for r in got] == ["OK"] * len(items) + ["NOT_FOUND", "INVALID_ARGUMENT"]
    assert all(torch.equal(r.tensor, items[k]) for r, k in zip(got, items))
    assert torch.equal(client.get(unique_id + 500, "prompt"), torch.ones(3))
    # every type of an id on one node, the node placement names, and each node used
    for name in cluster.names:
        held = {(m.index_id, m.matrix_type) for m in client.node(name).list()
                if m.index_id in ids}
        assert held and all(cluster.node_of(i) == name for i, _ in held)
        assert all((i, "resp") in held for i, t in held)
    listed = [(m.index_id, m.matrix_type) for m in client.list() if m.index_id in ids]
    assert listed == sorted(items)
    assert client.metadata(ids[3])["types"] == ["prompt", "resp"]
    assert client.delete(ids[3]) == ["prompt", "resp"]
    assert set(client.health()) == set(cluster.names)
    copy = pickle.loads(pickle.dumps(client))  # a DataLoader worker's
    assert torch.equal(copy.get(ids[4], "resp"), items[(ids[4], "resp")])


def test_a_node_that_is_down_fails_only_its_own_ids(unique_id):
    with ExitStack() as stack:
        servers = [stack.enter_context(torch_tq.start_server(storage="memory", qps=0))
                   for _ in range(3)]
        cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(servers)})
        client = cluster.client(transport="grpc", connect_timeout=0, retry_deadline=0)
        ids = [unique_id + i for i in range(60)]
        assert all(r.success for r in client.put_many({(i, "x"): torch.ones(2) for i in ids}))
        servers[1].kill()
        got = client.get_many([(i, "x") for i in ids])
        for r in got:
            if cluster.node_of(r.index_id) == "n1":
                assert r.code == "UNAVAILABLE" and r.message.startswith("node n1: ")
            else:
                assert r.success and torch.equal(r.tensor, torch.ones(2))
        results = client.put_many({(i, "y"): torch.zeros(1) for i in ids})
        assert {r.success for r in results if cluster.node_of(r.index_id) != "n1"} == {True}
        assert {r.code for r in results if cluster.node_of(r.index_id) == "n1"} == \
            {"UNAVAILABLE"}
        health = client.health()
        assert health["n1"]["status"] == "UNAVAILABLE"
        assert health["n0"]["status"] == health["n2"]["status"] == "SERVING"
        with pytest.raises(torch_tq.Unavailable, match="node n1"):
            client.list()


def test_the_sink_and_the_dataset_take_a_cluster(three, unique_id):
    from torch_tq import TensorSink, TQDataset

    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    ids = [unique_id + i for i in range(24)]
    with TensorSink(cluster, client_options={"transport": "grpc"}) as sink:
        for i in ids:
            sink.write(i, {"prompt": torch.full((4,), float(i % 97)), "reward": torch.ones(1)})
        assert sink.finish() == ["prompt", "reward"]
    client = cluster.client(transport="grpc")
    assert {name: bool(client.node(name).list()) for name in cluster.names} == \
        dict.fromkeys(cluster.names, True)
    ds = TQDataset(cluster, ["prompt", "reward"], index_ids=ids,
                   client_options={"transport": "grpc"})
    got = {int(item["index_id"]): item["prompt"] for item in ds.loader(batch_size=None,
                                                                      num_workers=1)}
    assert sorted(got) == ids
    assert all(torch.equal(got[i], torch.full((4,), float(i % 97))) for i in ids)
    assert client.reopen(["prompt"]) == ["reward"]
    # rounds with group_by need each group's ids on one node
    with pytest.raises(InvalidArgument, match="placement_key=4"):
        TQDataset(cluster, ["prompt"], group="g", group_by=4, rank=0, world_size=2)
    TQDataset(Cluster(cluster.nodes, placement_key=8), ["prompt"], group="g", group_by=4,
              rank=0, world_size=2)


@pytest.mark.parametrize("transport", ["grpc", "auto"])
def test_a_node_refuses_ids_it_does_not_own(transport, unique_id):
    """Each node knows the cluster: a client with a stale map (here: one node short)
    cannot store an id on a node that does not own it, on any path."""
    names = ["n0", "n1", "n2"]
    with ExitStack() as stack:
        servers = [stack.enter_context(torch_tq.start_server(
            storage="memory", qps=0, node_name=name, cluster_nodes=names, cluster_epoch=7))
            for name in names]
        nodes = dict(zip(names, (srv.location for srv in servers)))
        cluster = Cluster(nodes)
        client = cluster.client(transport=transport)
        ids = [unique_id + i for i in range(60)]
        items = {(i, t): torch.randn(64) for i in ids for t in ("a", "b")}
        assert all(r.success for r in client.put_many(items))
        health = client.health()
        assert health["n1"]["node"] == {"name": "n1", "nodes": names, "epoch": 7,
                                        "placement_key": 1}
        stale = Cluster({"n0": nodes["n0"], "n1": nodes["n1"]}).client(transport=transport)
        moved = [i for i in ids if Cluster({"n0": "h:1", "n1": "h:2"}).node_of(i) !=
                 cluster.node_of(i)]
        assert moved  # the ids n2 owns, which the stale map sends to n0 or n1
        big = torch.randn(1 << 18)  # 1 MiB: a put of its own on every transport
        results = stale.put_many({(i, "c"): big if k % 2 else torch.ones(4)
                                  for k, i in enumerate(ids)})
        for r in results:
            if r.index_id in moved:
                assert r.code == "FAILED_PRECONDITION", r
                assert f"belongs to node {cluster.node_of(r.index_id)}" in r.message
                assert "cluster epoch 7" in r.message
            else:
                assert r.success, r
        with pytest.raises(torch_tq.WrongNode):
            stale.put(moved[0], "c", big)
        # nothing of the refused puts was stored anywhere
        assert not [m for m in client.list() if m.index_id in moved and m.matrix_type == "c"]
    with pytest.raises(InvalidArgument, match="not one of"):
        torch_tq.start_server(storage="memory", node_name="n9", cluster_nodes=names)


def test_the_cli_works_over_every_node(three, unique_id):
    import json
    import subprocess
    import sys

    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    client = cluster.client(transport="grpc")
    ids = [unique_id + i for i in range(12)]
    assert all(r.success for r in client.put_many({(i, "cli"): torch.ones(2) for i in ids}))
    spec = ",".join(f"{name}={loc}" for name, loc in cluster.nodes.items())
    cli = [sys.executable, "-m", "torch_tq"]

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(cli + list(args) + ["--nodes", spec], capture_output=True,
                              text=True)

    done = run("ls", "--type", "cli", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(r["index_id"] for r in json.loads(done.stdout)
                  if r["index_id"] in ids) == ids
    done = run("stats", "--json")
    stats = json.loads(done.stdout)
    assert set(stats["nodes"]) == set(cluster.names) and stats["nodes_serving"] == 3
    assert stats["matrices"] == sum(s["matrices"] for s in stats["nodes"].values())
    done = run("info", str(ids[0]), "--json")
    assert json.loads(done.stdout)["types"] == ["cli"]
    assert run("rm", str(ids[0])).returncode == 0
    assert run("info", str(ids[0])).returncode == 1  # NOT_FOUND: gone from its node
    done = run("group", "status", "g-cli", "--json")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["nodes"]) == set(cluster.names)



def test_safetensors_export_and_import_across_nodes(three, unique_id, tmp_path):
    """One file from the ids of every node (each matrix streamed from its own node), and
    back: into a fresh cluster, each tensor onto the node that owns its id, through the
    CLI as well."""
    import json
    import subprocess
    import sys

    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    client = cluster.client(transport="grpc")
    ids = sorted(i for name in cluster.names for i in [  # three of every node's
        i for i in range(unique_id, unique_id + 200) if cluster.node_of(i) == name][:3])
    values = {(i, t): torch.arange(6, dtype=torch.float32).reshape(2, 3) * (i % 100 + k)
              for i in ids for k, t in enumerate(("a", "b"))}
    assert all(r.success for r in client.put_many(values))
    assert len({cluster.node_of(i) for i in ids}) == 3  # the ids span every node
    path = tmp_path / "all.safetensors"
    summary = client.export_safetensors(path, ids)
    assert summary["matrices"] == 18
    for key in values:
        client.delete(*key)
    assert client.import_safetensors(path)[:2] == [(ids[0], "a"), (ids[0], "b")]
    got = client.get_many(list(values))
    assert all(r.success and torch.equal(r.tensor, values[r.index_id, r.matrix_type])
               for r in got)
    for name in cluster.names:  # each on its own node, and only there
        assert {m.index_id for m in client.node(name).list() if m.index_id in ids} == \
            {i for i in ids if cluster.node_of(i) == name}
    spec = ",".join(f"{name}={loc}" for name, loc in cluster.nodes.items())
    cli = [sys.executable, "-m", "torch_tq"]
    again = tmp_path / "cli.safetensors"
    done = subprocess.run(cli + ["export", str(again), "--ids", ",".join(map(str, ids)),
                                 "--types", "b", "--json", "--nodes", spec],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["matrices"] == 9
    for i in ids:
        client.delete(i, "b")
    done = subprocess.run(cli + ["import", str(again), "--json", "--nodes", spec],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(torch.equal(client.get(i, "b"), values[i, "b"]) for i in ids)


def test_slurm_and_kubernetes_name_the_same_nodes_as_their_manifests():
    import os
    import shlex

    import yaml

    from torch_tq.cluster.deploy import expand_hostlist
    from torch_tq.tools.cli import build_parser

    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                        "login1"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    for bad in ("gpu[1-", "gpu]1[", "gpu[3-1]", "gpu[a-b]", ""):
        with pytest.raises(InvalidArgument):
            expand_hostlist(bad)
    slurm = Cluster.from_slurm(9000, nodelist="gpu[01-02]")
    assert slurm.nodes == {"gpu01": "grpc://gpu01:9000", "gpu02": "grpc://gpu02:9000"}

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
    with open(os.path.join(root, "kubernetes", "torch-tq.yaml")) as f:
        service, sts = list(yaml.safe_load_all(f))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert sts["kind"] == "StatefulSet" and sts["spec"]["serviceName"] == service["metadata"][
        "name"]
    cluster = Cluster.from_statefulset(sts["metadata"]["name"], sts["spec"]["replicas"],
                                       sts["metadata"]["namespace"], port=8080)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TORCH_TQ_CLUSTER_NODES"].split(",") == cluster.names  # in step
    assert cluster.nodes["torch-tq-1"] == "grpc://torch-tq-1.torch-tq.rl.svc.cluster.local:8080"
    args = build_parser().parse_args(container["args"])  # the server's own parser takes them
    assert args.host == "0.0.0.0" and args.auth_tokens  # reachable: so authenticated
    with open(os.path.join(root, "slurm", "torch-tq.sbatch")) as f:
        script = f.read()
    srun = script[script.index("exec torch-tq"):].split("'", 1)[0].replace("\\\n", " ")
    words = shlex.split(srun.replace('"$NODES"', "n0,n1").replace("exec torch-tq ", ""))
    words = [w.replace("$SLURMD_NODENAME", "n0").replace("$USER", "u").replace("$HOME", "/h")
             for w in words]
    assert words[-1] == "--cluster-nodes"  # then every node's name, "$NODES"
    args = build_parser().parse_args(words + ["n0,n1"])
    assert args.node_name == "n0" and args.auth_tokens


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray's own test cluster: a head and three raylets that offer {"storage": 1}, on
    loopback only."""
    import os
    import sys

    # Ray's addresses: 127.0.0.1 (read when Ray loads, here and in its processes)
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    loaded = "ray" in sys.modules
    ray = pytest.importorskip("ray", reason="the Ray tests need ray (pip install "
                                            "'torch_tq[ray]')")
    from ray.cluster_utils import Cluster as RayTestCluster

    if loaded:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = RayTestCluster(initialize_head=True,
                             head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={"storage": 1},
                             node_ip_address="127.0.0.1")
        ray.init(address=cluster.address)
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


def test_ray_starts_one_node_per_ray_node_and_stops_them(ray_cluster, tmp_path):
    cluster = torch_tq.ray.start_nodes(3, storage="disk", data_dir=str(tmp_path),
                                       host="127.0.0.1")
    try:
        assert cluster.names == ["tq-0", "tq-1", "tq-2"]
        ray_nodes = ray_cluster.get([a.node_id.remote() for a in cluster.actors.values()])
        assert len(set(ray_nodes)) == 3  # pinned to three distinct Ray nodes
        client = cluster.client(transport="grpc")
        items = {(i, "x"): torch.full((3,), float(i)) for i in range(40)}
        assert all(r.success for r in client.put_many(items))
        got = client.get_many(list(items))
        assert all(torch.equal(r.tensor, items[(r.index_id, "x")]) for r in got)
        assert {name: h["node"]["name"] for name, h in client.health().items()} == \
            {name: name for name in cluster.names}
        assert sorted(p.name for p in tmp_path.iterdir()) == cluster.names  # a dir each
        plain = pickle.loads(pickle.dumps(cluster))  # what a worker gets: no actors
        assert type(plain) is Cluster and plain == cluster
        with pytest.raises(torch_tq.Unavailable, match="only 3 Ray nodes"):
            torch_tq.ray.start_nodes(4, storage="memory", host="127.0.0.1")
    finally:
        cluster.stop()
    dead = cluster.client(transport="grpc", connect_timeout=0, retry_deadline=0)
    assert {h["status"] for h in dead.health().values()} == {"UNAVAILABLE"}


def test_a_consumer_group_spans_the_nodes(three, unique_id):
    """Each node runs the group for its ids; consumers lease from all of them, every id
    goes to exactly one consumer, and the group is drained only when every node is."""
    import threading

    from torch_tq import TQDataset

    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    producer = cluster.client(transport="grpc")
    types = [f"p{unique_id % 10**6}", f"r{unique_id % 10**6}"]
    ids = [unique_id + i for i in range(90)]
    group = f"g-{unique_id}"
    assert all(r.success for r in producer.put_many(
        {(i, t): torch.full((2,), float(i % 1000)) for i in ids for t in types}))
    producer.finish(types)
    got: list[list[int]] = [[], []]

    def consume(k: int) -> None:
        client = cluster.client(transport="grpc")
        acks: list[int] = []
        while True:
            lease = client.consume(group, types, max_items=7, timeout=1, ack=acks)
            acks = list(lease.index_ids)
            got[k].extend(lease.index_ids)
            assert len(lease.index_ids) <= 7
            if lease.drained:
                break
        if acks:
            client.ack(group, acks)

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got[0] + got[1]) == ids  # every id exactly once
    assert got[0] and got[1]
    status = producer.group_status(group)
    assert status["consumed"] == len(ids) and status["drained"] and status["finished"]
    assert set(status["nodes"]) == set(cluster.names)
    # the streaming dataset over the cluster reads a second group to its end
    ds = TQDataset(cluster, types, group=group + "-ds", client_options={"transport": "grpc"},
                   batch_items=8)
    seen = [int(item["index_id"]) for item in ds.loader(batch_size=None)]
    assert sorted(seen) == ids


def _disk_cluster(stack: ExitStack, tmp_path, nodes: int, ids: list[int]):
    """``nodes`` disk nodes, a client that fails at once on a node that is down, and ``ids``
    written (one matrix ``x`` each) and finished."""
    servers = [stack.enter_context(torch_tq.start_server(
        storage="disk", data_dir=str(tmp_path / f"n{i}"), qps=0)) for i in range(nodes)]
    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(servers)})
    client = cluster.client(transport="grpc", connect_timeout=0, retry_deadline=0)
    assert all(r.success for r in client.put_many({(i, "x"): torch.ones(1) for i in ids}))
    client.finish(["x"])
    return servers, cluster, client


def _consume_to_the_end(client, seen: list[int], acks: list[int], max_items: int):
    """Consumes group ``g`` (acks riding on the next call) until it is drained, or 40
    tries: the last lease."""
    for _ in range(40):
        lease = client.consume("g", ["x"], max_items=max_items, timeout=0.5, ack=acks)
        seen.extend(lease.index_ids)
        acks = list(lease.index_ids)
        if lease.drained:
            break
    return lease


def test_a_group_is_not_drained_while_a_node_is_down_and_resumes_after(unique_id, tmp_path):
    with ExitStack() as stack:
        ids = [unique_id + i for i in range(30)]
        servers, cluster, client = _disk_cluster(stack, tmp_path, 3, ids)
        servers[2].kill()
        live = [i for i in ids if cluster.node_of(i) != "n2"]
        seen: list[int] = []
        acks: list[int] = []
        for _ in range(40):  # acks ride on the next consume, as TQDataset sends them
            lease = client.consume("g", ["x"], max_items=10, timeout=0.2, ack=acks)
            assert not lease.drained  # n2's ids may still come
            seen.extend(lease.index_ids)
            acks = list(lease.index_ids)
            if sorted(seen) == sorted(live):
                break
        assert sorted(seen) == sorted(live)  # the live nodes delivered theirs meanwhile
        lease = client.consume("g", ["x"], max_items=10, timeout=0.2)
        assert not lease.index_ids and not lease.drained
        # the disk node comes back where it was: its ids arrive, each once, then the end
        port = servers[2].port
        stack.enter_context(torch_tq.start_server(storage="disk", data_dir=str(tmp_path / "n2"),
                                                  qps=0, port=port))
        lease = _consume_to_the_end(client, seen, acks, max_items=10)
        assert lease.drained
        assert sorted(seen) == ids  # every id exactly once, across the restart


def test_acks_for_a_node_that_is_down_wait_for_it(unique_id, tmp_path):
    """A consumer acks ids of a node that has just gone down: the acks wait in the client,
    the consumer goes on with the other nodes, and once the node is back the acks land
    before anything is leased again, so nothing is delivered twice."""
    with ExitStack() as stack:
        ids = [unique_id + i for i in range(20)]
        servers, cluster, client = _disk_cluster(stack, tmp_path, 2, ids)
        first = client.consume("g", ["x"], max_items=6, timeout=1)
        assert any(cluster.node_of(i) == "n1" for i in first.index_ids)
        port = servers[1].port
        servers[1].kill()
        on_n1 = [i for i in first.index_ids if cluster.node_of(i) == "n1"]
        assert client.ack("g", on_n1)["unsent"] == on_n1  # kept, not lost, not raised
        seen, acks = list(first.index_ids), list(first.index_ids)
        for _ in range(10):  # n0's ids keep coming; n1's acks wait
            lease = client.consume("g", ["x"], max_items=6, timeout=0.2, ack=acks)
            seen.extend(lease.index_ids)
            acks = list(lease.index_ids)
        assert sorted(seen) == sorted({*first.index_ids,
                                       *(i for i in ids if cluster.node_of(i) == "n0")})
        stack.enter_context(torch_tq.start_server(storage="disk", data_dir=str(tmp_path / "n1"),
                                                  qps=0, port=port))
        lease = _consume_to_the_end(client, seen, acks, max_items=6)
        assert lease.drained and sorted(seen) == ids  # each once: the acks landed first
        assert client.group_status("g")["consumed"] == len(ids)


def _rounds_run(cluster, types, group, world_size, dp_size, batch, jitter=0.0, produce=None,
                **options):
    """Every rank of a job reads ``group`` through TQDataset in a thread of its own (each
    with its own cluster client), while ``produce()`` (if given) writes in another: the
    batches each rank received, in order."""
    import random
    import threading
    import time

    from torch_tq import TQDataset

    got: list[list[list[int]]] = [[] for _ in range(world_size)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        rng = random.Random(r)
        if jitter:
            time.sleep(0.5 * (r % 2))  # the peers do not start together
        try:
            ds = TQDataset(cluster, types, group=group, rank=r, world_size=world_size,
                           dp_size=dp_size, batch_size=batch, poll=0.5, lease=30,
                           client_options={"transport": "grpc"}, **options)
            for b in ds.loader(batch_size=batch):
                got[r].append(sorted(int(i) for i in b["index_id"]))
                if jitter:
                    time.sleep(rng.random() * jitter)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    if produce is not None:
        threads.append(threading.Thread(target=produce))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    if errors:
        raise errors[0]
    return got


def _written(cluster, matrix_type: str, ids: list[int]):
    """``ids`` written (one small matrix each) and their type finished: the producer."""
    producer = cluster.client(transport="grpc")
    assert all(r.success for r in producer.put_many(
        {(i, matrix_type): torch.tensor([i % 1000]) for i in ids}))
    producer.finish([matrix_type])
    return producer


def test_rounds_across_nodes_give_every_rank_the_same_steps(three, unique_id):
    """Each node deals its own ids in rounds: every dp rank gets one share of every round
    of every node, so all ranks take the same number of steps (DDP's collectives would hang
    otherwise), each batch from one node, every id at most once."""
    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    types = [f"rp{unique_id % 10**6}"]
    ids = [unique_id + i for i in range(101)]
    producer = _written(cluster, types[0], ids)
    got = _rounds_run(cluster, types, f"g-{unique_id}", world_size=2, dp_size=2, batch=4,
                      jitter=0.02)
    assert len(got[0]) == len(got[1]) > 0  # equal steps
    delivered = [i for batches in got for b in batches for i in b]
    assert len(delivered) == len(set(delivered))  # nothing twice
    assert all(len(b) == 4 and len({cluster.node_of(i) for i in b}) == 1
               for batches in got for b in batches)
    # what fills no round stays, less than a round (2 shares of 4) per node
    status = producer.group_status(f"g-{unique_id}")
    left = len(ids) - len(delivered)
    assert status["ready"] == left and left < 8 * len(cluster.names)
    assert status["consumed"] == len(delivered)
    for name, per_node in status["nodes"].items():
        assert per_node["ready"] < 8, (name, per_node)
        assert per_node["rounds"]["dealt"] * 8 == sum(
            1 for i in delivered if cluster.node_of(i) == name)


def test_grpo_groups_stay_whole_across_nodes(three, unique_id):
    """``placement_key=4`` keeps a prompt's 4 responses on one node, where ``group_by=4``
    deals them as one: every batch is whole groups."""
    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)}, placement_key=4)
    types = [f"gr{unique_id % 10**6}"]
    base = unique_id - unique_id % 4
    _written(cluster, types[0], [base + i for i in range(96)])
    got = _rounds_run(cluster, types, f"g-{unique_id}", world_size=2, dp_size=2, batch=8,
                      group_by=4)
    assert len(got[0]) == len(got[1]) > 0
    for b in got[0] + got[1]:
        assert sorted(collections.Counter(i // 4 for i in b).values()) == [4, 4]  # 2 whole


def test_peers_of_one_dp_rank_read_the_same_batches_across_nodes(three, unique_id):
    """Four ranks as two dp ranks of two (tensor-parallel peers): the peers of a dp rank
    read the same batches in the same order although the shares come from three nodes and
    the peers run at different speeds; every id goes to exactly one dp rank."""
    cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(three)})
    producer = cluster.client(transport="grpc")
    types = [f"tp{unique_id % 10**6}"]
    ids = [unique_id + i for i in range(90)]

    def produce() -> None:  # while the ranks read: which node fills a round first varies
        import random
        import time

        order = random.Random(7).sample(ids, len(ids))
        for k in range(0, len(order), 5):
            assert all(r.success for r in producer.put_many(
                {(i, types[0]): torch.tensor([i % 1000]) for i in order[k:k + 5]}))
            time.sleep(0.02)
        producer.finish(types)

    got = _rounds_run(cluster, types, f"g-{unique_id}", world_size=4, dp_size=2, batch=3,
                      jitter=0.1, produce=produce)
    assert got[0] == got[1] and got[2] == got[3]  # peers in step
    assert len(got[0]) == len(got[2]) > 0
    nodes_seen = {cluster.node_of(b[0]) for b in got[0]}
    assert len(nodes_seen) == 3  # the shares did come from every node
    delivered = [i for batches in (got[0], got[2]) for b in batches for i in b]
    assert len(delivered) == len(set(delivered))
    assert producer.group_status(f"g-{unique_id}")["consumed"] == len(delivered)


def test_a_node_that_timed_out_is_not_believed_drained_for_a_lease_term(unique_id):
    """A consume that times out on a node (stopped here with SIGSTOP; cut off by a partition
    in tests/test_multihost.py) may have been served with a reply that never came: the node
    then holds leases this client never saw. So its "drained" counts only once a lease term
    has passed and such leases have run out."""
    import os
    import signal
    import time

    with ExitStack() as stack:
        servers = [stack.enter_context(torch_tq.start_server(storage="memory", qps=0))
                   for _ in range(2)]
        cluster = Cluster({f"n{i}": srv.location for i, srv in enumerate(servers)})
        client = cluster.client(transport="grpc", timeout=1, connect_timeout=0,
                                retry_deadline=0)
        ids = [unique_id + i for i in range(10)]
        assert all(r.success for r in client.put_many({(i, "x"): torch.ones(1) for i in ids}))
        client.finish(["x"])
        seen: list[int] = []
        lease = client.consume("g", ["x"], max_items=100, timeout=1, lease=4)
        while not lease.drained:
            seen += lease.index_ids
            lease = client.consume("g", ["x"], max_items=100, timeout=0.2, lease=4,
                                   ack=lease.index_ids)
        assert sorted(seen) == ids
        os.kill(servers[1].pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            lease = client.consume("g", ["x"], max_items=100, lease=4)  # n1 times out
            assert not lease.drained
        finally:
            os.kill(servers[1].pid, signal.SIGCONT)
        while True:
            lease = client.consume("g", ["x"], max_items=100, timeout=0.2, lease=4)
            assert not lease.index_ids
            if lease.drained:
                break
            assert time.monotonic() - stopped < 15
        assert time.monotonic() - stopped >= 4  # not before the lease term had passed
