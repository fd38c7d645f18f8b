"""Consumer groups on a real server: readiness, leases, acks, long-poll, finish, restart."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

import torch_tq
from torch_tq import InvalidArgument, NotFound, Unavailable

T = torch.ones(4)


@pytest.fixture
def group(unique_id):
    """A group name no other test uses (tests share the session server)."""
    return f"t{unique_id}"


@pytest.fixture
def P(unique_id):
    """A matrix type of this test only: a group requiring it sees this test's writes alone."""
    return f"p{unique_id}"


@pytest.fixture
def R(unique_id):
    return f"r{unique_id}"


def _ids(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def test_ready_only_when_every_type_is_present(client, group, unique_id, P, R):
    ids = _ids(unique_id, 4)
    for i in ids:
        client.put(i, P, T)
    assert client.consume(group, [P, R], max_items=10).index_ids == []
    client.put(ids[2], R, T)
    client.put(ids[0], R, T)
    lease = client.consume(group, [R, P], max_items=10)
    assert lease.index_ids == [ids[2], ids[0]]  # in the order they became ready
    status = client.group_status(group)
    assert (status["ready"], status["leased"], status["consumed"], status["incomplete"]) == (0, 2, 0, 2)
    assert status["types"] == [P, R]


def test_ack_consumes_for_good_and_reports_per_item(client, group, unique_id, P, R):
    ids = _ids(unique_id, 3)
    for i in ids:
        client.put(i, P, T)
    lease = client.consume(group, [P], max_items=2, lease=0.2)
    reply = client.ack(group, [lease.index_ids[0], 999_999_999_999])
    assert reply["acked"] == [lease.index_ids[0]] and reply["unknown"] == [999_999_999_999]
    assert client.ack(group, [lease.index_ids[0]])["already"] == [lease.index_ids[0]]
    time.sleep(0.3)  # the unacknowledged one's lease runs out: it comes back first
    again = client.consume(group, max_items=10)
    assert again.index_ids == [lease.index_ids[1], ids[2]]
    client.ack(group, again.index_ids)
    assert client.consume(group, max_items=10).index_ids == []
    status = client.group_status(group)
    assert status["consumed"] == 3 and status["redelivered"] == 1
    client.put(ids[0], P, T * 2)  # an overwrite does not make it new for the group
    assert client.consume(group, max_items=10).index_ids == []


def test_release_hands_back_at_once(client, group, unique_id, P, R):
    for i in _ids(unique_id, 2):
        client.put(i, P, T)
    lease = client.consume(group, [P], max_items=2, lease=600)
    assert client.release(group, lease.index_ids + [5]) == lease.index_ids
    assert client.consume(group, max_items=2).index_ids == lease.index_ids


def test_groups_are_independent(client, group, unique_id, P, R):
    client.put(unique_id, P, T)
    a = client.consume(group + "a", [P], max_items=5)
    b = client.consume(group + "b", [P], max_items=5)
    assert unique_id in a.index_ids and unique_id in b.index_ids


def test_group_types_are_fixed_and_unknown_groups_not_found(client, group, P, R):
    client.consume(group, [P])
    with pytest.raises(InvalidArgument, match="requires types"):
        client.consume(group, [P, R])
    with pytest.raises(NotFound):
        client.group_status(group + "x")
    with pytest.raises(NotFound):
        client.consume(group + "x")  # a new group needs its types
    client.delete_group(group)
    client.consume(group, [P, R])  # a deleted group starts afresh


def test_long_poll_waits_for_the_producer(client, group, unique_id, P, R):
    client.consume(group, [P])  # create the group
    got = {}

    def consumer():
        t0 = time.monotonic()
        got["lease"] = client.consume(group, max_items=1, timeout=20)
        got["waited"] = time.monotonic() - t0

    th = threading.Thread(target=consumer)
    th.start()
    time.sleep(0.5)
    assert th.is_alive()  # waiting, not returning empty
    client.put(unique_id, P, T)
    th.join(10)
    assert got["lease"].index_ids == [unique_id]
    assert 0.4 < got["waited"] < 5  # woken by the put, not by the timeout
    assert client.group_status(group)["requests"] == 2


@pytest.mark.parametrize("transport", ["grpc", "same-host"])
def test_a_waiting_consumer_leases_a_batch_write_whole(memory_server, group, unique_id, P,
                                                        transport):
    """A batch call's items are told to the groups at its end, together: the consumer
    waiting on the group wakes once and leases them all, not the first one alone."""
    producer = torch_tq.Client(memory_server.location, transport=transport)
    consumer = torch_tq.Client(memory_server.location, transport="grpc")
    consumer.consume(group, [P])  # create the group
    got = {}
    th = threading.Thread(
        target=lambda: got.setdefault("lease", consumer.consume(group, max_items=64,
                                                                timeout=20)))
    th.start()
    time.sleep(0.3)
    assert th.is_alive()
    items = {(i, P): torch.randn(64 << 10) for i in _ids(unique_id, 32)}  # 8 MiB
    assert all(r.success for r in producer.put_many(items, batch_items=32))
    th.join(10)
    assert got["lease"].index_ids == _ids(unique_id, 32)


def test_long_poll_times_out_empty(client, group, P, R):
    t0 = time.monotonic()
    lease = client.consume(group, [P], timeout=0.3)
    assert lease.index_ids == [] and not lease.finished
    assert 0.25 < time.monotonic() - t0 < 5


def test_finish_ends_the_group_once_drained(client, group, unique_id, P, R):
    types = [f"ft{unique_id % 10**9}"]  # types of this test only: finishing them ends no one else
    client.put(unique_id, types[0], T)
    lease = client.consume(group, types, max_items=5)
    assert client.finish(types) == sorted(set(client.finish(types)))
    # nothing ready and nothing more coming: drained at once, though not finished while
    # something is still leased
    t0 = time.monotonic()
    lease2 = client.consume(group, max_items=5, timeout=20)
    assert time.monotonic() - t0 < 5
    assert lease2.drained and not lease2.finished and lease2.index_ids == []
    client.ack(group, lease.index_ids)
    lease3 = client.consume(group, timeout=20)
    assert lease3.finished and lease3.drained
    assert client.group_status(group)["finished"]
    client.reopen(types)
    reopened = client.consume(group, timeout=0)
    assert not reopened.finished and not reopened.drained


def test_ack_with_delete_removes_the_matrices(client, group, unique_id, P, R):
    client.put(unique_id, P, T)
    client.put(unique_id, R, T)
    lease = client.consume(group, [P], max_items=1)
    assert lease.index_ids == [unique_id]
    reply = client.ack(group, lease.index_ids, delete=True)
    assert reply["deleted"] == 2
    with pytest.raises(NotFound):
        client.metadata(unique_id)


def test_acks_ride_on_the_next_consume(client, group, unique_id, P, R):
    for i in _ids(unique_id, 2):
        client.put(i, P, T)
    first = client.consume(group, [P], max_items=1)
    second = client.consume(group, max_items=1, ack=first.index_ids)
    assert second.index_ids != first.index_ids
    assert client.group_status(group)["consumed"] == 1


def test_exactly_once_among_concurrent_consumers(client, group, unique_id, P, R):
    ids = _ids(unique_id, 60)
    client.consume(group, [P])
    seen: list[int] = []
    lock = threading.Lock()

    def consumer():
        c = torch_tq.Client(client.location)
        while True:
            lease = c.consume(group, max_items=3, timeout=2)
            if not lease.index_ids:
                return
            with lock:
                seen.extend(lease.index_ids)
            c.ack(group, lease.index_ids)

    threads = [threading.Thread(target=consumer) for _ in range(4)]
    for th in threads:
        th.start()
    for i in ids:
        client.put(i, P, T)
    for th in threads:
        th.join(60)
    assert sorted(seen) == ids


def test_shutdown_wakes_long_polls(tmp_path):
    srv = torch_tq.start_server(storage="memory")
    c = torch_tq.Client(srv.location)
    c.consume("g", ["prompt"])
    result = {}

    def consumer():
        try:
            result["lease"] = c.consume("g", timeout=50)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e

    th = threading.Thread(target=consumer)
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    srv.stop()
    th.join(20)
    assert time.monotonic() - t0 < 10
    assert isinstance(result.get("error"), Unavailable)


def test_state_survives_restart(disk_server, tmp_path):
    srv = disk_server()
    c = torch_tq.Client(srv.location)
    for i in range(6):
        c.put(i, "prompt", T)
    lease = c.consume("train", ["prompt"], max_items=4, lease=600)
    c.ack("train", lease.index_ids[:2])
    c.finish(["prompt"])
    srv.stop()

    srv = disk_server()
    c = torch_tq.Client(srv.location)
    status = c.group_status("train")
    # acked stays consumed; the lease was not kept, so its unacked items are ready again
    assert (status["consumed"], status["ready"], status["leased"]) == (2, 4, 0)
    assert status["finished_types"] == ["prompt"]
    rest = c.consume("train", max_items=10)
    assert sorted(rest.index_ids) == sorted(set(range(6)) - set(lease.index_ids[:2]))
    c.ack("train", rest.index_ids)
    assert c.consume("train", max_items=10).finished


def test_acked_survives_kill_9_and_torn_journal_tail_is_dropped(disk_server, tmp_path):
    srv = disk_server()
    c = torch_tq.Client(srv.location)
    for i in range(3):
        c.put(i, "prompt", T)
    lease = c.consume("g", ["prompt"], max_items=3)
    c.ack("g", lease.index_ids[:1])  # acknowledged: fsynced before the reply
    srv.kill()
    journal = tmp_path / "data" / "queue" / "groups" / "g" / "acked.u64"
    assert journal.read_bytes() == struct.pack("<Q", lease.index_ids[0])
    with open(journal, "ab") as f:
        f.write(b"\x01\x02\x03")  # a torn append from a crash mid-write
    srv = disk_server()
    c = torch_tq.Client(srv.location)
    assert c.group_status("g")["consumed"] == 1
    assert sorted(c.consume("g", max_items=5).index_ids) == sorted(lease.index_ids[1:])
    assert journal.stat().st_size == 8


def test_killed_consumer_items_are_redelivered(memory_server, group, unique_id, P, R):
    client = torch_tq.Client(memory_server.location)
    ids = _ids(unique_id, 3)
    for i in ids:
        client.put(i, P, T)
    code = (
        "import sys, time, torch_tq\n"
        f"c = torch_tq.Client({memory_server.location!r})\n"
        f"l = c.consume({group!r}, [{P!r}], max_items=3, lease=1.0)\n"
        "print(l.index_ids, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        leased = eval(proc.stdout.readline())  # our own child's list of ints
        assert sorted(leased) == ids
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert client.consume(group, max_items=3).index_ids == []  # still leased
    time.sleep(1.1)
    assert sorted(client.consume(group, max_items=3, timeout=5).index_ids) == ids


def test_renewed_leases_stay_and_stale_ones_keep_the_group_undrained(client, group, unique_id):
    types = [f"rn{unique_id % 10**9}"]
    for i in _ids(unique_id, 2):
        client.put(i, types[0], T)
    lease = client.consume(group, types, max_items=2, lease=1.0)
    client.finish(types)
    assert client.consume(group).drained  # a fresh lease: its holder is alive
    time.sleep(0.6)
    assert not client.consume(group).drained  # not renewed for half its term: maybe dead
    assert client.renew(group, lease.index_ids + [12345], lease=1.0) == lease.index_ids
    assert client.consume(group).drained
    time.sleep(0.8)  # past the first deadline, but renewed: still leased
    assert client.group_status(group)["leased"] == 2
    # a stale lease makes a waiting consumer wait for it to run out, then take it
    time.sleep(0.3)
    again = client.consume(group, max_items=2, timeout=5)
    assert sorted(again.index_ids) == lease.index_ids


def test_many_long_polls_do_not_starve_other_calls(client, group, unique_id, P):
    client.consume(group, [P])
    n = 32
    results: list = []

    def consumer():
        c = torch_tq.Client(client.location)
        results.append(c.consume(group, max_items=1, timeout=8).index_ids)

    threads = [threading.Thread(target=consumer) for _ in range(n)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    client.put(unique_id, "other", T)  # unrelated calls go through while they wait
    assert torch.equal(client.get(unique_id, "other"), T)
    assert client.health()["status"] == "SERVING"
    assert time.monotonic() - t0 < 3
    for i in _ids(unique_id, n):
        client.put(i, P, T)
    for th in threads:
        th.join(30)
    assert sorted(i for ids in results for i in ids) == _ids(unique_id, n)
