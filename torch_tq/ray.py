"""``torch_tq.ray``: storage nodes started as Ray actors, one per Ray node
(:func:`start_nodes`), reached and stopped through the :class:`RayCluster` it returns.
See docs/cluster.md."""

from torch_tq.cluster.ray_nodes import RayCluster, StorageNode, start_nodes

__all__ = ["RayCluster", "StorageNode", "start_nodes"]
