"""Same-host: a client on the storage node reads the store's files itself and writes its
matrices as files the server publishes (:mod:`torch_tq.transport.same_host`)."""

from __future__ import annotations

import logging

from torch_tq.client.connection import Connection
from torch_tq.client.devices import Want, pinned_out
from torch_tq.client.results import ItemResult
from torch_tq.client.transports.base import Capabilities, Decline
from torch_tq.codec import tensors as codec
from torch_tq.errors import InvalidArgument, NotFound, TQError, Unavailable
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol
from torch_tq.transport import same_host as local

log = logging.getLogger(__name__)

# Up to this size a put goes over gRPC, not through a file: staging a file and asking the
# server to publish it costs ~3 ms whatever the size, one gRPC upload of 1-64 KiB 1.3-1.8 ms
# (memory store, this 2-core VM). Into a memory store the matrix then lives in the server's
# heap, and a same-host get of it is a gRPC read.
SMALL_BYTES = 64 << 10


class SameHostTransport:
    """Gets from a read-only mapping of the published file (a tensor over it when the matrix
    is one batch); puts as a staged file and a ``PublishLocal`` call. A memory store shares
    only what same-host clients put (``store.partial``): what is not found here may still be
    in the server's heap, and is read over gRPC."""

    name = "same-host"
    can = Capabilities(zero_copy_reads=True, local_reads=True)
    refusal = "the server cannot be reached that way"
    warn_if_unavailable = False  # a server on another host is the common case

    def __init__(self, connection: Connection, store: local.LocalStore) -> None:
        self.connection = connection
        self.store = store

    @classmethod
    def wanted(cls, ucx_locations: list[str]) -> bool:
        return True

    @classmethod
    def open(cls, connection: Connection, grpc=None) -> tuple[SameHostTransport | None, str]:
        try:
            info = connection.action(protocol.LOCAL_INFO, {"host_id": local.host_id()},
                                     "local info")
        except InvalidArgument:
            return None, "the server has no same-host access"
        store = local.attach(info, connection.chunk_bytes)
        if store is None:
            return None, info.get("reason") or "its directory is not visible here"
        log.info("torch_tq client %s: transport same-host (%s)", connection.location, store.root)
        return cls(connection, store), ""

    def put(self, conn, key: Key, dtype: codec.DType, shape, flat, compression) -> None:
        store = self.store
        if flat.nbytes <= SMALL_BYTES:  # one gRPC upload is quicker (SMALL_BYTES)
            raise Decline
        try:
            try:
                name = store.stage(key, dtype, shape, flat)
            except OSError as e:
                raise Unavailable(f"put {key}: could not stage the file ({e})") from None
            try:
                body = {"index_id": key.index_id, "matrix_type": key.matrix_type, "file": name}
                self.connection.action(protocol.PUBLISH_LOCAL, body, f"put {key}")
            except BaseException:
                store.discard(name)  # refused or not reached: leave nothing behind
                raise
        except Unavailable:
            if not store.partial:
                raise  # the disk is full: so it is for gRPC too
            # a memory store's /dev/shm is full (containers often give it 64 MB): the
            # server's heap may still have room
            log.debug("same-host put of %s: /dev/shm is full; using gRPC", key)
            raise Decline from None

    def get(self, conn, key: Key, want: Want):
        # to a GPU or pinned: copied once from the mapping into a pooled pinned block
        try:
            result, copied = self.store.read(key, want.out, want.shared,
                                             pinned_out if want.pinned else None)
        except NotFound:
            if not self.store.partial:
                raise
            raise Decline from None  # a memory store's matrix that came over the network
        self.connection.count_get(copied)
        return want.place(result)

    def read_here(self, keys: list[Key]) -> list[ItemResult | None]:
        """Each item straight from its file; no call at all."""
        rows: list[ItemResult | None] = []
        for key in keys:
            try:
                tensor, copied = self.store.read(key)
            except NotFound as e:
                # a memory store's matrix may have come over the network
                rows.append(None if self.store.partial else ItemResult.failed(key, e))
            except TQError as e:
                rows.append(ItemResult.failed(key, e))
            else:
                self.connection.count_get(copied)
                rows.append(ItemResult.ok(key, tensor))
        return rows

    def put_many(self, conn, group: list) -> list[dict]:
        # One BatchWrite over gRPC. Staging a file per item and publishing them in one call
        # was measured slower here: 32 x 256 KiB took 53 ms against 17 ms over gRPC, and
        # 16 x 1 MiB 37 ms against 31 ms (each file costs ~1.5 ms of system calls and
        # checks on the two sides, more than its bytes over the socket).
        raise Decline

    def get_many(self, conn, keys: list[Key], max_inline_bytes: int | None):
        raise Decline  # what read_here left: a memory store's items from the network

    def close(self) -> None:
        pass
