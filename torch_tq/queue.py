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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch_tq.backends import io_error
from torch_tq.errors import InvalidArgument, NotFound, Unavailable
from torch_tq.protocol import GROUP_RE
from torch_tq.store import Store, now_ms

log = logging.getLogger(__name__)
_U64 = struct.Struct("<Q")

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
            if self._requeue(group, index_id):
                group.redelivered += 1

    def _requeue(self, group: _Group, index_id: int) -> bool:
        """Puts an index_id no longer leased back at the front of the line (it waited
        longest), if every required type is still stored; returns whether it did."""
        if not group.types <= self.store.types_of(index_id):
            return False
        group.ready[index_id] = None
        group.ready.move_to_end(index_id, last=False)
        return True

    def _is_drained(self, group: _Group, now: float) -> bool:
        """Nothing ready, nothing more coming, and every lease still held is *fresh* (granted
        or renewed within half its term: its holder is alive, as far as anyone can tell).
        A stale lease may be a dead consumer's, whose index_ids come back when it runs out,
        so a group with one is not drained yet."""
        if not group.types <= self._finished or group.ready:
            return False
        return all(now - renewed < term / 2 for _, _, renewed, term in group.leased.values())

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
    ) -> dict[str, Any]:
        """Leases up to ``max_items`` ready index_ids, waiting up to ``wait_s`` for one.

        ``ack`` acknowledges earlier index_ids first (one round trip for both).
        """
        acked = self.ack(name, ack, delete) if ack else None
        deadline = time.monotonic() + wait_s
        with self._cv:
            group = self._group(name, types)
            group.requests += 1
            while True:
                if self._closed:
                    raise Unavailable("the server is shutting down")
                now = time.monotonic()
                self._expire(group, now)
                if group.ready:
                    lease = secrets.token_hex(8)
                    expires = now + lease_s
                    items = []
                    while group.ready and len(items) < max_items:
                        index_id, _ = group.ready.popitem(last=False)
                        group.leased[index_id] = (lease, expires, now, lease_s)
                        heapq.heappush(group.expiries, (expires, index_id, lease))
                        items.append(index_id)
                    group.delivered += len(items)
                    reply = {"items": items, "lease": lease,
                             "lease_expires_at": now_ms() + int(lease_s * 1000),
                             "finished": False, "drained": False}
                    break
                drained = self._is_drained(group, now)
                if drained or now >= deadline:
                    # Drained: nothing ready and nothing more coming, though live consumers
                    # may still hold leases; finished: not even those.
                    reply = {"items": [], "lease": None, "lease_expires_at": None,
                             "finished": self._is_finished(group), "drained": drained}
                    break
                wake = deadline
                if group.expiries:
                    wake = min(wake, group.expiries[0][0])
                self._cv.wait(max(0.0, wake - now))
        if acked is not None:
            reply["acked"] = acked
        return reply

    def ack(self, name: str, ids: list[int], delete: bool = False) -> dict[str, Any]:
        """Consumes ``ids`` for the group: never handed out to it again.

        Returns which were newly acknowledged, which were already, and which the group never
        held (those change nothing). With ``delete``, every matrix of the newly acknowledged
        index_ids is deleted afterwards (for the last stage of a pipeline).
        """
        with self._cv:
            if self._closed:
                raise Unavailable("the server is shutting down")
            group = self._group(name, None)
            new, already, unknown = [], [], []
            for index_id in dict.fromkeys(ids):
                if index_id in group.consumed:
                    already.append(index_id)
                elif index_id in group.leased or index_id in group.ready:
                    new.append(index_id)
                else:
                    unknown.append(index_id)
            self._append_journal(group, new)  # durable before it counts
            for index_id in new:
                group.consumed.add(index_id)
                group.leased.pop(index_id, None)
                group.ready.pop(index_id, None)
            if new:
                self._cv.notify_all()  # a group may have just finished
        deleted = 0
        if delete:
            for index_id in new:
                try:
                    deleted += len(self.store.delete(index_id))
                except NotFound:
                    pass
        return {"acked": new, "already": already, "unknown": unknown, "deleted": deleted}

    def renew(self, name: str, ids: list[int], lease_s: float) -> dict[str, Any]:
        """Extends the leases of ``ids`` by ``lease_s`` from now (a consumer's heartbeat for
        what it holds); returns the ids that were leased."""
        with self._cv:
            group = self._group(name, None)
            now = time.monotonic()
            self._expire(group, now)
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
            }

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
