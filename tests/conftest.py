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


@pytest.fixture(scope="session")
def memory_server():
    """One memory-store server shared by the tests that only add keys of their own."""
    with torch_tq.start_server(storage="memory") as srv:
        yield srv


@pytest.fixture
def client(memory_server):
    with torch_tq.Client(memory_server.location, timeout=60) as c:
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
