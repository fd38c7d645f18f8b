"""safetensors export and import through every transport's client (the export streams over
gRPC; the import puts through the client's transport)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load_file

from ..test_codec import bits, random_tensor
from ..test_safetensors import DTYPES


def test_round_trip_is_bit_exact_for_every_dtype(client, unique_id, tmp_path):
    stored = {}
    for i, dtype in enumerate(DTYPES):
        t = random_tensor(dtype, (3, 5, 7), seed=i)
        client.put(unique_id, f"m{i}", t)
        stored[(unique_id, f"m{i}")] = t
    client.put(unique_id + 1, "empty", torch.zeros(0, 4))
    client.put(unique_id + 1, "scalar", torch.tensor(2.5))
    stored[(unique_id + 1, "empty")] = torch.zeros(0, 4)
    stored[(unique_id + 1, "scalar")] = torch.tensor(2.5)
    path = tmp_path / "x.safetensors"
    summary = client.export_safetensors(path, [unique_id, unique_id + 1])
    assert summary["matrices"] == len(stored) and sorted(summary["keys"]) == sorted(stored)
    # a file the safetensors library reads as it is, with our metadata in its header
    loaded = load_file(str(path))
    for (i, t), v in stored.items():
        got = loaded[f"{i}/{t}"]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(bits(got), bits(v))
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    described = json.loads(meta["torch_tq"])
    assert {d["name"] for d in described} == {f"{i}/{t}" for i, t in stored}
    assert all(isinstance(d["created_at"], int) for d in described)
    client.delete(unique_id)
    client.delete(unique_id + 1)
    keys = client.import_safetensors(path)
    assert sorted(keys) == sorted(stored)
    for (i, t), v in stored.items():
        got = client.get(i, t)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(bits(got), bits(v))
