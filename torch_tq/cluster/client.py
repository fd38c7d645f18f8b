"""A client of every node of a :class:`~torch_tq.cluster.cluster.Cluster`: each call goes to
the node that owns its index_id; batches split per node and run in parallel; catalog calls
merge. A node that cannot be reached fails only its own ids."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from torch_tq.client.batches import key_of
from torch_tq.client.client import Client
from torch_tq.client.results import ItemResult, MatrixInfo
from torch_tq.cluster.groups import ClusterGroupCalls
from torch_tq.cluster.parallel import parallel
from torch_tq.cluster.rounds import ClusterRounds
from torch_tq.errors import InvalidArgument, TQError, Unavailable

if TYPE_CHECKING:
    import torch

    from torch_tq.cluster.cluster import Cluster


class ClusterClient(ClusterGroupCalls):
    """The methods of :class:`torch_tq.Client`, over the nodes of a cluster
    (:meth:`Cluster.client`). One ``Client`` per node, made on first use with the same
    options; pickles as its recipe (cluster and options)."""

    def __init__(self, cluster: Cluster, client_options: Mapping[str, Any] | None = None) -> None:
        self.cluster = cluster
        self.client_options = dict(client_options or {})
        for forbidden in ("location", "client_id"):
            if forbidden in self.client_options:
                raise InvalidArgument(f"{forbidden} is the cluster's to set, per node")
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # group calls, one in flight per node
        self._busy: dict[str, Future] = {}
        self._turn = 0  # which node a consume takes from first: each in turn
        self._down: set[str] = set()  # nodes a group call found unreachable (said once)
        # acks a node could not take yet: (group, node, delete, rank) -> index_ids
        self._unsent: dict[tuple[str, str, bool, int | None], list[int]] = {}
        self._acking: dict[tuple, Future] = {}  # acks in flight, by _unsent's key
        # (group, node) -> until when the node may hold leases whose answer was lost
        self._unseen: dict[tuple[str, str], float] = {}
        self._lease_s: dict[str, float] = {}  # each group's lease term, as last asked
        self._rounds = ClusterRounds(self)  # shares taken from several nodes at once

    # ------------------------------------------------------------------ nodes

    def node(self, name: str) -> Client:
        """The ``Client`` of node ``name``."""
        client = self._clients.get(name)
        if client is None:
            if name not in self.cluster.nodes:
                raise InvalidArgument(f"no node {name!r:.70} in {self.cluster.names}")
            with self._lock:
                client = self._clients.get(name)
                if client is None:
                    client = Client(self.cluster.nodes[name], **self.client_options)
                    self._clients[name] = client
        return client

    def owner(self, index_id) -> Client:
        """The ``Client`` of the node that owns ``index_id``."""
        return self.node(self.cluster.node_of(index_id))

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for client in clients:
            client.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        return (ClusterClient, (self.cluster, self.client_options))

    def _per_node(self, index_ids: Iterable[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for index_id in index_ids:
            out.setdefault(self.cluster.node_of(index_id), []).append(index_id)
        return out

    def __repr__(self) -> str:
        return f"ClusterClient({self.cluster.names})"

    # ------------------------------------------------------------------ one item

    def put(self, index_id: int, matrix_type: str, tensor: torch.Tensor, **kwargs) -> None:
        """:meth:`Client.put` on the node that owns ``index_id``."""
        self.owner(index_id).put(index_id, matrix_type, tensor, **kwargs)

    def get(self, index_id: int, matrix_type: str, **kwargs) -> torch.Tensor:
        """:meth:`Client.get` from the node that owns ``index_id``."""
        return self.owner(index_id).get(index_id, matrix_type, **kwargs)

    def delete(self, index_id: int, matrix_type: str | None = None) -> list[str]:
        return self.owner(index_id).delete(index_id, matrix_type)

    def metadata(self, index_id: int) -> dict[str, Any]:
        return self.owner(index_id).metadata(index_id)

    # ------------------------------------------------------------------ batches

    def put_many(self, items: Mapping[tuple[int, str], torch.Tensor] |
                 Iterable[tuple[int, str, torch.Tensor]], **kwargs) -> list[ItemResult]:
        """:meth:`Client.put_many`, split per node and run on every node at once; one
        result per item, in order (the items of a node that cannot be reached fail with
        ``UNAVAILABLE``, the others are stored)."""
        if isinstance(items, Mapping):
            triples = [(*key, value) if isinstance(key, tuple) and len(key) == 2 else key
                       for key, value in items.items()]  # a bad key fails its item alone
        else:
            triples = list(items)
        return self._fan_out(triples, 3, "put_many", kwargs)

    def get_many(self, items: Iterable[tuple[int, str]], **kwargs) -> list[ItemResult]:
        """:meth:`Client.get_many`, split per node and run on every node at once; one
        result per item, in order."""
        return self._fan_out(list(items), 2, "get_many", kwargs)

    def _fan_out(self, entries: list, width: int, method: str, kwargs) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(entries)
        per_node: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            try:
                if not isinstance(entry, (tuple, list)) or len(entry) != width:
                    raise InvalidArgument(f"item {i} must be a tuple of {width}")
                key = key_of(entry[0], entry[1])
            except TQError as e:
                first = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
                second = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 \
                    else None
                results[i] = ItemResult(first, second, False, e.code, e.message)
                continue
            per_node.setdefault(self.cluster.node_of(key.index_id), []).append(i)

        def run(name: str, positions: list[int]) -> None:
            try:
                rows = getattr(self.node(name), method)([entries[i] for i in positions],
                                                        **kwargs)
            except TQError as e:  # the node as a whole: unreachable, or refused the call
                rows = [ItemResult(entries[i][0], entries[i][1], False, e.code,
                                   f"node {name}: {e.message}") for i in positions]
            for i, row in zip(positions, rows):
                if row.code == "UNAVAILABLE" and not row.message.startswith("node "):
                    row = row._replace(message=f"node {name}: {row.message}")  # which one
                results[i] = row

        parallel([(name, positions) for name, positions in per_node.items()], run)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ safetensors

    def export_safetensors(self, path, index_ids, types=None, *,
                           progress=None) -> dict[str, Any]:
        """:meth:`Client.export_safetensors` over the nodes: each matrix streamed from the
        node that owns it, into one file."""
        from torch_tq.client import safetensors_io

        ids = [index_ids] if isinstance(index_ids, int) else list(index_ids)
        return safetensors_io.export_safetensors(self, path, ids, types, progress)

    def import_safetensors(self, path, index_id: int | None = None, *,
                           progress=None) -> list[tuple[int, str]]:
        """:meth:`Client.import_safetensors` over the nodes: each tensor stored on the
        node that owns its index_id."""
        from torch_tq.client import safetensors_io

        return safetensors_io.import_safetensors(self, path, index_id, progress)

    # ------------------------------------------------------------------ catalog

    def list(self, index_id: int | None = None) -> list[MatrixInfo]:
        """Every stored matrix of every node (or of one index_id), sorted by key.

        Raises:
            Unavailable: a node cannot be reached (a partial list would mislead).
        """
        if index_id is not None:
            return self.owner(index_id).list(index_id)
        found: dict[str, list[MatrixInfo]] = {}
        failed: dict[str, TQError] = {}

        def run(name: str, _) -> None:
            try:
                found[name] = self.node(name).list()
            except TQError as e:
                failed[name] = e

        parallel([(name, None) for name in self.cluster.names], run)
        if failed:
            name, e = next(iter(sorted(failed.items())))
            raise type(e)(f"node {name}: {e.message}")
        return sorted((m for infos in found.values() for m in infos),
                      key=lambda m: (m.index_id, m.matrix_type))

    def health(self) -> dict[str, dict[str, Any]]:
        """Each node's Health, by name; a node that cannot be reached has ``status``
        ``"UNAVAILABLE"`` and the error's ``code`` and ``message``."""
        return self._each("health")

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """Each node's Stats, by name (as :meth:`health` for a node that failed)."""
        return self._each("server_stats")

    def _each(self, method: str, *args) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}

        def run(name: str, _) -> None:
            try:
                out[name] = getattr(self.node(name), method)(*args)
            except TQError as e:
                out[name] = {"success": False, "status": "UNAVAILABLE" if isinstance(
                    e, Unavailable) else "FAILED", "code": e.code, "message": e.message}

        parallel([(name, None) for name in self.cluster.names], run)
        return {name: out[name] for name in self.cluster.names}
