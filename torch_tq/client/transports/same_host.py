"""Same-host: a client on the storage node reads the store's files itself and writes its
matrices as files the server publishes (:mod:`torch_tq.transport.same_host`)."""

from __future__ import annotations

import logging

from torch_tq.client.connection import Connection
from torch_tq.client.devices import Want, pinned_out, tensor_from
from torch_tq.client.results import ItemResult
from torch_tq.client.transports.base import Capabilities, Decline
from torch_tq.codec import tensors as codec
from torch_tq.errors import InternalError, InvalidArgument, NotFound, TQError, Unavailable
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol
from torch_tq.transport import same_host as local

log = logging.getLogger(__name__)

# Up to this size a put goes over gRPC, not through a file: staging a file and asking the
# server to publish it costs ~3 ms whatever the size, one gRPC upload of 1-64 KiB 1.3-1.8 ms
# (memory store, this 2-core VM). Into a memory store the matrix then lives in the server's
# heap, and a same-host get of it is a gRPC read.
SMALL_BYTES = 64 << 10


def _tensor_in(buf, row: dict, key: Key):
    """The tensor a ``LocateLocal`` row places in the mapped pack ``buf`` (None: gone)."""
    if buf is None:
        return None
    dtype = codec.DTYPES[row["dtype"]]
    shape = tuple(row["shape"])
    start = row["offset"]
    if start + codec.numel(shape) * dtype.itemsize > buf.size:
        raise InternalError(f"LocateLocal placed {key} outside its pack")
    return tensor_from(buf, start, dtype, shape)


class SameHostTransport:
    """Gets from a read-only mapping of the published file (a tensor over it when the matrix
    is one batch); puts as a staged file and a ``PublishLocal`` call. A memory store shares
    only what same-host clients put (``store.partial``): what is not found here may still be
    in the server's heap, and is read over gRPC."""

    name = "same-host"
    can = Capabilities(zero_copy_reads=True, local_reads=True, batch_fast_path=True)
    refusal = "the server cannot be reached that way"
    warn_if_unavailable = False  # a server on another host is the common case

    def __init__(self, connection: Connection, store: local.LocalStore, grpc) -> None:
        self.connection = connection
        self.store = store
        self.grpc = grpc  # for what a memory store holds in its heap

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
        return cls(connection, store, grpc), ""

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
            # a memory store's matrix in a pack, or in its heap (it came over the network)
            if want.out is not None or want.shared or want.pinned:
                raise Decline from None
            ((_, _, tensor),) = self._locate([key])
            if tensor is None:
                raise Decline from None  # not found, or large: ReadMatrix over gRPC
            return want.place(tensor)
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
        # A memory store: the group's values in one shared-memory file (a pack) and one
        # PublishLocalBatch; its items are then slices of the server's mapping of it, and
        # same-host readers map it too (get_many). A disk store keeps a file per matrix:
        # staging a file per item measured slower than one BatchWrite over gRPC (32 x
        # 256 KiB: 53 ms against 17 ms; each file costs ~1.5 ms of system calls and checks).
        store = self.store
        # (a pack of 32 x 4 KiB too: 3,094 items/s in benchmarks/pipeline.py, where a
        # BatchWrite moved 2,672)
        if not store.partial:
            raise Decline
        what = f"PublishLocalBatch of {len(group)} items"
        try:
            name, items = store.stage_pack(group)
        except OSError as e:
            # /dev/shm is full (containers often give it 64 MB): the heap may have room
            log.debug("same-host %s: could not stage the pack (%s); using gRPC", what, e)
            raise Decline from None
        try:
            reply = self.connection.action(protocol.PUBLISH_LOCAL_BATCH,
                                           {"file": name, "items": items}, what)
        except BaseException:
            store.discard(name)  # refused or not reached: leave nothing behind
            raise
        if len(reply.get("results", ())) != len(group):
            raise InternalError(f"{what}: the server answered for "
                                f"{len(reply.get('results', ()))} items")
        return reply["results"]

    def get_many(self, conn, keys: list[Key], max_inline_bytes: int | None):
        # what read_here left: in a memory store, items of packs (mapped here, no copy)
        # and items in the server's heap (their bytes come with LocateLocal's answer)
        if not self.store.partial:
            raise Decline
        results: list[ItemResult | None] = [None] * len(keys)
        remote = []
        for i, (key, row, tensor) in enumerate(self._locate(keys)):
            if not row.get("success"):
                results[i] = ItemResult(key.index_id, key.matrix_type, False, row["code"],
                                        row["message"])
            elif tensor is None:
                remote.append(i)  # beyond what came along, or its pack went since
            else:
                results[i] = ItemResult.ok(key, tensor)
        if remote:
            for i, row in zip(remote, self.grpc.get_many(conn, [keys[i] for i in remote],
                                                         max_inline_bytes)):
                results[i] = row
        return results

    def _locate(self, keys: list[Key]):
        """``(key, LocateLocal row, tensor or None)`` for each of ``keys``: a tensor over
        its pack (one mapping per pack), or over the bytes that came with the answer; None
        for one to read over gRPC (or that failed: see its row)."""
        what = f"LocateLocal of {len(keys)} items"
        body = {"items": [{"index_id": k.index_id, "matrix_type": k.matrix_type} for k in keys]}
        reply = self.connection.action(protocol.LOCATE_LOCAL, body, what, extra=len(keys))
        rows = reply.get("items", ())
        if len(rows) != len(keys):
            raise InternalError(f"{what}: the server answered for {len(rows)} items")
        maps: dict[str, object] = {}
        for key, row in zip(keys, rows):
            tensor = None
            if row.get("success") and "inline" in row:  # held in the server's heap
                tensor = self._inline(reply["_extra"], row, key)
            elif row.get("success") and row.get("shared"):
                name = row["file"]
                if name not in maps:
                    maps[name] = self.store.map_pack(name, key)
                tensor = _tensor_in(maps[name], row, key)
                if tensor is not None:
                    self.connection.count_get(0)
            yield key, row, tensor

    def _inline(self, buffers: list, row: dict, key: Key):
        k = row["inline"]
        dtype = codec.DTYPES[row["dtype"]]
        shape = tuple(row["shape"])
        if not isinstance(k, int) or not 0 <= k < len(buffers) or \
                buffers[k].size != codec.numel(shape) * dtype.itemsize:
            raise InternalError(f"LocateLocal sent the wrong bytes for {key}")
        tensor = tensor_from(buffers[k], 0, dtype, shape)
        self.connection.count_get(0 if tensor.numel() and tensor.untyped_storage().data_ptr()
                                  == buffers[k].address else buffers[k].size)
        return tensor

    def close(self) -> None:
        pass
