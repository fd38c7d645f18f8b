"""put and get on every transport: every dtype and odd shape bit-exact, out=, shared memory,
pickled and spawned clients, checksums, the catalog."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_tq
from torch_tq import InvalidArgument, NotFound
from torch_tq.codec.tensors import DTYPES

from ..conftest import TRANSPORTS
from ..test_codec import bits, random_tensor
from .conftest import located


@pytest.fixture(scope="module", params=TRANSPORTS)
def tiny_client(request, tmp_path_factory):
    """Stores 1 KiB batches, so small matrices already stream as many batches."""
    if request.param == "same-host":
        srv = torch_tq.start_server(data_dir=str(tmp_path_factory.mktemp("tiny")),
                                    chunk_bytes="1KiB", durable=False)
    else:
        srv = torch_tq.start_server(storage="memory", chunk_bytes="1KiB")
    with srv:
        with torch_tq.Client(located(srv, request.param), chunk_bytes=1024,
                             transport=request.param) as c:
            assert c.transport == request.param
            yield c


shapes = st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple).filter(
    lambda s: math.prod(s) <= 20_000)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(sorted(DTYPES)), shape=shapes, seed=st.integers(0, 2**31),
       index_id=st.integers(0, 2**64 - 1))
def test_any_dtype_and_shape_roundtrips_bit_exact(tiny_client, dtype, shape, seed, index_id):
    t = random_tensor(dtype, shape, seed)
    tiny_client.put(index_id, "prompt", t)
    back = tiny_client.get(index_id, "prompt")
    assert back.dtype == t.dtype and tuple(back.shape) == shape
    assert torch.equal(bits(back), bits(t))
    out = torch.empty(shape, dtype=t.dtype)
    assert tiny_client.get(index_id, "PROMPT", out=out) is out
    assert torch.equal(bits(out), bits(t))
    tiny_client.delete(index_id, "prompt")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_large_enough_for_many_batches(client, unique_id, dtype):
    t = random_tensor(dtype, (3, 1 << 20), seed=1)  # 3M elements: several 4 MiB batches
    client.put(unique_id, "resp", t)
    back = client.get(unique_id, "resp")
    assert torch.equal(bits(back), bits(t))


def test_zero_dim_and_zero_size(client, unique_id):
    client.put(unique_id, "scalar", torch.tensor(7, dtype=torch.int64))
    back = client.get(unique_id, "scalar")
    assert back.shape == () and back.item() == 7
    client.put(unique_id, "empty", torch.zeros(3, 0, 5, dtype=torch.bfloat16))
    back = client.get(unique_id, "empty")
    assert back.shape == (3, 0, 5) and back.dtype == torch.bfloat16


def test_non_contiguous_and_requires_grad_input(client, unique_id):
    base = torch.randn(64, 32, requires_grad=True)
    view = base.t()[:, ::3]
    client.put(unique_id, "prompt", view)
    assert torch.equal(client.get(unique_id, "prompt"), view.detach())


def test_received_tensor_is_writable_and_independent(client, unique_id):
    client.put(unique_id, "prompt", torch.zeros(10))
    a = client.get(unique_id, "prompt")
    b = client.get(unique_id, "prompt")
    a += 1
    assert torch.equal(b, torch.zeros(10)) and torch.equal(a, torch.ones(10))


def test_get_into_shared_memory(client, unique_id):
    t = torch.randn(3, 1000)
    client.put(unique_id, "prompt", t)
    got = client.get(unique_id, "prompt", shared=True)
    assert got.is_shared() and torch.equal(got, t)
    assert not client.get(unique_id, "prompt").is_shared()


def test_client_pickles_as_recipe(client, unique_id):
    client.put(unique_id, "prompt", torch.arange(5))
    clone = pickle.loads(pickle.dumps(client))
    assert clone.location == client.location and clone is not client
    assert torch.equal(clone.get(unique_id, "prompt"), torch.arange(5))


def test_client_used_in_a_spawned_process(client, unique_id, memory_server):
    client.put(unique_id, "prompt", torch.arange(6))
    code = (
        "import pickle, sys, torch\n"
        "c = pickle.loads(sys.stdin.buffer.read())\n"
        f"assert torch.equal(c.get({unique_id}, 'prompt'), torch.arange(6))\n"
        f"c.put({unique_id}, 'resp', torch.ones(2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(client), timeout=120)
    assert proc.returncode == 0
    assert torch.equal(client.get(unique_id, "resp"), torch.ones(2))


def test_checksum_option(client, unique_id):
    where = [*client.ucx_locations, client.location]
    with torch_tq.Client(where, checksum=True, transport=client.transport_mode) as c:
        t = torch.randn(3, 1 << 20)
        c.put(unique_id, "prompt", t)
        assert torch.equal(c.get(unique_id, "prompt"), t)


def test_list_and_health(client, unique_id):
    client.put(unique_id, "a", torch.zeros(2, 3, dtype=torch.int16))
    client.put(unique_id, "b", torch.zeros(5, dtype=torch.bool))
    infos = client.list(unique_id)
    assert [(i.matrix_type, i.shape, i.dtype, i.nbytes) for i in infos] == [
        ("a", (2, 3), "int16", 12), ("b", (5,), "bool", 5)]
    assert client.health()["status"] == "SERVING"


def test_out_must_match(client, unique_id):
    client.put(unique_id, "prompt", torch.zeros(4, 4))
    with pytest.raises(InvalidArgument, match="out is"):
        client.get(unique_id, "prompt", out=torch.empty(16))
    with pytest.raises(InvalidArgument, match="out is"):
        client.get(unique_id, "prompt", out=torch.empty(4, 4, dtype=torch.float64))


def test_typed_errors(client, unique_id):
    with pytest.raises(NotFound) as info:
        client.get(unique_id, "nothing_here")
    assert isinstance(info.value, KeyError) and isinstance(info.value, torch_tq.TQError)
    with pytest.raises(InvalidArgument):
        client.put(unique_id, "bad/type", torch.zeros(1))
    with pytest.raises(InvalidArgument):
        client.put(2**64, "prompt", torch.zeros(1))
    with pytest.raises(InvalidArgument):
        client.put(True, "prompt", torch.zeros(1))
    with pytest.raises(InvalidArgument):
        client.put(unique_id, "prompt", torch.zeros(1, dtype=torch.complex64))
    with pytest.raises(InvalidArgument):
        client.put(unique_id, "prompt", [1, 2, 3])


def test_client_put_get_seed_shape(client, unique_id):
    t = torch.randn(32, 512, 4096)
    client.put(unique_id, "prompt", t)
    assert torch.equal(client.get(unique_id, "prompt"), t)
    out = torch.empty_like(t)
    assert client.get(unique_id, "prompt", out=out) is out
    assert torch.equal(out, t)


def test_invalid_argument_is_a_value_error(client):
    with pytest.raises(InvalidArgument):
        client.put(-1, "prompt", torch.zeros(1))
    with pytest.raises(ValueError):
        client.get(1, "../etc")
