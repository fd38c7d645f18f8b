"""The codec on its own: tensors -> Arrow arrays -> tensors, bit for bit, and upload forms."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_tq.codec import tensors as codec

from torch_tq.codec import assemble

from torch_tq.codec import upload
from torch_tq.errors import InternalError, InvalidArgument


def random_tensor(dtype_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals) for every dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype = codec.DTYPES[dtype_name]
    n = math.prod(shape)
    if dtype_name == "bool":
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype.torch).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(sorted(codec.DTYPES)), shape=shapes, seed=st.integers(0, 2**31),
       chunk=st.sampled_from([64, 1000, 4096, 1 << 22]))
def test_tensor_arrow_roundtrip_is_bit_exact(dtype, shape, seed, chunk):
    t = random_tensor(dtype, shape, seed)
    d, got_shape, flat = codec.tensor_values(t)
    assert d.name == dtype and got_shape == shape
    arrays = list(codec.values_to_arrays(d, flat, chunk))
    assert all(a.type == d.arrow for a in arrays)
    assert sum(len(a) for a in arrays) == math.prod(shape)
    asm = assemble.TensorAssembler(d, shape)
    for a in arrays:
        asm.add(a)
    back = asm.finish()
    assert back.dtype == t.dtype and tuple(back.shape) == shape
    assert torch.equal(bits(back), bits(t))


def test_values_are_zero_copy_views():
    t = torch.arange(1 << 16, dtype=torch.float32)
    _, _, flat = codec.tensor_values(t)
    (arr,) = codec.values_to_arrays(codec.DTYPES["float32"], flat, 1 << 20)
    assert arr.buffers()[1].address == t.data_ptr()


def test_non_contiguous_and_grad_tensors():
    base = torch.randn(8, 6, requires_grad=True)
    t = base.t()[::2]
    d, shape, flat = codec.tensor_values(t)
    assert shape == (3, 8)
    assert np.array_equal(flat, t.detach().contiguous().reshape(-1).numpy())


def test_unsupported_dtype():
    with pytest.raises(InvalidArgument, match="unsupported tensor dtype"):
        codec.tensor_values(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(InvalidArgument):
        codec.tensor_values(np.zeros(2))


def test_bfloat16_travels_as_uint16():
    t = torch.tensor([1.0, -2.5, float("nan"), float("inf")], dtype=torch.bfloat16)
    d, _, flat = codec.tensor_values(t)
    assert d.arrow == pa.uint16() and flat.dtype == np.uint16
    schema = codec.wire_schema(d, (4,))
    assert schema.metadata[b"dtype"] == b"bfloat16"
    assert codec.parse_wire_schema(schema) == (d, (4,))


def test_single_buffer_receive_is_zero_copy():
    arr = pa.array(np.arange(1000, dtype=np.int64))
    asm = assemble.TensorAssembler(codec.DTYPES["int64"], (10, 100))
    asm.add(arr)
    t = asm.finish()
    assert t.data_ptr() == arr.buffers()[1].address
    assert t[3, 7] == 307


def test_assembler_into_out_and_checks():
    d = codec.DTYPES["float32"]
    out = torch.empty(2, 3)
    asm = assemble.TensorAssembler(d, (2, 3), out)
    asm.add(pa.array(np.arange(4, dtype=np.float32)))
    asm.add(pa.array(np.arange(4, 6, dtype=np.float32)))
    assert asm.finish() is out and out.reshape(-1).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(InvalidArgument, match="out is"):
        assemble.TensorAssembler(d, (2, 3), torch.empty(3, 2))
    with pytest.raises(InvalidArgument, match="contiguous"):
        assemble.TensorAssembler(d, (2, 3), torch.empty(3, 2).t())
    asm = assemble.TensorAssembler(d, (2,))
    with pytest.raises(InternalError, match="more than"):
        asm.add(pa.array(np.arange(3, dtype=np.float32)))
    asm = assemble.TensorAssembler(d, (2,))
    asm.add(pa.array(np.arange(1, dtype=np.float32)))
    with pytest.raises(InternalError, match="ended after 1 of 2"):
        asm.finish()


def test_upload_decoder_forms():
    values = pa.array(np.arange(12, dtype=np.float32))
    flat = upload.UploadDecoder(pa.schema([("data", pa.float32())]))
    assert flat.dtype.name == "float32" and flat.shape_for(12) == (12,)
    lists = upload.UploadDecoder(pa.schema([("data", pa.list_(pa.float32()))]))
    out = lists.flatten(pa.ListArray.from_arrays([0, 4, 8, 12], values))
    assert len(out) == 12 and lists.shape_for(12) == (3, 4)
    tensor_type = pa.fixed_shape_tensor(pa.float32(), [2, 3])
    tensors = upload.UploadDecoder(pa.schema([("data", tensor_type)]))
    arr = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 2, 3), np.float32))
    assert len(tensors.flatten(arr)) == 12 and tensors.shape_for(12) == (2, 2, 3)
    bf16 = upload.UploadDecoder(pa.schema([("data", pa.uint16())]), declared_dtype="bfloat16")
    assert bf16.dtype.name == "bfloat16"
    with pytest.raises(InvalidArgument, match="contradicts"):
        upload.UploadDecoder(
            pa.schema([("data", pa.float32())], metadata={b"shape": b"[3]"}), declared_shape=(4,))
    sliced = upload.UploadDecoder(pa.schema([("data", pa.list_(pa.float32()))]))
    part = pa.ListArray.from_arrays([0, 4, 8, 12], values).slice(1, 1)
    assert sliced.flatten(part).to_pylist() == [4, 5, 6, 7]


def test_element_bytes_of_slices_and_bools():
    arr = pa.array(np.arange(10, dtype=np.int16)).slice(3, 4)
    assert bytes(codec.element_bytes(arr)) == np.arange(3, 7, dtype=np.int16).tobytes()
    flags = pa.array([True, False, True, True, False, False, True, False, True]).slice(1, 5)
    assert bytes(codec.element_bytes(flags)) == bytes([0, 1, 1, 0, 0])
    assert bytes(codec.element_bytes(pa.array([], pa.float32()))) == b""


@pytest.mark.parametrize("text, expected", [("4MiB", 4 << 20), ("1.5GB", 1_500_000_000),
                                            ("256mib", 256 << 20), (4096, 4096), ("64k", 64000)])
def test_parse_size(text, expected):
    from torch_tq._config import parse_size

    assert parse_size(text) == expected
