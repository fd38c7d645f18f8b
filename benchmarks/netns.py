"""Hosts simulated with Linux network namespaces, for the cluster benchmark and the
multi-host tests: one namespace per storage node and one for the clients, joined by veth
pairs to a bridge in a namespace of its own, each node's link optionally shaped with
``tc tbf`` both ways. Needs root and ``ip``/``tc``. Traffic stays inside the namespaces made
here, and every one of them is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _tc(ns: str, dev: str, rate: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", "256kb", "latency", "400ms"], check=True,
                   capture_output=True)


def available() -> str | None:
    """Why namespaces cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"{tool} is not installed"
    return None


@dataclass
class Network:
    """What :func:`network` made: each node's address, and the prefix of a command that
    runs on node ``i`` (``nodes[i]``) or on the clients' host (``client``)."""

    addresses: list[str]
    nodes: list[list[str]]
    client: list[str]
    bridge_ns: str
    _outer: list[str] = field(default_factory=list)  # node i's end on the bridge

    def cut(self, i: int, cut: bool = True) -> None:
        """Takes node ``i``'s link down (a partition: the node runs on, unreachable and
        silent, no connection refused), or back up."""
        _ip("-n", self.bridge_ns, "link", "set", self._outer[i], "down" if cut else "up")


@contextlib.contextmanager
def network(nodes: int, rate: str | None = None) -> Iterator[Network]:
    """``nodes`` node namespaces and one client namespace on a bridge, each node's link
    shaped to ``rate`` (``None``: not shaped)."""
    tag = f"{os.getpid() % 10000}"
    octet = os.getpid() % 200 + 20
    bridge_ns, client_ns = f"tqcb{tag}", f"tqcc{tag}"
    node_ns = [f"tqcn{tag}x{i}" for i in range(nodes)]
    made: list[str] = []
    try:
        for ns in (bridge_ns, client_ns, *node_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        addresses, outers = [], []
        for k, ns in enumerate([client_ns, *node_ns]):
            inner, outer = f"e{tag}i{k}", f"e{tag}o{k}"
            addr = f"10.{octet}.88.{100 if k == 0 else k}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", outer, "master", "br0")
            _ip("-n", bridge_ns, "link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if k:  # a node: its link shaped both ways
                if rate:
                    _tc(ns, inner, rate)
                    _tc(bridge_ns, outer, rate)
                addresses.append(addr)
                outers.append(outer)
        yield Network(addresses, [["ip", "netns", "exec", ns] for ns in node_ns],
                      ["ip", "netns", "exec", client_ns], bridge_ns, outers)
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start_node(prefix: list[str], host: str, name: str, names: list[str],
               *options: str) -> tuple[subprocess.Popen, str]:
    """``torch-tq serve`` as node ``name`` of ``names`` on ``host``:8080 inside a namespace
    (``prefix``); ``options`` go to ``serve`` (default storage: memory). Returns the process
    and its location once it listens."""
    # --insecure: a network inside namespaces of this run's own, no one else on it
    cmd = prefix + [sys.executable, "-m", "torch_tq", "--log-level", "WARNING", "serve",
                    "--host", host, "--port", "8080", "--insecure", "--no-same-host",
                    "--no-ucx", "--qps", "0", "--node-name", name,
                    "--cluster-nodes", ",".join(names), "--watch-stdin", *options]
    if "--storage" not in options:
        cmd += ["--storage", "memory"]
    return listening(cmd, f"node {name}")


def listening(cmd: list[str], what: str) -> tuple[subprocess.Popen, str]:
    """Starts the server command ``cmd``; returns it and its location once it listens."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        match = re.search(r"listening on (grpc://\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"{what} did not start")
