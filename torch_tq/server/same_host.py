"""The server's half of the same-host path (:mod:`torch_tq.transport.same_host`): who may
use it, publishing the files those clients stage, and sweeping what they abandon."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
import uuid

import pyarrow as pa
import pyarrow.flight as flight

from torch_tq.errors import InvalidArgument, TQError
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.commands import BadItem
from torch_tq.protocol.transfers import PackItem
from torch_tq.server import batch
from torch_tq.store.engine import Store
from torch_tq.store.errors import io_error
from torch_tq.store.memory import FREE_PREFIX, PACKS, STAGING, unshared
from torch_tq.transport import same_host as local

log = logging.getLogger(__name__)

# LocateLocal: bytes of heap items that come with its answer, at most (the rest: BatchRead)
INLINE_BYTES = 16 << 20


class SameHostService:
    """Same-host access to one server's store: a disk store's directory, or a memory
    store's shared directory in /dev/shm; none when switched off."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self.store = store
        self.host_id = local.host_id()
        self.root = None
        if enabled:
            self.root = (store.backend.root if store.storage == "disk"
                         else getattr(store.backend, "shared_root", None))
        self.probe = _prepare_dir(self.root) if self.root else None

    def info(self, client_host: str) -> dict:
        """The ``LocalInfo`` answer to a client on ``client_host``."""
        if client_host != self.host_id:
            return protocol.ok(same_host=False, reason="another host")
        if self.probe is None:
            return protocol.ok(same_host=False,
                               reason=f"{self.store.storage} store without a same-host directory")
        return protocol.ok(same_host=True, root=self.root, probe=self.probe,
                           storage=self.store.storage, compression=self.store.compression,
                           max_matrix_bytes=self.store.max_matrix_bytes)

    def publish(self, key: Key, staged: str) -> dict:
        """Checks the file a client staged as ``staged`` and publishes it as ``key``."""
        if self.probe is None:
            raise InvalidArgument("this server takes no same-host uploads")
        path = os.path.join(self.root, local.STAGING, staged)
        try:
            entry = self.store.publish_staged(key, path)
        except BaseException:
            local.discard(path)  # refused: a staged file is garbage once answered
            raise
        return protocol.ok(index_id=key.index_id, matrix_type=key.matrix_type, **entry.describe())

    def _packs_here(self, what: str) -> None:
        if self.probe is None or self.store.storage != "memory":
            raise InvalidArgument(f"this server takes no {what}: only a memory store's "
                                  "same-host clients share packs")

    def publish_batch(self, staged: str, items: list, limits, limiter) -> dict:
        """Checks the pack a client staged as ``staged`` and publishes each of its items
        (a slice of the pack, no copy); a result per item, as BatchWrite."""
        path = os.path.join(self.root, local.STAGING, staged)
        try:
            self._packs_here("same-host batches")
            nbytes = sum(item.nbytes for item in items if isinstance(item, PackItem))
            batch.check_batch_limits(limits, limiter, len(items), nbytes, "PublishLocalBatch")
            try:
                pack = self.store.backend.take_pack(path)
            except OSError as e:
                raise io_error(e, "publish a same-host batch") from None
        except BaseException:
            local.discard(path)  # refused: a staged file is garbage once answered
            raise
        return protocol.ok(results=batch.write_pack(self.store, pack, items))

    def locate(self, items: list, limits) -> list[flight.Result]:
        """Where same-host readers find each of ``items``: ``file`` (under the store's
        root) and ``offset``, with ``dtype`` and ``shape``; or, for one held in the heap
        (it came over the network), its bytes as a result of their own after the answer
        (``inline``: which one; up to :data:`INLINE_BYTES` of them), else ``shared: false``
        (read it with BatchRead); or its error."""
        self._packs_here("LocateLocal")
        if limits.max_batch_items and len(items) > limits.max_batch_items:
            raise InvalidArgument(f"LocateLocal of {len(items)} items; the limit is "
                                  f"{limits.max_batch_items} per call (split the batch)")
        rows, extra = [], []
        room = INLINE_BYTES
        for item in items:
            if isinstance(item, BadItem):
                rows.append(_failed(item.error))
                continue
            try:
                entry, where = self.store.locate(item)
                if where is not None:
                    rows.append({"success": True, "shared": True, "file": f"{PACKS}/{where[0]}",
                                 "offset": where[1], "dtype": entry.dtype,
                                 "shape": list(entry.shape)})
                    continue
                if entry.nbytes > room:
                    rows.append({"success": True, "shared": False})
                    continue
                # in the heap: its bytes come with the answer (no second round trip)
                row, pieces = batch.read_one(self.store, item, room)
            except TQError as e:
                rows.append(_failed(e))
                continue
            if pieces is None:  # overwritten meanwhile with more than there is room for
                rows.append({"success": True, "shared": False})
                continue
            data = pieces[0] if len(pieces) == 1 else pa.py_buffer(b"".join(
                p.to_pybytes() for p in pieces))
            room -= data.size
            rows.append({"success": True, "shared": False, "inline": len(extra),
                         "dtype": row["dtype"], "shape": row["shape"]})
            extra.append(flight.Result(data))
        return [flight.Result(pa.py_buffer(protocol.dumps(protocol.ok(items=rows)))), *extra]

    def sweep(self, max_age_s: float) -> None:
        """Removes staged files older than ``max_age_s`` (their clients are gone)."""
        if self.probe is not None:
            _sweep_staging(self.root, max_age_s)


def _failed(error: TQError) -> dict:
    return {"success": False, "code": error.code, "message": error.message}


def _prepare_dir(root: str) -> str:
    """Server side: (re)creates the staging directory (dropping files left by clients of an
    earlier run) and writes a fresh probe token; returns the token."""
    staging = os.path.join(root, STAGING)
    os.makedirs(staging, mode=0o700, exist_ok=True)
    for name in os.listdir(staging):
        try:
            os.unlink(os.path.join(staging, name))
        except OSError:
            pass
    token = uuid.uuid4().hex
    tmp = os.path.join(root, f".{local.PROBE}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(token)
    os.replace(tmp, os.path.join(root, local.PROBE))
    return token



def _sweep_staging(root: str, max_age_s: float) -> int:
    """Server side: removes what same-host clients left in the staging directory and
    abandoned (a client killed mid-put leaves its file there): entries untouched for
    ``max_age_s`` that no process holds open. The memory store's recycled files
    (``free-*``, trimmed by their pool) and the server's own ``.retired-*`` names stay.
    Returns how many entries went."""
    staging = os.path.join(root, STAGING)
    cutoff = time.time() - max_age_s
    removed = 0
    try:
        names = os.listdir(staging)
    except OSError:
        return 0
    for name in names:
        if name.startswith((FREE_PREFIX, ".retired-")):
            continue
        path = os.path.join(staging, name)
        try:
            st = os.lstat(path)
            if st.st_mtime > cutoff:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            elif stat.S_ISREG(st.st_mode) and not unshared(path):
                continue  # a writer still holds it: not abandoned
            else:
                os.unlink(path)
            removed += 1
        except OSError:
            continue  # published or removed meanwhile
    if removed:
        log.info("removed %d abandoned same-host staged file(s)", removed)
    return removed
