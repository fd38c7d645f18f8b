"""Limits and quotas against real servers: QPS per client, streams per client, calls per
node, oversized matrices, and the client's retry of calls turned away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq
from torch_tq.server.limits import Limiter, Limits, client_identity, peer_host

from .conftest import proc_status_kib


def _opts(client_id: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"x-tq-client-id", client_id.encode())])


def _in_flight(client: torch_tq.Client) -> int:
    """Calls in flight on the server, not counting the Stats call asking."""
    return client.server_stats()["calls_in_flight"] - 1


def _wait_in_flight(client: torch_tq.Client, expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = _in_flight(client)
        if n == expected or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


_SCHEMA = pa.schema([("data", pa.float32())])


def _open_put(fc: flight.FlightClient, client_id: str, index_id: int):
    desc = flight.FlightDescriptor.for_command(
        json.dumps({"index_id": index_id, "matrix_type": "held", "shape": [4]}))
    return fc.do_put(desc, _SCHEMA, _opts(client_id))


def _close_quietly(writers) -> None:
    for w, _ in writers:
        try:
            w.close()
        except pa.ArrowException:
            pass  # the upload was abandoned empty: the server says INVALID_ARGUMENT


# ------------------------------------------------------------------ unit: the limiter itself


def test_token_bucket_rate_and_hint():
    now = [0.0]
    lim = Limiter(Limits(qps=10, qps_burst=2), clock=lambda: now[0])
    lim.admit("a"), lim.release("a")
    lim.admit("a"), lim.release("a")
    with pytest.raises(torch_tq.Unavailable) as e:
        lim.admit("a")
    assert e.value.retry_after_ms == 100
    lim.admit("b"), lim.release("b")  # another client is not affected
    now[0] += 0.1
    lim.admit("a")  # a token earned back in 0.1 s
    lim.release("a")
    now[0] += 0.03
    with pytest.raises(torch_tq.Unavailable) as e:
        lim.admit("a")
    assert e.value.retry_after_ms == 70  # 0.3 of a token saved: 0.07 s to the next
    assert lim.snapshot()["rejected"] == {"qps": 2}


def test_client_identity_header_or_peer_ip():
    assert client_identity({"x-tq-client-id": [b"trainer-7"]}, "ipv4:127.0.0.1:5000") == "id:trainer-7"
    assert client_identity({}, "ipv4:127.0.0.1:5000") == "ip:127.0.0.1"
    assert client_identity({}, "ipv6:[::1]:5000") == "ip:::1"
    assert peer_host("ipv4:10.0.0.2:1") == "10.0.0.2"
    with pytest.raises(torch_tq.InvalidArgument):
        client_identity({"x-tq-client-id": [b"bad id\n"]}, "ipv4:127.0.0.1:1")


@pytest.mark.parametrize("bad", [{"qps": -1}, {"streams_per_client": 1.5}, {"qps_burst": 0},
                                 {"max_calls": True}])
def test_limits_reject_nonsense(bad):
    with pytest.raises(torch_tq.InvalidArgument):
        Limits(**bad)


# ------------------------------------------------------------------ QPS


def test_qps_enforced_for_eager_client_while_another_keeps_its_rate():
    rate, burst, window = 200, 20, 2.0
    with torch_tq.start_server(storage="memory", qps=rate, qps_burst=burst) as srv:
        eager = torch_tq.Client(srv.location, retry_deadline=0)
        calm = torch_tq.Client(srv.location, retry_deadline=0)
        eager.health(), calm.health()
        time.sleep(0.2)  # both buckets full again
        accepted, rejected, calm_done = [0], [0], [0]
        start = time.monotonic()
        stop = start + window

        def hammer() -> None:
            while time.monotonic() < stop:
                try:
                    eager.health()
                    if time.monotonic() <= stop:
                        accepted[0] += 1
                except torch_tq.Unavailable as e:
                    assert e.retry_after_ms is not None
                    rejected[0] += 1

        def steady() -> None:  # half the quota, evenly paced: never turned away
            for i in range(int(window * rate / 2) - 20):
                time.sleep(max(0.0, start + i * 2 / rate - time.monotonic()))
                calm.health()
                calm_done[0] += 1

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        threads.append(threading.Thread(target=steady))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = burst + rate * window
        assert abs(accepted[0] - expected) <= 0.1 * expected, (accepted[0], expected)
        assert rejected[0] > accepted[0]  # it really was over the limit
        assert calm_done[0] == int(window * rate / 2) - 20  # no Unavailable was raised
        stats = calm.server_stats()
        assert stats["rejected"]["qps"] == rejected[0]
        assert stats["limits"]["qps"] == rate


def test_client_retry_honours_hint_and_deadline():
    with torch_tq.start_server(storage="memory", qps=4, qps_burst=1) as srv:
        patient = torch_tq.Client(srv.location, retry_deadline=10)
        patient.health()
        t0 = time.monotonic()
        patient.health()  # bucket empty: the server says retry after ~250 ms
        waited = time.monotonic() - t0
        assert 0.2 <= waited < 2.0
        assert patient.stats["retries"] >= 1

        hasty = torch_tq.Client(srv.location, retry_deadline=0.1)
        hasty.health()
        t0 = time.monotonic()
        with pytest.raises(torch_tq.Unavailable, match="retry_deadline") as e:
            hasty.health()  # the hint (~250 ms) lies past the deadline: give up at once
        assert time.monotonic() - t0 < 0.2
        assert e.value.retry_after_ms is not None

        # a pickled copy is the same client to the quota
        import pickle

        twin = pickle.loads(pickle.dumps(hasty))
        assert twin.client_id == hasty.client_id
        with pytest.raises(torch_tq.Unavailable):
            twin.health()


# ------------------------------------------------------------------ streams and calls


def test_101st_stream_rejected_and_counters_return_to_zero():
    with torch_tq.start_server(storage="memory") as srv:
        fc = flight.FlightClient(srv.location)
        observer = torch_tq.Client(srv.location)
        writers = [_open_put(fc, "greedy", i) for i in range(100)]
        assert _wait_in_flight(observer, 100) == 100
        w, _ = _open_put(fc, "greedy", 100)
        with pytest.raises(flight.FlightUnavailableError, match="too many concurrent streams"):
            w.write_table(pa.table({"data": pa.array([1, 2, 3, 4], pa.float32())}))
            w.close()
        # another client is unaffected
        other = torch_tq.Client(srv.location)
        other.put(1, "fine", torch.ones(4))
        # completion with errors (empty uploads) brings the count back
        _close_quietly(writers[:50])
        assert _wait_in_flight(observer, 50) == 50
        # completion with success too
        for i, (w, r) in enumerate(writers[50:]):
            w.write_table(pa.table({"data": pa.array([1, 2, 3, float(i)], pa.float32())}))
            w.done_writing()
            r.read()
            w.close()
        assert _wait_in_flight(observer, 0) == 0
        stats = observer.server_stats()
        assert stats["rejected"]["client_streams"] == 1
        assert stats["clients_active"] == 1  # only the observer, asking now


def test_killed_client_releases_its_streams():
    with torch_tq.start_server(storage="memory") as srv:
        observer = torch_tq.Client(srv.location)
        script = textwrap.dedent(f"""
            import json, sys, time, pyarrow as pa, pyarrow.flight as flight
            fc = flight.FlightClient({srv.location!r})
            opts = flight.FlightCallOptions(headers=[(b"x-tq-client-id", b"doomed")])
            schema = pa.schema([("data", pa.float32())])
            held = []
            for i in range(30):
                d = flight.FlightDescriptor.for_command(json.dumps(
                    {{"index_id": i, "matrix_type": "doomed", "shape": [1 << 20]}}))
                w, r = fc.do_put(d, schema, opts)
                w.write_table(pa.table({{"data": pa.array([1.0] * 1000, pa.float32())}}))
                held.append((w, r))
            print("ready", flush=True)
            time.sleep(600)
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            assert _wait_in_flight(observer, 30) == 30
            proc.kill()
            proc.wait(10)
            assert _wait_in_flight(observer, 0) == 0
            assert not [m for m in observer.list() if m.matrix_type == "doomed"]
        finally:
            proc.kill()
            proc.stdout.close()


def test_node_call_limit_across_clients():
    with torch_tq.start_server(storage="memory", max_calls=20) as srv:
        fc = flight.FlightClient(srv.location)
        writers = [_open_put(fc, f"c{i}", i) for i in range(19)]  # each within its share
        observer = torch_tq.Client(srv.location, retry_deadline=0)
        assert _wait_in_flight(observer, 19) == 19
        writers.append(_open_put(fc, "c19", 19))  # the 20th call in flight
        time.sleep(0.5)
        with pytest.raises(torch_tq.Unavailable, match="server busy"):
            observer.health()  # within its share: it waits for a slot, and none frees up
        w, _ = _open_put(fc, "c20", 99)
        with pytest.raises(flight.FlightUnavailableError, match="server busy"):
            w.write_table(pa.table({"data": pa.array([1, 2, 3, 4], pa.float32())}))
            w.close()
        _close_quietly(writers)
        assert _wait_in_flight(observer, 0) == 0
        assert observer.server_stats()["rejected"].get("node_calls", 0) >= 1, observer.server_stats()["rejected"]


# ------------------------------------------------------------------ matrix size


def _rss_kib(pid: int) -> int:
    return proc_status_kib(pid, "VmRSS")


def test_oversize_rejected_from_declared_size_before_streaming():
    with torch_tq.start_server(storage="memory") as srv:  # the default 10 GB limit
        fc = flight.FlightClient(srv.location)
        client = torch_tq.Client(srv.location)
        client.health()
        rss0 = _rss_kib(srv.pid)
        chunk = pa.table({"data": pa.array(torch.zeros(16 << 20).numpy())})  # 64 MiB
        numel = 11 * 10**9 // 4  # 11 GB of float32 declared
        desc = flight.FlightDescriptor.for_command(json.dumps(
            {"index_id": 5, "matrix_type": "huge", "shape": [numel], "dtype": "float32"}))
        writer, _ = fc.do_put(desc, chunk.schema)
        sent = 0
        with pytest.raises(pa.ArrowException, match="matrix too large"):
            for _ in range(32):  # would be 2 GiB, if the server kept reading
                writer.write_table(chunk)
                sent += 1
            writer.close()
        assert sent < 32
        assert _rss_kib(srv.pid) - rss0 < 200 * 1024  # stayed flat (no 2 GiB received)
        with pytest.raises(torch_tq.NotFound):
            client.get(5, "huge")
        assert client.server_stats()["errors"]["INVALID_ARGUMENT"] >= 1


def test_oversize_aborted_mid_stream_and_by_client_put():
    with torch_tq.start_server(storage="memory", max_matrix_bytes="1MiB") as srv:
        client = torch_tq.Client(srv.location)
        with pytest.raises(torch_tq.InvalidArgument, match="matrix too large"):
            client.put(1, "big", torch.zeros(300_000))  # 1.2 MB
        # no declared size: the server counts as the bytes arrive and stops the stream
        fc = flight.FlightClient(srv.location)
        desc = flight.FlightDescriptor.for_command(json.dumps({"index_id": 2, "matrix_type": "big"}))
        table = pa.table({"data": pa.array(torch.zeros(400_000).numpy())})
        writer, _ = fc.do_put(desc, table.schema)
        with pytest.raises(pa.ArrowException, match="matrix too large|more than one record batch"):
            writer.write_table(table, max_chunksize=100_000)
            writer.close()
        # more than declared: aborted mid-stream
        desc = flight.FlightDescriptor.for_command(
            json.dumps({"index_id": 3, "matrix_type": "big", "shape": [1000]}))
        writer, _ = fc.do_put(desc, table.schema)
        with pytest.raises(pa.ArrowException, match="more than the 1000 elements"):
            writer.write_table(table.slice(0, 2000), max_chunksize=500)
            writer.close()
        assert client.list() == []


def test_limits_configurable_from_cli_and_reported(tmp_path):
    with torch_tq.start_server(storage="memory", qps=0, streams_per_client=7, max_calls=50,
                               max_batch_items=10) as srv:
        limits = torch_tq.Client(srv.location).server_stats()["limits"]
        assert limits["qps"] == 0 and limits["qps_burst"] is None
        assert limits["streams_per_client"] == 7
        assert limits["max_calls"] == 50
        assert limits["max_batch_items"] == 10
    env = {**os.environ, "TORCH_TQ_QPS": "nope"}
    out = subprocess.run([sys.executable, "-m", "torch_tq", "serve", "--port", "0", "--storage",
                          "memory"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "TORCH_TQ_QPS" in out.stderr


# ------------------------------------------------------------------ fair shares of the slots


def _fake_limiter(max_calls: int = 10, slot_wait_s: float = 2.0):
    now = [0.0]
    lim = Limiter(Limits(qps=0, max_calls=max_calls, slot_wait_s=slot_wait_s),
                  clock=lambda: now[0])
    return lim, now


def _admit_in_thread(lim: Limiter, client: str, host: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            lim.admit(client, host=host)
            out["ok"] = True
        except torch_tq.Unavailable as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _waiting(lim: Limiter, n: int) -> None:
    deadline = time.monotonic() + 5
    while lim.snapshot()["calls_waiting"] != n:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_lone_client_may_use_every_slot():
    lim, _ = _fake_limiter()
    for _ in range(10):
        lim.admit("F", host="A")
    assert lim.snapshot()["calls_in_flight"] == 10


def test_a_victim_waits_for_the_next_slot_while_the_flooder_is_held_to_its_share():
    lim, now = _fake_limiter()
    for _ in range(10):
        lim.admit("F", host="A")
    t, out = _admit_in_thread(lim, "V", "B")  # the node is full: the victim waits...
    _waiting(lim, 1)
    with pytest.raises(torch_tq.Unavailable, match="fair share"):
        lim.admit("F", host="A")  # ...and the flooder, over its half, is turned away
    lim.release("F", host="A")  # the slot that frees up goes to the victim
    t.join()
    assert out == {"ok": True}
    for _ in range(4):  # the victim may take the rest of its half as the flood drains
        lim.release("F", host="A")
        lim.admit("V", host="B")
    assert _holding(lim) == {"A": 5, "B": 5}
    lim.release("V", host="B")
    with pytest.raises(torch_tq.Unavailable, match="fair share"):
        lim.admit("F", host="A")  # a free slot, but not the flooder's while the victim is here
    assert lim.snapshot()["rejected"]["fair_share"] == 2


def _holding(lim: Limiter) -> dict:
    return {host: share.active for host, share in lim._hosts.items() if share.active}


def test_shares_split_among_hosts_first_then_among_a_hosts_ids():
    lim, _ = _fake_limiter(max_calls=12)
    for i in range(6):  # one host with six ids
        lim.admit(f"a{i}", host="A")
    lim.admit("b", host="B")
    lim.admit("c", host="C")
    # three hosts: four slots each; host A's four are its six ids' (one each at most)
    with pytest.raises(torch_tq.Unavailable, match="fair share"):
        lim.admit("a6", host="A")
    for _ in range(3):
        lim.admit("b", host="B")
    with pytest.raises(torch_tq.Unavailable, match="fair share"):
        lim.admit("b", host="B")
    assert _holding(lim) == {"A": 6, "B": 4, "C": 1}  # A came first, before B and C


def test_a_share_outlives_short_gaps_between_calls_and_goes_back_after_idling():
    lim, now = _fake_limiter()
    lim.admit("V", host="B")
    lim.release("V", host="B")  # between two of its calls: still present
    for _ in range(5):
        lim.admit("F", host="A")
    now[0] += 0.5
    with pytest.raises(torch_tq.Unavailable, match="fair share"):
        lim.admit("F", host="A")
    now[0] += 0.6  # idle past PRESENCE_S: its share goes back
    for _ in range(5):
        lim.admit("F", host="A")
    assert lim.snapshot()["hosts_present"] == 1


def test_a_wait_that_times_out_is_turned_away_and_leaves_no_trace():
    lim, now = _fake_limiter(max_calls=4, slot_wait_s=0.2)
    for host in ("A", "A", "B", "B"):
        lim.admit(host.lower(), host=host)
    t, out = _admit_in_thread(lim, "c", "C")  # within its share (1 of 4), but nothing frees up
    t.join()
    assert "no call slot freed up" in str(out["error"])
    assert lim.snapshot()["calls_waiting"] == 0
    for host in ("A", "A", "B", "B"):
        lim.release(host.lower(), host=host)
    now[0] += 2
    lim.admit("z", host="Z")
    lim.release("z", host="Z")
    now[0] += 2
    lim.admit("z", host="Z")
    snap = lim.snapshot()
    assert snap["calls_in_flight"] == 1 and snap["hosts_present"] == 1
    assert len(lim._members) == 1


def test_random_calls_keep_the_counts_whole():
    import random

    rng = random.Random(5)
    lim, now = _fake_limiter(max_calls=8, slot_wait_s=0)
    held: list[tuple[str, str]] = []
    for _ in range(5000):
        now[0] += rng.random() * 0.05
        if held and rng.random() < 0.5:
            client, host = held.pop(rng.randrange(len(held)))
            lim.release(client, host=host)
        else:
            host = rng.choice("ABC")
            client = f"{host}{rng.randrange(4)}"
            try:
                lim.admit(client, host=host)
                held.append((client, host))
            except torch_tq.Unavailable:
                pass
        assert lim.active == len(held) <= 8
        assert sum(h.active for h in lim._hosts.values()) == len(held)
        assert all(h.members == sum(1 for k in lim._members if k[0] == host)
                   for host, h in lim._hosts.items())
    for client, host in held:
        lim.release(client, host=host)
    now[0] += 5
    lim.admit("x", host="X")
    assert lim.snapshot()["hosts_present"] == 1 and len(lim._members) == 1


def _fairness(*args: str) -> dict:
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fairness.py")
    out = subprocess.run([sys.executable, script, "--json", "--seconds", "2", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_victim_keeps_its_share_while_one_client_floods_the_node():
    """120 connections of one client id hold every slot with long polls; another client on
    the same host still gets every call through (it waits for the next free slot once, then
    the flood is held to half)."""
    result = _fairness("--ids", "one")
    assert result["victim_refused_fraction"] <= 0.01, result
    assert result["flooder_calls_refused"] > result["flooder_calls_admitted"], result
    assert result["ratio"] > 0.2, result  # the rest is the flood's CPU on a 2-core machine


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    name = f"tqprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and ip netns")
def test_a_host_keeps_its_share_while_another_host_floods_with_many_ids():
    """The flooder on another host (a network namespace) under 120 client ids: the node's
    slots are split between the hosts first, so the victim's host keeps half."""
    result = _fairness("--ids", "many", "--netns")
    assert result["victim_refused_fraction"] <= 0.01, result
    assert result["ratio"] > 0.2, result


# ------------------------------------------------------------------ a memory store's capacity


def _memory(client: torch_tq.Client) -> dict:
    return client.server_stats()["memory"]


def test_a_memory_store_refuses_what_does_not_fit_before_taking_a_byte():
    with torch_tq.start_server(storage="memory", max_memory="64MiB", qps=0) as srv:
        client = torch_tq.Client(srv.location, transport="grpc")
        assert _memory(client) == {"max_memory": 64 << 20, "stored": 0, "in_flight": 0}
        fc = flight.FlightClient(srv.location)
        rss0 = _rss_kib(srv.pid)
        chunk = pa.table({"data": pa.array(torch.zeros(4 << 20).numpy())})  # 16 MiB
        desc = flight.FlightDescriptor.for_command(json.dumps(
            {"index_id": 1, "matrix_type": "big", "shape": [25 << 20], "dtype": "float32"}))
        writer, _ = fc.do_put(desc, chunk.schema)  # 100 MiB declared
        with pytest.raises(flight.FlightUnavailableError, match="memory store full"):
            for _ in range(8):
                writer.write_table(chunk)
            writer.close()
        assert _rss_kib(srv.pid) - rss0 < 64 * 1024
        half = torch.ones(10 << 20)  # 40 MiB
        client.put(2, "a", half)
        with pytest.raises(torch_tq.Unavailable, match="memory store full"):
            client.put(3, "b", half)
        # an undeclared upload counts as it arrives
        desc = flight.FlightDescriptor.for_command(json.dumps({"index_id": 4, "matrix_type": "c"}))
        table = pa.table({"data": pa.array(torch.zeros(10 << 20).numpy())})
        writer, _ = fc.do_put(desc, table.schema)
        with pytest.raises(pa.ArrowException, match="memory store full"):
            writer.write_table(table)
            writer.close()
        # batch items: each stands alone
        results = client.put_many([(5, "d", torch.ones(1 << 20)), (6, "e", half)])
        assert [r.success for r in results] == [True, False]
        assert "memory store full" in results[1].message
        assert sorted((m.index_id, m.matrix_type) for m in client.list()) == [(2, "a"), (5, "d")]
        mem = _memory(client)
        assert mem["in_flight"] == 0 and mem["stored"] == (40 << 20) + (4 << 20)
        client.delete(2)
        client.put(3, "b", half)  # room again
        assert _memory(client)["stored"] == (40 << 20) + (4 << 20)


def test_a_memory_store_emptied_of_batch_items_gives_their_memory_back(unique_id):
    with torch_tq.start_server(storage="memory", qps=0) as srv:
        client = torch_tq.Client(srv.location, transport="grpc")
        client.health()
        time.sleep(0.3)
        rss0 = _rss_kib(srv.pid)
        item = torch.randn(64 << 10)  # 256 KiB
        for rnd in range(2):  # 256 MiB of items, put and overwritten, in BatchWrites of 32
            for start in range(0, 1024, 32):
                batch = {(unique_id + i, "it"): item for i in range(start, start + 32)}
                assert all(r.success for r in client.put_many(batch, batch_items=32))
        # Holding costs the bytes held plus a fixed part (the free fragments of the arenas
        # of gRPC's threads), measured 35-67 MiB whatever is held; the bound, 1 GiB
        # held in <= 1.15 GiB, allows 154 MiB of it, this test 96 MiB.
        bound = (256 + 96) << 10
        deadline = time.monotonic() + 10
        while (held := _rss_kib(srv.pid) - rss0) >= bound and time.monotonic() < deadline:
            time.sleep(0.5)  # received buffers not kept are given back once it is quiet
        assert held < bound, f"{held // 1024} MiB held for 256 MiB"
        for i in range(1024):
            client.delete(unique_id + i)
        deadline = time.monotonic() + 10
        while (grown := _rss_kib(srv.pid) - rss0) >= 96 << 10 and time.monotonic() < deadline:
            time.sleep(0.5)  # the housekeeping gives it back once the node is quiet
        # 71 MiB was seen in a loaded CI run; issue 16's 64 MiB bound is for 1 GiB held,
        # and benchmarks/memory.py measures it
        assert grown < 96 << 10, f"{grown // 1024} MiB kept after the store was emptied"


def test_an_aborted_upload_gives_its_memory_back():
    with torch_tq.start_server(storage="memory", qps=0) as srv:
        client = torch_tq.Client(srv.location, transport="grpc")
        client.health()
        rss0 = _rss_kib(srv.pid)
        fc = flight.FlightClient(srv.location)
        chunk = pa.table({"data": pa.array(torch.zeros(16 << 20).numpy())})  # 64 MiB
        desc = flight.FlightDescriptor.for_command(json.dumps(
            {"index_id": 1, "matrix_type": "gone", "shape": [1 << 30], "dtype": "float32"}))
        writer, _ = fc.do_put(desc, chunk.schema)  # 4 GiB declared, 512 MiB sent, then given up
        for _ in range(8):
            writer.write_table(chunk)
        with pytest.raises(pa.ArrowInvalid, match="declared elements"):
            writer.close()
        time.sleep(1.5)
        grown = _rss_kib(srv.pid) - rss0
        assert grown < 300 * 1024, f"{grown // 1024} MiB kept after the abort"
        assert _memory(client)["in_flight"] == 0
