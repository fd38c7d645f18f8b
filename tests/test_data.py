"""TQDataset and TensorSink against real servers, with real DataLoader worker processes."""

from __future__ import annotations

import multiprocessing as mp
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader

import torch_tq
from torch_tq import InvalidArgument, TensorSink, TQDataset


TYPES = ["prompt", "resp"]


def expected(i: int) -> dict[str, torch.Tensor]:
    return {"prompt": torch.full((3, 2), float(i)), "resp": torch.arange(3) + i}


def check_item(item) -> int:
    i = int(item["index_id"])
    for t, want in expected(i).items():
        assert torch.equal(item[t], want), (i, t)
    return i


def _rank_main(location, rank, world, workers, kwargs, out, context) -> None:
    """One data-parallel rank: iterate a DataLoader over TQDataset, report the index_ids.
    (tests/test_ddp.py runs ranks that take rank and world size from torch.distributed.)"""
    ds = TQDataset(location, TYPES, rank=rank, world_size=world, **kwargs)
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        multiprocessing_context=context if workers else None)
    out.put((rank, [check_item(item) for item in loader]))


def run_ranks(location, world, workers, kwargs, timeout=120,
              context="forkserver") -> dict[int, list[int]]:
    return run_processes(_rank_main, [(location, r, world, workers, kwargs) for r in range(world)],
                         (context,), timeout)


def run_processes(target, args_per_rank, extra=(), timeout=120, meanwhile=None) -> dict:
    """Runs ``target(*args, out, *extra)`` in a process per rank, started by the forkserver
    (``meanwhile()`` runs here while they do); returns what each put on ``out``, by rank."""
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out, *extra)) for args in args_per_rank]
    for p in procs:
        p.start()
    try:
        if meanwhile is not None:
            meanwhile()
        got = dict(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return got


try:
    import ucxx  # noqa: F401

    _TRANSPORTS = ["same-host", "grpc", "ucx"]
except ImportError:
    _TRANSPORTS = ["same-host", "grpc"]


@pytest.fixture(params=_TRANSPORTS)
def server(request, monkeypatch):
    """A memory store, reached the same-host way (its clients run here), over gRPC, or with
    the bytes over UCX (every client of the test, workers included, told so through
    TORCH_TQ_TRANSPORT)."""
    if request.param == "ucx":
        monkeypatch.setenv("TORCH_TQ_TRANSPORT", "ucx")
    with torch_tq.start_server(storage="memory", same_host=request.param == "same-host") as srv:
        assert torch_tq.Client(srv.location).transport == request.param
        yield srv


# For tests of how items are dealt: the transports are covered by the tests that take
# ``server`` with all of its params.
GRPC_ONLY = pytest.mark.parametrize("server", ["grpc"], indirect=True)


def write_all(location, ids, finish=True) -> None:
    with TensorSink(location) as sink:
        for i in ids:
            sink.write(i, expected(i))
        if finish:
            sink.finish()


# ---------------------------------------------------------------------- fixed mode


@GRPC_ONLY
# Ranks from torch.distributed, forkserver workers and batches are what tests/test_ddp.py
# runs under torchrun; this adds spawn workers and drop_last.
def test_fixed_mode_gives_every_rank_the_same_count(server):
    workers, context = 2, "spawn"
    ids = list(range(100, 137))  # 37: odd, so the epoch is padded with one repeated id
    write_all(server.location, ids, finish=False)
    got = run_ranks(server.location, 2, workers, {"index_ids": ids, "shuffle": True, "seed": 7},
                    context=context)
    assert len(got[0]) == len(got[1]) == 19
    everything = got[0] + got[1]
    assert set(everything) == set(ids)  # nothing lost
    assert len(everything) - len(set(everything)) == 1  # the one pad
    dropped = run_ranks(server.location, 2, 0,  # the workers do not change what is dropped
                        {"index_ids": ids, "shuffle": True, "seed": 7, "drop_last": True})
    assert len(dropped[0]) == len(dropped[1]) == 18
    assert len(set(dropped[0] + dropped[1])) == 36  # no repeats: the tail is dropped


def test_fixed_shards_follow_distributed_sampler_and_shuffle_follows_the_epoch():
    from torch.utils.data.distributed import DistributedSampler

    ids = range(50)
    shards = [TQDataset("127.0.0.1:1", TYPES, index_ids=ids, rank=r, world_size=3,
                        shuffle=False) for r in range(3)]
    for r, shard in enumerate(shards):  # the same ids as DistributedSampler deals, in order
        sampler = DistributedSampler(ids, num_replicas=3, rank=r, shuffle=False)
        assert list(shard.shard_ids()) == [ids[i] for i in sampler]
        assert len(shard) == len(sampler) == 17
    for drop_last in (False, True):
        for n, world in ((50, 3), (7, 4), (2, 5), (0, 2)):
            counts = {len(TQDataset("127.0.0.1:1", TYPES, index_ids=range(n), rank=r,
                                    world_size=world, drop_last=drop_last).shard_ids())
                      for r in range(world)}
            assert counts == {len(DistributedSampler(range(n), num_replicas=world, rank=0,
                                                     drop_last=drop_last))}, (n, world)
    shards = [TQDataset("127.0.0.1:1", TYPES, index_ids=ids, rank=r, world_size=3,
                        shuffle=True, seed=1) for r in range(3)]
    parts = [list(s.shard_ids()) for s in shards]
    assert set(i for part in parts for i in part) == set(ids)
    assert [len(p) for p in parts] == [17, 17, 17]
    first = parts[0]
    shards[0].set_epoch(1)
    assert list(shards[0].shard_ids()) != first  # a new permutation each epoch
    assert sorted(TQDataset("127.0.0.1:1", TYPES, index_ids=ids).shard_ids()) == list(ids)


def test_sample_unit_and_default_collate(server):
    write_all(server.location, [1, 2], finish=False)
    ds = TQDataset(server.location, TYPES, index_ids=[1, 2], unit="sample")
    batches = list(DataLoader(ds, batch_size=4))
    assert [b["index_id"].tolist() for b in batches] == [[1, 1, 1, 2], [2, 2]]
    assert batches[0]["row"].tolist() == [0, 1, 2, 0]
    assert torch.equal(batches[0]["prompt"][3], torch.full((2,), 2.0))
    assert batches[1]["resp"].tolist() == [3, 4]


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidArgument):
        TQDataset("127.0.0.1:1", TYPES)  # neither mode
    with pytest.raises(InvalidArgument):
        TQDataset("127.0.0.1:1", TYPES, index_ids=[1], group="g")
    with pytest.raises(InvalidArgument):
        TQDataset("127.0.0.1:1", TYPES, index_ids=[1, 1])
    with pytest.raises(InvalidArgument):
        TQDataset("127.0.0.1:1", ["bad/type"], index_ids=[1])
    with pytest.raises(InvalidArgument):
        TQDataset("127.0.0.1:1", TYPES, index_ids=[1], rank=2, world_size=2)
    with pytest.raises(InvalidArgument):
        TQDataset("127.0.0.1:1", TYPES, index_ids=[1], unit="row")
    with pytest.raises(torch_tq.InvalidArgument, match="shuffle=True is for fixed mode"):
        TQDataset("127.0.0.1:1", TYPES, group="g", shuffle=True)
    with pytest.raises(torch_tq.InvalidArgument, match="ack='manual' is for streaming"):
        TQDataset("127.0.0.1:1", TYPES, index_ids=[1], ack="manual")


# ---------------------------------------------------------------------- resume


@GRPC_ONLY
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("unit", ["matrix", "sample"])
def test_resume_from_state_dict_equals_the_uninterrupted_tail(server, workers, unit):
    from torchdata import stateful_dataloader as sdl  # a test requirement
    ids = list(range(20))
    write_all(server.location, ids, finish=False)

    def loader():
        ds = TQDataset(server.location, TYPES, index_ids=ids, shuffle=True, seed=3, unit=unit)
        ds.set_epoch(2)
        return sdl.StatefulDataLoader(ds, batch_size=None, num_workers=workers,
                                      multiprocessing_context="forkserver" if workers else None)

    def key(item):
        return (int(item["index_id"]), int(item.get("row", -1)))

    whole = [key(x) for x in loader()]
    assert len(whole) == (60 if unit == "sample" else 20)
    for k in ((0, 1, 7) if not workers else (1, 7)):  # workers: each loader costs ~3 s
        first = loader()
        it = iter(first)
        head = [key(next(it)) for _ in range(k)]
        state = first.state_dict()
        del it
        again = loader()
        again.load_state_dict(state)
        tail = [key(x) for x in again]
        assert head + tail == whole, k


@GRPC_ONLY
def test_state_dict_without_dataloader(server):
    write_all(server.location, range(6), finish=False)
    ds = TQDataset(server.location, TYPES, index_ids=range(6))
    it = iter(ds)
    assert [int(next(it)["index_id"]) for _ in range(2)] == [0, 1]
    state = ds.state_dict()
    fresh = TQDataset(server.location, TYPES, index_ids=range(6))
    fresh.load_state_dict(state)
    assert [int(x["index_id"]) for x in fresh] == [2, 3, 4, 5]
    assert [int(x["index_id"]) for x in fresh] == list(range(6))  # the next epoch is whole


# ---------------------------------------------------------------------- streaming mode


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_every_id_exactly_once_across_ranks_and_workers(server, workers):
    ids = list(range(500, 560))
    # the consumers start first and wait for the producer (long-poll)
    result = {}
    th = threading.Thread(target=lambda: result.update(
        run_ranks(server.location, 2, workers, {"group": "trainer", "batch_items": 2})))
    th.start()
    time.sleep(1.0)
    write_all(server.location, ids)
    th.join(180)
    assert sorted(result[0] + result[1]) == ids
    status = torch_tq.Client(server.location).group_status("trainer")
    assert status["consumed"] == len(ids) and status["finished"]
    assert status["redelivered"] == 0


def test_streaming_stage_adds_a_type_and_trainer_waits_for_it(server):
    """A middle stage consumes prompt+resp, adds ref; the trainer requires all three."""
    client = torch_tq.Client(server.location)
    ids = list(range(20))
    write_all(server.location, ids)  # finishes prompt and resp

    def stage():
        ds = TQDataset(server.location, TYPES, group="ref_stage")
        with TensorSink(server.location) as sink:
            for item in ds:
                sink.write(int(item["index_id"]), {"ref": item["prompt"].sum(dim=1)})
            sink.finish()

    th = threading.Thread(target=stage)
    th.start()
    ds = TQDataset(server.location, ["prompt", "resp", "ref"], group="trainer")
    got = []
    for item in ds:
        assert torch.equal(item["ref"], item["prompt"].sum(dim=1))
        got.append(int(item["index_id"]))
    th.join(60)
    assert sorted(got) == ids
    assert client.group_status("trainer")["finished"]


@GRPC_ONLY  # lease logic: the same on every transport
def test_slow_producer_long_polls_without_busy_looping(server):
    ids = list(range(6))

    def produce():
        with TensorSink(server.location) as sink:
            for i in ids:
                time.sleep(0.4)
                sink.write(i, expected(i))
                sink.flush()
            sink.finish()

    th = threading.Thread(target=produce)
    th.start()
    ds = TQDataset(server.location, TYPES, group="slow", poll=10.0)
    got = [check_item(x) for x in ds]
    th.join(30)
    assert sorted(got) == ids
    requests = torch_tq.Client(server.location).group_status("slow")["requests"]
    # one request per item, plus a few that end empty (finish, race with the put): a loop
    # that polled without waiting would have made hundreds in these ~2.5 s
    assert requests <= 2 * len(ids) + 3, requests


@GRPC_ONLY  # lease logic: the same on every transport
def test_streaming_manual_ack_redelivers_what_was_not_acked(server):
    write_all(server.location, range(4), finish=False)
    ds = TQDataset(server.location, TYPES, group="manual", ack="manual", lease=2.0,
                   poll=0.1, idle_timeout=0.2, prefetch=0, batch_items=1)
    first = [int(x["index_id"]) for x in ds]
    assert sorted(first) == [0, 1, 2, 3]
    ds.ack(first[:2])
    time.sleep(2.1)  # the leases of the two not acknowledged run out
    again = [int(x["index_id"]) for x in ds]
    assert sorted(again) == sorted(first[2:])


@GRPC_ONLY  # lease logic: the same on every transport
def test_stopping_early_gives_leases_back(server):
    write_all(server.location, range(10), finish=False)
    ds = TQDataset(server.location, TYPES, group="early", batch_items=3, prefetch=2, lease=600)
    it = iter(ds)
    taken = [int(next(it)["index_id"]) for _ in range(2)]
    it.close()  # the loop broke off: the prefetched leases are released, taken ones acked
    client = torch_tq.Client(server.location)
    status = client.group_status("early")
    assert (status["consumed"], status["leased"], status["ready"]) == (2, 0, 8)
    rest = [int(x["index_id"]) for x in TQDataset(server.location, TYPES, group="early",
                                                  idle_timeout=0.3)]
    assert sorted(taken + rest) == list(range(10))


@GRPC_ONLY
def test_delete_after_ack_keeps_the_store_bounded(server):
    write_all(server.location, range(5))
    ds = TQDataset(server.location, TYPES, group="last", delete_after_ack=True)
    assert sorted(int(x["index_id"]) for x in ds) == list(range(5))
    assert torch_tq.Client(server.location).list() == []


@GRPC_ONLY  # lease logic: the same on every transport
def test_killed_consumer_items_go_to_another(server):
    write_all(server.location, range(8), finish=True)
    code = textwrap.dedent(f"""
        import time, torch_tq
        ds = torch_tq.TQDataset({server.location!r}, {TYPES!r}, group="crash", lease=3.0,
                                batch_items=3, prefetch=2)
        it = iter(ds)
        print(int(next(it)["index_id"]), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        first = int(proc.stdout.readline())
        time.sleep(1.5)  # it renews its leases meanwhile
    finally:
        proc.kill()
        proc.wait()
    client = torch_tq.Client(server.location)
    status = client.group_status("crash")
    acked_by_dead = status["consumed"]
    assert acked_by_dead in (0, 1) and status["leased"] >= 5 and status["ready"] <= 2
    time.sleep(1.6)  # its leases are stale now (not renewed for half their term)...
    assert not client.group_status("crash")["drained"]
    t0 = time.monotonic()
    # ...so a new consumer takes what is ready, then waits for them to run out and come back
    got = [check_item(x) for x in TQDataset(server.location, TYPES, group="crash")]
    assert time.monotonic() - t0 < 10
    assert len(got) == len(set(got))
    if acked_by_dead:
        assert first not in got
    assert sorted(got + ([first] if acked_by_dead else [])) == list(range(8))
    assert client.group_status("crash")["redelivered"] >= 1


# ---------------------------------------------------------------------- fork


FORK_SCRIPT = """
import sys, torch_tq
from torch.utils.data import DataLoader
location, used = sys.argv[1], sys.argv[2] == "used"
ds = torch_tq.TQDataset(location, ["prompt", "resp"], index_ids=range(4))
if used:
    torch_tq.Client(location).health()  # gRPC is now running in this process
loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
try:
    print(sorted(int(x["index_id"]) for x in loader))
except torch_tq.ForkedProcessError as e:
    print("ForkedProcessError:", e)
"""


@pytest.mark.parametrize("used", ["used", "fresh"])
def test_fork_never_hangs(server, used):
    write_all(server.location, range(4), finish=False)
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, server.location, used],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if used == "used":
        assert "ForkedProcessError:" in proc.stdout and "dataset.loader(" in proc.stdout
    else:
        assert proc.stdout.strip() == "[0, 1, 2, 3]"


LOADER_SCRIPT = """
import glob, multiprocessing, os, sys, torch_tq
location = sys.argv[1]
multiprocessing.set_forkserver_preload(["sqlite3"])  # the user's own: kept
torch_tq.Client(location).health()  # gRPC is running in this process: fork would be unsafe
fixed = torch_tq.TQDataset(location, ["prompt", "resp"], index_ids=range(4))
print(sorted(int(i) for b in fixed.loader(batch_size=2, num_workers=2) for i in b["index_id"]))
def forkserver_has(name):  # the workers' parent: it imported torch, so a worker need not
    for stat in glob.glob("/proc/[0-9]*/stat"):
        pid = stat.split("/")[2]
        try:
            ppid = int(open(stat).read().rsplit(")", 1)[1].split()[1])
            cmd = open(f"/proc/{pid}/cmdline").read()
            if ppid == os.getpid() and "forkserver" in cmd:
                return name in open(f"/proc/{pid}/maps").read()
        except OSError:
            pass
print("forkserver holds torch", forkserver_has("libtorch_cpu"), forkserver_has("_sqlite3"))
stream = torch_tq.TQDataset(location, ["prompt", "resp"], group="loader", idle_timeout=5)
loader = stream.loader(batch_size=2, num_workers=2)
print(loader.multiprocessing_context.get_start_method(), loader.in_order)
print(sorted(int(i) for b in loader for i in b["index_id"]))
"""


@GRPC_ONLY
def test_loader_builds_a_dataloader_that_is_safe_after_grpc(server):
    write_all(server.location, range(4))
    proc = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, server.location],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == ["[0, 1, 2, 3]", "forkserver holds torch True True",
                                         "forkserver False", "[0, 1, 2, 3]"]


# ---------------------------------------------------------------------- TensorSink


def test_sink_backpressure_bounds_bytes_in_flight(server):
    bound = 32 << 20
    item = 8 << 20
    peak = 0
    blocked = 0
    with TensorSink(server.location, max_inflight_bytes=bound, copy=True) as sink:
        src = torch.zeros(item // 4)
        for i in range(24):
            t0 = time.perf_counter()
            sink.write(i, {"prompt": src})
            blocked += time.perf_counter() - t0 > 0.005
            peak = max(peak, sink.inflight_bytes)
        assert sink.inflight_bytes > 0 or blocked  # it returned before storing
        sink.flush()
        assert sink.inflight_bytes == 0
    assert peak <= bound
    assert blocked > 0  # the producer was held back, not buffered without bound
    assert len(torch_tq.Client(server.location).list()) == 24


def test_sink_failure_surfaces_at_flush_with_its_item():
    with torch_tq.start_server(storage="memory", max_matrix_bytes="1MiB") as srv:
        sink = TensorSink(srv.location)
        sink.write(1, {"prompt": torch.zeros(10)})
        sink.write(2, {"prompt": torch.zeros(1 << 19), "resp": torch.zeros(3)})  # 2 MiB prompt
        sink.write(3, {"prompt": torch.zeros(10)})
        with pytest.raises(InvalidArgument, match=r"index_id=2, type=prompt.*too large"):
            sink.flush()
        sink.flush()  # raised once
        sink.close()
        stored = {(m.index_id, m.matrix_type) for m in torch_tq.Client(srv.location).list()}
        assert stored == {(1, "prompt"), (2, "resp"), (3, "prompt")}


@GRPC_ONLY
def test_sink_checks_input_before_queueing(server):
    with TensorSink(server.location) as sink:
        with pytest.raises(InvalidArgument):
            sink.write(-1, {"prompt": torch.zeros(1)})
        with pytest.raises(InvalidArgument):
            sink.write(1, {"bad/type": torch.zeros(1)})
        with pytest.raises(InvalidArgument):
            sink.write(1, {"prompt": [1, 2]})
    with pytest.raises(InvalidArgument):
        sink.write(1, {"prompt": torch.zeros(1)})  # closed


# ---------------------------------------------------------------------- waiting that explains itself


def _warnings_while_waiting(caplog, location, group, types, seconds=2.5):
    import logging

    ds = TQDataset(location, types, group=group, poll=0.3, warn_after=1, idle_timeout=seconds)
    with caplog.at_level(logging.WARNING, logger="torch_tq.integrations"):
        got = [int(item["index_id"]) for item in ds]
    return got, [r.getMessage() for r in caplog.records if "nothing to read" in r.getMessage()]


def test_a_wait_for_a_type_nobody_writes_says_so(memory_server, unique_id, caplog):
    # types of this test's own: the session's server holds other tests' matrices
    with TensorSink(memory_server.location) as sink:
        for i in range(3):
            sink.write(unique_id + i, {"wait_prompt": torch.ones(2)})  # no "wait_ref", ever
    got, warnings = _warnings_while_waiting(caplog, memory_server.location, f"w{unique_id}",
                                            ["wait_prompt", "wait_ref"])
    assert got == []
    assert warnings, "no warning while waiting"
    assert "3 index_id(s) have some of the types ['wait_prompt', 'wait_ref'] but not all" \
        in warnings[0]


def test_a_re_run_says_the_group_is_consumed_and_a_reset_starts_it_afresh(memory_server,
                                                                          unique_id, caplog):
    group = f"rerun{unique_id}"
    types = ["rerun_prompt", "rerun_resp"]  # this test's own (the server is the session's)
    with TensorSink(memory_server.location) as sink:
        for i in (unique_id, unique_id + 1):
            sink.write(i, {t: torch.ones(2) for t in types})
    first = TQDataset(memory_server.location, types, group=group, idle_timeout=2, poll=0.3)
    assert sorted(int(x["index_id"]) for x in first) == [unique_id, unique_id + 1]
    got, warnings = _warnings_while_waiting(caplog, memory_server.location, group, types)
    assert got == [] and warnings
    assert "has consumed 2 index_id(s) already (a re-run?" in warnings[0]
    assert f"torch-tq group reset {group}" in warnings[0]
    status = subprocess.run([sys.executable, "-m", "torch_tq", "group", "status", group,
                             "--location", memory_server.location, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["consumed"] == 2, status.stderr
    reset = subprocess.run([sys.executable, "-m", "torch_tq", "group", "reset", group,
                            "--location", memory_server.location],
                           capture_output=True, text=True, timeout=60)
    assert reset.returncode == 0 and "reset" in reset.stdout, reset.stderr
    again = TQDataset(memory_server.location, types, group=group, idle_timeout=2, poll=0.3)
    assert sorted(int(x["index_id"]) for x in again) == [unique_id, unique_id + 1]


# ---------------------------------------------------------------------- data-parallel dealing


def test_fixed_samples_are_dealt_so_every_rank_yields_the_same_count():
    rows = {i: 1 + i % 3 for i in range(7)}  # 13 rows in all, unevenly spread over ids
    per_rank = []
    for r in range(2):
        ds = TQDataset("127.0.0.1:1", TYPES, index_ids=range(7), rank=r, world_size=2,
                       unit="sample")
        per_rank.append(ds.shard_samples(rows))
    assert [len(p) for p in per_rank] == [7, 7]  # 13 padded to 14
    assert {s for p in per_rank for s in p} == {(i, r) for i in rows for r in range(rows[i])}


def test_fixed_mode_gives_the_members_of_a_dp_rank_the_same_ids():
    shards = [TQDataset("127.0.0.1:1", TYPES, index_ids=range(10), rank=r, world_size=4,
                        dp_size=2) for r in range(4)]
    assert [s.dp_rank for s in shards] == [0, 0, 1, 1]
    assert shards[0].rank_ids() == shards[1].rank_ids() == range(0, 10, 2)
    assert shards[2].rank_ids() == shards[3].rank_ids() == range(1, 10, 2)


def test_round_options_are_checked_before_anything_is_read():
    with pytest.raises(InvalidArgument, match="runs no code"):
        TQDataset("127.0.0.1:1", TYPES, group="g", group_by=lambda i: i // 4)
    with pytest.raises(InvalidArgument, match="multiple of group_by"):
        TQDataset("127.0.0.1:1", TYPES, group="g", group_by=4, batch_size=6, world_size=2,
                  rank=0)
    with pytest.raises(InvalidArgument, match="streaming"):
        TQDataset("127.0.0.1:1", TYPES, index_ids=range(4), group_by=2)
    with pytest.raises(InvalidArgument, match="divide"):
        TQDataset("127.0.0.1:1", TYPES, group="g", rank=0, world_size=4, dp_size=3)
    ds = TQDataset("127.0.0.1:1", TYPES, group="g", rank=1, world_size=2)
    assert ds.round_spec()["share"] == 1 and ds.batch_size is None
    told = ds.loader(batch_size=4).dataset  # the loader tells a copy its batch size
    assert told.round_spec()["share"] == 4 and ds.batch_size is None
    assert TQDataset("127.0.0.1:1", TYPES, group="g").round_spec() is None  # one rank


def test_streaming_dp_groups_and_grpo_groups_over_four_ranks(memory_server, unique_id):
    P = f"d{unique_id}"
    group = f"dp{unique_id}"
    base = unique_id - unique_id % 4  # prompt k's responses are 4k .. 4k+3
    ids = range(base, base + 4 * 9)  # 9 prompts x 4 responses
    with TensorSink(memory_server.location) as sink:
        for i in ids:
            sink.write(i, {P: torch.tensor([i])})
    # 4 ranks = 2 dp ranks x 2 tensor-parallel peers; batches of 4 = one prompt's group
    datasets = [TQDataset(memory_server.location, [P], group=group, rank=r, world_size=4,
                          dp_size=2, batch_size=4, group_by=4, idle_timeout=3)
                for r in range(4)]
    got: dict[int, list[int]] = {}

    def run(r):
        got[r] = [int(item["index_id"]) for item in datasets[r]]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    torch_tq.Client(memory_server.location).finish([P])
    for t in threads:
        t.join(60)
    try:
        assert got[0] == got[1] and got[2] == got[3]  # peers: the same items, same order
        assert len(got[0]) == len(got[2]) == 16  # 4 rounds; the 9th prompt stays
        assert not set(got[0]) & set(got[2])
        for r in (0, 2):
            for k in range(0, 16, 4):  # each batch is one prompt's 4 responses
                assert len({i // 4 for i in got[r][k:k + 4]}) == 1
        status = torch_tq.Client(memory_server.location).group_status(group)
        assert (status["consumed"], status["ready"]) == (32, 4)
    finally:
        torch_tq.Client(memory_server.location).reopen([P])


def _rank_batches(location, rank, world, group, mtype, out) -> None:
    ds = TQDataset(location, [mtype], group=group, rank=rank, world_size=world, unit="sample")
    loader = ds.loader(batch_size=4, num_workers=2, in_order=True)
    out.put((rank, [batch["index_id"].tolist() for batch in loader]))


def test_streaming_samples_in_order_workers_give_equal_full_batches(memory_server, unique_id):
    """unit='sample', 2 ranks x 2 in-order workers, ids of 1 to 3 rows: every batch is 4 rows
    and both ranks take the same number of steps."""
    mtype, group = f"s{unique_id}", f"samples{unique_id}"
    rows = [1 + k % 3 for k in range(30)]  # 60 rows: 7 rounds of 2 x 4, and some left

    def produce():
        with TensorSink(memory_server.location) as sink:
            for k, n in enumerate(rows):
                sink.write(unique_id + k, {mtype: torch.full((n, 2), float(k))})
            sink.finish()

    got = run_processes(_rank_batches, [(memory_server.location, r, 2, group, mtype)
                                        for r in range(2)], meanwhile=produce)
    assert len(got[0]) == len(got[1]) >= 6
    assert all(len(batch) == 4 for r in (0, 1) for batch in got[r])
    ids0 = {i for batch in got[0] for i in batch}
    ids1 = {i for batch in got[1] for i in batch}
    assert not ids0 & ids1  # no index_id reached both ranks
    status = torch_tq.Client(memory_server.location).group_status(group)
    assert status["consumed"] == len(ids0 | ids1)
    assert status["consumed"] + status["ready"] == len(rows)  # nothing lost


def test_fixed_samples_read_from_a_server_are_equal_per_rank(memory_server, unique_id):
    mtype = f"f{unique_id}"
    ids = range(unique_id, unique_id + 7)
    with TensorSink(memory_server.location) as sink:
        for k, i in enumerate(ids):
            sink.write(i, {mtype: torch.arange(1 + k % 3) + 10 * k})
    got = []
    for r in range(2):
        ds = TQDataset(memory_server.location, [mtype], index_ids=ids, rank=r, world_size=2,
                       unit="sample")
        got.append([(int(s["index_id"]), int(s["row"]), int(s[mtype])) for s in ds])
    assert len(got[0]) == len(got[1]) == 7  # 13 rows padded to 14
    every = {(i, r) for i, r, _ in got[0] + got[1]}
    assert every == {(i, r) for k, i in enumerate(ids) for r in range(1 + k % 3)}
    assert all(v == 10 * (i - unique_id) + r for i, r, v in got[0] + got[1])


def test_streaming_reads_a_lease_with_batch_reads_not_a_call_per_matrix(unique_id):
    with torch_tq.start_server(storage="memory", same_host=False) as srv:
        c = torch_tq.Client(srv.location, transport="grpc")
        items = {(unique_id + i, t): v for i in range(24)
                 for t, v in expected(unique_id + i).items()}
        assert all(r.success for r in c.put_many(items))
        c.finish(TYPES)
        before = c.server_stats()["calls"].get("do_get", 0)
        ds = TQDataset(srv.location, TYPES, group=f"b{unique_id}", batch_items=8,
                       idle_timeout=30, client_options={"transport": "grpc"})
        got = sorted(check_item(item) for item in ds)
        assert got == [unique_id + i for i in range(24)]
        reads = c.server_stats()["calls"].get("do_get", 0) - before
        # 3 leases of 8 index_ids, 16 matrices each: a BatchRead per stream of get_many
        # (4 at most), against 48 DoGets read one matrix at a time
        assert 3 <= reads <= 12, reads
