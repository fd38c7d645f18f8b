"""Streaming mode's machinery: the conversation with a consumer group (leases, fetches,
acknowledgements, the heartbeat, waiting that explains itself) and the prefetch thread."""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.utils.data

from torch_tq.client.client import Client
from torch_tq.errors import TQError
from torch_tq.integrations.items import UNREACHABLE

if TYPE_CHECKING:
    from torch_tq.integrations.dataset import TQDataset

log = logging.getLogger(__name__)

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Stream:
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
            try:
                self.flush()
            except TQError as e:  # kept for the next lease request, or the next flush
                log.warning("acks of group %s wait: %s", self.ds.group, e)
                with self._lock:
                    self._first_unacked = time.monotonic()

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
            # every leased index_id's types in one get_many (a BatchRead per batch of
            # items), not a call per matrix
            for index_id, item in zip(lease.index_ids, ds._fetch_many(self.client,
                                                                      lease.index_ids)):
                if item is UNREACHABLE:
                    # its node went away after the lease: the lease dies with the node (or
                    # runs out behind a partition) and the id comes again; not renewed here
                    log.warning("index_id %d of group %s: its node cannot be reached since "
                                "its lease; it comes again once the node is back", index_id,
                                ds.group)
                    with self._lock:
                        self._unhanded.pop(index_id, None)
                    continue
                if item is None:
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
        if not acks:
            return
        try:
            self.client.ack(self.ds.group, acks, delete=self.ds.delete_after_ack,
                            rank=self.ds.rank if self.ds.rounds else None)
        except TQError:
            with self._lock:  # kept: they go with the next lease request
                self._to_ack[:0] = acks
            raise

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


class Prefetcher:
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
