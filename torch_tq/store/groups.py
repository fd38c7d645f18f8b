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

State that must survive a restart of a ``disk`` store lives under ``<data_dir>/queue/``
(:mod:`torch_tq.store.journal`): each group's required types, its consumed index_ids (an
append-only journal, fsynced before an ack is answered) and the finished types. Rounds
are dealt by :mod:`torch_tq.store.dealing`. Ready sets are rebuilt from the store's catalog; leases are not kept (after a restart every
unacknowledged index_id is ready again, which at-least-once allows).

The group's lock is a leaf below the store's per-index_id write locks: the store calls
:meth:`Queue._on_change` with those held, and the queue never calls into a store write while
holding its own lock.
"""

from __future__ import annotations

import heapq
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch_tq.errors import InvalidArgument, NotFound, Unavailable
from torch_tq.store import dealing
from torch_tq.store.engine import Store
from torch_tq.store.format import now_ms
from torch_tq.store.journal import GroupJournal
from torch_tq.store.rounds import RoundSpec

log = logging.getLogger(__name__)


@dataclass
class Group:
    """One consumer group's state: what is ready, leased and consumed."""

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
    deal: dealing.Deal | None = None

    def holds(self, index_id: int) -> bool:
        return index_id in self.consumed or index_id in self.leased or index_id in self.ready

    def fill(self, catalog: dict[int, frozenset[str]]) -> None:
        """Makes ready every index_id of ``catalog`` that has the group's types."""
        for index_id in sorted(catalog):
            if self.types <= catalog[index_id] and not self.holds(index_id):
                self.ready[index_id] = None

    def counts(self) -> dict[str, Any]:
        return {"group": self.name, "types": sorted(self.types), "ready": len(self.ready),
                "leased": len(self.leased), "consumed": len(self.consumed),
                "delivered": self.delivered, "redelivered": self.redelivered,
                "requests": self.requests}

    def leases_fresh(self, now: float) -> bool:
        """Every lease is granted or renewed within half its term: its holder is alive, as
        far as anyone can tell. A stale lease may be a dead consumer's, whose index_ids come
        back when it runs out, so a group with one is not drained yet."""
        return all(now - renewed < term / 2 for _, _, renewed, term in self.leased.values())

    def lease(self, now: float, max_items: int, lease_s: float) -> dict[str, Any] | None:
        """Leases up to ``max_items`` of the oldest ready index_ids (``None``: none ready)."""
        if not self.ready:
            return None
        lease = secrets.token_hex(8)
        expires = now + lease_s
        items = []
        while self.ready and len(items) < max_items:
            index_id, _ = self.ready.popitem(last=False)
            self.leased[index_id] = (lease, expires, now, lease_s)
            heapq.heappush(self.expiries, (expires, index_id, lease))
            items.append(index_id)
        self.delivered += len(items)
        return {"items": items, "lease": lease,
                "lease_expires_at": now_ms() + int(lease_s * 1000),
                "finished": False, "drained": False}


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
        self._journal = GroupJournal(state_dir, durable) if state_dir is not None else None
        self._cv = threading.Condition(threading.Lock())
        self._groups: dict[str, Group] = {}
        self._finished: set[str] = set()
        self._closed = False
        if self._journal is not None:
            self._load()
        store.add_listener(self._on_change)

    def _load(self) -> None:
        self._finished, saved = self._journal.load()
        catalog = self.store.index_types()
        for name, types, consumed, journal in saved:
            group = Group(name, types, consumed=consumed, journal=journal)
            group.fill(catalog)
            self._groups[name] = group
        if self._groups:
            log.info("consumer groups: %s", ", ".join(
                f"{g.name} ({len(g.consumed)} consumed, {len(g.ready)} ready)"
                for g in self._groups.values()))

    # ------------------------------------------------------------------ readiness

    def _on_change(self, changes: list[tuple[int, frozenset[str]]]) -> None:
        """The store's changes (one, or a batch call's): the index_ids they make ready or
        unready; waiting consumers wake once, so a batch is leased whole, not item by item."""
        with self._cv:
            woke = False
            for index_id, present in changes:
                for group in self._groups.values():
                    if group.types <= present:
                        if not group.holds(index_id):
                            group.ready[index_id] = None
                            woke = True
                    else:
                        group.ready.pop(index_id, None)
            if woke:
                self._cv.notify_all()

    def _expire(self, group: Group, now: float) -> None:
        while group.expiries and group.expiries[0][0] <= now:
            deadline, index_id, lease = heapq.heappop(group.expiries)
            held = group.leased.get(index_id)
            if held is None or held[0] != lease or held[1] != deadline:
                continue  # acknowledged, released, renewed or leased again since
            del group.leased[index_id]
            dealing.unshare(group, index_id)
            if self._requeue(group, index_id):
                group.redelivered += 1

    def _requeue(self, group: Group, index_id: int) -> bool:
        """Puts an index_id no longer leased back at the front of the line (it waited
        longest), if every required type is still stored; returns whether it did."""
        if not group.types <= self.store.types_of(index_id):
            return False
        group.ready[index_id] = None
        group.ready.move_to_end(index_id, last=False)
        return True

    def _is_drained(self, group: Group, now: float) -> bool:
        """Nothing ready, nothing more coming, and every lease still held is *fresh*."""
        if not group.types <= self._finished or group.ready:
            return False
        return group.leases_fresh(now)

    def _is_finished(self, group: Group) -> bool:
        return group.types <= self._finished and not group.ready and not group.leased

    def _group(self, name: str, types: frozenset[str] | None) -> Group:
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
        group = Group(name, types)
        if self._journal is not None:
            group.journal = self._journal.create(name, types)
        group.fill(self.store.index_types())
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
                dealing.join(group, rounds)
            while True:
                if self._closed:
                    raise Unavailable("the server is shutting down")
                now = time.monotonic()
                self._expire(group, now)
                if rounds is not None:
                    reply = dealing.next_share(self.store, group, rounds, now, lease_s)
                    drained = reply is None and (group.types <= self._finished
                                                 and group.leases_fresh(now))
                else:
                    reply = group.lease(now, max_items, lease_s)
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
                            dealing.log_left(group)
                    break
                wake = deadline
                if group.expiries:
                    wake = min(wake, group.expiries[0][0])
                self._cv.wait(max(0.0, wake - now))
        if acked is not None:
            reply["acked"] = acked
        return reply

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
            if self._journal is not None:  # durable before it counts
                self._journal.append(group.journal, group.name, new)
            for index_id in new:
                group.consumed.add(index_id)
                group.leased.pop(index_id, None)
                group.ready.pop(index_id, None)
                if deal is not None:
                    dealing.unshare(group, index_id)
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
                dealing.renew_pending(group, deal.pending[dp_rank], now, lease_s)
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
                dealing.unshare(group, index_id)
                self._requeue(group, index_id)
                released.append(index_id)
            if released:
                self._cv.notify_all()
        return {"released": released[::-1]}

    def finish(self, types: frozenset[str], finished: bool = True) -> dict[str, Any]:
        """Marks ``types`` finished (no more will be written), or open again."""
        with self._cv:
            new = self._finished | types if finished else self._finished - types
            if self._journal is not None and new != self._finished:
                self._journal.save_finished(new)
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
            return {**group.counts(), "incomplete": incomplete,
                    "finished": self._is_finished(group),
                    "drained": self._is_drained(group, time.monotonic()),
                    "finished_types": sorted(self._finished), **dealing.status(group)}

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
            if self._journal is not None:
                self._journal.delete(name)
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



def group_counts(queue: Queue) -> list[dict[str, Any]]:
    """Every group's ready, leased and consumed counts, cheaply (no scan of the store):
    what a metrics scrape reads."""
    with queue._cv:
        return [group.counts() for group in queue._groups.values()]
