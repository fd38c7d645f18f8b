"""``DataLoader(TQDataset(...))``: the trainer's side.

:class:`TQDataset` reads matrices either for a fixed set of index_ids (sharded across ranks
and DataLoader workers, optionally shuffled per epoch, resumable mid-epoch) or as a stream
from a consumer group (the server hands each index_id to exactly one consumer as soon as
every required type is present; see :mod:`torch_tq.store.groups`). Fixed mode is
:mod:`torch_tq.integrations.fixed`, streaming :mod:`torch_tq.integrations.streaming`; the
producer's side, :class:`~torch_tq.TensorSink`, is :mod:`torch_tq.integrations.sink`.

Both hold only picklable configuration: the :class:`~torch_tq.Client` is created lazily in
the process that iterates (a DataLoader worker, say) and rebuilt after a fork.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.utils.data

from torch_tq.protocol import commands as protocol
from torch_tq.protocol.groups import validate_group
from torch_tq.client.client import Client
from torch_tq.cluster.cluster import Cluster, client_for
from torch_tq._fork import preload_in_forkserver
from torch_tq.errors import InvalidArgument
from torch_tq.integrations.fixed import FixedSet
from torch_tq.integrations.items import Items
from torch_tq.integrations.streaming import Prefetcher, Stream

log = logging.getLogger(__name__)

def _dist_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_groups_stay_on_a_node(location: Any, group_by: int | None) -> None:
    """Rounds with ``group_by=n`` over a cluster: each node deals whole groups of ``n``, so
    the ids ``i // n`` must share a node (a ``placement_key`` that is a multiple of ``n``);
    a group split over nodes would never be complete on any of them, and never dealt."""
    if isinstance(location, Cluster) and group_by and location.placement_key % group_by:
        raise InvalidArgument(
            f"group_by={group_by} over a cluster with placement_key="
            f"{location.placement_key}: a group's ids would be spread over nodes, and no node "
            f"could deal it whole; make the cluster with placement_key={group_by} (or a "
            "multiple of it)")


def _ranks(rank, world_size, dp_rank, dp_size) -> tuple[int, int, int, int]:
    """rank, world_size (default: torch.distributed's), dp_rank and dp_size, checked."""
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
    return rank, world_size, dp_rank, dp_size


def _checked_ids(index_ids: Iterable[int]) -> range | list[int]:
    """Fixed mode's index_ids: each in range, none twice (a range is checked at its ends)."""
    ids = index_ids if isinstance(index_ids, range) else [
        protocol.validate_index_id(i) for i in index_ids
    ]
    if isinstance(ids, range) and len(ids):
        ends = (ids[0], ids[-1])
        if min(ends) < 0 or max(ends) > protocol.MAX_INDEX_ID:
            raise InvalidArgument(f"{ids} holds index_ids outside [0, 2**64-1]")
    if not isinstance(ids, range) and len(set(ids)) != len(ids):
        raise InvalidArgument("index_ids holds duplicates")
    return ids


class TQDataset(FixedSet, Items, torch.utils.data.IterableDataset):
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
        location: the server (``grpc://HOST:PORT``); default as for :class:`Client`. Or a
            :class:`torch_tq.Cluster`: each item is read from the node that owns it, a group
            leased from every node (with ``rounds``, each node deals its own rounds:
            :mod:`torch_tq.cluster.rounds`).
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
        prefetch: items fetched ahead by a background thread (0: none; streaming keeps at
            least a lease of ``batch_items`` ahead, fetched with one ``get_many``).
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
            self.index_ids: range | list[int] | None = _checked_ids(index_ids)
            self.group = None
        else:
            self.index_ids = None
            self.group = validate_group(group)
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
        rank, world_size, dp_rank, dp_size = _ranks(rank, world_size, dp_rank, dp_size)
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
        _check_groups_stay_on_a_node(location, group_by if self.rounds else None)
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
            self._client = client_for(self.location, self.client_options)
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
            if kwargs["multiprocessing_context"] == "forkserver":
                preload_in_forkserver()
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

    def __bool__(self) -> bool:  # a dataset is never false, with a length or without one
        return True

    # ------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("TQDataset(pin_memory=True) without CUDA: tensors stay pageable",
                          stacklevel=2)
        if self.group is None:
            return self._iter_fixed()
        return self._iter_stream()

    def _iter_stream(self) -> Iterator[dict[str, Any]]:
        stream = Stream(self, self._get_client())
        # a whole lease ahead: the next lease and its fetch overlap this one's items
        source = Prefetcher(stream.items, max(self.prefetch, self.batch_items)
                            if self.prefetch else 0)
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


