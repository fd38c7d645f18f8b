"""The C extension: builds, imports and answers without a GPU; DLPack export shares memory,
keeps owners alive, and refuses misaligned addresses."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pyarrow as pa
import pytest
import torch

import torch_tq
import torch_tq._C as _C
from torch_tq import native

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]


def test_abi_version():
    assert _C.abi_version() == 1


def test_cuda_runtime_version_is_none_or_positive():
    version = _C.cuda_runtime_version()
    # On a CPU-only machine there is no libcudart; on a GPU machine it is e.g. 12040.
    assert version is None or (isinstance(version, int) and version > 0)


def _source(dtype: torch.dtype, n: int = 24) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.arange(n) % 3 == 0
    return (torch.arange(n) * 7 % 101).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_capsule_shares_memory_for_every_dtype(dtype):
    src = _source(dtype)
    raw = src.view(torch.uint8).numpy().tobytes() if dtype != torch.bool else src.numpy().tobytes()
    buf = pa.py_buffer(raw)
    t = native.tensor_over(buf, dtype, (4, 6))
    assert t.dtype == dtype and t.shape == (4, 6)
    assert t.data_ptr() == buf.address == _C.buffer_address(buf)  # the same memory
    assert torch.equal(t.reshape(-1), src)


def test_offset_and_zero_sized_and_0d():
    buf = pa.py_buffer(np.arange(10, dtype=np.float32).tobytes())
    t = native.tensor_over(buf, torch.float32, (3,), offset=8)
    assert t.tolist() == [2.0, 3.0, 4.0] and t.data_ptr() == buf.address + 8
    assert native.tensor_over(buf, torch.float32, (0, 5)).shape == (0, 5)
    assert native.tensor_over(buf, torch.float32, ()).item() == 0.0


def test_owner_stays_alive_until_the_tensor_goes():
    arr = np.arange(1000, dtype=np.float64)
    alive = weakref.ref(arr)
    t = native.tensor_over(arr, torch.float64, (1000,))
    del arr
    gc.collect()
    assert alive() is not None  # the tensor holds the buffer export
    junk = [np.full(1000, -1.0) for _ in range(50)]  # would reuse freed memory
    assert t.sum().item() == sum(range(1000))
    del t, junk
    gc.collect()
    assert alive() is None  # and lets it go with the tensor


def test_unconsumed_capsule_releases_its_owner():
    arr = np.zeros(16, dtype=np.int32)
    alive = weakref.ref(arr)
    capsule = _C.to_dlpack(arr, 0, 32, (16,))
    del arr
    gc.collect()
    assert alive() is not None
    del capsule
    gc.collect()
    assert alive() is None


def test_pointer_capsule_keeps_its_owner():
    arr = np.arange(8, dtype=np.int64)
    alive = weakref.ref(arr)
    capsule = _C.pointer_to_dlpack(arr.ctypes.data, arr.nbytes, arr, 0, 64, (2, 4))
    del arr
    t = torch.from_dlpack(capsule)
    del capsule
    gc.collect()
    assert alive() is not None and t.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    del t
    gc.collect()
    assert alive() is None


def test_misaligned_address_is_refused_and_the_codec_copies_once():
    raw = pa.py_buffer(bytes(1) + np.arange(8, dtype=np.float32).tobytes())
    assert raw.address % 4 == 0  # Arrow allocates aligned; offset 1 is misaligned
    with pytest.raises(BufferError, match="not aligned"):
        native.tensor_over(raw, torch.float32, (8,), offset=1)
    # the receive path: a misaligned single-buffer array is copied into an aligned tensor
    from torch_tq.codec import assemble
    from torch_tq.codec import tensors as codec

    arr = pa.Array.from_buffers(pa.float32(), 8, [None, raw.slice(1)])
    asm = assemble.TensorAssembler(codec.DTYPES["float32"], (8,))
    asm.add(arr)
    out = asm.finish()
    assert out.data_ptr() % 4 == 0 and out.tolist() == list(range(8))


@pytest.mark.parametrize("kwargs, error", [
    ({"code": 2, "bits": 8}, ValueError),     # no 8-bit float
    ({"code": 9, "bits": 32}, ValueError),    # unknown code
    ({"shape": (-1,)}, ValueError),
    ({"shape": (100,)}, ValueError),          # larger than the buffer
    ({"shape": "ab"}, TypeError),
    ({"offset": 64}, ValueError),
])
def test_bad_export_arguments(kwargs, error):
    args = {"obj": bytearray(64), "code": 2, "bits": 32, "shape": (4,), **kwargs}
    with pytest.raises(error):
        _C.to_dlpack(**args)


def test_client_get_copies_only_what_the_transport_forces(memory_server, unique_id):
    """One batch: no copy (the tensor is the received buffer). Several batches: each byte is
    copied once, straight into the result (or the caller's ``out``: pointer identity)."""
    c = torch_tq.Client(memory_server.location, chunk_bytes="64KiB", transport="grpc")
    small = torch.randn(64, 64)  # 16 KiB: one batch
    big = torch.randn(64, 4096)  # 1 MiB: 16 batches of 64 KiB
    c.put(unique_id, "small", small)
    c.put(unique_id, "big", big)

    got = c.get(unique_id, "small")
    assert c.stats == {"gets": 1, "zero_copy_gets": 1, "copied_bytes": 0, "retries": 0,
                       "throttled": 0}
    assert torch.equal(got, small) and not got.untyped_storage().resizable()

    got = c.get(unique_id, "big")
    assert c.stats["copied_bytes"] == big.numel() * 4 and torch.equal(got, big)
    out = torch.empty_like(big)
    ptr = out.data_ptr()
    got = c.get(unique_id, "big", out=out)
    assert got.data_ptr() == ptr and torch.equal(out, big)
    assert c.stats == {"gets": 3, "zero_copy_gets": 1, "copied_bytes": 2 * big.numel() * 4,
                       "retries": 0, "throttled": 0}


def test_extension_survives_debug_malloc():
    """The lifetime tests again under PYTHONMALLOC=debug, which poisons freed memory."""
    code = textwrap.dedent("""
        import gc, numpy as np, torch, pyarrow as pa
        from torch_tq import native
        for i in range(200):
            b = pa.py_buffer(np.arange(256, dtype=np.float32).tobytes())
            t = native.tensor_over(b, torch.float32, (16, 16))
            del b  # freed (and poisoned) here unless the tensor holds it
            if i % 50 == 0:
                gc.collect()  # slow under debug malloc with torch loaded: now and then
            assert t.sum().item() == sum(range(256)), i
        print("ok")
    """)
    env = dict(os.environ, PYTHONMALLOC="debug")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "uint8"])
def test_assembler_makes_no_copy_of_a_single_aligned_buffer(dtype):
    from torch_tq.codec import assemble
    from torch_tq.codec import tensors as codec

    dt = codec.DTYPES[dtype]
    src = _source(dt.torch, 96)
    arrays = list(codec.values_to_arrays(dt, codec.tensor_values(src)[2], 1 << 20))
    assert len(arrays) == 1
    asm = assemble.TensorAssembler(dt, (8, 12))
    asm.add(arrays[0])
    out = asm.finish()
    assert out.data_ptr() == arrays[0].buffers()[1].address + arrays[0].offset * dt.itemsize
    assert torch.equal(out.reshape(-1), src)


def test_everything_works_without_the_extension(memory_server, unique_id):
    """A source checkout without the built extension: pure Python, same results."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch_tq._C"] = None  # as if the extension had not been built
        import torch, torch_tq
        from torch_tq import native, pinned
        assert not native.available() and pinned.status() == (False,
            "the torch_tq._C extension is not built")
        c = torch_tq.Client({memory_server.location!r})
        for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.int16):
            t = (torch.randn(3, 50) * 10).to(dtype)
            c.put({unique_id}, "prompt", t)
            assert torch.equal(c.get({unique_id}, "prompt", pin_memory=True), t), dtype
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
