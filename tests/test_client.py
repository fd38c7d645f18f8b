"""torch_tq.Client whatever its transport: unreachable servers, start-up order, location
forms. What every transport must do (dtypes, shapes, out=, errors, pickling, batches) is
the conformance suite, tests/conformance."""

from __future__ import annotations

import time

import pytest
import torch

import torch_tq
from torch_tq import InvalidArgument, Unavailable


def test_unreachable_server_is_unavailable():
    from .conftest import free_port

    c = torch_tq.Client(f"grpc://127.0.0.1:{free_port()}", timeout=5, connect_timeout=0)
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as info:
        c.get(1, "prompt")
    assert isinstance(info.value, ConnectionError)
    assert time.monotonic() - t0 < 5  # connect_timeout=0: at once
    with pytest.raises(Unavailable):
        c.put(1, "prompt", torch.zeros(3))
    patient = torch_tq.Client(c.location, timeout=5, connect_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="still unreachable after 1.5s"):
        patient.health()
    assert 1.0 < time.monotonic() - t0 < 10


def test_a_client_started_before_its_server_waits_for_it(tmp_path):
    """torchrun, SLURM and Kubernetes start processes in no fixed order: a client, a sink
    and a dataset made 3 s before their server start all get through."""
    import threading

    from .conftest import free_port

    port = free_port()
    location = f"grpc://127.0.0.1:{port}"
    servers = []
    starter = threading.Timer(3.0, lambda: servers.append(
        torch_tq.start_server(port=port, data_dir=str(tmp_path / "d"))))
    starter.start()
    try:
        t0 = time.monotonic()
        with torch_tq.TensorSink(location) as sink:
            sink.write(7, {"prompt": torch.arange(4.0)})
        assert time.monotonic() - t0 > 2.5  # it really waited
        ds = torch_tq.TQDataset(location, ["prompt"], index_ids=[7])
        assert [int(item["index_id"]) for item in ds] == [7]
        assert torch.equal(torch_tq.Client(location).get(7, "prompt"), torch.arange(4.0))
    finally:
        starter.join()
        for srv in servers:
            srv.stop()


def test_location_forms():
    from torch_tq.client.client import normalize_location

    assert normalize_location("127.0.0.1:9000") == "grpc://127.0.0.1:9000"
    assert normalize_location("grpc+tcp://h:1") == "grpc://h:1"
    assert normalize_location("localhost") == "grpc://localhost:8080"
    assert normalize_location("[::1]") == "grpc://[::1]:8080"
    with pytest.raises(InvalidArgument):
        normalize_location("http://x:1")

