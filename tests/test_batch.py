"""BatchWrite / BatchRead against real servers: per-item results in request order, partial
failures, the generic Flight wire forms, the item cap and a batch counted as one query."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq


_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32",
           "float64"]


def _tensor(dtype: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.rand(shape, generator=g) > 0.5
    if dtype in ("uint8", "int8", "int16", "int32", "int64"):
        return torch.randint(-100 if dtype != "uint8" else 0, 100, shape, generator=g).to(
            getattr(torch, dtype))
    return torch.randn(shape, generator=g).to(getattr(torch, dtype))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


@pytest.fixture(scope="module")
def small_server():
    """Matrices over 1 MiB are refused; matrices over 64 KiB travel as their own streams."""
    with torch_tq.start_server(storage="memory", max_matrix_bytes="1MiB", qps=0,
                               max_batch_items=50) as srv:
        yield srv


@pytest.fixture
def bc(small_server):
    """A gRPC client: what this module checks is the server's side of batches (what every
    transport's client does with them is tests/conformance/test_batches.py)."""
    with torch_tq.Client(small_server.location, transport="grpc") as c:
        yield c


def test_results_when_the_server_is_gone(unique_id):
    with torch_tq.start_server(storage="memory") as srv:
        # connect_timeout: a gone server is retried that long (tests/test_client.py covers
        # the waiting); here only the results matter
        c = torch_tq.Client(srv.location, timeout=5, connect_timeout=1)
        c.put(1, "a", torch.ones(2))
    results = c.get_many([(1, "a"), (2, "a")])
    assert [r.code for r in results] == ["UNAVAILABLE", "UNAVAILABLE"]
    results = c.put_many([(1, "a", torch.ones(2)), (1, "b!", torch.ones(2))])
    assert [r.code for r in results] == ["UNAVAILABLE", "INVALID_ARGUMENT"]


# ------------------------------------------------------------------ the wire forms


def _batch_write(fc, table: pa.Table) -> dict:
    desc = flight.FlightDescriptor.for_command(json.dumps({"action": "BatchWrite"}))
    writer, reader = fc.do_put(desc, table.schema)
    writer.write_table(table)
    writer.done_writing()
    ack = reader.read()
    writer.close()  # raises the server's error, if any
    return json.loads(ack.to_pybytes())


def test_generic_flight_batch_write_binary_and_list_forms(small_server, bc, unique_id):
    fc = flight.FlightClient(small_server.location)
    binary = pa.table({
        "index_id": pa.array([unique_id, unique_id, unique_id, None], pa.int64()),
        "matrix_type": ["prompt", "resp", "adv", "x"],
        "dtype": ["float32", "int64", "nosuch", "float32"],
        "shape": pa.array([[2, 2], None, None, None], pa.list_(pa.int32())),
        "data": [np.arange(4, dtype=np.float32).tobytes(), np.arange(3).tobytes(), b"xx",
                 b"\0" * 4],
    })
    reply = _batch_write(fc, binary)
    assert reply["success"] is True
    assert [r["success"] for r in reply["results"]] == [True, True, False, False]
    assert "unsupported dtype" in reply["results"][2]["message"]
    assert reply["results"][3]["message"] == "index_id is null"
    assert torch.equal(bc.get(unique_id, "prompt"), torch.arange(4.0).reshape(2, 2))
    assert torch.equal(bc.get(unique_id, "resp"), torch.arange(3))

    lists = pa.table({
        "index_id": pa.array([unique_id + 1, unique_id + 1], pa.uint64()),
        "type": ["prompt", "resp"],
        "shape": pa.array([[2, 3], [5]], pa.list_(pa.int64())),
        "data": [np.arange(6, dtype=np.float64), np.arange(4, dtype=np.float64)],
    })
    results = _batch_write(fc, lists)["results"]
    assert results[0]["success"] and not results[1]["success"]
    assert results[1]["message"] == "shape [5] holds 5 elements, data has 4"
    assert torch.equal(bc.get(unique_id + 1, "prompt"),
                       torch.arange(6, dtype=torch.float64).reshape(2, 3))


def test_generic_flight_batch_write_binary_view_form(small_server, bc, unique_id):
    """binary_view data (what torch_tq's client sends: each item a buffer of its own):
    values held in their view (up to 12 bytes) and in data buffers, a null, a sliced
    column; a view that names bytes outside its buffers fails alone."""
    fc = flight.FlightClient(small_server.location)
    values = [np.arange(3, dtype=np.float32), np.arange(5, dtype=np.float32),
              None, np.arange(7, dtype=np.int64)]
    data = pa.array([v.tobytes() if v is not None else None for v in values] + [b"\0" * 32],
                    pa.binary_view()).slice(0, 4)
    table = pa.table({
        "index_id": pa.array([unique_id] * 4, pa.uint64()),
        "matrix_type": ["inline", "viewed", "null", "long"],
        "dtype": ["float32", "float32", "float32", "int64"],
        "data": data,
    })
    results = _batch_write(fc, table)["results"]
    assert [r["success"] for r in results] == [True, True, False, True]
    assert results[2]["message"] == "item has no data (null)"
    assert torch.equal(bc.get(unique_id, "inline"), torch.arange(3.0))
    assert torch.equal(bc.get(unique_id, "viewed"), torch.arange(5.0))
    assert torch.equal(bc.get(unique_id, "long"), torch.arange(7))

    # the second view points 64 bytes past the end of its 20-byte buffer
    good = np.arange(5, dtype=np.float32)
    views = np.array([[20, 0, 0, 0], [20, 0, 0, 64]], dtype=np.int32)
    bad = pa.Array.from_buffers(pa.binary_view(), 2,
                                [None, pa.py_buffer(views), pa.py_buffer(good)])
    table = pa.table({"index_id": pa.array([unique_id + 1] * 2, pa.uint64()),
                      "matrix_type": ["ok", "outside"], "dtype": ["float32"] * 2, "data": bad})
    results = _batch_write(fc, table)["results"]  # Arrow's reader checks no view
    assert [r["success"] for r in results] == [True, False]
    assert "outside the column's data buffers" in results[1]["message"]
    assert torch.equal(bc.get(unique_id + 1, "ok"), torch.arange(5.0))
    assert [m.matrix_type for m in bc.list(unique_id + 1)] == ["ok"]
    assert bc.health()["status"] == "SERVING"


def test_generic_flight_batch_read_via_flight_info(small_server, bc, unique_id):
    bc.put(unique_id, "prompt", torch.arange(6, dtype=torch.int32).reshape(2, 3))
    fc = flight.FlightClient(small_server.location)
    command = json.dumps({"action": "BatchRead", "items": [
        {"index_id": unique_id, "matrix_type": "PROMPT"},
        {"index_id": unique_id, "matrix_type": "missing"},
        {"index_id": "12", "matrix_type": "prompt"},
        [1, 2],
    ]})
    info = fc.get_flight_info(flight.FlightDescriptor.for_command(command))
    table = fc.do_get(info.endpoints[0].ticket).read_all()
    rows = table.drop_columns(["data"]).to_pylist()
    assert [r["success"] for r in rows] == [True, False, False, False]
    assert rows[0]["shape"] == [2, 3] and rows[0]["dtype"] == "int32" and rows[0]["inline"]
    assert rows[1]["code"] == "NOT_FOUND"
    assert rows[1]["message"] == f"matrix not found: index_id={unique_id}, type=missing"
    assert rows[2]["code"] == "INVALID_ARGUMENT" and rows[2]["index_id"] is None
    assert rows[3]["message"] == "item 3 must be a JSON object"
    values = np.frombuffer(table["data"][0].as_py(), dtype=np.int32)
    assert values.tolist() == [0, 1, 2, 3, 4, 5]
    assert table["data"][1].as_py() is None
    # an action of that name points at the right method
    with pytest.raises(pa.ArrowException, match="not an action"):
        list(fc.do_action(flight.Action("BatchRead", b"{}")))


def test_batch_over_item_cap_rejected_whole_and_stores_nothing(small_server, bc, unique_id):
    fc = flight.FlightClient(small_server.location)
    n = 51  # the server's max_batch_items is 50
    table = pa.table({
        "index_id": pa.array([unique_id + i for i in range(n)], pa.uint64()),
        "matrix_type": ["capped"] * n,
        "data": [np.zeros(2, np.float32)] * n,
    })
    with pytest.raises(pa.ArrowException, match="limit is 50 per call"):
        _batch_write(fc, table)
    assert not [m for m in bc.list() if m.matrix_type == "capped"
                and unique_id <= m.index_id < unique_id + n]
    ticket = json.dumps({"action": "BatchRead",
                         "items": [{"index_id": i, "matrix_type": "x"} for i in range(n)]})
    with pytest.raises(pa.ArrowException, match="limit is 50 per call"):
        fc.do_get(flight.Ticket(ticket)).read_all()
    # the client splits to fit
    results = bc.put_many({(unique_id + i, "capped"): torch.ones(2) for i in range(n)},
                          batch_items=50)
    assert all(r.success for r in results)


@pytest.mark.parametrize("table, match", [
    (pa.table({"index_id": [1], "data": [b"x"]}), "no 'matrix_type' column"),
    (pa.table({"index_id": [1], "matrix_type": ["a"], "data": [b"x"]}), "needs a 'dtype' column"),
    (pa.table({"index_id": ["1"], "matrix_type": ["a"], "data": [[1.0]]}), "integer type"),
    (pa.table({"index_id": [1], "matrix_type": ["a"], "data": [1.0]}), "must be binary"),
    (pa.table({"index_id": [1], "matrix_type": ["a"], "data": [[1.0]], "extra": [1]}),
     "columns must be distinct and among"),
])
def test_malformed_batch_write_tables(small_server, table, match):
    fc = flight.FlightClient(small_server.location)
    with pytest.raises(pa.ArrowException, match=match):
        _batch_write(fc, table)


def test_a_batch_call_is_one_query_against_the_quota(unique_id, caplog):
    with torch_tq.start_server(storage="memory", qps=0.5, qps_burst=3) as srv:
        c = torch_tq.Client(srv.location, retry_deadline=0, transport="grpc")  # no probe calls
        items = {(unique_id + i, "t"): torch.full((8,), float(i)) for i in range(200)}
        # 200 items in one BatchWrite and one BatchRead: two tokens of three
        assert all(r.success for r in c.put_many(items, concurrency=1, batch_items=200))
        got = c.get_many(list(items), concurrency=1, batch_items=200)
        assert all(torch.equal(r.tensor, t) for r, t in zip(got, items.values()))
        assert c.stats["throttled"] == 0
        c.health()  # the third token
        with caplog.at_level(logging.WARNING, logger="torch_tq.client.connection"):
            for _ in range(3):  # the bucket is empty: turned away, said once, counted
                with pytest.raises(torch_tq.Unavailable, match="rate limit") as e:
                    c.health()
                assert e.value.retry_after_ms >= 1
        said = [r for r in caplog.records if "turned a call away" in r.getMessage()]
        assert len(said) == 1 and "rate limit" in said[0].getMessage()
        assert c.stats["throttled"] == 3 and c.stats["retries"] == 0
        patient = torch_tq.Client(srv.location, client_id=c.client_id, retry_deadline=10,
                                  transport="grpc")
        assert patient.health()["status"] == "SERVING"
        assert patient.stats["retries"] >= 1 and patient.stats["throttled"] >= 1


def test_result_rows_alignment_learning_gives_zero_copy(unique_id):
    with torch_tq.start_server(storage="memory", chunk_bytes="64KiB") as srv:
        c = torch_tq.Client(srv.location)
        items = {(unique_id + i, "big"): torch.randn(64 << 10) for i in range(6)}  # 256 KiB
        c.put_many(items)
        c.get_many(list(items), concurrency=1)  # learns where gRPC puts the bytes
        before = dict(c.stats)
        results = c.get_many(list(items), concurrency=1)
        assert all(torch.equal(r.tensor, t) for r, t in zip(results, items.values()))
        assert c.stats["zero_copy_gets"] - before["zero_copy_gets"] == len(items)
        assert c.stats["copied_bytes"] == before["copied_bytes"]



def test_small_items_packed_in_one_result_batch_come_back_without_a_copy(unique_id):
    """Items below chunk_bytes share a result batch; once the client knows the padding
    for that size of batch, every one of them lands aligned for float64 (8 bytes)."""
    with torch_tq.start_server(storage="memory") as srv:
        c = torch_tq.Client(srv.location, transport="grpc")
        for n, count in ((512, 32), (64 << 10, 24)):  # 4 KiB items; 512 KiB items
            items = {(unique_id + i, f"packed{n}"): torch.randn(n, dtype=torch.float64)
                     for i in range(count)}
            c.put_many(items)
            c.get_many(list(items), concurrency=1)  # learns the padding of its size class
            before = dict(c.stats)
            results = c.get_many(list(items), concurrency=1)
            assert all(torch.equal(r.tensor, t) for r, t in zip(results, items.values()))
            assert c.stats["zero_copy_gets"] - before["zero_copy_gets"] == count
            assert c.stats["copied_bytes"] == before["copied_bytes"]
        # the first size class's padding still holds after the second was learnt
        again = c.get_many([(unique_id + i, "packed512") for i in range(32)], concurrency=1)
        assert c.stats["zero_copy_gets"] - before["zero_copy_gets"] == 24 + len(again)


def test_batch_write_data_lands_aligned_once_the_client_knows_the_pad(bc, unique_id):
    """The server tells the client how much app_metadata puts a BatchWrite's data 8-byte
    aligned in its receive buffer; from the second call on, it keeps the items without
    copying them (Stats: realigned_bytes)."""
    items = {(unique_id + i, "aligned"): _tensor("float32", (128, 128), i) for i in range(8)}
    copied = []
    for _ in range(3):
        before = bc.server_stats()["realigned_bytes"]
        assert all(r.success for r in bc.put_many(items, batch_items=8))
        copied.append(bc.server_stats()["realigned_bytes"] - before)
    assert copied[1:] == [0, 0], copied
    for (key, want), got in zip(items.items(), bc.get_many(list(items))):
        assert torch.equal(got.tensor, want), key
    # a client that sends no such metadata is stored as well (and copied when misaligned)
    fc = flight.FlightClient(bc.location)
    table = pa.table({"index_id": pa.array([unique_id + 100], pa.uint64()),
                      "matrix_type": ["plain"], "dtype": ["float32"],
                      "data": pa.array([_bits(torch.arange(1000.0)).numpy().tobytes()],
                                       pa.binary())})
    reply = _batch_write(fc, table)
    assert reply["results"][0]["success"] and "pad" not in reply
    assert torch.equal(bc.get(unique_id + 100, "plain"), torch.arange(1000.0))


def test_contiguous_joins_only_pieces_that_lie_end_to_end_in_one_allocation():
    from torch_tq.server.batch import contiguous

    root = pa.py_buffer(np.arange(64, dtype=np.uint8))
    a, b, c = root.slice(8, 16), root.slice(24, 8).slice(0, 8), root.slice(32, 8)
    joined = contiguous([a, b, c])
    assert joined is not None and joined.to_pybytes() == bytes(range(8, 40))
    assert contiguous([a, c]) is None  # a gap
    assert contiguous([b, a]) is None  # out of order
    other = pa.py_buffer(np.arange(64, dtype=np.uint8))
    assert contiguous([a, other.slice(24, 8)]) is None  # another allocation
    assert contiguous([a]) is a and contiguous([]) is None
