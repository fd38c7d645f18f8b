"""A cluster client's consumer-group calls: each node runs the group for the ids it owns;
consume leases from every node in turn and long-polls all of them at once; acks, renewals
and releases go to each id's node; finish, reopen and delete_group reach every node."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from torch_tq.client.results import Lease
from torch_tq.cluster.acks import ClusterAcks
from torch_tq.cluster.parallel import parallel
from torch_tq.errors import TQError, Unavailable

log = logging.getLogger(__name__)
# how long a consume waits for the other nodes once one has answered with ids (a node that
# is slow or down must not hold up the rest)
_GRACE_S = 0.25


class ClusterGroupCalls(ClusterAcks):
    """Mixed into :class:`~torch_tq.cluster.client.ClusterClient` (which supplies
    ``cluster``, ``node``, ``_per_node``, ``_lock``, ``_pool``, ``_busy``, ``_turn``,
    ``_down``, ``_unsent``, ``_acking``, ``_unseen``, ``_lease_s``, ``_rounds``)."""

    def consume(self, group: str, types: list[str] | None = None, *, max_items: int = 1,
                timeout: float = 0.0, lease: float = 60.0, ack: Iterable[int] = (),
                delete: bool = False, rounds: Mapping[str, Any] | None = None) -> Lease:
        """:meth:`Client.consume` over every node: each node runs the group for the ids it
        owns; this leases up to ``max_items`` of them, from every node in turn, and waits
        up to ``timeout`` on all nodes at once when none has any ready. ``ack`` goes to
        each id's node first (kept and sent again while that node is down). ``drained`` and
        ``finished`` only when every node says so: a node
        that cannot be reached keeps the group open (its ids may still come), while the
        others go on delivering.

        With ``rounds``, each node deals its own ids in rounds and the shares come one per
        call (:mod:`torch_tq.cluster.rounds`).
        """
        self._send_acks(group, list(ack), delete,
                        rank=None if rounds is None else rounds.get("rank"))
        self._lease_s[group] = lease
        if rounds is not None:
            return self._rounds.consume(group, types, timeout, lease, rounds)
        names = self.cluster.names
        start = self._turn % len(names)
        self._turn += 1
        order = names[start:] + names[:start]
        common = {"types": types, "lease": lease}
        # every node at once, without waiting: what is ready anywhere
        futures = self._submit_all(group, order, lambda name: lambda c: c.consume(
            group, max_items=max_items, timeout=0, **common))
        answers = self._gather(futures, group, until=time.monotonic() + 2.0)
        deadline = time.monotonic() + max(0.0, timeout)
        if not any(a is not None and a.index_ids for a in answers.values()) and timeout > 0:
            # nothing ready: wait on every node at once; the first with ids answers
            wait_s = max(0.0, deadline - time.monotonic())
            futures = self._submit_all(group, order, lambda name: lambda c: c.consume(
                group, max_items=max_items, timeout=wait_s, **common))
            answers = {**answers, **self._gather(futures, group, until=deadline + 5,
                                                 first=True)}
        return self._merge(group, order, answers, max_items)

    def _pool_of_calls(self) -> ThreadPoolExecutor:
        """The threads group calls run on (``self._lock`` held)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(3 * len(self.cluster.names) + 2,
                                            "torch_tq-cluster-groups")
        return self._pool

    def _is_busy(self, name: str) -> bool:
        busy = self._busy.get(name)
        return busy is not None and not busy.done()

    def _submit_all(self, group: str, order: list[str], make) -> dict[str, Future]:
        """``make(name)(client)`` on every node not busy with an earlier call, at once (a
        busy node answers nothing this time: the group stays undrained). Nor on a node
        that has not taken this client's acks of the group yet: a node back from a restart
        or a partition would lease again what was delivered but not acked there."""
        with self._lock:
            pool = self._pool_of_calls()
        owed = self._owes_acks(group)
        futures = {}
        for name in order:
            if not self._is_busy(name) and name not in owed:
                futures[name] = self._busy[name] = pool.submit(make(name), self.node(name))
        return futures

    def _gather(self, futures: dict[str, Future], group: str, until: float,
                first: bool = False, late=None) -> dict[str, Lease | None]:
        """Each node's lease by ``until`` (None: it is down, or did not answer in time;
        whatever it leases later goes to ``late(name, group, future)``, by default back to
        it). With ``first``, once one node has answered with ids the others get a moment
        (:data:`_GRACE_S`), no more."""
        late = late or self._give_back
        pending = set(futures.values())
        deadline = until
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            if first and any(f.exception() is None and f.result().index_ids for f in done):
                deadline = min(deadline, time.monotonic() + _GRACE_S)
        out: dict[str, Lease | None] = {}
        for name, future in futures.items():
            if not future.done():
                future.add_done_callback(lambda f, name=name: late(name, group, f))
                out[name] = None
                continue
            error = future.exception()
            if error is None:
                out[name] = future.result()
                if name in self._down:
                    self._down.discard(name)
                    log.warning("consumer group %s: node %s is back", group, name)
            elif isinstance(error, Unavailable):  # down: the others go on
                self._maybe_lost(group, name, error)
                # a fresh channel for the next call: one that failed to connect may not
                # notice the node is back for a long while (seen after Ray ran in-process)
                self.node(name).close()
                if name not in self._down:
                    self._down.add(name)
                    log.warning("consumer group %s: node %s cannot be reached (%s); the "
                                "other nodes go on, and the group stays open until it is "
                                "back", group, name, error.message)
                out[name] = None
            else:
                raise error
        return out

    def _give_back(self, name: str, group: str, future: Future) -> None:
        """A lease that came after its consume had returned: back to its node."""
        if future.cancelled():
            return
        if future.exception() is not None:
            self._maybe_lost(group, name, future.exception())
            return
        ids = future.result().index_ids
        if ids:
            try:
                self.node(name).release(group, ids)
            except TQError as e:  # its leases run out instead
                log.debug("could not give back %s on node %s: %s", ids, name, e)
                self._may_hold_until(group, name)

    def _maybe_lost(self, group: str, name: str, error: BaseException) -> None:
        """A consume on ``name`` timed out: the node may have leased ids whose answer never
        came (a partition drops replies, and the node, alive, holds the leases as fresh)."""
        if isinstance(error, Unavailable) and "timed out" in error.message:
            self._may_hold_until(group, name)

    def _may_hold_until(self, group: str, name: str) -> None:
        """Node ``name`` may hold leases of ``group`` that this client never saw: they come
        back when they run out, so until then the node's "drained" does not count."""
        until = time.monotonic() + self._lease_s.get(group, 60.0)
        with self._lock:
            self._unseen[(group, name)] = max(until, self._unseen.get((group, name), 0.0))

    def _holds_unseen(self, group: str, names: list[str]) -> bool:
        """Whether any of ``names`` may still hold leases this client never saw."""
        now = time.monotonic()
        with self._lock:
            return any(self._unseen.get((group, name), 0.0) > now for name in names)

    def _merge(self, group: str, order: list[str], answers: dict[str, Lease | None],
               max_items: int) -> Lease:
        """One lease of at most ``max_items`` ids, taken from the nodes in turn; what is
        over goes back to its node."""
        queues = {name: list(a.index_ids) for name, a in answers.items() if a is not None}
        taken: list[int] = []
        while len(taken) < max_items and any(queues.values()):
            for name in order:
                if queues.get(name) and len(taken) < max_items:
                    taken.append(queues[name].pop(0))
        for name, rest in queues.items():
            if rest:
                try:
                    self.node(name).release(group, rest)
                except TQError as e:  # gone meanwhile: the leases run out there instead
                    log.debug("could not give back %s on node %s: %s", rest, name, e)
                    self._may_hold_until(group, name)
        leases = [a for a in answers.values() if a is not None]
        reachable = len(leases) == len(order)  # every node answered this time
        expiries = [a.expires_at for a in leases if a.index_ids and a.expires_at is not None]
        return Lease(taken, next((a.lease for a in leases if a.index_ids), None),
                     min(expiries) if expiries else None,
                     reachable and all(a.finished for a in leases),
                     reachable and not taken and all(a.drained for a in leases)
                     and not self._holds_unseen(group, order))

    def renew(self, group: str, index_ids: Iterable[int], lease: float = 60.0, *,
              dp_rank: int | None = None) -> list[int]:
        """:meth:`Client.renew` on each id's node (with ``dp_rank``, rounds: on every node,
        which also renews the shares dealt to that dp rank there, and the shares that wait
        in this client)."""
        ids = list(index_ids)
        if dp_rank is None:
            return [i for answer in self._on_owners(
                ids, lambda c, ids: c.renew(group, ids, lease)) for i in answer]
        per_node = {name: [] for name in self.cluster.names}
        for name, some in self._per_node(ids + self._rounds.held_ids(group)).items():
            per_node[name] = some
        return [i for answer in self._on_nodes(
            per_node, lambda c, ids: c.renew(group, ids, lease, dp_rank=dp_rank))
            for i in answer]

    def release(self, group: str, index_ids: Iterable[int]) -> list[int]:
        """:meth:`Client.release` on each id's node."""
        return [i for answer in self._on_owners(index_ids, lambda c, ids: c.release(group, ids))
                for i in answer]

    def _on_owners(self, index_ids: Iterable[int], call) -> list:
        return self._on_nodes(self._per_node(index_ids), call)

    def _on_nodes(self, per_node: dict[str, list[int]], call) -> list:
        answers: list = []
        failed: dict[str, TQError] = {}

        def run(name: str, ids: list[int]) -> None:
            try:
                answers.append(call(self.node(name), ids))
            except TQError as e:
                failed[name] = e

        parallel(list(per_node.items()), run)
        if failed:
            name, e = sorted(failed.items())[0]
            raise type(e)(f"node {name}: {e.message}")
        return answers

    def finish(self, types: list[str]) -> list[str]:
        """Marks ``types`` finished on every node; returns the types every node has
        finished.

        Raises:
            Unavailable: a node cannot be reached (the others have the mark: call again).
        """
        return self._everywhere("finish", list(types))

    def reopen(self, types: list[str]) -> list[str]:
        """Clears the finished mark of ``types`` on every node (as :meth:`finish`)."""
        return self._everywhere("reopen", list(types))

    def delete_group(self, group: str) -> None:
        """Forgets ``group`` on every node (as :meth:`finish`)."""
        self._everywhere("delete_group", group)

    def _everywhere(self, method: str, arg) -> list[str] | None:
        answers: dict[str, Any] = {}
        failed: dict[str, TQError] = {}

        def run(name: str, _) -> None:
            try:
                answers[name] = getattr(self.node(name), method)(arg)
            except TQError as e:
                failed[name] = e

        parallel([(name, None) for name in self.cluster.names], run)
        if failed:
            name, e = sorted(failed.items())[0]
            raise type(e)(f"node {name}: {e.message} ({len(failed)} of "
                          f"{len(self.cluster.names)} nodes failed; call again)")
        if all(isinstance(a, list) for a in answers.values()):
            return sorted(set.intersection(*(set(a) for a in answers.values())))
        return None

    def group_status(self, group: str) -> dict[str, Any]:
        """A consumer group over every node: its counts added up, ``drained`` and
        ``finished`` only when every node says so, and each node's own under ``nodes``
        (a node that cannot be reached: its error, and the group is not drained)."""
        per_node = self._each("group_status", group)
        merged: dict[str, Any] = {"group": group, "nodes": per_node}
        for status in per_node.values():
            for key, value in status.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    merged[key] = merged.get(key, 0) + value
        for key in ("drained", "finished"):
            merged[key] = all(status.get(key) is True for status in per_node.values())
        return merged
