"""The UCX data plane and the automatic transport choice, against real servers: bit-exact
transfers, the choice exposed, and the fallback to gRPC when ucxx is missing, when the
server offers no UCX, and when a UCX endpoint dies mid-run."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_tq

ucxx = pytest.importorskip("ucxx", reason="the UCX tests need ucxx (pip install 'torch_tq[ucx]')")


@pytest.fixture(scope="module")
def server():
    """A memory store that offers no same-host path (which "auto" would prefer here)."""
    with torch_tq.start_server(storage="memory", qps=0, same_host=False) as srv:
        yield srv


def _locations(srv) -> list[str]:
    host_port = srv.location.split("://", 1)[1]
    return [f"ucx://{host_port.rsplit(':', 1)[0]}:8081", srv.location]


def test_ucx_chosen_and_bit_exact(server, unique_id):
    c = torch_tq.Client(_locations(server))
    assert c.transport == "ucx"
    for i, t in enumerate([torch.randn(3, 1 << 20), torch.rand(1001) > 0.5,
                           torch.randn(7).bfloat16(), torch.zeros(0), torch.tensor(5)]):
        c.put(unique_id + i, "u", t)
        got = c.get(unique_id + i, "u")
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    remote = torch_tq.Client(server.location, transport="grpc")
    assert torch.equal(remote.get(unique_id, "u"), c.get(unique_id, "u"))
    calls = c.server_stats()["calls"]
    # matrices over 1 MiB move over UCX; smaller ones travel with the gRPC call itself
    assert calls["action:UcxPut"] == 1 and calls["action:UcxGet"] == 6
    out = torch.empty(3, 1 << 20)
    assert c.get(unique_id, "u", out=out) is out
    # the host side of a copy to a GPU (pageable here, without CUDA)
    assert torch.equal(c.get(unique_id, "u", pin_memory=True), out)
    with pytest.raises(torch_tq.NotFound, match="matrix not found"):
        c.get(unique_id + 99, "u")
    with pytest.raises(torch_tq.InvalidArgument, match="matrix too large|unsupported"):
        c.put(unique_id, "u", torch.zeros(2, dtype=torch.complex64))


def test_batches_move_their_large_matrices_over_ucx(server, unique_id):
    c = torch_tq.Client(_locations(server))
    assert c.transport == "ucx"
    items = {(unique_id + i, "b"): torch.randn(1 << 19) if i % 2 else torch.randn(10)
             for i in range(6)}  # three of 2 MiB, three of 40 bytes
    before = c.server_stats()["calls"]
    assert all(r.success for r in c.put_many(items, small_bytes=1 << 20))
    results = c.get_many([*items, (unique_id + 99, "b")])
    after = c.server_stats()["calls"]
    assert [r.success for r in results] == [True] * 6 + [False]
    assert results[-1].code == "NOT_FOUND"
    assert all(torch.equal(r.tensor, t) for r, t in zip(results, items.values()))

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    # the large ones over UCX, a transfer each; the small ones in one BatchWrite; the
    # whole read one UcxGetBatch (6 MiB over UCX in one transfer)
    assert delta("action:UcxPut") == 3 and delta("do_put") == 1
    assert delta("action:UcxGetBatch") == 1
    assert delta("action:UcxGet") == 0 and delta("do_get") == 0


def _batch_items(unique_id: int) -> dict:
    """32 items of 4 KiB-256 KiB of every dtype, some of sizes that put the next item at
    an odd offset of the transfer (bool, bfloat16)."""
    makers = [lambda: torch.randn(64, 1024), lambda: torch.rand(1001) > 0.5,
              lambda: torch.randn(3, 333).bfloat16(), lambda: torch.arange(1 << 15),
              lambda: torch.randint(0, 255, (4097,), dtype=torch.uint8),
              lambda: torch.randn(1024, dtype=torch.float64), lambda: torch.zeros(0)]
    return {(unique_id + i, "ub"): makers[i % len(makers)]() for i in range(32)}


def test_a_batch_is_one_ucx_transfer_each_way(server, unique_id):
    c = torch_tq.Client(_locations(server))
    assert c.transport == "ucx"
    items = _batch_items(unique_id)
    before = c.server_stats()["calls"]
    assert all(r.success for r in c.put_many(items, batch_items=32))
    stats = dict(c.stats)
    results = c.get_many([*items, (unique_id + 99, "ub")], batch_items=64)
    after = c.server_stats()["calls"]

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("action:UcxPutBatch") == 1 and delta("action:UcxGetBatch") == 1
    assert delta("do_put") == 0 and delta("do_get") == 0 and delta("action:UcxGet") == 0
    assert [r.success for r in results] == [True] * 32 + [False]
    assert results[-1].code == "NOT_FOUND"
    for r, (key, t) in zip(results, items.items()):
        assert (r.index_id, r.matrix_type) == key
        assert r.tensor.dtype == t.dtype and r.tensor.shape == t.shape and torch.equal(r.tensor, t)
    # UCX wrote the items end to end into buffers whose views the tensors are; only an
    # item the layout puts at an offset its dtype cannot be read at may have been copied
    offset, misaligned = 0, []
    for t in items.values():
        nbytes = t.numel() * t.element_size()
        if nbytes and offset % t.element_size():
            misaligned.append(nbytes)
        offset += nbytes
    assert misaligned  # the layout above does put some there
    assert c.stats["copied_bytes"] - stats["copied_bytes"] <= sum(misaligned)
    assert c.stats["zero_copy_gets"] - stats["zero_copy_gets"] >= 32 - len(misaligned)
    assert c.stats["gets"] - stats["gets"] == 32
    # what UCX stored is what any client reads
    remote = torch_tq.Client(server.location, transport="grpc")
    assert all(torch.equal(r.tensor, items[(r.index_id, r.matrix_type)])
               for r in remote.get_many(list(items)))


def test_a_small_ucx_batch_travels_with_its_calls(server, unique_id):
    c = torch_tq.Client(_locations(server))
    items = {(unique_id + i, "us"): torch.full((1000,), float(i)) for i in range(8)}
    before = c.server_stats()["calls"]
    assert all(r.success for r in c.put_many(items))
    results = c.get_many(list(items))
    after = c.server_stats()["calls"]
    assert after["do_put"] - before.get("do_put", 0) == 1  # 32 KB: one BatchWrite
    assert after.get("action:UcxPutBatch", 0) == before.get("action:UcxPutBatch", 0)
    # one UcxGetBatch whose bytes came with the answer (no UCX transfer)
    assert after["action:UcxGetBatch"] - before.get("action:UcxGetBatch", 0) == 1
    assert all(torch.equal(r.tensor, t) for r, t in zip(results, items.values()))


def test_a_ucx_batch_leaves_items_over_max_inline_bytes_to_ucx_get(server, unique_id):
    c = torch_tq.Client(_locations(server))
    items = {(unique_id + i, "ul"): torch.randn(1 << 17) for i in range(4)}  # 512 KiB each
    assert all(r.success for r in c.put_many(items))
    before = c.server_stats()["calls"]
    results = c.get_many(list(items), max_inline_bytes=100_000)
    after = c.server_stats()["calls"]
    assert after["action:UcxGet"] - before.get("action:UcxGet", 0) == 4
    assert all(torch.equal(r.tensor, t) for r, t in zip(results, items.values()))


def _raw_ucx(srv, unique_id):
    """A gRPC client, this process's UCX runtime and the server's lanes, for raw bodies."""
    import pyarrow.flight as flight

    from torch_tq.transport import ucx

    c = torch_tq.Client(_locations(srv))
    assert c.transport == "ucx"
    return flight.FlightClient(srv.location), ucx, ucx.runtime(), c._transport().peers


def test_a_ucx_put_batch_stores_each_good_item_and_refuses_bad_ones_alone(server, unique_id):
    import json

    import numpy as np
    import pyarrow.flight as flight

    fc, ucx, rt, peers = _raw_ucx(server, unique_id)
    good = np.arange(1 << 16, dtype=np.float32)
    data = np.concatenate([good.view(np.uint8)] * 4)
    items = [
        {"index_id": unique_id, "matrix_type": "raw", "dtype": "float32",
         "shape": [256, 256], "nbytes": good.nbytes},
        {"index_id": unique_id + 1, "matrix_type": "raw", "dtype": "complex64",
         "shape": [1 << 15], "nbytes": good.nbytes},  # unknown dtype
        {"index_id": unique_id + 2, "matrix_type": "raw", "dtype": "float32",
         "shape": [3], "nbytes": good.nbytes},  # shape does not hold nbytes
        {"index_id": -1, "matrix_type": "raw", "dtype": "float32",
         "shape": [1 << 16], "nbytes": good.nbytes},  # bad key
    ]
    parts = ucx.split(data.nbytes, 1 << 19)
    tag = 77_000_000 + unique_id
    sending = rt.start("send", peers, tag, ucx.views(data, parts), timeout=20)
    body = {"items": items, "parts": parts, "addresses": rt.addresses_b64[: len(peers)],
            "tag": tag}
    (result,) = fc.do_action(flight.Action("UcxPutBatch", json.dumps(body).encode()))
    sending.result(10)
    rows = json.loads(result.body.to_pybytes())["results"]
    assert [r["success"] for r in rows] == [True, False, False, False]
    assert [r["code"] for r in rows[1:]] == ["INVALID_ARGUMENT"] * 3
    assert "dtype" in rows[1]["message"] and "holds" in rows[2]["message"]
    c = torch_tq.Client(server.location, transport="grpc")
    assert torch.equal(c.get(unique_id, "raw"), torch.from_numpy(good).reshape(256, 256))
    for i in (1, 2):
        with pytest.raises(torch_tq.NotFound):
            c.get(unique_id + i, "raw")


def test_a_refused_ucx_put_batch_stores_nothing_and_takes_the_bytes(unique_id):
    """A UcxPutBatch refused whole (parts that do not add up, an nbytes that is not a
    count, over max_batch_items, over the quota) stores nothing, and the server takes what
    the client had started sending, so the send completes."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.flight as flight

    with torch_tq.start_server(storage="memory", same_host=False, max_batch_items=2,
                               qps_ucx=0.05, qps_burst=3) as srv:
        fc, ucx, rt, peers = _raw_ucx(srv, unique_id)
        data = np.ones(3 << 20, np.uint8)
        item = {"index_id": unique_id, "matrix_type": "r", "dtype": "uint8",
                "shape": [1 << 20], "nbytes": 1 << 20}

        def refused(items, parts, match, sent=None) -> None:
            tag = 88_000_000 + unique_id + len(match)
            sent = parts if sent is None else sent
            sending = rt.start("send", peers, tag, ucx.views(data, sent), timeout=20)
            body = {"items": items, "parts": parts,
                    "addresses": rt.addresses_b64[: len(peers)], "tag": tag}
            with pytest.raises(pa.ArrowException, match=match):
                list(fc.do_action(flight.Action("UcxPutBatch", json.dumps(body).encode())))
            if sent == parts:
                sending.result(10)  # completed: the server took the messages
            else:
                sending.cancel()

        one = [1 << 20]
        refused([item], [1 << 19, 1 << 19, 1 << 19], "add up", sent=[])
        refused([{**item, "nbytes": "many"}], one, "nbytes", sent=[])
        refused([item, {**item, "index_id": unique_id + 1},
                 {**item, "index_id": unique_id + 2}], [3 << 20], "more than 2 items")
        refused([item], one, "retry_after_ms")  # the UCX quota is spent
        with pytest.raises(torch_tq.NotFound):
            torch_tq.Client(srv.location, transport="grpc").get(unique_id, "r")


def test_rdma_spelling_and_forced_transport(server):
    host = server.location.split("://", 1)[1].rsplit(":", 1)[0]
    assert torch_tq.Client([f"rdma://{host}:8081", server.location]).transport == "ucx"
    assert torch_tq.Client(server.location, transport="ucx").transport == "ucx"
    assert torch_tq.Client(_locations(server), transport="grpc").transport == "grpc"
    with pytest.raises(torch_tq.InvalidArgument, match="transport must be one of"):
        torch_tq.Client(server.location, transport="carrier-pigeon")


def test_fallback_when_the_server_offers_no_ucx(unique_id):
    with torch_tq.start_server(storage="memory", ucx=False, same_host=False) as srv:
        c = torch_tq.Client(_locations(srv))
        assert c.transport == "grpc"
        c.put(unique_id, "x", torch.ones(3))
        assert torch.equal(c.get(unique_id, "x"), torch.ones(3))
        with pytest.raises(torch_tq.Unavailable, match="UCX cannot be used"):
            torch_tq.Client(srv.location, transport="ucx").transport


def test_fallback_when_ucxx_is_missing(server, unique_id):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ucxx"] = None  # import ucxx now raises ImportError
        import torch, torch_tq
        c = torch_tq.Client({_locations(server)!r})
        assert c.transport == "grpc", c.transport
        c.put({unique_id}, "m", torch.arange(4))
        assert torch.equal(c.get({unique_id}, "m"), torch.arange(4))
        try:
            torch_tq.Client({server.location!r}, transport="ucx").transport
        except torch_tq.Unavailable as e:
            assert "not available" in str(e), e
        else:
            raise AssertionError("transport='ucx' without ucxx did not raise")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_fallback_when_the_endpoint_dies_mid_run(server, unique_id):
    # in a process of its own: the endpoints it kills stay dead in that process's runtime
    code = textwrap.dedent(f"""
        import asyncio, os
        os.environ["UCX_NET_DEVICES"] = "lo"
        import torch, torch_tq
        from torch_tq.transport import ucx
        c = torch_tq.Client({_locations(server)!r})
        t = torch.randn(1 << 20)
        c.put({unique_id}, "d", t)
        assert c.transport == "ucx"
        rt = ucx.runtime()
        for lane, address in zip(rt._lanes, c._transport().peers):  # every lane's endpoint dies
            ep = asyncio.run_coroutine_threadsafe(lane.endpoint(address), lane.loop).result(10)
            asyncio.run_coroutine_threadsafe(ep.close(), lane.loop).result(10)
        assert torch.equal(c.get({unique_id}, "d"), t)  # retried over gRPC
        assert c.transport == "grpc"
        c.put({unique_id}, "d", t * 2)
        assert torch.equal(c.get({unique_id}, "d"), t * 2)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_ucx_calls_draw_on_the_ucx_quota(unique_id):
    with torch_tq.start_server(storage="memory", qps=5, qps_burst=3, qps_ucx=0,
                               same_host=False) as srv:
        c = torch_tq.Client(_locations(srv), retry_deadline=0)
        assert c.transport == "ucx"  # LocalInfo + UcxInfo: two TCP tokens
        for i in range(30):  # far over 5/s: fine over UCX (1.2 MB: over the inline size)
            c.put(unique_id, "q", torch.full((300_000,), float(i)))
            assert c.get(unique_id, "q")[0].item() == i
        with pytest.raises(torch_tq.Unavailable, match="rate limit"):
            for _ in range(10):
                c.health()  # a control call: the TCP quota


def _process_counts(pid: int) -> tuple[int, int, int]:
    """Open descriptors, threads and memory mappings of a process."""
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), maps


def test_no_descriptor_thread_mapping_or_endpoint_leaks_after_1000_calls(server, unique_id):
    from torch_tq.transport import ucx

    c = torch_tq.Client(_locations(server))
    assert c.transport == "ucx"
    t = torch.randn(300_000)  # 1.2 MB: over the inline size, so every call moves over UCX
    for i in range(20):  # warm: pools, lanes, endpoints, torch's own threads
        c.put(unique_id, "l", t + i)
        assert torch.equal(c.get(unique_id, "l"), t + i)
    gc.collect()
    rt = ucx.runtime()
    endpoints = sum(len(lane._endpoints) for lane in rt._lanes)
    before = _process_counts(os.getpid()), _process_counts(server.pid)
    calls = c.server_stats()["calls"]
    for i in range(1000):
        if i % 10 == 0:
            c.put(unique_id, "l", t + i)
        got = c.get(unique_id, "l")
    assert torch.equal(got, t + 990)
    del got
    gc.collect()
    after = _process_counts(os.getpid()), _process_counts(server.pid)
    done = c.server_stats()["calls"]
    assert done["action:UcxGet"] - calls["action:UcxGet"] == 1000
    assert done["action:UcxPut"] - calls["action:UcxPut"] == 100
    assert sum(len(lane._endpoints) for lane in rt._lanes) == endpoints
    for (fds0, threads0, maps0), (fds1, threads1, maps1) in zip(before, after):
        assert fds1 <= fds0 and threads1 <= threads0, (before, after)
        assert maps1 <= maps0 + 8, (before, after)  # allocator arenas may settle a little


def test_a_refused_put_takes_the_bytes_already_sent(unique_id):
    """The client sends a UcxPut's parts before it calls; when the server refuses the call
    (over the size limit, over the quota) it takes those messages without their bytes, so
    the client's send completes and nothing stays pending on either side."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.flight as flight

    from torch_tq.transport import ucx

    with torch_tq.start_server(storage="memory", same_host=False, max_matrix_bytes="1MiB",
                               qps_ucx=0.05, qps_burst=1) as srv:  # one UCX call per 20 s
        c = torch_tq.Client(_locations(srv))
        assert c.transport == "ucx"
        rt = ucx.runtime()
        peers = c._transport().peers
        fc = flight.FlightClient(srv.location)
        data = np.ones(4 << 20, np.uint8)

        def refused_put(match: str) -> None:
            tag = 1234567 + len(match)
            parts = ucx.split(data.nbytes, 1 << 20)
            sending = rt.start("send", peers, tag, ucx.views(data, parts), timeout=20)
            body = {"index_id": unique_id, "matrix_type": "r", "shape": [data.nbytes // 4],
                    "dtype": "float32", "nbytes": data.nbytes, "parts": parts,
                    "addresses": rt.addresses_b64[: len(peers)], "tag": tag}
            with pytest.raises(pa.ArrowException, match=match):
                list(fc.do_action(flight.Action("UcxPut", json.dumps(body).encode())))
            sending.result(10)  # completed: the server took the messages

        refused_put("over the limit|too large")  # 4 MiB over a 1 MiB limit
        refused_put("retry_after_ms")  # the UCX quota is spent
        with pytest.raises(torch_tq.NotFound):
            c.get(unique_id, "r")


def test_a_ucx_batch_a_full_memory_store_has_no_room_for_fails_its_items(unique_id):
    """The store is full, not the transport: every item fails with UNAVAILABLE (a single
    put raises it), nothing is stored, and the client stays on UCX (and can store once
    there is room)."""
    with torch_tq.start_server(storage="memory", same_host=False, max_memory="6MiB") as srv:
        c = torch_tq.Client(_locations(srv))
        assert c.transport == "ucx"
        items = {(unique_id + i, "f"): torch.randn(1 << 16) for i in range(32)}  # 8 MiB
        results = c.put_many(items, batch_items=32)
        assert [r.code for r in results] == ["UNAVAILABLE"] * 32
        assert all("memory store full" in r.message for r in results)
        assert c.transport == "ucx" and c.server_stats()["matrices"] == 0
        with pytest.raises(torch_tq.Unavailable, match="memory store full"):
            c.put(unique_id, "big", torch.randn(7 << 18))  # one UcxPut of 7 MiB
        assert c.transport == "ucx"  # a full store is the server's answer, not UCX failing
        half = dict(list(items.items())[:16])  # 4 MiB fit
        assert all(r.success for r in c.put_many(half, batch_items=16))
        got = c.get_many(list(half))
        assert all(torch.equal(r.tensor, t) for r, t in zip(got, half.values()))


def test_coalesce_joins_small_pieces_and_sends_large_ones_from_their_memory():
    import numpy as np

    from torch_tq.transport import ucx

    rng = np.random.default_rng(0)
    small = [rng.integers(0, 255, n, dtype=np.uint8) for n in (7, 4096, 0, 300_000, 1)]
    large = rng.integers(0, 255, 40 << 20, dtype=np.uint8)
    pieces = [*small, large, *small]
    parts = ucx.coalesce(pieces, lanes=2)
    assert np.array_equal(np.concatenate(parts), np.concatenate(pieces))
    assert all(0 < p.nbytes <= ucx.PART_BYTES for p in parts)
    # the large piece: parts of its own, views of its memory
    assert sum(np.shares_memory(p, large) for p in parts) == -(-large.nbytes // ucx.PART_BYTES)
    # two lanes, 32 x 256 KiB: a part per lane; 4 MiB pieces are not copied
    assert [p.nbytes for p in ucx.coalesce([np.ones(1 << 18, np.uint8)] * 32, 2)] == [4 << 20] * 2
    big = [np.ones(4 << 20, np.uint8) for _ in range(8)]
    assert all(any(np.shares_memory(p, b) for b in big) for p in ucx.coalesce(big, 2))
    assert ucx.coalesce([np.empty(0, np.uint8)], 2) == []


def test_a_reused_ucx_tag_moves_nothing(server, unique_id, monkeypatch):
    """Every transfer's tag is single-use: a second call with a tag the server saw is
    refused before anything is sent or received, and the stored matrix stays as it was."""
    from torch_tq.client.transports import ucx as client_ucx

    c = torch_tq.Client(_locations(server))
    assert c.transport == "ucx"
    first, second = torch.randn(1 << 19), torch.randn(1 << 19)  # 2 MiB: over UCX
    tag = 0x5EED5EED5EED
    monkeypatch.setattr(client_ucx.secrets, "randbits", lambda bits: tag)
    c.put(unique_id, "t", first)  # uses the tag
    with pytest.raises(torch_tq.InvalidArgument, match="was used already"):
        c.put(unique_id, "t", second)
    with pytest.raises(torch_tq.InvalidArgument, match="was used already"):
        c.get(unique_id, "t")
    results = c.get_many([(unique_id, "t"), (unique_id + 1, "t")])
    assert [r.code for r in results] == ["INVALID_ARGUMENT"] * 2, results
    assert all("was used already" in r.message for r in results)
    monkeypatch.undo()
    assert torch.equal(c.get(unique_id, "t"), first)  # fresh tags again; nothing changed
    assert torch.equal(torch_tq.Client(server.location, transport="grpc").get(unique_id, "t"),
                       first)


def test_bytes_sent_under_another_tag_are_not_taken():
    """A UcxPut receives only under the tag its authenticated call names: bytes sent to the
    server under any other tag (a guess) are never stored under that key."""
    from torch_tq.transport import ucx

    with torch_tq.start_server(storage="memory", qps=0, same_host=False,
                               env={"TORCH_TQ_UCX_TIMEOUT": "2"}) as srv:
        c = torch_tq.Client(_locations(srv))
        assert c.transport == "ucx"
        transport = c._router.transport
        rt = ucx.runtime()
        data = torch.randn(1 << 19).numpy().view("uint8")
        sending = rt.start("send", transport.peers, 1111, [data])
        body = {"index_id": 9, "matrix_type": "g", "shape": [1 << 19], "dtype": "float32",
                "nbytes": data.nbytes, "parts": [data.nbytes],
                "addresses": rt.addresses_b64[: len(transport.peers)], "tag": 2222}
        with pytest.raises(torch_tq.Unavailable):
            c.connection.action("UcxPut", body, "a put under a guessed tag")
        sending.cancel()
        with pytest.raises(torch_tq.NotFound):
            torch_tq.Client(srv.location, transport="grpc").get(9, "g")


def test_an_authenticating_server_binds_ucx_uploads_to_their_digest(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("w write " + "w" * 20 + "\n")
    path.chmod(0o600)
    with torch_tq.start_server(storage="memory", qps=0, same_host=False,
                               auth_tokens=str(path)) as srv:
        locations = _locations(srv)
        c = torch_tq.Client(locations, token="w" * 20)
        assert c.transport == "ucx"
        value = torch.randn(1 << 19)
        c.put(1, "d", value)  # the client sends the digest: it has a token
        items = {(2, "d"): torch.randn(1 << 18), (3, "d"): torch.randn(1 << 18)}
        assert all(r.success for r in c.put_many(items))
        assert torch.equal(c.get(1, "d"), value)
        assert torch.equal(c.get_many([(3, "d")])[0].tensor, items[(3, "d")])
        # a UcxPut without the digest, or with a wrong one, stores nothing
        transport = c._router.transport
        from torch_tq.transport import ucx

        rt = ucx.runtime()
        data = torch.randn(1 << 19).numpy().view("uint8")
        for extra, match in (({}, "must carry the xxh3"), ({"xxh3": "0" * 16}, "xxh3|digest")):
            tag = 4242 + len(extra)
            sending = rt.start("send", transport.peers, tag, [data])
            body = {"index_id": 1, "matrix_type": "d", "shape": [1 << 19], "dtype": "float32",
                    "nbytes": data.nbytes, "parts": [data.nbytes],
                    "addresses": rt.addresses_b64[: len(transport.peers)], "tag": tag, **extra}
            with pytest.raises(torch_tq.InvalidArgument, match=match):
                c.connection.action("UcxPut", body, "a put without its digest")
            sending.cancel()
        assert torch.equal(c.get(1, "d"), value)
