"""A hypothesis state machine drives a real disk-store server (with restarts) against a dict."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import torch_tq
from torch_tq import NotFound

IDS = st.integers(0, 3) | st.just(2**64 - 1)
TYPES = st.sampled_from(["prompt", "resp", "advantage"])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tq-state-")
        self.server = torch_tq.start_server(data_dir=self.dir, chunk_bytes="1KiB", durable=False)
        self.client = torch_tq.Client(self.server.location, chunk_bytes=1024)
        self.model: dict[tuple[int, str], torch.Tensor] = {}

    def teardown(self) -> None:
        self.client.close()
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(index_id=IDS, mtype=TYPES, dtype=DTYPES, shape=SHAPES, seed=st.integers(0, 1000),
          big=st.booleans())
    def put(self, index_id, mtype, dtype, shape, seed, big):
        if big:
            shape = (3, 1000)  # several 1 KiB batches
        g = torch.Generator().manual_seed(seed)
        t = (torch.rand(shape, generator=g) * 100).to(dtype)
        self.client.put(index_id, mtype, t)
        self.model[(index_id, mtype)] = t

    @rule(index_id=IDS, mtype=TYPES)
    def get(self, index_id, mtype):
        expected = self.model.get((index_id, mtype))
        if expected is None:
            with pytest.raises(NotFound):
                self.client.get(index_id, mtype)
        else:
            got = self.client.get(index_id, mtype)
            assert got.dtype == expected.dtype and torch.equal(got, expected)

    @rule(index_id=IDS, mtype=TYPES)
    def delete_one(self, index_id, mtype):
        if (index_id, mtype) in self.model:
            assert self.client.delete(index_id, mtype) == [mtype]
            del self.model[(index_id, mtype)]
        else:
            with pytest.raises(NotFound):
                self.client.delete(index_id, mtype)

    @rule(index_id=IDS)
    def delete_all(self, index_id):
        types = sorted(t for (i, t) in self.model if i == index_id)
        if types:
            assert sorted(self.client.delete(index_id)) == types
            for t in types:
                del self.model[(index_id, t)]
        else:
            with pytest.raises(NotFound):
                self.client.delete(index_id)

    @rule()
    def restart(self):
        self.server.stop()
        self.server = torch_tq.start_server(data_dir=self.dir, chunk_bytes="1KiB", durable=False)
        self.client = torch_tq.Client(self.server.location, chunk_bytes=1024)

    @invariant()
    def metadata_and_listing_match(self):
        listed = {(m.index_id, m.matrix_type): (m.shape, m.dtype) for m in self.client.list()}
        assert listed == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                          for k, v in self.model.items()}
        for index_id in {i for i, _ in self.model}:
            meta = self.client.metadata(index_id)
            assert meta["types"] == sorted(t for i, t in self.model if i == index_id)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=5, stateful_step_count=25, deadline=None)
