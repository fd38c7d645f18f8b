"""Fixed mode of :class:`~torch_tq.TQDataset` (``index_ids=``): a set of index_ids dealt across
data-parallel ranks as ``DistributedSampler`` deals, split across DataLoader workers,
shuffled per epoch, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils.data

from torch_tq.errors import NotFound

from torch_tq.integrations.streaming import Prefetcher


def _deal(ids: Any, rank: int, world: int, per_rank: int) -> Any:
    """``DistributedSampler``'s dealing: ``ids`` padded from its start (or cut) to
    ``per_rank * world``, then every ``world``-th from ``rank``."""
    if world == 1:
        return ids
    total = per_rank * world
    if total > len(ids):  # pad from the start of the epoch's order
        ids = list(ids)
        ids += (ids * -(-(total - len(ids)) // len(ids)))[: total - len(ids)]
    return ids[rank:total:world]


class FixedSet:
    """The fixed-mode half of :class:`~torch_tq.TQDataset` (mixed into it)."""

    # ------------------------------------------------------------------ sharding

    def _per_rank(self) -> int:
        """Fixed mode: how many index_ids each dp rank takes per epoch."""
        n, world = len(self.index_ids), self.dp_size
        return n // world if self.drop_last else -(-n // world)

    def __len__(self) -> int:
        """Fixed mode with ``unit="matrix"``: the items this rank yields per epoch (the same
        on every rank).

        Raises:
            TypeError: streaming mode, or ``unit="sample"`` (the rows are not known before
                the matrices are read), as ``len()`` of a dataset without a length does.
        """
        if self.index_ids is None:
            raise TypeError("a streaming TQDataset (group=) has no length")
        if self.unit != "matrix":
            raise TypeError("a TQDataset with unit='sample' has no length before it is read")
        return self._per_rank()

    def rank_ids(self) -> list[int] | range:
        """Fixed mode: this rank's index_ids for the current epoch, in order (as
        ``DistributedSampler`` deals them: the epoch's order padded or cut to a multiple of
        ``world_size``, then every ``world_size``-th from ``rank``)."""
        assert self.index_ids is not None
        ids = self.index_ids
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(ids), generator=g).tolist()
            ids = [ids[i] for i in perm]
        return _deal(ids, self.dp_rank, self.dp_size, self._per_rank())

    def shard_ids(self) -> list[int] | range:
        """Fixed mode: this rank's and DataLoader worker's index_ids for the current epoch,
        in order: the rank's share (:meth:`rank_ids`) split across the workers."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank_ids()[worker::workers]

    def shard_samples(self, rows: Mapping[int, int] | None = None) -> list[tuple[int, int]]:
        """Fixed mode with ``unit="sample"``: this rank's and worker's ``(index_id, row)``
        pairs for the current epoch. The epoch's rows (in its order of index_ids) are dealt
        across dp ranks as ``DistributedSampler`` deals, so every rank yields the same number
        of samples; an index_id's rows may then go to more than one rank. ``rows``: each
        index_id's first dimension (default: asked of the server in one listing)."""
        assert self.index_ids is not None
        if rows is None:
            first = self.types[0]
            rows = {m.index_id: (m.shape[0] if m.shape else 1)
                    for m in self._get_client().list() if m.matrix_type == first}
        order = self.index_ids
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        missing = [i for i in order if i not in rows]
        if missing:
            raise NotFound(f"matrix not found: index_id={missing[0]}, type={self.types[0]} "
                           f"({len(missing)} of the dataset's index_ids have no {self.types[0]})")
        samples = [(i, r) for i in order for r in range(rows[i])]
        n, world = len(samples), self.dp_size
        per_rank = n // world if self.drop_last else -(-n // world)
        mine = _deal(samples, self.dp_rank, world, per_rank) if samples else []
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return list(mine[worker::workers])

    def _iter_fixed_samples(self) -> Iterator[dict[str, Any]]:
        """Fixed mode, ``unit="sample"``, several dp ranks: samples dealt, not index_ids."""
        pairs = self.shard_samples()
        start = self._position[0]
        client = self._get_client()
        runs: list[tuple[int, list[int]]] = []  # consecutive rows of one index_id
        for index_id, row in pairs[start:]:
            if runs and runs[-1][0] == index_id:
                runs[-1][1].append(row)
            else:
                runs.append((index_id, [row]))
        source = Prefetcher(lambda: ((self._fetch(client, i), r) for i, r in runs),
                             self.prefetch)
        n = start
        try:
            for item, wanted in source:
                samples = dict(self._rows(item, 0))
                for row in wanted:
                    n += 1
                    self._position = (n, 0)
                    yield samples[row]
        finally:
            source.close()
        self._position = (0, 0)

    def _iter_fixed(self) -> Iterator[dict[str, Any]]:
        if self.unit == "sample" and self.dp_size > 1:
            yield from self._iter_fixed_samples()
            return
        ids = self.shard_ids()
        start, skip_rows = self._position
        client = self._get_client()
        todo = ids[start:]
        source = Prefetcher(lambda: (self._fetch(client, i) for i in todo), self.prefetch)
        try:
            for n, item in enumerate(source, start):
                if self.unit == "matrix":
                    self._position = (n + 1, 0)
                    yield item
                    continue
                for row, sample in self._rows(item, skip_rows):
                    self._position = (n, row + 1)
                    yield sample
                skip_rows = 0
                self._position = (n + 1, 0)
        finally:
            source.close()
        self._position = (0, 0)  # the epoch is complete: the next iteration starts afresh
