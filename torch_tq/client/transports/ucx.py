"""UCX: the server's workers send and receive a matrix's bytes straight into place (RDMA
where the fabric has it); gRPC carries the control call that names the transfer."""

from __future__ import annotations

import logging
import os
import secrets

import numpy as np
import pyarrow as pa
import xxhash

from torch_tq.client.connection import Connection, connection_lost
from torch_tq.client.devices import Want, pinned_out, tensor_from
from torch_tq.client.results import ItemResult
from torch_tq.client.transports.base import Capabilities, Decline, TransportFailed
from torch_tq.client.transports.grpc import GrpcTransport
from torch_tq.codec import tensors as codec
from torch_tq.codec import assemble
from torch_tq.errors import ForkedProcessError, InternalError, TQError, Unavailable
from torch_tq.model import Key
from torch_tq.protocol import commands as protocol

log = logging.getLogger(__name__)

# Up to this size a UCX client's matrix travels with the gRPC call itself: a control round
# trip plus a UCX transfer costs more than one gRPC round trip below ~1.5 MiB here
# (torch_tq.tools.bench: a 1 MiB get 1.3 ms over gRPC, 2.0 ms over UCX; 2 MiB: 2.4 vs 1.7 ms).
INLINE_BYTES = 1 << 20


def _data_plane_broke(e: Unavailable) -> bool:
    """Whether a UCX call failed for UCX (every such error of the server's names it) or
    because its connection broke, rather than by the server's choice."""
    return "UCX" in e.message or connection_lost(e)


class UcxTransport:
    """Large puts and gets over the server's UCX lanes, and batches of more than
    :data:`INLINE_BYTES` as one UCX transfer each (UcxPutBatch/UcxGetBatch); smaller batches
    travel with their gRPC call."""

    name = "ucx"
    can = Capabilities(device_memory=True)
    refusal = "UCX cannot be used"
    warn_if_unavailable = True  # the caller named a ucx:// location: say why it is not used

    def __init__(self, connection: Connection, grpc: GrpcTransport, peers: list[bytes]) -> None:
        self.connection = connection
        self.grpc = grpc
        self.peers = peers
        # UCX receiving straight into CUDA memory (TORCH_TQ_UCX_CUDA=1): off by default until
        # measured on a GPU (benchmarks/gpu_check.py); a GPU get otherwise lands in pinned
        # host memory, then a non-blocking copy
        self.cuda_direct = os.environ.get("TORCH_TQ_UCX_CUDA", "0") == "1"

    @classmethod
    def wanted(cls, ucx_locations: list[str]) -> bool:
        """Whether ``transport="auto"`` tries this transport."""
        return bool(ucx_locations)

    @classmethod
    def open(cls, connection: Connection, grpc: GrpcTransport) -> tuple[UcxTransport | None, str]:
        from torch_tq.transport import ucx

        try:
            rt = ucx.runtime()
            try:
                info = connection.action(protocol.UCX_INFO, {}, "ucx info")
            except Unavailable as e:
                # Seen once in a loaded CI run: the connection broke as the server's UCX
                # runtime started. UcxInfo changes nothing, so it is simply asked again.
                if not connection_lost(e):
                    raise
                log.info("torch_tq client %s: ucx info: %s; asking again",
                         connection.location, e.message)
                info = connection.action(protocol.UCX_INFO, {}, "ucx info")
            # the server's lanes this process pairs with its own
            peers = ucx.decode_addresses(info.get("addresses", info.get("address")))
            peers = peers[: rt.lanes]
            rt.connect(peers)
        except ForkedProcessError:
            raise  # not a UCX problem: no connection may be made here at all
        except TQError as e:
            return None, str(e)
        log.info("torch_tq client %s: transport ucx (%d lanes)", connection.location, len(peers))
        return cls(connection, grpc, peers), ""

    def put(self, conn, key: Key, dtype: codec.DType, shape, flat, compression) -> None:
        from torch_tq.transport import ucx

        if flat.nbytes <= INLINE_BYTES:  # small: one gRPC upload beats two messages
            raise Decline
        rt = ucx.runtime()
        raw = flat.view(np.uint8).reshape(-1) if flat.size else np.empty(0, np.uint8)
        sizes = ucx.split(raw.nbytes, max(self.connection.chunk_bytes, ucx.PART_BYTES))
        parts = ucx.views(raw, sizes)
        tag = secrets.randbits(64)  # unguessable: it is all that binds bytes to a call
        sending = rt.start("send", self.peers, tag, parts)
        body = {"index_id": key.index_id, "matrix_type": key.matrix_type, "shape": list(shape),
                "dtype": dtype.name, "nbytes": raw.nbytes, "parts": sizes,
                "addresses": rt.addresses_b64[: len(self.peers)], "tag": tag}
        if self.connection.checksum or self.connection.credentials.token:
            # an authenticating server binds the bytes to this call by their digest
            body["xxh3"] = xxhash.xxh3_64_hexdigest(memoryview(raw))
        self._call_sending(sending, protocol.UCX_PUT, body, f"put {key}")

    def _call_sending(self, sending, action: str, body: dict, what: str) -> dict:
        """Calls ``action`` while ``sending`` (the UCX send of its bytes) runs; its answer.
        A refusal cancels the send (the server takes what arrived without its bytes).

        Raises:
            TransportFailed: UCX failed, or the connection broke: gRPC may do better.
            Unavailable: the server's answer (over a quota, a memory store full): the
                caller's, and the data plane is fine.
        """
        from torch_tq.transport import ucx

        try:
            reply = self.connection.action(action, body, what)
        except Unavailable as e:
            sending.cancel()
            if e.retry_after_ms is not None or not _data_plane_broke(e):
                raise
            raise TransportFailed(str(e)) from e
        except BaseException:
            sending.cancel()  # refused: the server received nothing
            raise
        try:
            sending.result(ucx.DEFAULT_TIMEOUT_S)
        except Exception as e:  # the server answered, so the bytes did arrive
            log.debug("UCX send of %s reported %s after the server's answer", what, e)
        return reply

    def get(self, conn, key: Key, want: Want):
        direct = want.to_cuda and want.out is None and not want.shared and self.cuda_direct
        try:
            result = self._receive(key, want, want.device if direct else None)
        except TransportFailed as e:
            if not direct:
                raise
            # CUDA memory as the receive buffer failed: pinned host memory from now on
            log.warning("torch_tq client %s: UCX into CUDA memory failed (%s); receiving "
                        "into pinned host memory", self.connection.location, e)
            self.cuda_direct = False
            return self.get(conn, key, want)
        return want.place(result)  # a no-op for what UCX wrote into the device itself

    def _receive(self, key: Key, want: Want, cuda=None):
        """A get over UCX, received straight into the result: a tensor on the CUDA device
        ``cuda`` when given (UCX writes GPU memory), else a pooled pinned block when
        ``want.pinned`` (the host side of a copy to a GPU), else host memory."""
        from torch_tq.transport import ucx

        rt = ucx.runtime()
        tag = secrets.randbits(64)  # unguessable: it is all that binds bytes to a call
        body = {"index_id": key.index_id, "matrix_type": key.matrix_type,
                "addresses": rt.addresses_b64[: len(self.peers)], "tag": tag,
                "inline_max": INLINE_BYTES}
        reply = self.connection.action(protocol.UCX_GET, body, f"get {key}", extra=1)
        dtype, shape = codec.DTYPES[reply["dtype"]], tuple(reply["shape"])
        out = pinned_out(dtype, shape) if want.pinned else want.out
        assembler = assemble.TensorAssembler(dtype, shape, out, want.shared)
        if reply.get("inline"):  # small: the bytes came with the answer
            (data,) = reply["_extra"] or [pa.py_buffer(b"")]
            if data.size != codec.numel(shape) * dtype.itemsize:
                raise InternalError(f"get {key}: the server sent {data.size} bytes")
            if data.size:
                assembler.add(codec.raw_values(data, dtype))
            result = assembler.finish()
            self.connection.count_get(assembler.copied_bytes)
            return result
        if cuda is not None:
            import torch

            result = torch.empty(shape, dtype=dtype.torch, device=cuda)
            whole = result.reshape(-1).view(torch.uint8)  # views of it carry the CUDA
            # array interface, which ucxx hands to UCX as GPU memory
        else:
            result = assembler.allocate()
            whole = assemble._byte_view(result) if result.numel() else np.empty(0, np.uint8)
        nbytes = codec.numel(shape) * dtype.itemsize
        if sum(reply["parts"]) != nbytes:
            raise InternalError(f"get {key}: the server announced {sum(reply['parts'])} bytes "
                                f"for {nbytes}")
        views = ucx.views(whole, reply["parts"])
        try:
            rt.run("recv", self.peers, tag, views)
        except Exception as e:
            rt.forget(self.peers)
            raise TransportFailed(str(e)) from e
        self.connection.count_get(0)
        return result

    def put_many(self, conn, group: list) -> list[dict]:
        """One UcxPutBatch: the items' bytes end to end, in order, as the parts of one
        transfer over the lanes; a result per item."""
        from torch_tq.transport import ucx

        if sum(flat.nbytes for *_, flat in group) <= INLINE_BYTES:
            raise Decline  # small: one BatchWrite beats a control call and a transfer
        rt = ucx.runtime()
        items = [{"index_id": key.index_id, "matrix_type": key.matrix_type,
                  "dtype": dtype.name, "shape": list(shape), "nbytes": flat.nbytes}
                 for _, key, dtype, shape, flat in group]
        parts = ucx.coalesce([flat.view(np.uint8).reshape(-1) for *_, flat in group],
                             min(len(self.peers), rt.lanes))
        tag = secrets.randbits(64)  # unguessable: it is all that binds bytes to a call
        what = f"UcxPutBatch of {len(group)} items"
        sending = rt.start("send", self.peers, tag, parts)
        body = {"items": items, "parts": [p.nbytes for p in parts],
                "addresses": rt.addresses_b64[: len(self.peers)], "tag": tag}
        if self.connection.checksum or self.connection.credentials.token:
            digest = xxhash.xxh3_64()
            for *_, flat in group:
                digest.update(memoryview(flat.view(np.uint8).reshape(-1)))
            body["xxh3"] = digest.hexdigest()
        reply = self._call_sending(sending, protocol.UCX_PUT_BATCH, body, what)
        if len(reply.get("results", ())) != len(group):
            raise InternalError(
                f"{what}: the server answered for {len(reply.get('results', ()))} items")
        return reply["results"]

    def get_many(self, conn, keys: list[Key], max_inline_bytes: int | None):
        """One UcxGetBatch: every found item's bytes end to end in one transfer over the
        lanes, received straight into buffers the items' tensors are views of (or, for a
        small batch, with the answer)."""
        from torch_tq.transport import ucx

        rt = ucx.runtime()
        tag = secrets.randbits(64)  # unguessable: it is all that binds bytes to a call
        what = f"UcxGetBatch of {len(keys)} items"
        body = {"items": [{"index_id": k.index_id, "matrix_type": k.matrix_type} for k in keys],
                "addresses": rt.addresses_b64[: len(self.peers)], "tag": tag,
                "inline_max": INLINE_BYTES}
        if max_inline_bytes is not None:
            body["max_bytes"] = max_inline_bytes
        reply = self.connection.action(protocol.UCX_GET_BATCH, body, what, extra=1)
        rows = reply.get("results", [])
        if len(rows) != len(keys):
            raise InternalError(f"{what}: the server answered for {len(rows)} items")
        # the items' bytes, end to end: with the answer, or over UCX
        layout, total = [], 0
        for row in rows:
            if row["success"] and row.get("inline"):
                dtype, shape = codec.DTYPES[row["dtype"]], tuple(row["shape"])
                nbytes = codec.numel(shape) * dtype.itemsize
                layout.append((dtype, shape, total, nbytes))
                total += nbytes
        if reply.get("stream") == "inline":
            stream = reply["_extra"][0] if reply["_extra"] else pa.py_buffer(b"")
            if stream.size != total:
                raise InternalError(f"{what}: the server sent {stream.size} bytes for {total}")
            regions = [(0, stream)]
        else:
            parts = reply.get("parts", [])
            if sum(parts) != total:
                raise InternalError(f"{what}: the server announced {sum(parts)} bytes for "
                                    f"{total}")
            regions = self._receive_stream(rt, tag, parts, {start for _, _, start, _ in layout})
        results = []
        places = iter(layout)
        k = 0
        for row in rows:
            tensor = None
            if row["success"] and row.get("inline"):
                dtype, shape, start, nbytes = next(places)
                while k + 1 < len(regions) and regions[k + 1][0] <= start:
                    k += 1
                base, buf = regions[k]
                tensor = tensor_from(buf, start - base, dtype, shape)
                self.connection.count_get(
                    0 if nbytes == 0 or tensor.untyped_storage().data_ptr()
                    == buf.address + start - base else nbytes)
            results.append(ItemResult(row["index_id"], row["matrix_type"], row["success"],
                                      row["code"], row["message"], tensor))
        return results

    def _receive_stream(self, rt, tag: int, parts: list[int], starts: set[int]) -> list:
        """Receives a UcxGetBatch stream cut into ``parts``; returns its regions as
        ``(offset, buffer)``. A region ends wherever a part and an item (``starts``: where
        each begins) end together, so that every item lies in one region and its tensor is
        a view of it: a run of small items that came as one part shares its buffer, a large
        item has a buffer of its own (what the allocator hands out again once the tensor
        is gone; one buffer for all of 8 x 4 MiB was new memory every call here, 0.8
        against 2.3 GB/s). numpy's memory: it asks for huge pages from 4 MiB on."""
        from torch_tq.transport import ucx

        regions, views, begin, pos, pending = [], [], 0, 0, []
        total = sum(parts)
        for size in parts:
            pending.append(size)
            pos += size
            if pos in starts or pos == total:
                whole = np.empty(pos - begin, np.uint8)
                views.extend(ucx.views(whole, pending))
                regions.append((begin, pa.py_buffer(whole)))
                begin, pending = pos, []
        if views:
            try:
                rt.run("recv", self.peers, tag, views)
            except Exception as e:
                rt.forget(self.peers)
                raise TransportFailed(str(e)) from e
        return regions or [(0, pa.py_buffer(b""))]

    def read_here(self, keys: list[Key]) -> None:
        return None

    def close(self) -> None:
        pass  # the UCX runtime is the process's, shared by its clients
