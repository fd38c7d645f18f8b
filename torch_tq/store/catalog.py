"""The catalog: what is stored, by index_id and matrix type, with its size and times; and who
hears of every change (consumer groups)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from torch_tq.errors import NotFound
from torch_tq.model import Key, not_found
from torch_tq.store.format import Entry


class Catalog:
    """The entries of the published matrices (a :class:`~torch_tq.store.engine.Store` is
    one). Its lock is a leaf: nothing is called while it is held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, dict[str, Entry]] = {}
        self._bytes = 0
        self.freed_bytes = 0  # bytes of matrices replaced or deleted, ever
        self._batch = threading.local()  # notifying_once's pending index_ids, per thread
        self._listeners: list[Callable[[list[tuple[int, frozenset[str]]]], None]] = []

    def add_listener(self, fn) -> None:
        """Calls ``fn(changes)`` after every publish and delete, ``changes`` a list of
        ``(index_id, types)`` with the types of each ``index_id`` then present (a
        frozenset), while writes to those index_ids are held: one change, or those of a
        whole batch call (:meth:`~torch_tq.store.engine.Store.notifying_once`)."""
        self._listeners.append(fn)

    def _notify(self, index_id: int) -> None:
        pending = getattr(self._batch, "pending", None)
        if pending is not None:  # within notifying_once: told at its end
            pending[index_id] = None
            return
        self._notify_ids([index_id])

    @contextlib.contextmanager
    def notifying_once(self):
        """Within it, this thread's publishes and deletes are told to the listeners (the
        consumer groups) once, at its end, all together: a consumer waiting for data
        then leases a batch call's items at once, not the first one alone. Each item is
        readable as soon as it is stored."""
        if getattr(self._batch, "pending", None) is not None:
            yield  # nested: the outer one tells
            return
        self._batch.pending = pending = {}
        try:
            yield
        finally:
            self._batch.pending = None
            if pending:
                ids = list(pending)
                # the listeners see the catalog as no write to those ids can change it
                with self._holding_writes(ids):
                    self._notify_ids(ids)

    def _holding_writes(self, index_ids: list[int]):
        """Holds the writes to ``index_ids`` (a store's locks; none here)."""
        return contextlib.nullcontext()

    def _notify_ids(self, index_ids: list[int]) -> None:
        if not self._listeners:
            return
        with self._lock:
            changes = [(i, frozenset(self._entries.get(i, ()))) for i in index_ids]
        for fn in self._listeners:
            fn(changes)

    def index_types(self) -> dict[int, frozenset[str]]:
        """Every stored index_id with the set of its matrix types."""
        with self._lock:
            return {i: frozenset(types) for i, types in self._entries.items()}

    def types_of(self, index_id: int) -> frozenset[str]:
        with self._lock:
            return frozenset(self._entries.get(index_id, ()))


    def get(self, key: Key) -> Entry:
        with self._lock:
            entry = self._entries.get(key.index_id, {}).get(key.matrix_type)
        if entry is None:
            raise not_found(key)
        return entry

    def entries(self, index_id: int | None = None) -> list[Entry]:
        with self._lock:
            if index_id is not None:
                return list(self._entries.get(index_id, {}).values())
            return [e for types in self._entries.values() for e in types.values()]

    def metadata(self, index_id: int) -> dict:
        """What the seed's GetMetadata answers for ``index_id`` (less ``success``/``message``)."""
        entries = sorted(self.entries(index_id), key=lambda e: e.key.matrix_type)
        if not entries:
            raise NotFound(f"index_id not found: index_id={index_id}")
        return {
            "index_id": index_id,
            "types": [e.key.matrix_type for e in entries],
            "dimensions": {e.key.matrix_type: list(e.shape) for e in entries},
            "dtypes": {e.key.matrix_type: e.dtype for e in entries},
            "nbytes": {e.key.matrix_type: e.nbytes for e in entries},
            "matrices": {e.key.matrix_type: e.describe() for e in entries},
            "created_at": min(e.created_at for e in entries),
            "updated_at": max(e.updated_at for e in entries),
        }

    def count(self) -> int:
        with self._lock:
            return sum(len(t) for t in self._entries.values())

    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _set(self, entry: Entry) -> None:
        with self._lock:
            types = self._entries.setdefault(entry.key.index_id, {})
            old = types.get(entry.key.matrix_type)
            self._bytes += entry.nbytes - (old.nbytes if old else 0)
            self.freed_bytes += old.nbytes if old else 0
            types[entry.key.matrix_type] = entry

    def _drop(self, key: Key) -> None:
        with self._lock:
            types = self._entries.get(key.index_id, {})
            old = types.pop(key.matrix_type, None)
            if old is not None:
                self._bytes -= old.nbytes
                self.freed_bytes += old.nbytes
            if not types:
                self._entries.pop(key.index_id, None)
