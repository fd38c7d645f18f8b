"""How one index_id becomes what a :class:`~torch_tq.TQDataset` yields: its types fetched
(into shared memory in a DataLoader worker, onto a device, pinned), and with
``unit="sample"`` one item per row of the first dimension."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

from torch_tq.client.client import Client
from torch_tq.errors import ERROR_CLASSES, InvalidArgument, NotFound, TQError, Unavailable

# _fetch_many's mark for an item whose node (of a cluster) went away after its lease
UNREACHABLE: dict[str, Any] = {}


class Items:
    """Mixed into :class:`~torch_tq.TQDataset`: needs ``types``, ``device``, ``pin_memory``."""

    def _fetch(self, client: Client, index_id: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        # In a worker process, receive straight into shared memory: the DataLoader then
        # passes the tensor to the main process without copying it again.
        in_worker = torch.utils.data.get_worker_info() is not None and self.device is None
        for t in self.types:
            # device= and pin_memory= receive into pooled page-locked memory (torch_tq.pinned)
            item[t] = client.get(index_id, t, shared=in_worker and not self.pin_memory,
                                 device=self.device, pin_memory=self.pin_memory)
        item["index_id"] = index_id
        return item

    def _fetch_many(self, client: Client, index_ids: list[int]) -> list[dict[str, Any] | None]:
        """:meth:`_fetch` of many index_ids in as few calls as :meth:`Client.get_many`
        makes (one per batch of items, in parallel streams); :data:`UNREACHABLE` for one
        whose cluster node cannot be reached, ``None`` for an index_id that
        is gone (some type not found). Onto a device or into pinned memory, item by item:
        :meth:`Client.get` receives straight into pooled page-locked blocks."""
        if self.device is not None or self.pin_memory:
            out: list[dict[str, Any] | None] = []
            for index_id in index_ids:
                try:
                    out.append(self._fetch(client, index_id))
                except NotFound:
                    out.append(None)
                except Unavailable:
                    if not self._on_nodes():
                        raise
                    out.append(UNREACHABLE)
            return out
        types = list(self.types)
        results = client.get_many([(i, t) for i in index_ids for t in types],
                                  batch_items=max(1, len(index_ids) * len(types)))
        out = []
        for n, index_id in enumerate(index_ids):
            item: dict[str, Any] | None = {}
            for t, r in zip(types, results[n * len(types):(n + 1) * len(types)]):
                if r.success:
                    item[t] = r.tensor
                elif r.code == NotFound.code:
                    item = None
                    break
                elif r.code == Unavailable.code and self._on_nodes():
                    item = UNREACHABLE
                    break
                else:
                    raise ERROR_CLASSES.get(r.code, TQError)(r.message)
            if item is not None and item is not UNREACHABLE:
                item["index_id"] = index_id
            out.append(item)
        return out

    def _on_nodes(self) -> bool:
        """Whether this dataset reads a cluster: there, one node being away fails only its
        own items (see :data:`UNREACHABLE`); from one server it fails the read."""
        from torch_tq.cluster.cluster import Cluster

        return isinstance(self.location, Cluster)

    def _rows(self, item: dict[str, Any], skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
        lengths = {t: (item[t].shape[0] if item[t].dim() else None) for t in self.types}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise InvalidArgument(
                f"unit='sample' needs every type of index_id={item['index_id']} to share its "
                f"first dimension; got {lengths}"
            )
        for row in range(skip, next(iter(lengths.values()))):
            sample = {t: item[t][row] for t in self.types}
            sample["index_id"] = item["index_id"]
            sample["row"] = row
            yield row, sample
