"""Storage nodes as Ray actors (``torch_tq.ray``): one server per Ray node that offers the
storage resource, pinned there, each binding its node's address; a :class:`RayCluster` to
reach and stop them.

Needs ``ray`` (``pip install 'torch_tq[ray]'``); nothing else of torch_tq imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch_tq.cluster.cluster import Cluster
from torch_tq.errors import InvalidArgument, Unavailable


def _ray():
    try:
        import ray
    except ImportError:
        raise InvalidArgument("torch_tq.ray needs Ray: pip install 'torch_tq[ray]'") from None
    return ray


class StorageNode:
    """The actor: starts a ``torch_tq`` server process on its Ray node and keeps it for
    the actor's life (a server whose parent is gone stops: it watches its stdin)."""

    def __init__(self, name: str, names: list[str], host: str | None, port: int,
                 storage: str, data_dir: str | None, placement_key: int,
                 options: Mapping[str, Any]) -> None:
        from torch_tq.server.launch import start_server

        ray = _ray()
        host = host or ray.util.get_node_ip_address()
        if data_dir is not None:
            data_dir = os.path.join(data_dir, name)  # each node's own, even on one host
        self.name = name
        self.server = start_server(host=host, port=port, storage=storage, data_dir=data_dir,
                                   node_name=name, cluster_nodes=names,
                                   placement_key=placement_key, **dict(options))

    def location(self) -> str:
        return self.server.location

    def alive(self) -> bool:
        return self.server.alive

    def node_id(self) -> str:
        return _ray().get_runtime_context().get_node_id()

    def stop(self) -> int:
        return self.server.stop()


class RayCluster(Cluster):
    """A :class:`Cluster` whose nodes are Ray actors started by :func:`start_nodes`.
    It pickles as a plain ``Cluster`` (a worker that receives it reaches the nodes but
    does not own them); :meth:`stop` ends them."""

    def __init__(self, nodes: Mapping[str, Any], actors: Mapping[str, Any], *,
                 placement_key: int = 1) -> None:
        super().__init__(nodes, placement_key=placement_key)
        self.actors = dict(actors)

    def stop(self) -> None:
        """Stops every node's server and its actor."""
        ray = _ray()
        try:
            ray.get([actor.stop.remote() for actor in self.actors.values()], timeout=60)
        finally:
            for actor in self.actors.values():
                ray.kill(actor)
            self.actors = {}

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_nodes(n: int, *, resources: Mapping[str, float] | None = None,
                storage: str = "disk", data_dir: str | None = None, host: str | None = None,
                port: int = 0, name_prefix: str = "tq-", placement_key: int = 1,
                timeout: float = 120.0, **server_options) -> RayCluster:
    """Starts ``n`` storage nodes, one per Ray node that offers ``resources`` (default
    ``{"storage": 1}``), each an actor pinned to its node (``NodeAffinitySchedulingStrategy``,
    not soft) that runs a server binding that node's address.

    Args:
        n: how many nodes; the Ray cluster must have at least ``n`` nodes with
            ``resources`` free.
        storage, data_dir: each node's store (``data_dir`` is a path on every node; each
            node keeps ``<data_dir>/<name>``).
        host: the address each server binds (default: its Ray node's IP address).
        port: each server's port (default 0: a free one).
        name_prefix: nodes are named ``<prefix>0 .. <prefix><n-1>`` in the order of their
            Ray nodes' ids.
        server_options: more :func:`torch_tq.serve` options for every node
            (``auth_tokens=``, ``insecure=True``, ``qps=``, ...).

    Returns:
        A :class:`RayCluster`; ``cluster.client()`` reaches the nodes, ``cluster.stop()``
        ends them.

    Raises:
        Unavailable: fewer than ``n`` Ray nodes offer ``resources``, or a node's server did
            not start.
    """
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgument(f"n must be an integer >= 1, got {n!r:.40}")
    resources = dict(resources if resources is not None else {"storage": 1})
    if not ray.is_initialized():
        ray.init()
    offering = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive")
                      and all(node.get("Resources", {}).get(k, 0) >= v
                              for k, v in resources.items()))
    if len(offering) < n:
        raise Unavailable(f"{n} storage nodes wanted, but only {len(offering)} Ray nodes offer "
                          f"{resources}")
    names = [f"{name_prefix}{i}" for i in range(n)]
    remote = ray.remote(StorageNode)
    actors = {}
    try:
        for name, node_id in zip(names, offering):
            actors[name] = remote.options(
                name=f"torch_tq-{name}-{os.getpid()}", num_cpus=0, resources=resources,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(name, names, host, port, storage, data_dir, placement_key,
                     server_options)
        locations = dict(zip(names, ray.get([a.location.remote() for a in actors.values()],
                                            timeout=timeout)))
    except BaseException as e:
        for actor in actors.values():
            ray.kill(actor)
        if isinstance(e, ray.exceptions.RayError):
            raise Unavailable(f"a storage node did not start: {e}") from None
        raise
    return RayCluster(locations, actors, placement_key=placement_key)
