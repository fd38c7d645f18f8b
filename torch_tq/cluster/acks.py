"""A cluster client's acknowledgements: each id's acks go to its node before anything new
is leased from that node, and wait in the client while the node cannot be reached."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import wait
from typing import Any

from torch_tq.cluster.parallel import parallel
from torch_tq.errors import TQError, Unavailable

log = logging.getLogger("torch_tq.cluster.groups")
# how long a consume waits for its acks to land before it goes on (a node that has not
# taken them yet is not leased from meanwhile)
_ACK_WAIT_S = 2.0


class ClusterAcks:
    """Mixed into :class:`~torch_tq.cluster.groups.ClusterGroupCalls` (the client supplies
    ``_lock``, ``_unsent``, ``_acking``, ``_down``, ``node``, ``_per_node`` and
    ``_pool_of_calls``)."""

    def ack(self, group: str, index_ids: Iterable[int], *, delete: bool = False,
            rank: int | None = None) -> dict[str, Any]:
        """:meth:`Client.ack` on each id's node; the answers added up. The acks of a node
        that cannot be reached (or still owes an answer to earlier ones) are kept in this
        client, tried again in the background, and sent first with its next
        :meth:`consume` of the group, nothing being leased from that node before; those
        still waiting are listed under ``unsent``."""
        per_node = self._per_node(index_ids)
        owed = self._owes_acks(group) | self._down
        kept: list[int] = []
        answers: list = []
        failed: dict[str, TQError] = {}

        def keep(name: str, ids: list[int]) -> None:
            with self._lock:
                self._unsent.setdefault((group, name, delete, rank), []).extend(ids)
                kept.extend(ids)

        def run(name: str, ids: list[int]) -> None:
            if name in owed:
                keep(name, ids)
                return
            try:
                answers.append(self.node(name).ack(group, ids, delete=delete, rank=rank))
            except Unavailable:
                self._down.add(name)
                keep(name, ids)
            except TQError as e:
                failed[name] = e

        parallel(list(per_node.items()), run)
        if failed:
            name, e = min(failed.items())
            raise type(e)(f"node {name}: {e.message}")
        merged: dict[str, Any] = {}
        for answer in answers:
            for key, value in answer.items():
                if isinstance(value, list):
                    merged[key] = merged.get(key, []) + value
                elif isinstance(value, int) and not isinstance(value, bool):
                    merged[key] = merged.get(key, 0) + value
        if kept:  # one more try now, in the background, as a consume makes it
            self._send_acks(group, [], delete, rank)
            with self._lock:
                waiting = {i for key, ids in self._unsent.items() if key[0] == group
                           for i in ids}
            if waiting & set(kept):
                merged["unsent"] = [i for i in kept if i in waiting]
        return merged

    def _send_acks(self, group: str, ack: list[int], delete: bool,
                   rank: int | None = None) -> None:
        """Acks on each id's node before anything is leased from it. A node that cannot be
        reached keeps its acks here, sent again with every later consume until it takes
        them (an ack is idempotent), and nothing is leased from it meanwhile
        (:meth:`_owes_acks`). Each node's acks run in the background and are waited for
        only :data:`_ACK_WAIT_S`: a node cut off from the network, which answers nothing
        until a call times out, must not hold up the consumers of the others."""
        with self._lock:
            for name, ids in self._per_node(ack).items():
                self._unsent.setdefault((group, name, delete, rank), []).extend(ids)
            # copies: another consume of this client may add to the lists meanwhile
            todo = [(key, list(ids)) for key, ids in self._unsent.items()
                    if key[0] == group and ids and key not in self._acking]
            pool = self._pool_of_calls()
            futures = []
            for key, ids in todo:
                self._acking[key] = future = pool.submit(self._ack_on, key, ids)
                futures.append(future)
        if not futures:
            return
        done, _ = wait(futures, timeout=_ACK_WAIT_S)
        for future in done:
            error = future.exception()
            if error is not None:
                raise error  # refused (not unreachable): said to the caller, and dropped

    def _ack_on(self, key: tuple, ids: list[int]) -> None:
        group, name, deleting, by = key
        sent = False
        try:
            self.node(name).ack(group, ids, delete=deleting, rank=by)
            sent = True
        except Unavailable as e:
            log.debug("acks of group %s wait for node %s: %s", group, name, e.message)
            self.node(name).close()  # a fresh channel for the next try (as in _gather)
        except TQError:
            sent = True  # refused for good: not sent again
            raise
        finally:
            with self._lock:
                self._acking.pop(key, None)
                if sent:
                    gone = set(ids)
                    rest = [i for i in self._unsent.get(key, []) if i not in gone]
                    if rest:
                        self._unsent[key] = rest
                    else:
                        self._unsent.pop(key, None)

    def _owes_acks(self, group: str) -> set[str]:
        """The nodes still owed acks of ``group`` by this client (they could not be sent)."""
        with self._lock:
            return {key[1] for key, ids in self._unsent.items() if key[0] == group and ids}
