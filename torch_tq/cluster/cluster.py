"""``torch_tq.Cluster``: the storage nodes of one deployment, by stable names, and where
each index_id lives."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from torch_tq.client.client import Client
from torch_tq.client.locations import split_locations
from torch_tq.protocol import placement
from torch_tq.cluster import deploy
from torch_tq.cluster.client import ClusterClient
from torch_tq.errors import InvalidArgument
from torch_tq.model import validate_index_id

NODES_ENV = "TORCH_TQ_NODES"


class Cluster:
    """Storage nodes used as one.

    Args:
        nodes: ``{name: locations}``: stable node names (what placement hashes: renaming
            a node moves its ids) and each node's locations as :class:`torch_tq.Client`
            takes them (``"grpc://h0:8080"``, or ``["ucx://h0:8081", "grpc://h0:8080"]``).
        placement_key: ids ``k*P .. k*P+P-1`` share a node (e.g. 16 for GRPO groups of
            16 responses); default 1, every id placed on its own.

    Example:
        >>> cluster = torch_tq.Cluster({"n0": "grpc://h0:8080", "n1": "grpc://h1:8080"})
        >>> client = cluster.client()  # the methods of a Client, over every node
    """

    def __init__(self, nodes: Mapping[str, Any], *, placement_key: int = 1) -> None:
        if not isinstance(nodes, Mapping) or not nodes:
            raise InvalidArgument("a Cluster needs a mapping of node names to locations, got "
                                  f"{type(nodes).__name__}")
        self.nodes: dict[str, Any] = {}
        seen: dict[str, str] = {}
        for name, locations in nodes.items():
            placement.check_name(name)
            grpc, _ = split_locations(locations)  # checks every location
            if grpc in seen:
                raise InvalidArgument(f"nodes {seen[grpc]} and {name} have the same location "
                                      f"{grpc}")
            seen[grpc] = name
            self.nodes[name] = list(locations) if isinstance(locations, (list, tuple)) \
                else locations
        self.placement_key = placement.check_placement_key(placement_key)
        self._seeds = placement.node_seeds(sorted(self.nodes))

    @classmethod
    def from_env(cls, value: str | None = None, **kwargs) -> Cluster:
        """The cluster ``$TORCH_TQ_NODES`` names: ``n0=grpc://h0:8080,n1=grpc://h1:8080``
        (a node's several locations joined by ``|``), or the same as a JSON object.

        Raises:
            InvalidArgument: unset or malformed.
        """
        text = value if value is not None else os.environ.get(NODES_ENV)
        if not text or not text.strip():
            raise InvalidArgument(f"{NODES_ENV} is not set (e.g. n0=grpc://h0:8080,"
                                  "n1=grpc://h1:8080)")
        text = text.strip()
        if text.startswith("{"):
            try:
                nodes = json.loads(text)
            except ValueError as e:
                raise InvalidArgument(f"{NODES_ENV} is not valid JSON: {e}") from None
            return cls(nodes, **kwargs)
        nodes = {}
        for part in text.split(","):
            name, sep, locations = part.strip().partition("=")
            if not sep or not locations:
                raise InvalidArgument(f"{NODES_ENV}: {part.strip()!r:.80} is not "
                                      "name=location")
            if name in nodes:
                raise InvalidArgument(f"{NODES_ENV}: node {name!r:.70} is named twice")
            locs = [loc.strip() for loc in locations.split("|")]
            nodes[name] = locs if len(locs) > 1 else locs[0]
        return cls(nodes, **kwargs)

    @classmethod
    def from_slurm(cls, port: int = 8080, nodelist: str | None = None, *,
                   scheme: str = "grpc", **kwargs) -> Cluster:
        """One node per host of the SLURM job (``$SLURM_JOB_NODELIST``, e.g.
        ``gpu[01-04]``), named by its host name, serving on ``port``."""
        return cls(deploy.slurm_nodes(port, nodelist, scheme), **kwargs)

    @classmethod
    def from_statefulset(cls, name: str, replicas: int, namespace: str = "default",
                         port: int = 8080, *, service: str | None = None,
                         scheme: str = "grpc", **kwargs) -> Cluster:
        """The pods of a Kubernetes StatefulSet behind a headless Service
        (``deploy/kubernetes/torch-tq.yaml``): nodes ``<name>-0 .. <name>-<replicas-1>``
        at their stable DNS names."""
        return cls(deploy.statefulset_nodes(name, replicas, namespace, port, service, scheme),
                   **kwargs)

    @property
    def names(self) -> list[str]:
        return sorted(self.nodes)

    def node_of(self, index_id: int) -> str:
        """The name of the node that owns ``index_id`` (every type of it).

        Raises:
            InvalidArgument: not an index_id.
        """
        return placement.owner(validate_index_id(index_id), self._seeds, self.placement_key)

    def client(self, **client_options):
        """A :class:`~torch_tq.cluster.client.ClusterClient`: the methods of a
        :class:`torch_tq.Client`, each call going to the node that owns its ids (batches
        and catalog calls fan out over the nodes). ``client_options`` go to every node's
        ``Client`` (``token``, ``timeout``, ``transport``, ...)."""
        return ClusterClient(self, client_options)

    def __reduce__(self):  # pickles as its recipe
        return (_rebuild, (self.nodes, self.placement_key))

    def __eq__(self, other) -> bool:
        return isinstance(other, Cluster) and other.nodes == self.nodes and \
            other.placement_key == self.placement_key

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.nodes)), self.placement_key))

    def __repr__(self) -> str:
        return f"Cluster({self.nodes!r}, placement_key={self.placement_key})"


def _rebuild(nodes, placement_key) -> Cluster:
    return Cluster(nodes, placement_key=placement_key)


def client_for(location, options: Mapping[str, Any]) -> Client | ClusterClient:
    """A :class:`ClusterClient` for a :class:`Cluster`, else a :class:`Client` of the
    location (what ``TQDataset`` and ``TensorSink`` take)."""
    if isinstance(location, Cluster):
        return location.client(**options)
    return Client(location, **options)
