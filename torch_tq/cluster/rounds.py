"""Rounds across the nodes of a cluster: every node deals the ids it owns in rounds of its
own (:mod:`torch_tq.store.rounds`), so each data-parallel rank receives one share of every
round of every node, and the ranks' step counts stay equal across nodes too.

Two ways to take the shares:

- one rank per dp rank (``world_size == dp_size``, plain data parallelism): whatever node
  has a share ready first. Shares leased from several nodes at once wait here, in order,
  with their leases renewed by the consumer's heartbeat: a share given back would be dealt
  again in a later round, one share short for this rank.
- several ranks per dp rank (tensor- or pipeline-parallel peers must read the same batch at
  each step): the nodes in a fixed cycle, each rank asking node ``k mod N`` for its ``k``-th
  share and waiting for it. Every node hands the peers its shares in the same order, so the
  peers agree on the order without talking to each other; the price is that a slow node
  holds up the rest. A drained node leaves the cycle at the same step for every peer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch_tq.client.results import Lease
from torch_tq.errors import Unavailable

if TYPE_CHECKING:
    from torch_tq.cluster.client import ClusterClient

log = logging.getLogger(__name__)


class ClusterRounds:
    """The shares one :class:`~torch_tq.cluster.client.ClusterClient` has taken but not
    handed on, and where each peer-ordered cycle stands."""

    def __init__(self, client: ClusterClient) -> None:
        self._c = client
        self._lock = threading.Lock()
        self._held: dict[str, deque[tuple[str, Lease]]] = {}  # group -> (node, share)
        self._cycles: dict[str, _Cycle] = {}  # group -> the peers' cycle

    def held_ids(self, group: str) -> list[int]:
        """The ids of the shares waiting here (their leases are renewed with the rest)."""
        with self._lock:
            return [i for _, share in self._held.get(group, ()) for i in share.index_ids]

    def consume(self, group: str, types: list[str] | None, timeout: float, lease: float,
                rounds: Mapping[str, Any]) -> Lease:
        world, dp_size = int(rounds["world_size"]), int(rounds.get("dp_size", rounds["world_size"]))
        if world != dp_size:
            return self._in_cycle(group, types, timeout, lease, rounds)
        with self._lock:
            held = self._held.setdefault(group, deque())
            if held:
                return held.popleft()[1]
        c = self._c
        names = c.cluster.names
        start = c._turn % len(names)
        c._turn += 1
        order = names[start:] + names[:start]
        common = {"types": types, "lease": lease, "rounds": dict(rounds)}

        def keep(name: str, _group: str, future) -> None:  # a share that came late
            if future.cancelled():
                return
            if future.exception() is not None:
                c._maybe_lost(group, name, future.exception())
            else:
                self._keep(group, name, future.result())

        futures = c._submit_all(group, order, lambda name: lambda cl: cl.consume(
            group, timeout=0, **common))
        answers = c._gather(futures, group, until=time.monotonic() + 2.0, late=keep)
        for name in order:
            if answers.get(name) is not None:
                self._keep(group, name, answers[name])
        if not self._waiting(group) and timeout > 0:
            deadline = time.monotonic() + timeout
            futures = c._submit_all(group, order, lambda name: lambda cl: cl.consume(
                group, timeout=timeout, **common))
            later = c._gather(futures, group, until=deadline + 5, first=True, late=keep)
            for name in order:
                if later.get(name) is not None:
                    self._keep(group, name, later[name])
            answers = {**answers, **{k: v for k, v in later.items() if v is not None}}
        with self._lock:
            if held:
                return held.popleft()[1]
        leases = [a for a in answers.values() if a is not None]
        reachable = len(leases) == len(order) and not any(c._is_busy(n) for n in order)
        return Lease([], None, None, reachable and all(a.finished for a in leases),
                     reachable and all(a.drained for a in leases)
                     and not c._holds_unseen(group, order),
                     left=sum(a.left or 0 for a in leases))

    def _keep(self, group: str, name: str, share: Lease) -> None:
        if share.index_ids:
            with self._lock:
                self._held.setdefault(group, deque()).append((name, share))

    def _waiting(self, group: str) -> bool:
        with self._lock:
            return bool(self._held.get(group))

    def _in_cycle(self, group: str, types: list[str] | None, timeout: float, lease: float,
                  rounds: Mapping[str, Any]) -> Lease:
        """The next share in the peers' fixed order (see the module's text)."""
        c = self._c
        with self._lock:
            cycle = self._cycles.setdefault(group, _Cycle(list(c.cluster.names)))
        deadline = time.monotonic() + max(0.0, timeout)
        while cycle.names:
            name = cycle.names[cycle.position % len(cycle.names)]
            if name in c._owes_acks(group):  # its acks first (sent with the next consume)
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                return Lease([], None, None, False, False)
            try:
                share = c.node(name).consume(group, types, timeout=max(
                    0.0, deadline - time.monotonic()), lease=lease, rounds=dict(rounds))
            except Unavailable as e:
                c._maybe_lost(group, name, e)
                c.node(name).close()  # a fresh channel for the next try
                log.warning("consumer group %s: waiting for node %s, whose turn it is in "
                            "the peers' order (%s)", group, name, e.message)
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                return Lease([], None, None, False, False)
            if share.index_ids:
                cycle.position += 1
                return share
            if not share.drained or c._holds_unseen(group, [name]):
                return share._replace(drained=False)  # nothing yet: its turn stays
            # drained: it leaves the cycle (at this same step for every peer)
            cycle.left += share.left or 0
            del cycle.names[cycle.position % len(cycle.names)]
        with self._lock:
            self._cycles.pop(group, None)  # a later stream of the group starts afresh
        return Lease([], None, None, False, True, left=cycle.left)


class _Cycle:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.position = 0
        self.left = 0
