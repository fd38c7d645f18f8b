"""A node's place in a cluster: its name, the cluster's node names and membership epoch,
and the placement rule (``torch_tq.protocol.placement``), so that it refuses to store an
index_id another node owns. A client with a stale map of the cluster then cannot scatter
one index_id's types over two nodes."""

from __future__ import annotations

from torch_tq._config import resolve
from torch_tq.errors import InvalidArgument, WrongNode
from torch_tq.model import Key
from torch_tq.protocol import placement


class Membership:
    def __init__(self, node: str, names: list[str], placement_key: int = 1,
                 epoch: int = 0) -> None:
        self.node = placement.check_name(node)
        self.names = sorted({placement.check_name(n) for n in names})
        if node not in self.names:
            raise InvalidArgument(f"node_name {node} is not one of cluster_nodes "
                                  f"{','.join(self.names)}")
        self.placement_key = placement.check_placement_key(placement_key)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 2**63:
            raise InvalidArgument(f"cluster_epoch must be an integer >= 0, got {epoch!r:.40}")
        self.epoch = epoch
        self._seeds = placement.node_seeds(self.names)

    def admits(self, key: Key) -> None:
        """Raises WrongNode unless this node owns ``key``'s index_id."""
        owner = placement.owner(key.index_id, self._seeds, self.placement_key)
        if owner != self.node:
            raise WrongNode(f"{key} belongs to node {owner}, not to {self.node} (cluster "
                            f"epoch {self.epoch}, nodes {','.join(self.names)}): the client's "
                            "map of the cluster is not this one's")

    def describe(self) -> dict:
        return {"name": self.node, "nodes": self.names, "epoch": self.epoch,
                "placement_key": self.placement_key}


def membership_from(node_name: str | None = None, cluster_nodes=None,
                    placement_key: int | None = None,
                    cluster_epoch: int | None = None) -> Membership | None:
    """A node's membership from these options or ``TORCH_TQ_NODE_NAME``,
    ``TORCH_TQ_CLUSTER_NODES`` (comma-separated names), ``TORCH_TQ_PLACEMENT_KEY`` and
    ``TORCH_TQ_CLUSTER_EPOCH``; None for a node on its own (no ``node_name``)."""
    node_name = resolve(node_name, "NODE_NAME", None)
    cluster_nodes = resolve(cluster_nodes, "CLUSTER_NODES", None)
    if not node_name:
        if cluster_nodes:
            raise InvalidArgument("cluster_nodes needs node_name: which of them this node is")
        return None
    if not cluster_nodes:
        raise InvalidArgument("node_name needs cluster_nodes: every node's name")
    names = cluster_nodes.split(",") if isinstance(cluster_nodes, str) else list(cluster_nodes)
    return Membership(node_name, [n.strip() for n in names],
                      int(resolve(placement_key, "PLACEMENT_KEY", 1, int)),
                      int(resolve(cluster_epoch, "CLUSTER_EPOCH", 0, int)))
