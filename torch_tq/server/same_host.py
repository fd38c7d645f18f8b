"""The server's half of the same-host path (:mod:`torch_tq.transport.same_host`): who may
use it, publishing the files those clients stage, and sweeping what they abandon."""

from __future__ import annotations

import os

from torch_tq.errors import InvalidArgument
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol
from torch_tq.store.engine import Store
from torch_tq.transport import same_host as local


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
        self.probe = local.prepare_server_dir(self.root) if self.root else None

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
            local.sweep_staging(self.root, max_age_s)
