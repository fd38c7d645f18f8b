"""The same-host path against real servers: detection and fallback, readers that keep their
data across overwrites and deletes, the server as the authority over staged files, and no
mapping or descriptor leaks."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq
from torch_tq.transport import same_host as local


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    with torch_tq.start_server(data_dir=str(d), qps=0, chunk_bytes="256KiB") as srv:
        srv.data_dir = str(d)
        yield srv


@pytest.fixture
def lc(disk):
    with torch_tq.Client(disk.location, transport="same-host", chunk_bytes="256KiB") as c:
        yield c


def test_detection_and_choice(disk, memory_server):
    assert torch_tq.Client(disk.location).transport == "same-host"  # auto
    assert torch_tq.Client(disk.location, transport="grpc").transport == "grpc"
    assert torch_tq.Client(memory_server.location).transport == "same-host"  # via /dev/shm
    with torch_tq.start_server(storage="memory", same_host=False) as closed:
        assert torch_tq.Client(closed.location).transport == "grpc"
        with pytest.raises(torch_tq.Unavailable, match="transport='same-host'.*without"):
            torch_tq.Client(closed.location, transport="same-host").put(1, "x", torch.ones(1))
    os.environ["TORCH_TQ_TRANSPORT"] = "grpc"
    try:
        assert torch_tq.Client(disk.location).transport == "grpc"
    finally:
        del os.environ["TORCH_TQ_TRANSPORT"]


def test_directory_not_visible_means_grpc(disk, tmp_path):
    good = {"same_host": True, "root": disk.data_dir,
            "probe": open(os.path.join(disk.data_dir, local.PROBE)).read()}
    assert local.attach(good, 1 << 20) is not None
    assert local.attach({**good, "probe": "0" * 32}, 1 << 20) is None  # another filesystem
    assert local.attach({**good, "root": str(tmp_path)}, 1 << 20) is None
    assert local.attach({"same_host": False}, 1 << 20) is None


def test_same_host_and_grpc_see_the_same_store(disk, lc, unique_id):
    remote = torch_tq.Client(disk.location, transport="grpc")
    t = torch.randn(300, 1000)  # several 256 KiB batches
    lc.put(unique_id, "prompt", t)
    assert torch.equal(remote.get(unique_id, "prompt"), t)
    remote.put(unique_id, "resp", t * 2)
    assert torch.equal(lc.get(unique_id, "resp"), t * 2)
    meta = remote.metadata(unique_id)
    assert meta["dimensions"] == {"prompt": [300, 1000], "resp": [300, 1000]}
    created = meta["matrices"]["prompt"]["created_at"]
    lc.put(unique_id, "prompt", t + 1)  # an overwrite keeps the creation time
    meta = remote.metadata(unique_id)
    assert meta["matrices"]["prompt"]["created_at"] == created
    assert meta["matrices"]["prompt"]["updated_at"] >= created
    with pytest.raises(torch_tq.NotFound, match=f"matrix not found: index_id={unique_id}"):
        lc.get(unique_id, "nothing")


def test_one_batch_get_is_a_view_of_the_file_and_survives_overwrite_and_delete(lc, unique_id):
    t = torch.arange(1000, dtype=torch.float32)
    lc.put(unique_id, "x", t)
    before = dict(lc.stats)
    got = lc.get(unique_id, "x")
    assert lc.stats["zero_copy_gets"] == before["zero_copy_gets"] + 1
    lc.put(unique_id, "x", torch.zeros(1000))
    lc.delete(unique_id)
    gc.collect()
    assert torch.equal(got, t)  # the mapping holds the old file
    with pytest.raises(torch_tq.NotFound):
        lc.get(unique_id, "x")


@pytest.mark.parametrize("storage", ["disk", "memory"])
def test_concurrent_overwrites_never_show_a_mix(disk, memory_server, storage, unique_id):
    # 1.2 MB: several batches in the disk store; in the memory store, over the size from
    # which a put reuses the file of a replaced version (never one a reader still maps)
    n = 300_000
    location = disk.location if storage == "disk" else memory_server.location
    lc = torch_tq.Client(location, transport="same-host", chunk_bytes="256KiB")
    lc.put(unique_id, "v", torch.full((n,), 0.0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        w = torch_tq.Client(location, transport="same-host", chunk_bytes="256KiB")
        i = 1
        while not stop.is_set():
            try:
                w.put(unique_id, "v", torch.full((n,), float(i)))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        for _ in range(60):
            got = lc.get(unique_id, "v")
            assert got.min() == got.max(), "a read mixed two versions"
            seen.add(got[0].item())
            del got  # unmapped: the versions replaced meanwhile can be reused
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert len(seen) > 1  # it really raced with the writer
    if storage == "memory":
        recycle = lc.server_stats()["recycle"]
        assert recycle["offered"] > 0, str(recycle)  # files were reused meanwhile


def test_staged_files_are_checked_by_the_server(disk, lc, unique_id):
    store = lc._transport().store
    t = torch.randn(1000)
    name = store.stage(torch_tq.protocol.commands.Key(unique_id, "bad"), torch_tq.codec.tensors.DTYPES["float32"],
                       (1000,), t.numpy())
    path = os.path.join(store.staging, name)
    with open(path, "r+b") as f:  # flip a byte in the middle of the values
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    fc = flight.FlightClient(disk.location)
    body = json.dumps({"index_id": unique_id, "matrix_type": "bad", "file": name}).encode()
    # the server checks the structure, not the digests: every read verifies those
    list(fc.do_action(flight.Action("PublishLocal", body)))
    with pytest.raises(torch_tq.InternalError, match="failed its checksum"):
        lc.get(unique_id, "bad")
    with pytest.raises(torch_tq.InternalError, match="failed its checksum"):
        torch_tq.Client(disk.location, transport="grpc").get(unique_id, "bad")
    # a truncated file, or one that is not a matrix file at all, is refused
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"not arrow at all"):
        name = store.stage(torch_tq.protocol.commands.Key(unique_id, "bad2"),
                           torch_tq.codec.tensors.DTYPES["float32"], (1000,), t.numpy())
        path = os.path.join(store.staging, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(damage(data))
        body = json.dumps({"index_id": unique_id, "matrix_type": "bad2", "file": name}).encode()
        with pytest.raises(pa.ArrowInvalid, match="staged file .* is invalid"):
            list(fc.do_action(flight.Action("PublishLocal", body)))
        assert not os.path.exists(path)
    with pytest.raises(torch_tq.NotFound):
        lc.get(unique_id, "bad2")
    for bad in ("../objects/1/x.arrow", "a" * 32 + ".arrow/..", "x.arrow"):
        body = json.dumps({"index_id": 1, "matrix_type": "x", "file": bad}).encode()
        with pytest.raises(pa.ArrowInvalid, match="staged file name"):
            list(fc.do_action(flight.Action("PublishLocal", body)))
    body = json.dumps({"index_id": 1, "matrix_type": "x", "file": "0" * 32 + ".arrow"}).encode()
    with pytest.raises(pa.ArrowInvalid, match="missing"):
        list(fc.do_action(flight.Action("PublishLocal", body)))


def test_refused_put_leaves_nothing_staged(tmp_path):
    with torch_tq.start_server(data_dir=str(tmp_path), max_matrix_bytes="1MiB") as srv:
        c = torch_tq.Client(srv.location, transport="same-host")
        with pytest.raises(torch_tq.InvalidArgument, match="matrix too large"):
            c.put(1, "big", torch.zeros(1 << 19))
        c.put(2, "ok", torch.ones(10))
        assert os.listdir(tmp_path / "staging") == []
        with pytest.raises(torch_tq.InvalidArgument, match="unsupported tensor dtype"):
            c.put(3, "c", torch.zeros(2, dtype=torch.complex64))
    (tmp_path / "staging" / ("f" * 32 + ".arrow")).write_bytes(b"left by a dead client")
    with torch_tq.start_server(data_dir=str(tmp_path)) as srv:  # a restart clears staging
        assert os.listdir(tmp_path / "staging") == []
        assert torch.equal(torch_tq.Client(srv.location).get(2, "ok"), torch.ones(10))


def test_consumer_groups_see_same_host_puts(lc, unique_id):
    group = f"g{unique_id}"
    lc.put(unique_id, "p", torch.ones(3))
    lc.put(unique_id, "r", torch.ones(3))
    lease = lc.consume(group, ["p", "r"], max_items=10, timeout=5)
    assert unique_id in lease.index_ids


def _maps_under(root: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if root in line)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_mapping_or_descriptor_leaks_after_1000_calls(disk, lc, unique_id):
    small, big = torch.randn(100), torch.randn(200_000)
    lc.put(unique_id, "s", small)
    lc.put(unique_id, "b", big)
    lc.get(unique_id, "s"), lc.get(unique_id, "b")
    gc.collect()
    maps0, fds0 = _maps_under(disk.data_dir), _open_fds()
    held = []
    for i in range(1000):
        if i % 100 == 0:
            lc.put(unique_id, "s", small + i)
        got = lc.get(unique_id, "s" if i % 10 else "b")
        if i % 250 == 0:
            held.append(got)  # a few results alive at the end: their mappings stay
    assert _maps_under(disk.data_dir) <= maps0 + len(held) + 1  # + the last result
    del held, got
    gc.collect()
    assert _maps_under(disk.data_dir) == maps0
    assert _open_fds() <= fds0
    assert os.listdir(os.path.join(disk.data_dir, "staging")) == []


# ------------------------------------------------------------------ a memory store


def test_memory_store_shares_same_host_puts_through_dev_shm(unique_id):
    with torch_tq.start_server(storage="memory") as srv:
        c = torch_tq.Client(srv.location)
        assert c.transport == "same-host"
        root = c._transport().store.root
        assert root.startswith("/dev/shm/")
        remote = torch_tq.Client(srv.location, transport="grpc")
        t = torch.randn(300, 1000)
        c.put(unique_id, "a", t)
        assert os.path.exists(os.path.join(root, "objects", str(unique_id), "a.arrow"))
        assert torch.equal(remote.get(unique_id, "a"), t)  # the server maps the same file
        assert torch.equal(c.get(unique_id, "a"), t)
        # a matrix that came over the network lives in the server's heap: read over gRPC
        remote.put(unique_id, "b", t * 2)
        assert torch.equal(c.get(unique_id, "b"), t * 2)
        # an overwrite over the network removes the shared file first: no stale reads
        held = c.get(unique_id, "a")
        remote.put(unique_id, "a", t * 3)
        assert not os.path.exists(os.path.join(root, "objects", str(unique_id), "a.arrow"))
        assert torch.equal(c.get(unique_id, "a"), t * 3)
        assert torch.equal(held, t)  # a reader keeps what it mapped
        c.put(unique_id, "a", t)
        c.delete(unique_id)
        with pytest.raises(torch_tq.NotFound):
            c.get(unique_id, "a")
        assert os.listdir(os.path.join(root, "objects", str(unique_id))) == []
    assert not os.path.exists(root)  # a memory store leaves nothing behind


def test_memory_store_removes_dev_shm_left_by_a_dead_server():
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = f"/dev/shm/torch_tq-{dead}-deadbeef"
    os.makedirs(os.path.join(stale, "objects"))
    with torch_tq.start_server(storage="memory"):
        assert not os.path.exists(stale)


def test_memory_store_put_falls_back_to_grpc_when_staging_fails(unique_id):
    with torch_tq.start_server(storage="memory") as srv:
        c = torch_tq.Client(srv.location)
        assert c.transport == "same-host"
        staging = c._transport().store.staging
        os.rename(staging, staging + ".away")  # staging now fails, as a full /dev/shm would
        with open(staging, "w"):
            pass
        try:
            t = torch.randn(100_000)
            c.put(unique_id, "x", t)  # went over gRPC into the server's heap
            assert not os.path.exists(c._transport().store.path_of(torch_tq.protocol.commands.Key(unique_id, "x")))
            assert torch.equal(c.get(unique_id, "x"), t)
        finally:
            os.unlink(staging)
            os.rename(staging + ".away", staging)


def test_get_many_reads_each_file_without_a_call(disk, lc, unique_id):
    items = {(unique_id + i, "m"): torch.randn(50, 10 + i) for i in range(5)}
    for (i, t), v in items.items():
        lc.put(i, t, v)
    before = lc.server_stats()["calls"].get("do_get", 0)
    results = lc.get_many([*items, (unique_id + 99, "m"), (unique_id, "bad type!")])
    assert [r.success for r in results] == [True] * 5 + [False, False]
    assert [r.code for r in results[5:]] == ["NOT_FOUND", "INVALID_ARGUMENT"]
    assert all(torch.equal(r.tensor, v) for r, v in zip(results, items.values()))
    assert lc.server_stats()["calls"].get("do_get", 0) == before  # no BatchRead stream


def test_memory_store_reuses_a_replaced_file_only_when_nobody_holds_it(unique_id):
    with torch_tq.start_server(storage="memory") as srv:
        c = torch_tq.Client(srv.location)
        remote = torch_tq.Client(srv.location, transport="grpc")
        staging = c._transport().store.staging

        def pool() -> dict:
            return c.server_stats()["recycle"]

        versions = [torch.full((1 << 19,), float(i)) for i in range(6)]  # 2 MiB each
        c.put(unique_id, "a", versions[0])
        held = c.get(unique_id, "a")  # maps version 0's file
        c.put(unique_id, "a", versions[1])
        assert pool()["refused"] == 1 and pool()["files"] == 0  # held: freed, not reused
        c.put(unique_id, "a", versions[2])
        assert pool()["offered"] == 1 and pool()["files"] == 1  # version 1's file, unheld
        (free,) = [n for n in os.listdir(staging) if n.startswith("free-")]
        c.put(unique_id, "a", versions[3])  # writes over that file's pages
        assert free not in os.listdir(staging)
        assert pool()["offered"] == 2 and pool()["files"] == 1
        assert torch.equal(c.get(unique_id, "a"), versions[3])
        assert torch.equal(remote.get(unique_id, "a"), versions[3])  # the server's view
        assert torch.equal(held, versions[0])  # untouched all along
        # a smaller matrix in a larger recycled file: the file is cut to what it holds
        small = torch.arange(300_000, dtype=torch.float32)
        c.put(unique_id, "a", small)
        assert torch.equal(c.get(unique_id, "a"), small)
        path = c._transport().store.path_of(torch_tq.protocol.commands.Key(unique_id, "a"))
        assert os.path.getsize(path) < small.numel() * 4 + 64 * 1024
        # an overwrite over gRPC and a delete retire files to the pool too
        remote.put(unique_id, "a", versions[4])
        c.put(unique_id, "b", versions[5])
        c.delete(unique_id)
        assert pool()["offered"] == 5
        assert pool()["bytes"] <= pool()["budget"]
        del held


# --------------------------------------------------------------------------- a staging
# directory the server does not trust: links, FIFOs, writers, abandoned files


@pytest.fixture(params=["disk", "memory"])
def staging_server(request, disk, memory_server):
    srv = disk if request.param == "disk" else memory_server
    with torch_tq.Client(srv.location, transport="same-host", chunk_bytes="256KiB") as c:
        yield srv, c, c._transport().store


def _publish(srv, key_id: int, mtype: str, name: str) -> None:
    body = json.dumps({"index_id": key_id, "matrix_type": mtype, "file": name}).encode()
    with flight.FlightClient(srv.location) as fc:
        list(fc.do_action(flight.Action("PublishLocal", body)))


def _stage(store, key_id: int, mtype: str, t: torch.Tensor) -> str:
    return store.stage(torch_tq.protocol.commands.Key(key_id, mtype), torch_tq.codec.tensors.DTYPES["float32"],
                       tuple(t.shape), t.numpy())


def _staged_name() -> str:
    import uuid

    return uuid.uuid4().hex + ".arrow"


def test_a_staged_symlink_is_refused_and_the_outside_file_untouched(staging_server, unique_id,
                                                                    tmp_path):
    srv, c, store = staging_server
    t = torch.arange(1000, dtype=torch.float32)
    real = os.path.join(store.staging, _stage(store, unique_id, "outside", t))
    outside = tmp_path / "outside.arrow"
    shutil.move(real, outside)  # a complete, valid matrix file, outside the store
    before = outside.read_bytes()
    name = _staged_name()
    os.symlink(outside, os.path.join(store.staging, name))
    with pytest.raises(pa.ArrowInvalid, match="symbolic link"):
        _publish(srv, unique_id, "outside", name)
    assert outside.read_bytes() == before
    assert not os.path.lexists(os.path.join(store.staging, name))
    with pytest.raises(torch_tq.NotFound):
        c.get(unique_id, "outside")


def test_a_fifo_in_staging_is_refused_without_blocking(staging_server, unique_id):
    srv, c, store = staging_server
    name = _staged_name()
    os.mkfifo(os.path.join(store.staging, name))
    start = time.monotonic()
    with pytest.raises(pa.ArrowInvalid, match="not a regular file"):
        _publish(srv, unique_id, "fifo", name)
    assert time.monotonic() - start < 5
    assert c.health()["status"] == "SERVING"


def test_a_hard_link_to_a_published_file_is_refused(staging_server, unique_id):
    srv, c, store = staging_server
    c.put(unique_id, "victim", torch.arange(300_000, dtype=torch.float32))  # a file of its own
    published = store.path_of(torch_tq.protocol.commands.Key(unique_id, "victim"))
    name = _staged_name()
    os.link(published, os.path.join(store.staging, name))
    with pytest.raises(pa.ArrowInvalid, match="2 links"):
        _publish(srv, unique_id, "thief", name)
    with pytest.raises(torch_tq.NotFound):
        c.get(unique_id, "thief")
    assert torch.equal(c.get(unique_id, "victim"), torch.arange(300_000, dtype=torch.float32))


def test_a_staged_file_still_open_for_writing_is_refused(staging_server, unique_id):
    srv, c, store = staging_server
    name = _stage(store, unique_id, "open", torch.ones(1000))
    with open(os.path.join(store.staging, name), "r+b"):
        with pytest.raises(pa.ArrowInvalid, match="still open for writing"):
            _publish(srv, unique_id, "open", name)
    with pytest.raises(torch_tq.NotFound):
        c.get(unique_id, "open")


def test_what_is_published_is_the_file_checked_not_the_clients_name(staging_server, unique_id):
    srv, c, store = staging_server
    t = torch.arange(1000, dtype=torch.float32)
    name = _stage(store, unique_id, "own", t)
    staged = os.path.join(store.staging, name)
    _publish(srv, unique_id, "own", name)
    assert not os.path.lexists(staged)  # the server took the file away from that name
    published = store.path_of(torch_tq.protocol.commands.Key(unique_id, "own"))
    st = os.lstat(published)
    assert not os.path.islink(published) and st.st_nlink == 1
    with open(staged, "wb") as f:  # a client writing its old name changes nothing served
        f.write(b"garbage")
    assert torch.equal(c.get(unique_id, "own"), t)
    assert torch.equal(torch_tq.Client(srv.location, transport="grpc").get(unique_id, "own"), t)
    os.unlink(staged)


_STAGE_AND_DIE = """
import os, sys, time, torch, torch_tq
c = torch_tq.Client(sys.argv[1], transport="same-host")
store = c._transport().store
t = torch.zeros(10 * 2**20 // 4)  # 10 MiB
name = store.stage(torch_tq.protocol.commands.Key(int(sys.argv[2]), "lost"),
                   torch_tq.codec.tensors.DTYPES["float32"], tuple(t.shape), t.numpy())
path = os.path.join(store.staging, name)
if sys.argv[3] == "hold":  # a client mid-put: its file is open
    f = open(path, "r+b")
print(path, flush=True)
time.sleep(3600)
"""


def test_abandoned_staged_files_are_removed_while_the_server_runs(tmp_path, unique_id):
    import signal
    import subprocess
    import sys

    env = {"TORCH_TQ_STAGING_TIMEOUT": "1"}
    with torch_tq.start_server(data_dir=str(tmp_path / "d"), env=env) as srv:
        children = {}
        for mode in ("hold", "closed"):
            p = subprocess.Popen([sys.executable, "-c", _STAGE_AND_DIE, srv.location,
                                  str(unique_id), mode], stdout=subprocess.PIPE, text=True)
            children[mode] = (p, p.stdout.readline().strip())
        held, held_path = children["hold"]
        time.sleep(3)  # past the timeout: the held file stays, the closed one is not held...
        assert os.path.exists(held_path), "a file a live writer holds open was removed"
        for p, _ in children.values():
            p.send_signal(signal.SIGKILL)  # ...and now both clients die mid-put
            p.wait()
        deadline = time.monotonic() + 15
        while any(os.path.exists(path) for _, path in children.values()):
            assert time.monotonic() < deadline, "abandoned staged files were not removed"
            time.sleep(0.2)
        assert torch_tq.Client(srv.location).health()["status"] == "SERVING"
