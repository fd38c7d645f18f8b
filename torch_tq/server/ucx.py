"""The server's half of the UCX data plane: its workers' addresses, sending a stored matrix
to a client's lanes (UcxGet) and receiving one into the store (UcxPut), and the same for
many items in one transfer (UcxGetBatch, UcxPutBatch)."""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np
import pyarrow as pa
import xxhash

from torch_tq.codec import tensors as codec
from torch_tq.errors import InvalidArgument, TQError, Unavailable
from torch_tq.protocol import commands as protocol
from torch_tq.protocol import transfers
from torch_tq.protocol.commands import BadItem
from torch_tq.server import batch as batch_ops
from torch_tq.server.stats import ServerStats
from torch_tq.server.ucx_probe import AddressProbe
from torch_tq.store.engine import Store
from torch_tq.transport import ucx

log = logging.getLogger(__name__)


class TagLedger:
    """The UCX tags of recent transfers: each may serve one transfer only. A tag is
    remembered for ``ttl_s`` (the transfer timeout: no transfer of it can still be
    running after that), at most ``cap`` of them (the oldest go first)."""

    def __init__(self, ttl_s: float = ucx.DEFAULT_TIMEOUT_S, cap: int = 1 << 20) -> None:
        self.ttl_s = ttl_s
        self.cap = cap
        self._seen: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def claim(self, tag: int, what: str) -> None:
        """Takes ``tag`` for one transfer.

        Raises:
            InvalidArgument: a transfer used it already (nothing moves).
        """
        now = time.monotonic()
        with self._lock:
            seen = self._seen
            while seen:
                oldest, expires = next(iter(seen.items()))
                if expires > now and len(seen) < self.cap:
                    break
                del seen[oldest]
            if tag in seen:
                raise InvalidArgument(f"{what}: UCX tag {tag} was used already; every "
                                      "transfer needs a fresh random tag")
            seen[tag] = now + self.ttl_s


class UcxService:
    """UCX for one server; its runtime starts with the first UCX client. Every transfer's
    tag is single-use (:class:`TagLedger`); with ``digests`` (an authenticating server)
    every upload must carry the XXH3-64 of its bytes, checked before anything of it is
    stored."""

    def __init__(self, store: Store, stats: ServerStats, enabled: bool,
                 digests: bool = False) -> None:
        self.store = store
        self.stats = stats
        self.enabled = enabled
        self.digests = digests
        self.tags = TagLedger()
        self.probe = AddressProbe()  # its process starts with the first UCX client

    def info(self) -> dict:
        addresses = self.runtime().addresses_b64
        return protocol.ok(address=addresses[0], addresses=addresses)

    def close(self) -> None:
        self.probe.close()

    def runtime(self):
        if not self.enabled:
            raise Unavailable("UCX is switched off on this server (--no-ucx)")
        return ucx.runtime()  # started on the first UCX client

    def peers(self, rt, req: dict) -> list[bytes]:
        """The client's lanes a request names (no more than this server runs), with an
        endpoint to each. An address met for the first time is checked against UCX's
        layout, then tried in a probe process (:mod:`torch_tq.server.ucx_probe`) before this
        process lets UCX near it.

        Raises:
            InvalidArgument: a malformed address, or one UCX cannot make an endpoint to.
        """
        peers = ucx.decode_addresses(req["addresses"])
        if len(peers) > rt.lanes:
            raise InvalidArgument(f"{len(peers)} UCX lanes named; this server runs {rt.lanes}")
        unknown = rt.unknown(peers)
        if unknown:
            for address in unknown:
                self.probe.check(address)
            try:
                rt.connect(peers)
            except Unavailable as e:
                raise InvalidArgument(f"the client's UCX lanes cannot be reached: {e.message}") \
                    from None
        return peers

    def get(self, req: dict) -> tuple[dict, pa.Buffer | None]:
        rt = self.runtime()
        peers = self.peers(rt, req)
        key = req["key"]
        self.tags.claim(req["tag"], f"UcxGet {key}")
        matrix = self.store.open(key)
        entry = matrix.entry
        # Runs of the stored bytes: consecutive batches that are slices of one buffer (a
        # matrix that came in one piece) make one run, so that a transfer has few parts.
        runs: list = []  # [buffer, start, end] or a finished memoryview
        for batch in matrix.batches():  # verified before anything is sent
            column = batch.column(0)
            if column.type == pa.bool_():
                runs.append(memoryview(codec.element_bytes(column)))
            elif len(column):
                width = column.type.byte_width
                buf = column.buffers()[1]
                start, end = column.offset * width, (column.offset + len(column)) * width
                last = runs[-1] if runs else None
                if isinstance(last, list) and last[0].address == buf.address and last[2] == start:
                    last[2] = end
                else:
                    runs.append([buf, start, end])
        parts = []
        step = max(self.store.chunk_bytes, ucx.PART_BYTES)
        for run in runs:
            raw = memoryview(run[0])[run[1]:run[2]] if isinstance(run, list) else run
            whole = np.frombuffer(raw, dtype=np.uint8)
            # pieces of a bounded size: the lanes share even a one-batch matrix
            parts.extend(ucx.views(whole, ucx.split(whole.nbytes, step)))
        self.stats.add_bytes(sent=entry.nbytes)
        reply = protocol.ok(index_id=key.index_id, matrix_type=key.matrix_type,
                            **entry.describe())
        if entry.nbytes <= req["inline_max"]:
            # one round trip instead of a control call and a UCX transfer
            data = np.concatenate(parts) if parts else np.empty(0, np.uint8)
            return {**reply, "parts": [], "inline": True}, pa.py_buffer(data)
        future = rt.start("send", peers, req["tag"], parts)
        future.add_done_callback(lambda f: _log_failure(f, rt, peers, f"UcxGet {key}"))
        return {**reply, "parts": [p.nbytes for p in parts]}, None

    def _drain(self, rt, peers: list[bytes], req: dict) -> None:
        """A refused UcxPut: the client started sending before it called, so its messages
        wait at this server. A 1-byte receive per part takes each one without its bytes
        (UCX truncates it) and completes the client's send: nothing is left pending on
        either side."""
        scratch = np.empty(1, np.uint8)
        rt.start("recv", peers, req["tag"], [scratch] * len(req["parts"]))

    def drain_refused(self, body, action: str = protocol.UCX_PUT) -> None:
        """:meth:`_drain` for a UcxPut or UcxPutBatch (``action``) refused before its
        handler ran (a limit), if its body parses; best effort."""
        try:
            raw = body.to_pybytes() if body is not None else b""
            if action == protocol.UCX_PUT_BATCH:
                req = transfers.parse_ucx_batch_body(raw, action)
            else:
                req = transfers.parse_ucx_body(raw, protocol.UCX_PUT)
            if self.enabled:
                rt = ucx.runtime()
                self._drain(rt, self.peers(rt, req), req)
        except Exception as e:  # noqa: BLE001 - the refusal is what the client gets
            log.debug("could not drain a refused UcxPut: %s", e)

    def put(self, req: dict) -> dict:
        rt = self.runtime()
        peers = self.peers(rt, req)
        key, dtype = req["key"], codec.DTYPES[req["dtype"]]
        nbytes = req["nbytes"]
        # a reused tag is refused before anything is received (no drain either: what waits
        # under that tag belongs to the transfer that used it first)
        self.tags.claim(req["tag"], f"UcxPut {key}")
        try:
            self._check_digest(req, f"UcxPut {key}")
            if nbytes % dtype.itemsize or nbytes // dtype.itemsize != codec.numel(req["shape"]):
                raise InvalidArgument(
                    f"nbytes {nbytes} contradicts shape {list(req['shape'])} of {dtype.name}")
            session = self.store.begin_put(key, dtype, nbytes // dtype.itemsize, req["xxh3"])
        except TQError:
            self._drain(rt, peers, req)
            raise
        try:
            buf = pa.allocate_buffer(nbytes) if nbytes else pa.py_buffer(b"")
            whole = np.frombuffer(buf, dtype=np.uint8) if nbytes else None
            views = ucx.views(whole, req["parts"])
            try:
                rt.run("recv", peers, req["tag"], views)
            except Unavailable:
                rt.forget(peers)
                raise
            self.stats.add_bytes(received=nbytes)
            session.append(codec.raw_values(buf, dtype))
            entry = session.commit(req["shape"])
        finally:
            session.abort()  # no-op after a commit
        return protocol.ok(index_id=key.index_id, matrix_type=key.matrix_type, **entry.describe())

    def _check_digest(self, req: dict, what: str) -> None:
        if self.digests and req.get("xxh3") is None:
            raise InvalidArgument(f"{what}: this server authenticates, so a UCX upload must "
                                  "carry the xxh3 digest of its bytes (checked before it is "
                                  "stored)")

    def put_batch(self, req: dict, limits, limiter) -> dict:
        """UcxPutBatch: receives the items' bytes, end to end, into one buffer (the parts
        the client cut them into, spread over the lanes), then stores each item on its own
        as a slice of it (a result per item, as BatchWrite answers). A call over the batch
        limits is refused whole; one a memory store has no room for fails every item (the
        transport is fine). Either way what the client sent is taken without its bytes."""
        rt = self.runtime()
        peers = self.peers(rt, req)
        items, nbytes = req["items"], req["nbytes"]
        what = f"UcxPutBatch of {len(items)} items"
        self.tags.claim(req["tag"], what)
        try:
            self._check_digest(req, what)
            batch_ops.check_batch_limits(limits, limiter, len(items), nbytes, "UcxPutBatch")
        except TQError:
            self._drain(rt, peers, req)
            raise
        try:  # the receive buffer counts against the capacity until the items are stored
            self.store.reserve(what, nbytes)
        except Unavailable as e:
            self._drain(rt, peers, req)
            return protocol.ok(results=[batch_ops._failed(*_ids(item), e) for item in items])
        try:
            # numpy's (glibc's) memory, not Arrow's pool: the items keep it, and the
            # housekeeping gives glibc's back once they are gone; numpy also asks for huge
            # pages from 4 MiB on (32 x 256 KiB of new keys: 23-24 ms against 27-30 a batch)
            whole = np.empty(nbytes, np.uint8)
            try:
                rt.run("recv", peers, req["tag"], ucx.views(whole, req["parts"]))
            except Unavailable:
                rt.forget(peers)
                raise
        finally:
            self.store.unreserve(nbytes)
        self.stats.add_bytes(received=nbytes)
        if req.get("xxh3") is not None and xxhash.xxh3_64_hexdigest(whole) != req["xxh3"]:
            e = InvalidArgument(f"{what}: the bytes received do not match the xxh3 digest "
                                "of the call; nothing was stored")
            return protocol.ok(results=[batch_ops._failed(*_ids(item), e) for item in items])
        results = batch_ops.write_slices(self.store, pa.py_buffer(whole), items, "UcxPutBatch")
        return protocol.ok(results=results)

    def get_batch(self, req: dict, limits, limiter) -> tuple[dict, pa.Buffer | None]:
        """UcxGetBatch: a result per item, in order (as a BatchRead row); the raw bytes of
        the items answered with ``inline: true`` follow end to end, in order, as one
        stream. At most ``inline_max`` bytes of it come back with the answer (one round
        trip); a larger one goes over UCX in the ``parts`` the answer lists (part ``i``
        with tag ``tag + i``). An item over ``max_bytes``, or beyond ``max_batch_bytes``
        in all, is answered with ``inline: false``: the client reads it with UcxGet."""
        rt = self.runtime()
        peers = self.peers(rt, req)
        items = req["items"]
        self.tags.claim(req["tag"], f"UcxGetBatch of {len(items)} items")
        batch_ops.check_batch_limits(limits, limiter, len(items), 0, "UcxGetBatch")
        budget = limits.max_batch_bytes or 2**62
        rows: list[dict] = []
        pieces: list = []
        total = 0
        for item in items:
            if isinstance(item, BadItem):
                rows.append(batch_ops._failed(item.index_id, item.matrix_type, item.error))
                continue
            try:
                row, data = batch_ops.read_one(self.store, item, req["max_bytes"])
            except TQError as e:
                rows.append(batch_ops._failed(item.index_id, item.matrix_type, e))
                continue
            except Exception as e:  # one item's failure must not fail the others
                err = batch_ops._unexpected(e, "UcxGetBatch item")
                rows.append(batch_ops._failed(item.index_id, item.matrix_type, err))
                continue
            size = sum(p.size for p in data) if data is not None else 0
            if data is None or total + size > budget:
                row["inline"] = False
            else:
                pieces.extend(p for p in data if p.size)
                total += size
            rows.append(row)
        self.stats.add_bytes(sent=total)
        # items stored from one batch and read in its order lie end to end: one piece
        joined = batch_ops.contiguous(pieces)
        pieces = [np.frombuffer(p, dtype=np.uint8)
                  for p in ([joined] if joined is not None else pieces)]
        if total <= req["inline_max"]:
            stream = np.concatenate(pieces) if pieces else np.empty(0, np.uint8)
            return protocol.ok(results=rows, stream="inline"), pa.py_buffer(stream)
        parts = ucx.coalesce(pieces, len(peers))
        future = rt.start("send", peers, req["tag"], parts)
        future.add_done_callback(lambda f: _log_failure(f, rt, peers, "UcxGetBatch"))
        return protocol.ok(results=rows, stream="ucx", parts=[p.nbytes for p in parts]), None


def _ids(item) -> tuple:
    """The index_id and matrix_type of a batch item (a PackItem or a BadItem)."""
    if isinstance(item, BadItem):
        return item.index_id, item.matrix_type
    return item.key.index_id, item.key.matrix_type


def _log_failure(future, rt, peers: list[bytes], what: str) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        rt.forget(peers)
        log.warning("%s: UCX send failed (%s); the client falls back to gRPC",
                    what, type(error).__name__)
