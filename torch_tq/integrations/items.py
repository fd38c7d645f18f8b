"""How one index_id becomes what a :class:`~torch_tq.TQDataset` yields: its types fetched
(into shared memory in a DataLoader worker, onto a device, pinned), and with
``unit="sample"`` one item per row of the first dimension."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

from torch_tq.client.client import Client
from torch_tq.errors import ERROR_CLASSES, InvalidArgument, NotFound, TQError


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
        makes (one per batch of items, in parallel streams); ``None`` for an index_id that
        is gone (some type not found). Onto a device or into pinned memory, item by item:
        :meth:`Client.get` receives straight into pooled page-locked blocks."""
        if self.device is not None or self.pin_memory:
            out: list[dict[str, Any] | None] = []
            for index_id in index_ids:
                try:
                    out.append(self._fetch(client, index_id))
                except NotFound:
                    out.append(None)
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
                else:
                    raise ERROR_CLASSES.get(r.code, TQError)(r.message)
            if item is not None:
                item["index_id"] = index_id
            out.append(item)
        return out

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
