"""Same-host batches into a memory store, against real servers: a ``put_many`` group is one
shared-memory file (a pack) and one ``PublishLocalBatch``; a ``get_many`` maps it
(``LocateLocal``) without a copy; a pack lives as long as any of its items and is then
recycled; the server checks every staged pack and every item of it."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq

ITEM = 1 << 14  # float32 elements: 64 KiB items, 16 of them a 1 MiB pack (recyclable)


@pytest.fixture(scope="module")
def mem():
    with torch_tq.start_server(storage="memory", qps=0, max_batch_items=40) as srv:
        yield srv


@pytest.fixture
def c(mem):
    with torch_tq.Client(mem.location, transport="same-host") as client:
        yield client


def _calls(client) -> dict:
    return client.server_stats()["calls"]


def _packs(client) -> list[str]:
    return sorted(os.listdir(os.path.join(client._transport().store.root, "packs")))


def _action(srv, name: str, body) -> list[dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with flight.FlightClient(srv.location) as fc:
        return [json.loads(r.body.to_pybytes()) for r in fc.do_action(flight.Action(name, raw))]


def test_put_many_is_one_pack_and_get_many_reads_it_without_a_copy(mem, c, unique_id):
    items = {(unique_id, f"f{i}"): torch.randn(ITEM) + i for i in range(16)}
    odd = {  # every dtype and shape, sizes that are no multiple of the 64-byte alignment
        (unique_id, "bf16"): torch.randn(3, 5).to(torch.bfloat16),
        (unique_id, "bool"): torch.rand(77) > 0.5,
        (unique_id, "i8"): torch.arange(3, dtype=torch.int8),
        (unique_id, "i64"): torch.arange(12, dtype=torch.int64).reshape(2, 3, 2),
        (unique_id, "empty"): torch.empty(0, 4),
    }
    items.update(odd)
    before = _calls(c)
    assert all(r.success for r in c.put_many(items))
    after = _calls(c)
    assert after.get("action:PublishLocalBatch", 0) == before.get("action:PublishLocalBatch", 0) + 1
    assert after.get("do_put", 0) == before.get("do_put", 0)  # no BatchWrite

    grpc = torch_tq.Client(mem.location, transport="grpc")
    remote = {(unique_id, "heap"): torch.arange(10.0)}  # over the network: the server's heap
    grpc.put_many(remote)
    keys = [*items, *remote, (unique_id, "missing")]
    stats = dict(c.stats)
    before = _calls(c)
    rows = c.get_many(keys)
    after = _calls(c)
    # one call: the heap item's bytes came with LocateLocal's answer, no BatchRead
    assert after.get("do_get", 0) == before.get("do_get", 0)
    assert after["action:LocateLocal"] == before.get("action:LocateLocal", 0) + 1
    for row, key in zip(rows[:-1], keys):
        want = {**items, **remote}[key]
        assert row.success, row
        assert row.tensor.dtype == want.dtype and torch.equal(row.tensor, want), key
    assert rows[-1].code == "NOT_FOUND"
    copied = c.stats["copied_bytes"] - stats["copied_bytes"]
    assert c.stats["zero_copy_gets"] - stats["zero_copy_gets"] >= len(items) - 1  # empty: new
    assert copied in (0, 10 * 4)  # at most the heap item (misaligned in its gRPC message)
    # the server's own view of the pack is the same bytes
    for row in grpc.get_many(list(items)):
        assert torch.equal(row.tensor, items[(row.index_id, row.matrix_type)])
    # a tensor over the pack is private: writing it changes nothing stored
    rows[0].tensor.fill_(0)
    assert torch.equal(c.get_many([keys[0]])[0].tensor, items[keys[0]])
    c.delete(unique_id)


def test_a_pack_lives_while_any_item_does_then_goes_to_the_pool(mem, c, unique_id):
    def pool() -> dict:
        return c.server_stats()["recycle"]

    items = {(unique_id, f"f{i}"): torch.full((ITEM,), float(i)) for i in range(16)}
    start = pool()
    c.put_many(items)
    (pack,) = [p for p in _packs(c)]
    for i in range(15):
        c.delete(unique_id, f"f{i}")
    assert _packs(c) == [pack]  # one live item keeps the pack
    held = c.get_many([(unique_id, "f15")])[0].tensor  # a reader's mapping of it
    c.delete(unique_id, "f15")
    assert _packs(c) == []  # out of readers' sight
    assert pool()["refused"] == start["refused"] + 1  # held: freed, not reused
    assert torch.equal(held, items[(unique_id, "f15")])
    del held

    c.put_many(items)
    c.delete(unique_id)
    assert _packs(c) == []
    assert pool()["offered"] == start["offered"] + 1
    staging = c._transport().store.staging
    free = [n for n in os.listdir(staging) if n.startswith("free-")]
    assert free
    c.put_many(items)  # claims the recycled file and writes over its pages
    assert set(free) - set(os.listdir(staging))  # one of them was taken
    rows = c.get_many(list(items))
    assert all(torch.equal(r.tensor, items[(r.index_id, r.matrix_type)]) for r in rows)
    c.delete(unique_id)


def test_an_overwrite_by_another_pack_keeps_readers_of_the_old_one(c, unique_id):
    old = {(unique_id, f"f{i}"): torch.full((ITEM,), 1.0) for i in range(16)}
    new = {k: torch.full((ITEM,), 2.0) for k in old}
    c.put_many(old)
    held = [r.tensor for r in c.get_many(list(old))]
    c.put_many(new)
    assert all(torch.equal(t, torch.full((ITEM,), 1.0)) for t in held)
    assert all(torch.equal(r.tensor, torch.full((ITEM,), 2.0)) for r in c.get_many(list(old)))
    c.delete(unique_id)


def _stage(c, unique_id, n: int = 4) -> tuple[str, list[dict]]:
    from torch_tq.codec import tensors as codec
    from torch_tq.model import Key

    group = []
    for i in range(n):
        dtype, shape, flat = codec.tensor_values(torch.full((ITEM,), float(i)))
        group.append((i, Key(unique_id, f"s{i}"), dtype, shape, flat))
    return c._transport().store.stage_pack(group)


def test_every_item_of_a_pack_is_checked_on_its_own(mem, c, unique_id):
    name, items = _stage(c, unique_id)
    items[1] = {**items[1], "offset": 1 << 30}  # outside the file
    items[2] = {**items[2], "nbytes": 8}  # not what its shape holds
    items[3] = {**items[3], "offset": 8}  # not aligned
    items.append({"index_id": unique_id, "matrix_type": "x" * 65, "dtype": "float32",
                  "shape": [1], "offset": 0, "nbytes": 4})
    items.append({"index_id": unique_id, "matrix_type": "bad", "dtype": "complex64",
                  "shape": [1], "offset": 0, "nbytes": 8})
    items.append("not an object")
    (reply,) = _action(mem, "PublishLocalBatch", {"file": name, "items": items})
    assert [r["success"] for r in reply["results"]] == [True] + [False] * 6
    assert all(r["code"] == "INVALID_ARGUMENT" for r in reply["results"][1:])
    assert "outside" in reply["results"][1]["message"]
    assert torch.equal(c.get(unique_id, "s0"), torch.zeros(ITEM))
    for t in ("s1", "s2", "s3", "bad"):
        with pytest.raises(torch_tq.NotFound):
            c.get(unique_id, t)
    located = _action(mem, "LocateLocal", {"items": [
        {"index_id": unique_id, "matrix_type": "s0"}, {"index_id": unique_id, "matrix_type": "s1"},
        {"index_id": -1, "matrix_type": "s0"}]})[0]["items"]
    assert located[0]["shared"] and located[0]["file"].startswith("packs/")
    assert [r["success"] for r in located] == [True, False, False]
    assert located[1]["code"] == "NOT_FOUND" and located[2]["code"] == "INVALID_ARGUMENT"
    c.delete(unique_id)


@pytest.mark.parametrize("body, words", [
    ({"file": "../objects.pack", "items": []}, "32 hex"),
    ({"file": "0" * 32 + ".pack"}, "items"),
    ({"file": "0" * 32 + ".pack", "items": {}}, "list"),
    ({"file": "0" * 32 + ".pack", "items": [], "extra": 1}, "extra"),
    (b"[not json", "JSON"),
])
def test_a_malformed_publish_local_batch_is_refused_whole(mem, body, words):
    with pytest.raises(pa.ArrowInvalid, match=words):
        _action(mem, "PublishLocalBatch", body)


def test_a_staged_pack_the_server_may_not_trust_is_refused_and_removed(mem, c, unique_id):
    staging = c._transport().store.staging
    with pytest.raises(pa.ArrowInvalid, match="missing"):
        _action(mem, "PublishLocalBatch", {"file": "0" * 32 + ".pack", "items": []})
    # still open for writing: its writer could change what readers map
    name, items = _stage(c, unique_id)
    with open(os.path.join(staging, name), "r+b"):
        with pytest.raises(pa.ArrowInvalid, match="open for writing"):
            _action(mem, "PublishLocalBatch", {"file": name, "items": items})
    assert not os.path.exists(os.path.join(staging, name))  # refused: removed
    # a symbolic link to a file elsewhere
    name, items = _stage(c, unique_id)
    outside = os.path.join(staging, "..", "outside-" + name)
    os.rename(os.path.join(staging, name), outside)
    os.symlink(outside, os.path.join(staging, name))
    with pytest.raises(pa.ArrowInvalid, match="symbolic link"):
        _action(mem, "PublishLocalBatch", {"file": name, "items": items})
    assert os.path.exists(outside)
    os.unlink(outside)
    # more items than the server takes in one call
    name, items = _stage(c, unique_id)
    with pytest.raises(pa.ArrowInvalid, match="limit is 40"):
        _action(mem, "PublishLocalBatch", {"file": name, "items": items * 11})
    assert not os.path.exists(os.path.join(staging, name))
    for t in ("s0", "s1", "s2", "s3"):
        with pytest.raises(torch_tq.NotFound):
            c.get(unique_id, t)


def test_a_disk_store_takes_no_packs_and_put_many_goes_over_grpc(tmp_path, unique_id):
    with torch_tq.start_server(data_dir=str(tmp_path), qps=0) as srv:
        with pytest.raises(pa.ArrowInvalid, match="memory store"):
            _action(srv, "PublishLocalBatch", {"file": "0" * 32 + ".pack", "items": []})
        with pytest.raises(pa.ArrowInvalid, match="memory store"):
            _action(srv, "LocateLocal", {"items": []})
        with torch_tq.Client(srv.location, transport="same-host") as c:
            items = {(unique_id, f"f{i}"): torch.randn(ITEM) for i in range(16)}
            before = _calls(c)
            assert all(r.success for r in c.put_many(items))
            after = _calls(c)
            assert after["action:PublishLocalBatch"] == before["action:PublishLocalBatch"]
            assert after["do_put"] == before.get("do_put", 0) + 1  # one BatchWrite
            rows = c.get_many(list(items))
            assert all(torch.equal(r.tensor, items[(r.index_id, r.matrix_type)]) for r in rows)


def test_malformed_pack_items_and_locations_fail_alone_and_change_nothing(mem, c, unique_id):
    from tests.test_sweep import VALUES

    keep = {(unique_id, f"k{i}"): torch.full((ITEM,), float(i)) for i in range(16)}
    c.put_many(keep)
    ids = {"index_id": unique_id, "matrix_type": "k0"}
    item = {**ids, "dtype": "float32", "shape": [ITEM], "offset": 0, "nbytes": ITEM * 4}
    for field in item:
        for value in VALUES:
            name, good = _stage(c, unique_id, 1)
            bad = [{**item, field: value}, {k: v for k, v in item.items() if k != field}]
            try:
                (reply,) = _action(mem, "PublishLocalBatch", {"file": name, "items": bad})
            except pa.ArrowInvalid:
                continue  # refused whole: nothing stored either
            assert [r["success"] or r["code"] for r in reply["results"]] in (
                [True, "INVALID_ARGUMENT"], ["INVALID_ARGUMENT"] * 2), (field, value)
        if field in ids:
            (reply,) = _action(mem, "LocateLocal", {"items": [{**ids, field: v} for v in VALUES]})
            assert all(r["success"] or r["code"] in ("INVALID_ARGUMENT", "NOT_FOUND")
                       for r in reply["items"])
    # what passed the checks was a whole new version of k0 (the same values); nothing else
    # changed, and no refused pack was left behind
    for row in c.get_many(list(keep)):
        assert torch.equal(row.tensor, keep[(row.index_id, row.matrix_type)])
    assert not [n for n in os.listdir(c._transport().store.staging) if n.endswith(".pack")]
    assert c.server_stats()["status"] == "SERVING"
    c.delete(unique_id)


def test_heap_items_beyond_what_locate_brings_along_are_read_with_batch_read(mem, c, unique_id):
    from torch_tq.server.same_host import INLINE_BYTES

    grpc = torch_tq.Client(mem.location, transport="grpc")
    big = torch.randn(INLINE_BYTES // 4 + 1)  # one element more than LocateLocal carries
    small = torch.randn(100)
    grpc.put(unique_id, "big", big)
    grpc.put(unique_id, "small", small)
    before = _calls(c)
    rows = c.get_many([(unique_id, "small"), (unique_id, "big")])
    assert torch.equal(rows[0].tensor, small) and torch.equal(rows[1].tensor, big)
    assert _calls(c).get("do_get", 0) == before.get("do_get", 0) + 1  # the big one only
    c.delete(unique_id)


def test_a_single_get_of_a_pack_item_maps_it_too(mem, c, unique_id):
    items = {(unique_id, f"f{i}"): torch.randn(ITEM) for i in range(4)}
    c.put_many(items)
    grpc = torch_tq.Client(mem.location, transport="grpc")
    grpc.put(unique_id, "heap", torch.arange(5.0))
    before, stats = _calls(c), dict(c.stats)
    assert torch.equal(c.get(unique_id, "f1"), items[(unique_id, "f1")])
    assert torch.equal(c.get(unique_id, "heap"), torch.arange(5.0))
    after = _calls(c)
    assert after["action:LocateLocal"] == before.get("action:LocateLocal", 0) + 2
    assert after.get("do_get", 0) == before.get("do_get", 0)  # neither was a gRPC read
    assert c.stats["zero_copy_gets"] > stats["zero_copy_gets"]
    with pytest.raises(torch_tq.NotFound):
        c.get(unique_id, "missing")
    out = torch.empty(ITEM)  # into a tensor of the caller's: read over gRPC
    c.get(unique_id, "f2", out=out)
    assert torch.equal(out, items[(unique_id, "f2")])
    c.delete(unique_id)
