"""Where results land on every transport: pinned memory and devices (on a machine without
CUDA, the same results through pageable memory; tests/test_gpu.py covers a GPU)."""

from __future__ import annotations

import pytest
import torch

import torch_tq._C as _C


def test_a_cpu_device_gives_the_matrix(client, unique_id):
    t = torch.randn(64, 1000)
    client.put(unique_id, "prompt", t)
    for kwargs in ({"device": torch.device("cpu")}, {"device": "cpu", "non_blocking": True}):
        got = client.get(unique_id, "prompt", **kwargs)
        assert got.device.type == "cpu" and torch.equal(got, t), kwargs
    results = client.get_many([(unique_id, "prompt")])
    assert results[0].success and torch.equal(results[0].tensor, t)


def test_pinned_memory_not_available_answers_cleanly(client, unique_id):
    """On a machine without a usable CUDA device every pinned path says why, and the client
    gives the same results through pageable memory."""
    from torch_tq import pinned

    ok, why = pinned.status()
    if ok:
        pytest.skip("this machine has CUDA: tests/test_gpu.py covers the pinned path")
    assert isinstance(why, str) and why
    assert pinned.default_pool() is None
    with pytest.raises(OSError, match="not available"):
        pinned.PinnedPool()
    with pytest.raises((OSError, RuntimeError)):
        _C.host_alloc(1 << 20)
    t = torch.randn(8, 1000)
    client.put(unique_id, "prompt", t)
    for kwargs in ({"pin_memory": True}, {"device": "cpu"}, {"device": "cpu", "pin_memory": True}):
        got = client.get(unique_id, "prompt", **kwargs)
        assert got.device.type == "cpu" and torch.equal(got, t)
