"""The training-loop side: ``DataLoader(TQDataset(...))`` for trainers, ``TensorSink`` for producers.

:class:`TQDataset` reads matrices either for a fixed set of index_ids (sharded across ranks
and DataLoader workers, optionally shuffled per epoch, resumable mid-epoch) or as a stream
from a consumer group (the server hands each index_id to exactly one consumer as soon as
every required type is present; see :mod:`torch_tq.store.groups`).

:class:`TensorSink` writes from a background thread, with bounded memory in flight.

Both hold only picklable configuration: the :class:`~torch_tq.Client` is created lazily in
the process that iterates (a DataLoader worker, say) and rebuilt after a fork.
"""

from __future__ import annotations

import copy
import logging
import queue as queue_mod
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.utils.data

from torch_tq.protocol import commands as protocol
from torch_tq.client.client import Client
from torch_tq.errors import InvalidArgument, NotFound, TQError

log = logging.getLogger(__name__)

_END = object()


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


def _dist_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class TQDataset(torch.utils.data.IterableDataset):
    """Matrices from a torch_tq server as dicts of tensors, for ``torch.utils.data.DataLoader``.

    Each item is ``{matrix_type: tensor, ..., "index_id": int}`` (with ``unit="sample"``, one
    item per row of the first dimension, plus ``"row"``).

    Two modes:

    * **fixed** (``index_ids=`` a list or range): split across ``world_size`` ranks as
      ``torch.utils.data.DistributedSampler`` splits, so that every rank yields the same
      number of items per epoch (``len(dataset)``) and takes the same number of steps:
      ``drop_last=False`` (default) pads the epoch by repeating index_ids from the start of
      its order, ``drop_last=True`` drops the tail; a rank's share is then split across the
      DataLoader's workers. ``shuffle=True`` permutes with ``seed + epoch`` (call
      :meth:`set_epoch`);
      :meth:`state_dict` / :meth:`load_state_dict` resume mid-epoch (torchdata's
      ``StatefulDataLoader`` calls them in each worker).
    * **streaming** (``group=``): the server leases ready index_ids of the consumer group;
      iteration ends when producers have finished the types (:meth:`TensorSink.finish`) and
      nothing is left to lease, or after ``idle_timeout`` seconds without an item. With one
      rank, whichever worker asks first gets the next ready index_ids. With ``world_size >
      1`` (or ``dp_size=``) the server deals the group in *rounds* (:mod:`torch_tq.store.rounds`):
      each round gives every data-parallel rank a share of ``batch_size`` items (one
      DataLoader batch; :meth:`loader` passes it on), so every rank takes the same number of
      steps and all end at the same step; ranks of one dp rank (``dp_rank=``, ``dp_size=``:
      tensor- or pipeline-parallel peers) receive the same items in the same order;
      ``group_by=n`` keeps index_ids ``i // n`` in one share (GRPO's n responses of a
      prompt); ``balance_by=`` a matrix type holding a size (a sequence length) balances a
      round's shares by it. The index_ids of a last round that cannot be filled stay in the
      group for a later run, and a warning says how many. With ``num_workers > 0`` pass
      ``in_order=False`` to the DataLoader: an in-order loader waits for each worker in turn
      even while another worker holds ready items. With ``ack="auto"`` an index_id is
      acknowledged once it has been handed on (to the loop, or to the DataLoader's queue from
      a worker); with ``ack="manual"`` the training loop calls :meth:`ack`, and anything
      not acknowledged within ``lease`` seconds is delivered again.

    Args:
        location: the server (``grpc://HOST:PORT``); default as for :class:`Client`.
        types: the matrix types to read for each index_id.
        index_ids: fixed mode: the index_ids to read.
        group: streaming mode: the consumer group name.
        rank, world_size: this process's rank (default: ``torch.distributed`` when
            initialized, else 0 of 1).
        dp_rank, dp_size: streaming: its data-parallel rank (default: ``rank`` of
            ``world_size``); the ``world_size // dp_size`` ranks of one dp rank read the same
            items. Fixed mode deals by ``dp_rank`` of ``dp_size`` likewise.
        batch_size: the per-rank DataLoader batch size (items, or samples with
            ``unit="sample"``): streaming rounds deal shares of this size so that each
            DataLoader batch is one share. :meth:`loader` sets it.
        group_by: streaming rounds: ``n`` keeps index_ids ``i // n`` in one share.
        balance_by: streaming rounds: a matrix type whose value (its sum) is an index_id's
            size; a round's shares are balanced by it.
        rounds: streaming: deal in rounds (default: when ``dp_size > 1``).
        shuffle, seed: fixed mode: permute the order each epoch.
        drop_last: fixed mode: drop the tail that would not give every rank the same
            count, instead of padding it with index_ids from the start of the epoch.
        unit: ``"matrix"`` (one item per index_id) or ``"sample"`` (one per row).
        prefetch: items fetched ahead by a background thread (0: none).
        lease, batch_items, poll: streaming: lease seconds, index_ids leased per request
            (in rounds: one share per request), long-poll seconds per request.
        idle_timeout: streaming: stop after this many seconds without an item (``None``:
            wait until producers finish).
        warn_after: streaming: after this many seconds without an item (default 30, and
            again every as many), log a warning saying why, as the server sees the group:
            index_ids missing some of the types, leases held by others, a group that has
            consumed everything already (a re-run), finished types. ``None``: never.
        delete_after_ack: streaming: delete an index_id's matrices once acknowledged, so the
            store does not grow without bound (for the last stage of a pipeline).
        ack: streaming: ``"auto"`` or ``"manual"``.
        pin_memory: return tensors in page-locked memory (when CUDA is available).
        device: move tensors there (e.g. ``"cuda"``) before yielding them.
        client_options: keyword arguments for the :class:`Client` (``timeout``, ...).
    """

    def __init__(
        self,
        location: str | None = None,
        types: Iterable[str] = ("prompt",),
        *,
        index_ids: Iterable[int] | None = None,
        group: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        dp_rank: int | None = None,
        dp_size: int | None = None,
        batch_size: int | None = None,
        group_by: int | None = None,
        balance_by: str | None = None,
        rounds: bool | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        unit: str = "matrix",
        prefetch: int = 2,
        lease: float = 60.0,
        batch_items: int = 2,
        poll: float = 2.0,
        idle_timeout: float | None = None,
        warn_after: float | None = 30.0,
        delete_after_ack: bool = False,
        ack: str = "auto",
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(types, str):
            types = [types]
        self.types = [protocol.validate_matrix_type(t) for t in types]
        if not self.types or len(set(self.types)) != len(self.types):
            raise InvalidArgument(f"types must be distinct matrix types, got {self.types}")
        if (index_ids is None) == (group is None):
            raise InvalidArgument("give exactly one of index_ids= (fixed mode) or group= (streaming)")
        if index_ids is not None:
            ids = index_ids if isinstance(index_ids, range) else [
                protocol.validate_index_id(i) for i in index_ids
            ]
            if isinstance(ids, range) and len(ids):
                ends = (ids[0], ids[-1])
                if min(ends) < 0 or max(ends) > protocol.MAX_INDEX_ID:
                    raise InvalidArgument(f"{ids} holds index_ids outside [0, 2**64-1]")
            if not isinstance(ids, range) and len(set(ids)) != len(ids):
                raise InvalidArgument("index_ids holds duplicates")
            self.index_ids: range | list[int] | None = ids
            self.group = None
        else:
            self.index_ids = None
            self.group = protocol.validate_group(group)
        if shuffle and self.group is not None:
            raise InvalidArgument(
                "shuffle=True is for fixed mode (index_ids=): a stream comes in the order "
                "producers complete it")
        if ack == "manual" and self.group is None:
            raise InvalidArgument(
                "ack='manual' is for streaming mode (group=): fixed mode acknowledges nothing")
        if unit not in ("matrix", "sample"):
            raise InvalidArgument(f"unit must be 'matrix' or 'sample', got {unit!r}")
        if ack not in ("auto", "manual"):
            raise InvalidArgument(f"ack must be 'auto' or 'manual', got {ack!r}")
        if rank is None or world_size is None:
            d_rank, d_world = _dist_rank_world()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is outside [0, world_size={world_size})")
        dp_size = world_size if dp_size is None else int(dp_size)
        if dp_size < 1 or world_size % dp_size:
            raise InvalidArgument(f"dp_size={dp_size} must divide world_size={world_size}")
        dp_rank = rank // (world_size // dp_size) if dp_rank is None else int(dp_rank)
        if not 0 <= dp_rank < dp_size:
            raise InvalidArgument(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if group_by is not None and (callable(group_by) or isinstance(group_by, bool)
                                     or not isinstance(group_by, int) or group_by < 1):
            raise InvalidArgument(
                f"group_by takes a count n (index_ids i // n stay together, GRPO's n "
                f"responses of a prompt), got {group_by!r:.60}: the server deals the rounds "
                "and runs no code of the caller's")
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        if balance_by is not None:
            balance_by = protocol.validate_matrix_type(balance_by)
        if rounds is None:
            rounds = dp_size > 1 or group_by is not None or balance_by is not None
        if (group_by or balance_by) and not rounds:
            raise InvalidArgument("group_by= and balance_by= apply to rounds (rounds=True)")
        if (group_by or balance_by) and self.group is None:
            raise InvalidArgument("group_by= and balance_by= are for streaming mode (group=)")
        self.location = location
        self.rank = rank
        self.world_size = world_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.batch_size = int(batch_size) if batch_size is not None else None
        self.group_by = group_by
        self.balance_by = balance_by
        self.rounds = bool(rounds) and self.group is not None
        if (self.rounds and group_by and self.batch_size and unit == "matrix"
                and self.batch_size % group_by):
            raise InvalidArgument(
                f"batch_size={self.batch_size} is not a multiple of group_by={group_by}: "
                "a batch holds whole groups")
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.unit = unit
        self.prefetch = max(0, int(prefetch))
        self.lease = float(lease)
        self.batch_items = int(batch_items)
        self.poll = float(poll)
        self.idle_timeout = idle_timeout
        self.warn_after = float(warn_after) if warn_after else None
        self.delete_after_ack = delete_after_ack
        self.ack_mode = ack
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self.client_options = dict(client_options or {})
        self.epoch = 0
        self._position = (0, 0)  # fixed mode: (items, rows of the next item) yielded this epoch
        self._client: Client | None = None

    # ------------------------------------------------------------------ pickling, state

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # a connection never crosses a process boundary
        return state

    def _get_client(self) -> Client:
        if self._client is None:
            self._client = Client(self.location, **self.client_options)
        return self._client

    def set_epoch(self, epoch: int) -> None:
        """Fixed mode: the epoch whose order to use (with ``shuffle``); a new epoch starts
        from its beginning (the same epoch keeps a position loaded by :meth:`load_state_dict`)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._position = (0, 0)

    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands: epoch and position (fixed mode; streaming keeps its state
        on the server)."""
        return {"epoch": self.epoch, "items": self._position[0], "rows": self._position[1]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from :meth:`state_dict`: the next iteration continues right after it."""
        self.epoch = int(state["epoch"])
        self._position = (int(state["items"]), int(state["rows"]))

    def ack(self, index_ids: Iterable[int]) -> dict[str, Any]:
        """Streaming with ``ack="manual"``: acknowledges ``index_ids`` (from any process)."""
        if self.group is None:
            raise InvalidArgument("ack() is for streaming mode (group=)")
        ids = [int(i) for i in index_ids]
        return self._get_client().ack(self.group, ids, delete=self.delete_after_ack,
                                      rank=self.rank if self.rounds else None)

    def loader(self, batch_size: int | None = 1, num_workers: int = 0,
               **kwargs: Any) -> torch.utils.data.DataLoader:
        """The ``DataLoader`` this dataset wants: workers started with ``forkserver`` (a
        forked worker of a process that used gRPC could hang), ``in_order=False`` in
        streaming mode (an in-order loader waits for each worker in turn while another
        holds ready items), ``pin_memory`` left to the dataset (it receives into pinned
        memory itself). Other keywords go to the ``DataLoader`` as they are.

        Example:
            >>> for batch in TQDataset(location, ["prompt"], group="g").loader(  # doctest: +SKIP
            ...         batch_size=8, num_workers=2):
            ...     ...
        """
        dataset = self
        if batch_size is not None and self.batch_size != batch_size:
            if self.batch_size is not None:
                raise InvalidArgument(
                    f"loader(batch_size={batch_size}) differs from the dataset's "
                    f"batch_size={self.batch_size}")
            dataset = copy.copy(self)  # told the batch size: a round's share is one batch
            dataset.batch_size = int(batch_size)
        if num_workers:
            kwargs.setdefault("multiprocessing_context", "forkserver")
            if self.group is not None:
                kwargs.setdefault("in_order", False)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                           num_workers=num_workers, **kwargs)

    def round_spec(self) -> dict[str, Any] | None:
        """Streaming: what this dataset asks the server's rounds for (``None``: no rounds)."""
        if not self.rounds:
            return None
        unit = self.unit if self.batch_size is not None else "matrix"
        share = self.batch_size or (self.group_by or 1)
        spec: dict[str, Any] = {"rank": self.rank, "world_size": self.world_size,
                                "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                                "share": share, "unit": unit, "group_by": self.group_by or 1}
        if self.balance_by is not None:
            spec["balance_by"] = self.balance_by
        return spec

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

    def __bool__(self) -> bool:  # a dataset is never false, with a length or without one
        return True

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

    # ------------------------------------------------------------------ reading

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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("TQDataset(pin_memory=True) without CUDA: tensors stay pageable",
                          stacklevel=2)
        if self.group is None:
            return self._iter_fixed()
        return self._iter_stream()

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
        source = _Prefetcher(lambda: ((self._fetch(client, i), r) for i, r in runs),
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
        source = _Prefetcher(lambda: (self._fetch(client, i) for i in todo), self.prefetch)
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

    def _iter_stream(self) -> Iterator[dict[str, Any]]:
        stream = _Stream(self, self._get_client())
        source = _Prefetcher(stream.items, self.prefetch)
        try:
            for item in source:
                if self.unit == "matrix":
                    stream.handed(item["index_id"])
                    yield item
                    continue
                rows = list(self._rows(item, 0))
                for i, (_, sample) in enumerate(rows):
                    if i == len(rows) - 1:
                        stream.handed(item["index_id"])
                    yield sample
                if not rows:
                    stream.handed(item["index_id"])
        finally:
            source.close()
            stream.close()


class _Stream:
    """Streaming mode's conversation with the server: leases, fetches, acknowledgements."""

    def __init__(self, dataset: TQDataset, client: Client) -> None:
        self.ds = dataset
        self.client = client
        self._lock = threading.Lock()
        self._to_ack: list[int] = []
        self._first_unacked = 0.0
        self._unhanded: dict[int, None] = {}  # leased here, not handed on yet
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None

    def _heartbeat(self) -> None:
        """Renews the leases this consumer holds (prefetched, or handed on but not yet
        acknowledged), so a slow training step never lets them run out and go to another
        consumer; a consumer that dies stops renewing, and its leases run out."""
        period = self.ds.lease / 3
        rounds = self.ds.rounds
        while not self._stop.wait(period):
            with self._lock:
                held = list(self._unhanded) + self._to_ack
            if not held and not rounds:
                continue
            try:
                # in rounds, also the shares dealt to this dp rank that it has not taken yet
                self.client.renew(self.ds.group, held, self.ds.lease,
                                  dp_rank=self.ds.dp_rank if rounds else None)
            except TQError as e:
                log.warning("renewing leases of group %s: %s", self.ds.group, e)

    def handed(self, index_id: int) -> None:
        with self._lock:
            self._unhanded.pop(index_id, None)
            if self.ds.ack_mode != "auto":
                return
            if not self._to_ack:
                self._first_unacked = time.monotonic()
            self._to_ack.append(index_id)
            # Acks ride on the next lease request; when the loop is slow and the prefetcher
            # has nothing to ask for, send them before their leases could run out.
            late = time.monotonic() - self._first_unacked > min(1.0, self.ds.lease / 4)
        if late:
            self.flush()

    def _take_acks(self) -> list[int]:
        with self._lock:
            acks, self._to_ack = self._to_ack, []
        return acks

    def _explain_wait(self, waited: float) -> None:
        """Logs why nothing has come for ``waited`` seconds, as the server sees the group."""
        ds = self.ds
        try:
            status = self.client.group_status(ds.group)
        except TQError as e:
            log.warning("group %s: nothing to read for %.0fs, and its status cannot be had: %s",
                        ds.group, waited, e)
            return
        reasons = []
        if status.get("incomplete"):
            reasons.append(f"{status['incomplete']} index_id(s) have some of the types "
                           f"{status['types']} but not all: is a producer of the others "
                           "running?")
        if status.get("rounds") and status.get("ready"):
            reasons.append(f"{status['ready']} ready index_id(s) wait to fill a round of "
                           f"{status['rounds']['dealing']}")
        if status.get("leased"):
            reasons.append(f"{status['leased']} index_id(s) are leased by other consumers")
        done = sorted(set(status.get("finished_types", ())) & set(status["types"]))
        if status.get("consumed") and not status.get("ready") and not status.get("leased"):
            reasons.append(
                f"the group has consumed {status['consumed']} index_id(s) already (a re-run?"
                f" 'torch-tq group reset {ds.group}' or Client.delete_group('{ds.group}') "
                "starts it afresh)")
        if done:
            reasons.append(f"types {done} are marked finished (TensorSink.finish); "
                           "Client.reopen(types) clears that")
        if not reasons:
            reasons.append(f"nothing of the types {status['types']} has been written yet")
        log.warning("group %s: nothing to read for %.0fs: %s", ds.group, waited,
                    "; ".join(reasons))

    def _first_of_rank(self) -> bool:
        info = torch.utils.data.get_worker_info()
        return info is None or info.id == 0

    def items(self) -> Iterator[dict[str, Any]]:
        ds = self.ds
        spec = ds.round_spec()
        info = torch.utils.data.get_worker_info()
        if (spec is not None and ds.batch_size is None and info is not None
                and info.num_workers > 1 and info.id == 0):
            log.warning(
                "TQDataset(group=%r) on %d ranks with %d DataLoader workers does not know the "
                "per-rank batch size, so ranks may end with different numbers of partial "
                "batches: build the loader with TQDataset.loader(batch_size=...) or pass "
                "batch_size=", ds.group, ds.world_size, info.num_workers)
        idle_since = time.monotonic()
        next_warning = idle_since + ds.warn_after if ds.warn_after else None
        if spec is not None:
            self._start_heart()  # it keeps this dp rank's dealt shares while the loop is slow
        while True:
            acks = self._take_acks()
            try:
                lease = self.client.consume(
                    ds.group, ds.types, max_items=ds.batch_items, timeout=ds.poll,
                    lease=ds.lease, ack=acks, delete=ds.delete_after_ack, rounds=spec,
                )
            except BaseException:
                with self._lock:
                    self._to_ack[:0] = acks
                raise
            if lease.drained:
                # Nothing ready and nothing more coming: end, even if live consumers still
                # hold leases (waiting for those could block a DataLoader that waits, in
                # order, for this worker while they sit in another worker's queue). Stale
                # leases, perhaps a dead consumer's, keep the group undrained until they
                # run out and come back here.
                if lease.left and ds.rank == 0 and self._first_of_rank():
                    log.warning(
                        "group %s: %d ready index_id(s) could not fill a last round (one "
                        "share of %s per data-parallel rank); they stay in the group for a "
                        "later run", ds.group, lease.left, spec["share"] if spec else 1)
                return
            if not lease.index_ids:
                now = time.monotonic()
                if ds.idle_timeout is not None and now - idle_since >= ds.idle_timeout:
                    return
                if next_warning is not None and now >= next_warning:
                    self._explain_wait(now - idle_since)
                    next_warning = now + ds.warn_after
                continue
            idle_since = time.monotonic()
            if ds.warn_after:
                next_warning = idle_since + ds.warn_after
            with self._lock:
                self._unhanded.update(dict.fromkeys(lease.index_ids))
            self._start_heart()
            for index_id in lease.index_ids:
                try:
                    item = ds._fetch(self.client, index_id)
                except NotFound:
                    # deleted since it was leased: nothing to deliver
                    log.warning("index_id %d of group %s vanished after its lease", index_id, ds.group)
                    with self._lock:
                        self._unhanded.pop(index_id, None)
                    self.client.release(ds.group, [index_id])
                    continue
                yield item

    def _start_heart(self) -> None:
        with self._lock:
            if self._heart is None:
                self._heart = threading.Thread(target=self._heartbeat, daemon=True,
                                               name="torch_tq-lease-heartbeat")
                self._heart.start()

    def flush(self) -> None:
        acks = self._take_acks()
        if acks:
            self.client.ack(self.ds.group, acks, delete=self.ds.delete_after_ack,
                            rank=self.ds.rank if self.ds.rounds else None)

    def close(self) -> None:
        """Acknowledges what was handed on and gives back what was leased but not."""
        self._stop.set()
        if self._heart is not None:
            self._heart.join()
        try:
            self.flush()
            with self._lock:
                back, self._unhanded = list(self._unhanded), {}
            if back:
                self.client.release(self.ds.group, back)
        except TQError as e:
            log.warning("closing the stream of group %s: %s (leases will expire)", self.ds.group, e)


class _Prefetcher:
    """Runs ``make()`` (an iterator factory) in a background thread, ``depth`` items ahead.

    With ``depth == 0`` it iterates in the caller's thread. Errors re-raise in the caller.
    """

    def __init__(self, make, depth: int) -> None:
        self._make = make
        self._depth = depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._q: queue_mod.Queue | None = None

    def __iter__(self) -> Iterator[Any]:
        if self._depth == 0:
            yield from self._make()
            return
        self._q = queue_mod.Queue(self._depth)
        self._thread = threading.Thread(target=self._run, daemon=True, name="torch_tq-prefetch")
        self._thread.start()
        while True:
            got = self._q.get()
            if got is _END:
                return
            if isinstance(got, _Failure):
                raise got.error
            yield got

    def _put(self, value: Any) -> bool:
        assert self._q is not None
        while not self._stop.is_set():
            try:
                self._q.put(value, timeout=0.1)
                return True
            except queue_mod.Full:
                continue
        return False

    def _run(self) -> None:
        it = self._make()
        try:
            for value in it:
                if not self._put(value):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer
            self._put(_Failure(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class TensorSink:
    """Writes matrices from a background thread, with bounded bytes in flight.

    ``write()`` returns at once (it blocks only while ``max_inflight_bytes`` are already
    waiting: backpressure, not unbounded memory); :meth:`flush` waits for everything written
    so far and re-raises the first failure, naming the item it concerned; :meth:`finish`
    marks the types written as finished for consumer groups.

    Tensors are sent as they are when ``write`` returns to the caller's view: do not modify
    a tensor after writing it until :meth:`flush` returns (pass ``copy=True`` to write a
    snapshot instead).

    Example:
        >>> with TensorSink("grpc://127.0.0.1:8080") as sink:  # doctest: +SKIP
        ...     sink.write(7, {"prompt": p, "resp": r})
        ...     sink.finish()
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        max_inflight_bytes: int = 1 << 30,
        copy: bool = False,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.location = location
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.copy = copy
        self.client_options = dict(client_options or {})
        self._cv = threading.Condition()
        self._pending: list[tuple[int, str, torch.Tensor, int]] = []
        self._inflight = 0  # bytes queued or being sent
        self._error: BaseException | None = None
        self._error_item: tuple[int, str] | None = None
        self._closed = False
        self._written_types: set[str] = set()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None

    def __getstate__(self):
        raise TypeError("a TensorSink holds a sending thread: create one in each process")

    def _get_client(self) -> Client:
        if self._client is None:
            self._client = Client(self.location, **self.client_options)
        return self._client

    def write(self, index_id: int, matrices: Mapping[str, torch.Tensor]) -> None:
        """Queues ``{matrix_type: tensor}`` for ``index_id``; returns once queued.

        Raises:
            InvalidArgument: a bad key or a non-tensor (checked here, before queueing).
            TQError: an earlier write failed (the first failure, raised once).
        """
        index_id = protocol.validate_index_id(index_id)
        items = []
        for mtype, tensor in matrices.items():
            mtype = protocol.validate_matrix_type(mtype)
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgument(f"{mtype} of index_id={index_id} is not a torch.Tensor")
            if self.copy:
                tensor = tensor.detach().clone()
            items.append((index_id, mtype, tensor, tensor.numel() * tensor.element_size()))
        with self._cv:
            self._raise_pending()
            if self._closed:
                raise InvalidArgument("write() on a closed TensorSink")
            for item in items:
                # Wait while the bytes in flight would exceed the bound (one item always fits).
                while self._inflight and self._inflight + item[3] > self.max_inflight_bytes:
                    self._cv.wait()
                    self._raise_pending()
                self._pending.append(item)
                self._inflight += item[3]
                self._written_types.add(item[1])
            self._start()
            self._cv.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="torch_tq-sink")
            self._thread.start()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, item = self._error, self._error_item
            self._error = None
            assert item is not None
            if isinstance(error, TQError):
                raise type(error)(
                    f"TensorSink write of index_id={item[0]}, type={item[1]} failed: {error}"
                ) from error
            raise error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                index_id, mtype, tensor, nbytes = self._pending[0]
            try:
                self._get_client().put(index_id, mtype, tensor)
            except BaseException as e:
                with self._cv:
                    if self._error is None:
                        self._error, self._error_item = e, (index_id, mtype)
            with self._cv:
                self._pending.pop(0)
                self._inflight -= nbytes
                self._cv.notify_all()

    @property
    def inflight_bytes(self) -> int:
        """Bytes written but not yet stored."""
        with self._cv:
            return self._inflight

    def flush(self) -> None:
        """Waits until everything written so far is stored; re-raises the first failure."""
        with self._cv:
            while self._pending:
                self._cv.wait()
            self._raise_pending()

    def finish(self, types: Iterable[str] | None = None) -> list[str]:
        """Flushes, then marks ``types`` (default: every type this sink wrote) finished for
        consumer groups; returns every finished type."""
        self.flush()
        types = sorted(self._written_types) if types is None else list(types)
        if not types:
            raise InvalidArgument("finish(): no types written and none given")
        return self._get_client().finish(types)

    def close(self) -> None:
        """Flushes and stops the sending thread; re-raises the first failure."""
        try:
            self.flush()
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def __enter__(self) -> TensorSink:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass  # the exception already propagating says more
