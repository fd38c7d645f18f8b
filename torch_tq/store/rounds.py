"""Dealing a consumer group's ready index_ids in rounds, so that data-parallel ranks stay equal.

Data-parallel training runs a collective every step, so every rank must take the same number
of steps. A streaming consumer group that hands index_ids to whichever consumer asks first
cannot promise that; one that deals them in *rounds* can. A round gives each of ``dp_size``
data-parallel ranks one *share* of the same weight (``share`` index_ids, or ``share`` rows with
``unit="sample"``); a round is dealt only once it can be filled, so every rank receives the
same number of shares, and whatever cannot fill a last round stays in the group.

This module holds the pure part: what a round asks for (:class:`RoundSpec`) and how one is
formed from the ready index_ids (:func:`form_round`). :mod:`torch_tq.store.groups` keeps the state
(which shares each rank has taken, their leases and acknowledgements).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch_tq.errors import InvalidArgument
from torch_tq.model import validate_matrix_type

UNITS = ("matrix", "sample")
_FIELDS = {"rank", "world_size", "dp_rank", "dp_size", "share", "unit", "group_by", "balance_by"}


@dataclass(frozen=True)
class RoundSpec:
    """How a consumer wants its group dealt, and who it is.

    ``rank`` (of ``world_size``) names the consumer's process; ``dp_rank`` (of ``dp_size``)
    its data-parallel rank: the ``world_size // dp_size`` ranks of one dp rank (tensor- or
    pipeline-parallel peers) each receive every share dealt to it, in the same order.
    ``share`` is a share's weight: index_ids, or rows of the first dimension with
    ``unit="sample"``. With ``group_by=n``, the index_ids ``i // n`` stay in one share (GRPO's
    n responses of a prompt); with ``balance_by`` (a matrix type holding a size, e.g. a
    sequence length), a round's shares are balanced by the sum of those sizes.
    """

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    share: int = 1
    unit: str = "matrix"
    group_by: int = 1
    balance_by: str | None = None

    @property
    def members(self) -> int:
        """Ranks per data-parallel rank."""
        return self.world_size // self.dp_size

    def dealing(self) -> tuple:
        """What every consumer of one group must agree on (its identity aside)."""
        return (self.world_size, self.dp_size, self.share, self.unit, self.group_by,
                self.balance_by)

    def describe(self) -> str:
        what = "rows" if self.unit == "sample" else "index_ids"
        text = f"{self.dp_size} share(s) of {self.share} {what}"
        if self.members > 1:
            text += f", each read by {self.members} ranks"
        if self.group_by > 1:
            text += f", index_ids i//{self.group_by} together"
        if self.balance_by:
            text += f", balanced by {self.balance_by}"
        return text


def parse_spec(value: Any, max_share: int) -> RoundSpec:
    """A checked :class:`RoundSpec` from a request's ``rounds`` object.

    Raises:
        InvalidArgument: a missing, unknown or out-of-range field.
    """
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"rounds must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise InvalidArgument(f"rounds: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    for name in ("rank", "world_size"):
        if name not in value:
            raise InvalidArgument(f"rounds: missing field {name!r}")

    def integer(name: str, default: int, low: int, high: int) -> int:
        v = value.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise InvalidArgument(f"rounds.{name} must be an integer in [{low}, {high}], got {v!r:.40}")
        return v

    world = integer("world_size", 1, 1, 1 << 20)
    rank = integer("rank", 0, 0, world - 1)
    dp_size = integer("dp_size", world, 1, world)
    if world % dp_size:
        raise InvalidArgument(f"rounds.dp_size={dp_size} does not divide world_size={world}")
    dp_rank = integer("dp_rank", rank // (world // dp_size), 0, dp_size - 1)
    share = integer("share", 1, 1, max_share)
    group_by = integer("group_by", 1, 1, max_share)
    unit = value.get("unit", "matrix")
    if unit not in UNITS:
        raise InvalidArgument(f"rounds.unit must be one of {list(UNITS)}, got {unit!r:.40}")
    if unit == "matrix" and share % group_by:
        raise InvalidArgument(
            f"rounds.share={share} is not a multiple of group_by={group_by}: a share holds "
            "whole groups")
    balance_by = value.get("balance_by")
    if balance_by is not None:
        balance_by = validate_matrix_type(balance_by)
    return RoundSpec(rank, world, dp_rank, dp_size, share, unit, group_by, balance_by)


def form_round(
    ready: Iterable[int],
    is_ready: Callable[[int], bool],
    spec: RoundSpec,
    weight: Callable[[int], int],
    size: Callable[[int], float] | None = None,
) -> tuple[list[list[int]] | None, int]:
    """Forms one round from the ready index_ids, or finds that none can be formed yet.

    ``ready`` is the ready index_ids in the order they became ready (the oldest first);
    ``weight(i)`` an index_id's weight (1, or its rows); ``size(i)`` its size for balancing.
    Units (an index_id, or with ``group_by`` a complete group) are taken oldest first and
    placed so that each of the ``dp_size`` shares reaches exactly ``spec.share``; a unit that
    fits no share is passed over (it stays ready). With ``size``, the units chosen are then
    re-dealt largest first to the share with the least size so far that has room.

    Returns:
        ``(shares, oversize)``: one list of index_ids per dp rank (``None`` when the ready ids
        cannot fill a round), and how many units weigh more than a whole share (they can
        never be dealt).
    """
    bins = spec.dp_size
    room = [spec.share] * bins
    placed: list[list[list[int]]] = [[] for _ in range(bins)]
    chosen: list[tuple[list[int], int]] = []
    oversize = 0
    full = 0
    seen: set[int] = set()
    n = spec.group_by
    for index_id in ready:
        if n > 1:
            key = index_id // n
            if key in seen:
                continue
            seen.add(key)
            unit = [key * n + j for j in range(n)]
            if not all(is_ready(i) for i in unit):
                continue  # an incomplete group waits for the rest of it
        else:
            unit = [index_id]
        w = sum(weight(i) for i in unit)
        if w > spec.share:
            oversize += 1
            continue
        # first fit into the share with the least room left that still takes it: fills
        # shares one after another, as dealing cards does
        best = -1
        for b in range(bins):
            if w <= room[b] and (best < 0 or room[b] < room[best]):
                best = b
        if best < 0:
            continue
        room[best] -= w
        placed[best].append(unit)
        chosen.append((unit, w))
        if room[best] == 0:
            full += 1
            if full == bins:
                break
    if full < bins:
        return None, oversize
    if size is not None:
        placed = _balance(chosen, bins, spec.share, size) or placed
    return [[i for unit in units for i in unit] for units in placed], oversize


def _balance(chosen: list[tuple[list[int], int]], bins: int, capacity: int,
             size: Callable[[int], float]) -> list[list[list[int]]] | None:
    """Longest-processing-time dealing of the chosen units: largest first, each to the share
    with the least size so far among those with room; ``None`` if weights do not allow it."""
    sized = sorted(((sum(size(i) for i in unit), unit, w) for unit, w in chosen),
                   key=lambda t: -t[0])
    totals = [0.0] * bins
    room = [capacity] * bins
    out: list[list[list[int]]] = [[] for _ in range(bins)]
    for s, unit, w in sized:
        fits = [b for b in range(bins) if room[b] >= w]
        if not fits:
            return None
        b = min(fits, key=lambda b: (totals[b], b))
        totals[b] += s
        room[b] -= w
        out[b].append(unit)
    if any(room):
        return None
    for units in out:
        units.sort(key=lambda unit: unit[0])
    return out
