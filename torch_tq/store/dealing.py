"""Dealing a consumer group in rounds (:mod:`torch_tq.store.rounds` forms them): the
shares dealt to each data-parallel rank, who has taken and acknowledged them, and their
leases. Called by :class:`~torch_tq.store.groups.Queue` with its lock held."""

from __future__ import annotations

import heapq
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch_tq.errors import InvalidArgument, NotFound
from torch_tq.model import Key
from torch_tq.store.format import now_ms
from torch_tq.store.rounds import RoundSpec, form_round

if TYPE_CHECKING:
    from torch_tq.store.engine import Store
    from torch_tq.store.groups import Group

log = logging.getLogger("torch_tq.store.groups")


@dataclass(eq=False)  # shares are compared by identity (deque.remove)
class Share:
    """One dp rank's share of a round: leased as one, read by each member rank of it."""

    token: str
    dp_rank: int
    round: int
    ids: list[int]
    taken: set[int] = field(default_factory=set)  # member ranks that took it
    acked: dict[int, set[int]] = field(default_factory=dict)  # index_id -> ranks that acked
    pending: bool = True  # in its dp rank's pending line: not yet taken by every member


@dataclass
class Deal:
    """A group being dealt in rounds: what the dealing is, and the shares not yet taken by
    every member of their dp rank."""

    spec: RoundSpec
    pending: list[deque[Share]]  # per dp rank
    shares: dict[int, Share] = field(default_factory=dict)  # index_id -> its share, until consumed
    dp_of: dict[int, int] = field(default_factory=dict)  # rank -> the dp rank it claimed
    rounds: int = 0
    sizes: dict[int, float] = field(default_factory=dict)  # balance_by values read so far
    left_logged: int = -1  # the remainder last warned about
    oversize_logged: bool = False

    def idle(self) -> bool:
        return not self.shares


def unshare(group: Group, index_id: int) -> None:
    """An index_id leaves its round's share (its lease ran out or was given back): the
    share is not handed to more members."""
    deal = group.deal
    share = deal.shares.pop(index_id, None) if deal is not None else None
    if share is not None and share.pending:
        deal.pending[share.dp_rank].remove(share)
        share.pending = False


def join(group: Group, spec: RoundSpec) -> None:
    """Checks that ``spec`` agrees with the group's dealing (or starts a new one when
    nothing of the old is outstanding)."""
    deal = group.deal
    if deal is not None and deal.spec.dealing() != spec.dealing():
        if not deal.idle():
            raise InvalidArgument(
                f"consumer group {group.name!r} is being dealt in rounds of "
                f"{deal.spec.describe()} (world_size {deal.spec.world_size}); this consumer "
                f"asks for {spec.describe()} (world_size {spec.world_size}): every rank "
                "must pass the same world_size, dp_size, batch size, unit, group_by and "
                "balance_by")
        deal = None
    if deal is None:
        deal = group.deal = Deal(spec, [deque() for _ in range(spec.dp_size)])
    claimed = deal.dp_of.setdefault(spec.rank, spec.dp_rank)
    if claimed != spec.dp_rank:
        raise InvalidArgument(
            f"rank {spec.rank} of group {group.name!r} said dp_rank {claimed} before and "
            f"now {spec.dp_rank}")

def _weight(store: Store, group: Group, spec: RoundSpec) -> Any:
    if spec.unit == "matrix":
        return lambda index_id: 1
    first = min(group.types)

    def rows(index_id: int) -> int:
        try:
            shape = store.get(Key(index_id, first)).shape
        except NotFound:  # deleted a moment ago: its removal from ready waits for our lock
            return 0  # weightless; the consumer finds it gone and gives it back
        return shape[0] if shape else 1
    return rows

def _sizer(store: Store, group: Group, spec: RoundSpec) -> Any:
    if spec.balance_by is None:
        return None
    deal = group.deal
    assert deal is not None

    def size(index_id: int) -> float:
        if index_id not in deal.sizes:
            deal.sizes[index_id] = _read_size(store, Key(index_id, spec.balance_by))
        return deal.sizes[index_id]
    return size

def _read_size(store: Store, key: Key) -> float:
    """The sum of a small matrix's values (0 when it is missing or not numeric)."""
    import pyarrow.compute as pc

    try:
        reader = store.open(key)
    except NotFound:
        return 0.0
    if reader.dtype.name == "bfloat16" or reader.numel > 1 << 16:
        reader.close()
        return float(reader.numel)
    total = 0.0
    for batch in reader.batches():
        value = pc.sum(batch.column(0)).as_py()
        total += float(value or 0)
    return total

def next_share(store: Store, group: Group, spec: RoundSpec, now: float,
               lease_s: float) -> dict[str, Any] | None:
    """The next share for ``spec.rank``: one dealt before that it has not taken, or the
    share of a new round; ``None`` when no round can be filled now."""
    deal = group.deal
    assert deal is not None
    pending = deal.pending[spec.dp_rank]
    renew_pending(group, pending, now, lease_s)
    share = next((s for s in pending if spec.rank not in s.taken), None)
    if share is None:
        shares, oversize = form_round(
            group.ready, group.ready.__contains__, spec, _weight(store, group, spec),
            _sizer(store, group, spec))
        if oversize and not deal.oversize_logged:
            log.warning("group %s: %d unit(s) of ready index_ids weigh more than a share "
                        "(%s) and can never be dealt", group.name, oversize,
                        spec.describe())
            deal.oversize_logged = True
        if shares is None:
            return None
        deal.rounds += 1
        expires = now + lease_s
        for dp_rank, ids in enumerate(shares):
            made = Share(secrets.token_hex(8), dp_rank, deal.rounds, ids)
            for index_id in ids:
                del group.ready[index_id]
                deal.sizes.pop(index_id, None)
                group.leased[index_id] = (made.token, expires, now, lease_s)
                heapq.heappush(group.expiries, (expires, index_id, made.token))
                deal.shares[index_id] = made
            deal.pending[dp_rank].append(made)
        share = next(s for s in pending if spec.rank not in s.taken)
    share.taken.add(spec.rank)
    if len(share.taken) >= spec.members:
        pending.remove(share)
        share.pending = False
    group.delivered += len(share.ids)
    return {"items": list(share.ids), "lease": share.token,
            "lease_expires_at": now_ms() + int(lease_s * 1000),
            "finished": False, "drained": False, "round": share.round}

def renew_pending(group: Group, shares: Any, now: float, lease_s: float) -> None:
    """A member of a dp rank is alive: the shares dealt to that rank and not yet taken by
    every member keep their leases."""
    for share in shares:
        for index_id in share.ids:
            held = group.leased.get(index_id)
            # renewed within a quarter of its term already: fresh, and the heap of
            # expiries does not grow by an entry per request
            if held is not None and held[0] == share.token and (
                    now + lease_s - held[1] >= lease_s / 4):
                deadline = now + lease_s
                group.leased[index_id] = (held[0], deadline, now, held[3])
                heapq.heappush(group.expiries, (deadline, index_id, held[0]))

def log_left(group: Group) -> None:
    deal = group.deal
    if deal is not None and deal.left_logged != len(group.ready) and group.ready:
        log.warning("group %s: %d ready index_id(s) cannot fill a last round of %s; they "
                    "stay in the group for a later run", group.name, len(group.ready),
                    deal.spec.describe())
        deal.left_logged = len(group.ready)


def status(group: Group) -> dict[str, Any]:
    deal = group.deal
    if deal is None:
        return {}
    return {"rounds": {
        "dealing": deal.spec.describe(),
        "world_size": deal.spec.world_size,
        "dp_size": deal.spec.dp_size,
        "share": deal.spec.share,
        "unit": deal.spec.unit,
        "dealt": deal.rounds,
        "pending_shares": [len(p) for p in deal.pending],
    }}
