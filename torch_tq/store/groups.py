"""Consumer groups: the queue semantics on top of the store.

A *consumer group* (``"actor_update"``) names a set of required matrix types. An index_id is
*ready* for the group once every required type is stored and the group has not consumed it.
:meth:`Queue.consume` hands ready index_ids out under a *lease*; :meth:`Queue.ack` consumes
them for good; a lease that runs out without an ack puts its index_ids back at the front of
the line (at-least-once delivery; an acknowledged index_id is never handed out again to that
group). :meth:`Queue.consume` long-polls: it waits, up to its timeout, for a producer to
complete an item instead of returning empty at once.

Producers mark the types they write *finished* (:meth:`Queue.finish`). A group whose
required types are all finished and which has nothing ready is *drained*: ``consume`` answers
at once, empty, with ``drained: true`` (other consumers may still hold leases, and a consumer
that waited for those could block a DataLoader that waits, in order, for it). Once nothing is
leased either, the group is *finished* (``finished: true``).

State that must survive a restart of a ``disk`` store lives under ``<data_dir>/queue/``:
each group's required types (``groups/<name>/types.json``, written atomically), its
consumed index_ids (``groups/<name>/acked.u64``, an append-only journal of little-endian
uint64, fsynced before an ack is answered) and the finished types (``finished.json``).
Ready sets are rebuilt from the store's catalog; leases are not kept (after a restart every
unacknowledged index_id is ready again, which at-least-once allows).

The group's lock is a leaf below the store's per-index_id write locks: the store calls
:meth:`Queue._on_change` with those held, and the queue never calls into a store write while
holding its own lock.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import secrets
import shutil
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch_tq.store.backends import io_error
from torch_tq.errors import InvalidArgument, NotFound, Unavailable
from torch_tq.model import GROUP_RE, Key
from torch_tq.store.rounds import RoundSpec, form_round
from torch_tq.store.engine import Store, now_ms

log = logging.getLogger(__name__)
_U64 = struct.Struct("<Q")

@dataclass(eq=False)  # shares are compared by identity (deque.remove)
class _Share:
    """One dp rank's share of a round: leased as one, read by each member rank of it."""

    token: str
    dp_rank: int
    round: int
    ids: list[int]
    taken: set[int] = field(default_factory=set)  # member ranks that took it
    acked: dict[int, set[int]] = field(default_factory=dict)  # index_id -> ranks that acked
    pending: bool = True  # in its dp rank's pending line: not yet taken by every member


@dataclass
class _Deal:
    """A group being dealt in rounds: what the dealing is, and the shares not yet taken by
    every member of their dp rank."""

    spec: RoundSpec
    pending: list[deque[_Share]]  # per dp rank
    shares: dict[int, _Share] = field(default_factory=dict)  # index_id -> its share, until consumed
    dp_of: dict[int, int] = field(default_factory=dict)  # rank -> the dp rank it claimed
    rounds: int = 0
    sizes: dict[int, float] = field(default_factory=dict)  # balance_by values read so far
    left_logged: int = -1  # the remainder last warned about
    oversize_logged: bool = False

    def idle(self) -> bool:
        return not self.shares


@dataclass
class _Group:
    name: str
    types: frozenset[str]
    ready: OrderedDict[int, None] = field(default_factory=OrderedDict)
    # index_id -> (lease token, deadline, last renewal, term), times from time.monotonic()
    leased: dict[int, tuple[str, float, float, float]] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)
    expiries: list[tuple[float, int, str]] = field(default_factory=list)  # heap
    delivered: int = 0
    redelivered: int = 0
    requests: int = 0
    journal: Any = None
    deal: _Deal | None = None

    def holds(self, index_id: int) -> bool:
        return index_id in self.consumed or index_id in self.leased or index_id in self.ready


class Queue:
    """The consumer groups of one store.

    Args:
        store: the store whose catalog decides readiness.
        state_dir: where groups, acknowledgements and finished marks persist (``None``: in
            RAM only, for the memory store).
        durable: fsync the journal and state files before answering.
    """

    def __init__(self, store: Store, state_dir: str | None = None, durable: bool = True) -> None:
        self.store = store
        self.state_dir = state_dir
        self.durable = durable
        self._cv = threading.Condition(threading.Lock())
        self._groups: dict[str, _Group] = {}
        self._finished: set[str] = set()
        self._closed = False
        if state_dir is not None:
            self._load()
        store.add_listener(self._on_change)

    # ------------------------------------------------------------------ persistence

    def _group_dir(self, name: str) -> str:
        assert self.state_dir is not None
        return os.path.join(self.state_dir, "groups", name)

    def _write_json(self, path: str, obj: Any) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.durable:
            _fsync_dir(os.path.dirname(path))

    def _load(self) -> None:
        assert self.state_dir is not None
        groups_dir = os.path.join(self.state_dir, "groups")
        if not os.path.isdir(groups_dir):
            os.makedirs(groups_dir)
            if self.durable:
                _fsync_dir(self.state_dir)
                _fsync_dir(os.path.dirname(self.state_dir))
        try:
            with open(os.path.join(self.state_dir, "finished.json")) as f:
                self._finished = set(json.load(f)["types"])
        except FileNotFoundError:
            pass
        catalog = self.store.index_types()
        for name in sorted(os.listdir(groups_dir)):
            if not GROUP_RE.fullmatch(name):
                continue  # not ours
            gdir = os.path.join(groups_dir, name)
            try:
                with open(os.path.join(gdir, "types.json")) as f:
                    types = frozenset(json.load(f)["types"])
            except (OSError, ValueError, KeyError) as e:
                # a group whose creation never finished: it acknowledged nothing
                log.warning("removing incomplete consumer group %s: %s", name, e)
                shutil.rmtree(gdir, ignore_errors=True)
                continue
            group = _Group(name, types)
            group.consumed = self._read_journal(os.path.join(gdir, "acked.u64"))
            group.journal = open(os.path.join(gdir, "acked.u64"), "ab")
            self._fill(group, catalog)
            self._groups[name] = group
        if self._groups:
            log.info("consumer groups: %s", ", ".join(
                f"{g.name} ({len(g.consumed)} consumed, {len(g.ready)} ready)"
                for g in self._groups.values()))

    @staticmethod
    def _read_journal(path: str) -> set[int]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set()
        whole = len(data) - len(data) % _U64.size
        if whole != len(data):
            # a torn append (crash mid-write) was never acknowledged: drop it
            with open(path, "r+b") as f:
                f.truncate(whole)
        return {v for (v,) in _U64.iter_unpack(data[:whole])}

    def _append_journal(self, group: _Group, ids: list[int]) -> None:
        if group.journal is None or not ids:
            return
        try:
            group.journal.write(b"".join(_U64.pack(i) for i in ids))
            group.journal.flush()
            if self.durable:
                os.fsync(group.journal.fileno())
        except OSError as e:
            raise io_error(e, f"acknowledge for group {group.name}") from None

    # ------------------------------------------------------------------ readiness

    def _fill(self, group: _Group, catalog: dict[int, frozenset[str]]) -> None:
        for index_id in sorted(catalog):
            if group.types <= catalog[index_id] and not group.holds(index_id):
                group.ready[index_id] = None

    def _on_change(self, index_id: int, present: frozenset[str]) -> None:
        with self._cv:
            woke = False
            for group in self._groups.values():
                if group.types <= present:
                    if not group.holds(index_id):
                        group.ready[index_id] = None
                        woke = True
                else:
                    group.ready.pop(index_id, None)
            if woke:
                self._cv.notify_all()

    def _expire(self, group: _Group, now: float) -> None:
        while group.expiries and group.expiries[0][0] <= now:
            deadline, index_id, lease = heapq.heappop(group.expiries)
            held = group.leased.get(index_id)
            if held is None or held[0] != lease or held[1] != deadline:
                continue  # acknowledged, released, renewed or leased again since
            del group.leased[index_id]
            self._unshare(group, index_id)
            if self._requeue(group, index_id):
                group.redelivered += 1

    @staticmethod
    def _unshare(group: _Group, index_id: int) -> None:
        """An index_id leaves its round's share (its lease ran out or was given back): the
        share is not handed to more members."""
        deal = group.deal
        share = deal.shares.pop(index_id, None) if deal is not None else None
        if share is not None and share.pending:
            deal.pending[share.dp_rank].remove(share)
            share.pending = False

    def _requeue(self, group: _Group, index_id: int) -> bool:
        """Puts an index_id no longer leased back at the front of the line (it waited
        longest), if every required type is still stored; returns whether it did."""
        if not group.types <= self.store.types_of(index_id):
            return False
        group.ready[index_id] = None
        group.ready.move_to_end(index_id, last=False)
        return True

    def _is_drained(self, group: _Group, now: float) -> bool:
        """Nothing ready, nothing more coming, and every lease still held is *fresh*."""
        if not group.types <= self._finished or group.ready:
            return False
        return self._leases_fresh(group, now)

    @staticmethod
    def _leases_fresh(group: _Group, now: float) -> bool:
        """Every lease is granted or renewed within half its term: its holder is alive, as
        far as anyone can tell. A stale lease may be a dead consumer's, whose index_ids come
        back when it runs out, so a group with one is not drained yet."""
        return all(now - renewed < term / 2 for _, _, renewed, term in group.leased.values())

    # ------------------------------------------------------------------ rounds

    def _join_deal(self, group: _Group, spec: RoundSpec) -> None:
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
            deal = group.deal = _Deal(spec, [deque() for _ in range(spec.dp_size)])
        claimed = deal.dp_of.setdefault(spec.rank, spec.dp_rank)
        if claimed != spec.dp_rank:
            raise InvalidArgument(
                f"rank {spec.rank} of group {group.name!r} said dp_rank {claimed} before and "
                f"now {spec.dp_rank}")

    def _weight(self, group: _Group, spec: RoundSpec) -> Any:
        if spec.unit == "matrix":
            return lambda index_id: 1
        first = min(group.types)

        def rows(index_id: int) -> int:
            try:
                shape = self.store.get(Key(index_id, first)).shape
            except NotFound:  # deleted a moment ago: its removal from ready waits for our lock
                return 0  # weightless; the consumer finds it gone and gives it back
            return shape[0] if shape else 1
        return rows

    def _sizer(self, group: _Group, spec: RoundSpec) -> Any:
        if spec.balance_by is None:
            return None
        deal = group.deal
        assert deal is not None

        def size(index_id: int) -> float:
            if index_id not in deal.sizes:
                deal.sizes[index_id] = self._read_size(Key(index_id, spec.balance_by))
            return deal.sizes[index_id]
        return size

    def _read_size(self, key: Key) -> float:
        """The sum of a small matrix's values (0 when it is missing or not numeric)."""
        import pyarrow.compute as pc

        try:
            reader = self.store.open(key)
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

    def _deal_next(self, group: _Group, spec: RoundSpec, now: float,
                   lease_s: float) -> dict[str, Any] | None:
        """The next share for ``spec.rank``: one dealt before that it has not taken, or the
        share of a new round; ``None`` when no round can be filled now."""
        deal = group.deal
        assert deal is not None
        pending = deal.pending[spec.dp_rank]
        self._renew_pending(group, pending, now, lease_s)
        share = next((s for s in pending if spec.rank not in s.taken), None)
        if share is None:
            shares, oversize = form_round(
                group.ready, group.ready.__contains__, spec, self._weight(group, spec),
                self._sizer(group, spec))
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
                made = _Share(secrets.token_hex(8), dp_rank, deal.rounds, ids)
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

    def _renew_pending(self, group: _Group, shares: Any, now: float, lease_s: float) -> None:
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

    def _log_left(self, group: _Group) -> None:
        deal = group.deal
        if deal is not None and deal.left_logged != len(group.ready) and group.ready:
            log.warning("group %s: %d ready index_id(s) cannot fill a last round of %s; they "
                        "stay in the group for a later run", group.name, len(group.ready),
                        deal.spec.describe())
            deal.left_logged = len(group.ready)

    def _is_finished(self, group: _Group) -> bool:
        return group.types <= self._finished and not group.ready and not group.leased

    def _group(self, name: str, types: frozenset[str] | None) -> _Group:
        group = self._groups.get(name)
        if group is not None:
            if types is not None and types != group.types:
                raise InvalidArgument(
                    f"consumer group {name!r} requires types {sorted(group.types)}, not "
                    f"{sorted(types)} (delete the group to change them)"
                )
            return group
        if types is None:
            raise NotFound(f"consumer group not found: {name}")
        group = _Group(name, types)
        if self.state_dir is not None:
            gdir = self._group_dir(name)
            try:
                os.makedirs(gdir, exist_ok=True)
                group.journal = open(os.path.join(gdir, "acked.u64"), "ab")
                # types.json's rename and fsync of gdir also make the journal's entry durable
                self._write_json(os.path.join(gdir, "types.json"), {"types": sorted(types)})
                if self.durable:
                    _fsync_dir(os.path.dirname(gdir))  # the group directory's own entry
            except OSError as e:
                if group.journal is not None:
                    group.journal.close()
                raise io_error(e, f"create consumer group {name}") from None
        self._fill(group, self.store.index_types())
        self._groups[name] = group
        return group

    # ------------------------------------------------------------------ the operations

    def consume(
        self,
        name: str,
        types: frozenset[str] | None,
        max_items: int,
        wait_s: float,
        lease_s: float,
        ack: Sequence[int] = (),
        delete: bool = False,
        rounds: RoundSpec | None = None,
    ) -> dict[str, Any]:
        """Leases up to ``max_items`` ready index_ids, waiting up to ``wait_s`` for one.

        ``ack`` acknowledges earlier index_ids first (one round trip for both). With
        ``rounds``, the group is dealt in rounds (:mod:`torch_tq.store.rounds`): the reply is the
        next share of the consumer's dp rank that its rank has not taken yet (``max_items``
        does not apply), ``drained`` once no further round can be filled, with ``left`` the
        ready index_ids that stay in the group.
        """
        acked = self.ack(name, ack, delete, rank=rounds.rank if rounds else None) if ack else None
        deadline = time.monotonic() + wait_s
        with self._cv:
            group = self._group(name, types)
            group.requests += 1
            if rounds is not None:
                self._join_deal(group, rounds)
            while True:
                if self._closed:
                    raise Unavailable("the server is shutting down")
                now = time.monotonic()
                self._expire(group, now)
                if rounds is not None:
                    reply = self._deal_next(group, rounds, now, lease_s)
                    drained = reply is None and (group.types <= self._finished
                                                 and self._leases_fresh(group, now))
                else:
                    reply = self._lease_ready(group, now, max_items, lease_s)
                    drained = reply is None and self._is_drained(group, now)
                if reply is not None:
                    break
                if drained or now >= deadline:
                    # Drained: nothing ready (or, in rounds, nothing that fills a round) and
                    # nothing more coming, though live consumers may still hold leases;
                    # finished: not even those.
                    reply = {"items": [], "lease": None, "lease_expires_at": None,
                             "finished": self._is_finished(group), "drained": drained}
                    if rounds is not None:
                        reply["left"] = len(group.ready)
                        if drained:
                            self._log_left(group)
                    break
                wake = deadline
                if group.expiries:
                    wake = min(wake, group.expiries[0][0])
                self._cv.wait(max(0.0, wake - now))
        if acked is not None:
            reply["acked"] = acked
        return reply

    @staticmethod
    def _lease_ready(group: _Group, now: float, max_items: int,
                     lease_s: float) -> dict[str, Any] | None:
        """Leases up to ``max_items`` of the oldest ready index_ids (``None``: none ready)."""
        if not group.ready:
            return None
        lease = secrets.token_hex(8)
        expires = now + lease_s
        items = []
        while group.ready and len(items) < max_items:
            index_id, _ = group.ready.popitem(last=False)
            group.leased[index_id] = (lease, expires, now, lease_s)
            heapq.heappush(group.expiries, (expires, index_id, lease))
            items.append(index_id)
        group.delivered += len(items)
        return {"items": items, "lease": lease,
                "lease_expires_at": now_ms() + int(lease_s * 1000),
                "finished": False, "drained": False}

    def ack(self, name: str, ids: list[int], delete: bool = False,
            rank: int | None = None) -> dict[str, Any]:
        """Consumes ``ids`` for the group: never handed out to it again.

        Returns which were newly acknowledged, which were already, and which the group never
        held (those change nothing). With ``delete``, every matrix of the newly acknowledged
        index_ids is deleted afterwards (for the last stage of a pipeline). An index_id dealt
        in rounds to a dp rank of several members is consumed once every member ``rank`` has
        acknowledged it (until then it is listed in ``waiting``); an ack without a rank
        consumes it at once.
        """
        with self._cv:
            if self._closed:
                raise Unavailable("the server is shutting down")
            group = self._group(name, None)
            deal = group.deal
            new, already, unknown, waiting = [], [], [], []
            for index_id in dict.fromkeys(ids):
                if index_id in group.consumed:
                    already.append(index_id)
                elif index_id in group.leased or index_id in group.ready:
                    share = deal.shares.get(index_id) if deal is not None else None
                    if share is not None and rank is not None and deal.spec.members > 1:
                        by = share.acked.setdefault(index_id, set())
                        by.add(rank)
                        if len(by) < deal.spec.members:
                            waiting.append(index_id)
                            continue
                    new.append(index_id)
                else:
                    unknown.append(index_id)
            self._append_journal(group, new)  # durable before it counts
            for index_id in new:
                group.consumed.add(index_id)
                group.leased.pop(index_id, None)
                group.ready.pop(index_id, None)
                if deal is not None:
                    self._unshare(group, index_id)
            if new:
                self._cv.notify_all()  # a group may have just finished
        deleted = 0
        if delete:
            for index_id in new:
                try:
                    deleted += len(self.store.delete(index_id))
                except NotFound:
                    pass
        reply = {"acked": new, "already": already, "unknown": unknown, "deleted": deleted}
        if waiting:
            reply["waiting"] = waiting
        return reply

    def renew(self, name: str, ids: list[int], lease_s: float,
              dp_rank: int | None = None) -> dict[str, Any]:
        """Extends the leases of ``ids`` by ``lease_s`` from now (a consumer's heartbeat for
        what it holds); returns the ids that were leased. With ``dp_rank``, the shares dealt
        to that dp rank and not yet taken keep their leases too."""
        with self._cv:
            group = self._group(name, None)
            now = time.monotonic()
            self._expire(group, now)
            deal = group.deal
            if dp_rank is not None and deal is not None and dp_rank < len(deal.pending):
                self._renew_pending(group, deal.pending[dp_rank], now, lease_s)
            renewed = []
            for index_id in dict.fromkeys(ids):
                held = group.leased.get(index_id)
                if held is None:
                    continue
                deadline = now + lease_s
                group.leased[index_id] = (held[0], deadline, now, lease_s)
                heapq.heappush(group.expiries, (deadline, index_id, held[0]))
                renewed.append(index_id)
        return {"renewed": renewed}

    def release(self, name: str, ids: list[int]) -> dict[str, Any]:
        """Gives leased ids back at once (a consumer that stops early)."""
        with self._cv:
            group = self._group(name, None)
            released = []
            for index_id in reversed(list(dict.fromkeys(ids))):
                if group.leased.pop(index_id, None) is None:
                    continue
                self._unshare(group, index_id)
                self._requeue(group, index_id)
                released.append(index_id)
            if released:
                self._cv.notify_all()
        return {"released": released[::-1]}

    def finish(self, types: frozenset[str], finished: bool = True) -> dict[str, Any]:
        """Marks ``types`` finished (no more will be written), or open again."""
        with self._cv:
            new = self._finished | types if finished else self._finished - types
            if self.state_dir is not None and new != self._finished:
                try:
                    self._write_json(os.path.join(self.state_dir, "finished.json"),
                                     {"types": sorted(new)})
                except OSError as e:
                    raise io_error(e, "mark types finished") from None
            self._finished = new
            self._cv.notify_all()
            return {"finished_types": sorted(self._finished)}

    def status(self, name: str) -> dict[str, Any]:
        """Progress of one group: ready, leased and consumed counts; finished or not."""
        with self._cv:
            group = self._group(name, None)
            self._expire(group, time.monotonic())
            incomplete = sum(
                1 for i, t in self.store.index_types().items()
                if t & group.types and not group.types <= t and i not in group.consumed
            )
            return {
                "group": group.name,
                "types": sorted(group.types),
                "ready": len(group.ready),
                "leased": len(group.leased),
                "consumed": len(group.consumed),
                "incomplete": incomplete,
                "delivered": group.delivered,
                "redelivered": group.redelivered,
                "requests": group.requests,
                "finished": self._is_finished(group),
                "drained": self._is_drained(group, time.monotonic()),
                "finished_types": sorted(self._finished),
                **self._deal_status(group),
            }

    @staticmethod
    def _deal_status(group: _Group) -> dict[str, Any]:
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

    def groups(self) -> list[str]:
        with self._cv:
            return sorted(self._groups)

    def delete_group(self, name: str) -> dict[str, Any]:
        """Forgets a group and everything it consumed (its next use starts afresh)."""
        with self._cv:
            group = self._group(name, None)
            del self._groups[name]
            if group.journal is not None:
                group.journal.close()
            if self.state_dir is not None:
                try:
                    os.remove(os.path.join(self._group_dir(name), "types.json"))
                    if self.durable:
                        _fsync_dir(self._group_dir(name))
                except OSError as e:
                    raise io_error(e, f"delete consumer group {name}") from None
                shutil.rmtree(self._group_dir(name), ignore_errors=True)
            self._cv.notify_all()
        return {"deleted": name}

    def close(self) -> None:
        """Wakes every waiting consumer with UNAVAILABLE; closes the journals."""
        with self._cv:
            self._closed = True
            for group in self._groups.values():
                if group.journal is not None:
                    group.journal.close()
                    group.journal = None
            self._cv.notify_all()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
