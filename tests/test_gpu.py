"""GPU checks (skipped on machines without CUDA; run them with `python -m pytest tests/test_gpu.py`
on a GPU host)."""

from __future__ import annotations

import pytest
import torch

import torch_tq
import torch_tq._C as _C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_runtime_found_at_run_time():
    torch.cuda.init()  # loads the CUDA runtime torch ships; dlopen then finds it by name
    version = _C.cuda_runtime_version()
    assert isinstance(version, int) and version >= 11000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64])
def test_put_gpu_tensor_get_back(memory_server, dtype):
    source = (torch.rand(64, 1 << 16, device="cuda") * 100).to(dtype)
    view = source.t()[::3]  # non-contiguous, on the GPU
    with torch_tq.Client(memory_server.location) as client:
        client.put(1, "prompt", view)
        back = client.get(1, "prompt")
    assert back.device.type == "cpu" and back.dtype == dtype
    assert torch.equal(back.cuda(), view)


@pytest.mark.parametrize("pin", [False, True])
def test_dataset_delivers_on_the_gpu(memory_server, pin):
    from torch.utils.data import DataLoader

    source = torch.randn(4, 256, 1024)
    with torch_tq.Client(memory_server.location) as client:
        client.put(77_001, "prompt", source)
        client.put(77_002, "prompt", source * 2)
    ds = torch_tq.TQDataset(memory_server.location, ["prompt"], index_ids=[77_001, 77_002],
                            device="cuda", pin_memory=pin)
    items = list(DataLoader(ds, batch_size=None))
    assert [int(x["index_id"]) for x in items] == [77_001, 77_002]
    for item, scale in zip(items, (1, 2)):
        assert item["prompt"].device.type == "cuda"
        torch.cuda.synchronize()
        assert torch.equal(item["prompt"].cpu(), source * scale)


def test_pinned_pool_reuses_and_releases_its_blocks():
    from torch_tq import pinned

    pool = pinned.PinnedPool(keep_bytes=64 << 20)
    a = pool.acquire(10 << 20)
    t = a.tensor(torch.float32, (10 << 18,))
    assert t.is_pinned() and t.data_ptr() == a.address
    del t  # the tensor held the block; now it is back in the pool
    b = pool.acquire(8 << 20)
    assert b.address == a.address and pool.allocations == 1  # reused, not re-pinned
    b.release()
    big = pool.acquire(100 << 20)  # over keep_bytes: freed as soon as it comes back
    big.release()
    assert pool.held_bytes == a.size
    with pytest.raises(ValueError):
        pool.acquire(pinned.MAX_BLOCK_BYTES + 1)
    pool.close()
    assert pool.held_bytes == 0  # every registration released


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64])
def test_get_to_cuda_through_pinned_memory(memory_server, dtype):
    from torch_tq import pinned

    source = (torch.rand(32, 1 << 16) * 100).to(dtype)
    with torch_tq.Client(memory_server.location) as client:
        client.put(2, "prompt", source)
        for _ in range(3):
            got = client.get(2, "prompt", device="cuda")
            assert got.device.type == "cuda" and torch.equal(got.cpu(), source)
        pinned_cpu = client.get(2, "prompt", pin_memory=True)
        assert pinned_cpu.is_pinned() and torch.equal(pinned_cpu, source)
    pool = pinned.default_pool()
    assert pool is not None and pool.allocations <= 2  # blocks reused across calls


def test_non_blocking_get_is_ordered_on_the_current_stream(memory_server):
    source = torch.randn(64, 1 << 16)
    with torch_tq.Client(memory_server.location) as client:
        client.put(3, "prompt", source)
        results = [client.get(3, "prompt", device="cuda", non_blocking=True) for _ in range(4)]
        total = sum(r.sum() for r in results)  # queued on the current stream, after the copies
        torch.cuda.synchronize()
    assert torch.allclose(total.cpu(), source.sum() * 4, rtol=1e-4)
    for r in results:
        assert torch.equal(r.cpu(), source)


@pytest.mark.parametrize("into_cuda", [False, True])
def test_ucx_get_to_cuda(monkeypatch, into_cuda):
    pytest.importorskip("ucxx")
    if into_cuda:
        monkeypatch.setenv("TORCH_TQ_UCX_CUDA", "1")  # UCX writes the CUDA tensor itself
    with torch_tq.start_server(storage="memory", same_host=False) as srv:
        host = srv.location.split("://", 1)[1].rsplit(":", 1)[0]
        with torch_tq.Client([f"ucx://{host}:8081", srv.location]) as client:
            assert client.transport == "ucx"
            src = torch.randn(3, 1 << 20)
            client.put(7, "u", src)
            got = client.get(7, "u", device="cuda")
            assert got.is_cuda and torch.equal(got.cpu(), src)
            assert client.transport == "ucx" and client._transport().cuda_direct == into_cuda  # no fallback
