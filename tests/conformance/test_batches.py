"""put_many / get_many on every transport: per-item results in request order, partial
failures, every dtype, an item too large to travel inline."""

from __future__ import annotations

import pytest
import torch

import torch_tq

from ..test_batch import _DTYPES, _bits, _tensor, small_server  # noqa: F401 - a fixture
from .conftest import located


@pytest.fixture
def bc(transport, small_server):
    with torch_tq.Client(located(small_server, transport), transport=transport) as c:
        assert c.transport == transport
        yield c


def test_put_many_partial_failure_in_order(bc, unique_id):
    good = torch.randn(3, 4)
    large = torch.randn(200, 1000)  # 800 kB: its own stream (over small_bytes below)
    items = [
        (unique_id, "prompt", good),
        (unique_id, "bad type!", torch.zeros(2)),
        (unique_id, "huge", torch.zeros(300_000)),  # over the server's 1 MiB
        (unique_id, "large", large),
        (unique_id, "complex", torch.zeros(2, dtype=torch.complex64)),
        (unique_id, "notatensor", [1, 2, 3]),
        (-1, "prompt", torch.zeros(1)),
        "not a triple",
        (unique_id, "resp", torch.arange(5)),
    ]
    results = bc.put_many(items, small_bytes=64 << 10, batch_items=3, concurrency=3)
    assert [r.success for r in results] == [True, False, False, True, False, False, False, False,
                                           True]
    assert [r.code for r in results] == ["OK", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK",
                                         "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                                         "INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK"]
    assert "matrix too large" in results[2].message
    assert "invalid matrix_type" in results[1].message
    assert (results[0].index_id, results[0].matrix_type) == (unique_id, "prompt")
    stored = {m.matrix_type for m in bc.list(unique_id)}
    assert stored == {"prompt", "large", "resp"}
    assert torch.equal(bc.get(unique_id, "large"), large)
    assert torch.equal(bc.get(unique_id, "prompt"), good)


def test_get_many_partial_failure_in_order(bc, unique_id):
    a, b = torch.randn(8, 8), torch.arange(100)
    bc.put_many({(unique_id, "a"): a, (unique_id, "b"): b})
    keys = [(unique_id, "b"), (unique_id + 1, "a"), (unique_id, "bad type"), "junk",
            (unique_id, "a"), (unique_id, "b")]
    results = bc.get_many(keys, concurrency=2, batch_items=2)
    assert [r.success for r in results] == [True, False, False, False, True, True]
    assert results[1].code == "NOT_FOUND"
    assert results[1].message == f"matrix not found: index_id={unique_id + 1}, type=a"
    assert results[2].code == "INVALID_ARGUMENT"
    assert torch.equal(results[0].tensor, b) and torch.equal(results[5].tensor, b)
    assert torch.equal(results[4].tensor, a)
    assert results[1].tensor is None


@pytest.mark.parametrize("dtype", _DTYPES)
def test_every_dtype_round_trips_through_batches(bc, unique_id, dtype):
    shapes = [(), (0,), (7,), (3, 5, 2), (64, 300)]
    items = {(unique_id + i, dtype): _tensor(dtype, s, i) for i, s in enumerate(shapes)}
    assert all(r.success for r in bc.put_many(items, small_bytes=1 << 16))
    for r, (key, t) in zip(bc.get_many(list(items)), items.items()):
        assert r.success, r
        assert r.tensor.dtype == t.dtype and r.tensor.shape == t.shape
        assert torch.equal(_bits(r.tensor), _bits(t))


def test_large_item_over_inline_limit_read_by_its_own_stream(bc, unique_id):
    t = torch.randn(1000)
    bc.put(unique_id, "x", t)
    before = bc.stats["gets"]
    (r,) = bc.get_many([(unique_id, "x")], max_inline_bytes=1024)
    assert r.success and torch.equal(r.tensor, t)
    assert bc.stats["gets"] == before + 1
