"""Shared fixtures: real torch_tq servers in their own processes, torn down even on failure."""

from __future__ import annotations

import os
import socket
import zlib

import pytest

# UCX may pick any network interface for its TCP transport: tests stay on loopback (the
# server processes inherit this).
os.environ.setdefault("UCX_NET_DEVICES", "lo")

import torch_tq  # noqa: E402
from torch_tq._fork import preload_in_forkserver  # noqa: E402

# The tests' own forkserver processes (ranks, DataLoader workers) start with torch loaded,
# as loader()'s do: a worker that imports torch itself takes ~3 s here.
preload_in_forkserver()


@pytest.fixture(scope="session")
def memory_server():
    """One memory-store server shared by the tests that only add keys of their own."""
    with torch_tq.start_server(storage="memory") as srv:
        yield srv


# The transports this machine has: gRPC, same-host (the client mapping and staging files
# itself) and UCX, when ucxx is here. The conformance suite (tests/conformance) runs on each.
try:
    import ucxx  # noqa: F401

    TRANSPORTS = ["grpc", "same-host", "ucx"]
except ImportError:
    TRANSPORTS = ["grpc", "same-host"]


def ucx_locations(location: str) -> list[str]:
    """The seed's pair of locations for a server: UCX first, then gRPC."""
    host = location.split("://", 1)[1].rsplit(":", 1)[0]
    return [f"ucx://{host}:8081", location]


@pytest.fixture(scope="session")
def same_host_server(tmp_path_factory):
    """A disk-store server for the same-host runs (a disk store's files are the ones a
    same-host client maps and stages)."""
    with torch_tq.start_server(data_dir=str(tmp_path_factory.mktemp("same_host"))) as srv:
        yield srv


@pytest.fixture
def client(memory_server):
    """A gRPC client of the session's memory store, for tests of what does not depend on
    the transport (the server's behaviour, consumer groups); tests/conformance overrides it
    with one per transport."""
    with torch_tq.Client(memory_server.location, transport="grpc", timeout=60) as c:
        yield c


@pytest.fixture
def disk_server(tmp_path):
    """A factory of disk-store servers on ``tmp_path/data``; all stopped at the end."""
    handles: list[torch_tq.ServerHandle] = []

    def start(**kwargs) -> torch_tq.ServerHandle:
        kwargs.setdefault("data_dir", str(tmp_path / "data"))
        srv = torch_tq.start_server(**kwargs)
        handles.append(srv)
        return srv

    yield start
    for srv in handles:
        srv.stop()


@pytest.fixture
def unique_id(request):
    """An index_id no other test uses (tests share the session server)."""
    return zlib.crc32(request.node.nodeid.encode()) * 1000 + os.getpid() % 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/<pid>/status (``VmRSS``, ``RssAnon``), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")
