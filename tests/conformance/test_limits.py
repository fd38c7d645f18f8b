"""A server's limits hold on every transport: a memory store's capacity, the largest matrix."""

from __future__ import annotations

import os

import pytest
import torch

import torch_tq

from ..test_limits import _memory
from .conftest import located


def test_the_capacity_holds_on_every_transport(transport):
    with torch_tq.start_server(storage="memory", max_memory="32MiB", qps=0) as srv:
        client = torch_tq.Client(located(srv, transport), transport=transport)
        assert client.transport == transport
        client.put(1, "a", torch.ones(5 << 20))  # 20 MiB
        with pytest.raises(torch_tq.Unavailable, match="memory store full"):
            client.put(2, "b", torch.ones(5 << 20))
        with pytest.raises(torch_tq.NotFound):
            client.get(2, "b")
        assert torch.equal(client.get(1, "a"), torch.ones(5 << 20))
        assert _memory(client)["in_flight"] == 0
        if transport == "same-host":
            staging = os.path.join(client._transport().store.root, "staging")
            assert [n for n in os.listdir(staging) if n.endswith(".arrow")] == []


def test_a_matrix_over_the_size_limit_is_refused_and_nothing_stored(transport, tmp_path):
    with torch_tq.start_server(data_dir=str(tmp_path), max_matrix_bytes="2MiB", qps=0) as srv:
        client = torch_tq.Client(located(srv, transport), transport=transport)
        assert client.transport == transport
        with pytest.raises(torch_tq.InvalidArgument, match="limit"):
            client.put(1, "big", torch.ones(1 << 20))  # 4 MiB
        with pytest.raises(torch_tq.NotFound):
            client.get(1, "big")
        client.put(1, "small", torch.ones(1 << 18))  # 1 MiB: fine
        assert client.list(1)[0].matrix_type == "small"
