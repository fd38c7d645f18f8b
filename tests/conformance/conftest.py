"""The conformance suite: what every transport must do, run against each of them, as
fsspec's ``tests/abstract`` runs against every filesystem.

The ``client`` fixture here is a :class:`torch_tq.Client` that insists on one transport
(gRPC, same-host, and UCX when ``ucxx`` is installed), against a real server: the session's
memory store, and for same-host a disk store too (whose files are the ones a same-host
client maps and stages). A new transport is one more entry of :data:`TRANSPORTS` (and of
``torch_tq.client.routing.CANDIDATES``); every test of this directory then runs on it.
"""

from __future__ import annotations

import pytest

import torch_tq

from ..conftest import TRANSPORTS, ucx_locations

def located(server, transport: str):
    """How a client names ``server`` to use ``transport``."""
    return ucx_locations(server.location) if transport == "ucx" else server.location


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture
def client(request, transport, memory_server):
    """A client on ``transport``, against the session's memory store; the same-host one
    against a disk store (whose files it maps and stages; a memory store shares only what
    same-host clients put)."""
    server = request.getfixturevalue("same_host_server") if transport == "same-host" \
        else memory_server
    c = torch_tq.Client(located(server, transport), transport=transport, timeout=60)
    assert c.transport == transport
    with c:
        yield c
