"""Many storage nodes used as one: :class:`Cluster` (the nodes, by stable names),
placement by rendezvous hashing (:mod:`.placement`), and a client that fans out over the
nodes (:class:`ClusterClient`)."""
