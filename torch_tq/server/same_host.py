"""The server's half of the same-host path (:mod:`torch_tq.transport.same_host`): who may
use it, publishing the files those clients stage, and sweeping what they abandon."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
import uuid

from torch_tq.errors import InvalidArgument
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol
from torch_tq.store.engine import Store
from torch_tq.store.memory import FREE_PREFIX, STAGING, unshared
from torch_tq.transport import same_host as local

log = logging.getLogger(__name__)


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

    def sweep(self, max_age_s: float) -> None:
        """Removes staged files older than ``max_age_s`` (their clients are gone)."""
        if self.probe is not None:
            _sweep_staging(self.root, max_age_s)


def _prepare_dir(root: str) -> str:
    """Server side: (re)creates the staging directory (dropping files left by clients of an
    earlier run) and writes a fresh probe token; returns the token."""
    staging = os.path.join(root, STAGING)
    os.makedirs(staging, exist_ok=True)
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
