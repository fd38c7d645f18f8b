"""How one index_id becomes what a :class:`~torch_tq.TQDataset` yields: its types fetched
(into shared memory in a DataLoader worker, onto a device, pinned), and with
``unit="sample"`` one item per row of the first dimension."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

from torch_tq.client.client import Client
from torch_tq.errors import InvalidArgument


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
