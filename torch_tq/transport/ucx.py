"""The UCX data plane: bulk bytes of put/get over UCX (RDMA, shared memory, CMA or TCP, as
UCX picks), with gRPC/Flight as the control plane.

gRPC carries everything but the bytes: the request, its validation, limits, metadata,
errors, the acknowledgement. The bytes move between the client's and the server's buffers
over UCX endpoints created from *worker addresses* exchanged over gRPC (``UcxInfo`` and the
``address`` field of each request): measured here, that is what lets UCX choose shared
memory on one host (~6.8 GB/s), where endpoints from a listener's socket address stay on
TCP (~0.6 GB/s). So the data plane needs no port of its own.

* **get** (``UcxGet``): the server opens and verifies the matrix, answers its dtype, shape
  and the byte size of each part (the stored batches, cut to at most ``chunk_bytes``), and
  sends the parts tagged ``tag + i``; the client receives them straight into the result
  tensor.
* **put** (``UcxPut``): the client starts sending its parts tagged ``tag + i``, then makes
  the call; the server checks the request (size limit, free space), receives the parts
  into one buffer, stores and publishes the matrix as a gRPC upload would, and answers.

Each process runs several UCX workers, *lanes* (:class:`Runtime`), and part ``i`` moves on
lane ``i % n``, so one transfer uses several cores. The tag is a random 64-bit number the
client picks per transfer: it names the transfer and is honoured only for the call that
carries it. Endpoints are created without UCX's error
handling (with it, UCX rules out shared memory), so a peer that dies is not reported: every
transfer runs under a timeout, and the client falls back to gRPC when one fails.

``ucxx`` is optional (``pip install 'torch_tq[ucx]'``); without it nothing here is loaded.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from torch_tq.transport import ucx_address
from torch_tq.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("TORCH_TQ_UCX_TIMEOUT", "30"))
# Before UCX's libraries load (they read it then): no warning about variables ucxx itself
# sets; UCX prints its warnings on stdout, which belongs to the program.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def installed() -> bool:
    """Whether ucxx imports here (loading UCX with this module's settings)."""
    try:
        import ucxx  # noqa: F401
    except ImportError:
        return False
    return True
_MASK = (1 << 64) - 1


class _Lane:
    """One UCX worker (with its progress thread) driven by an asyncio loop in a daemon
    thread, and the endpoints it made."""

    def __init__(self, ucxx, index: int) -> None:
        from ucxx._lib_async.application_context import ApplicationContext

        self._ucxx = ucxx
        self.loop = asyncio.new_event_loop()
        # the endpoints this lane made, least recently used first
        self._endpoints: OrderedDict[bytes, Any] = OrderedDict()
        ready: concurrent.futures.Future = concurrent.futures.Future()

        def start() -> None:  # runs on the loop, so ucxx binds its futures to it
            try:
                # Python futures: a request's completion wakes its awaiting coroutine;
                # without them ucxx polls every request in the loop, which kept a core
                # busy and halved the transfer here (2 cores).
                self.ctx = ApplicationContext(
                    enable_python_future=_env_flag("UCXPY_ENABLE_PYTHON_FUTURE", True))
                ready.set_result(self.ctx.worker_address.tobytes())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                ready.set_exception(e)
                self.loop.stop()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(start)
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True, name=f"torch_tq-ucx-{index}").start()
        self.address = ready.result(timeout=60)

    async def endpoint(self, address: bytes):
        ep = self._endpoints.get(address)
        if ep is None:
            ep = await self.ctx.create_endpoint_from_worker_address(
                self._ucxx.get_ucx_address_from_buffer(address), endpoint_error_handling=False)
            self._endpoints[address] = ep
            while len(self._endpoints) > MAX_ENDPOINTS:  # a server outlives many clients
                self._endpoints.popitem(last=False)
        else:
            self._endpoints.move_to_end(address)
        return ep

    async def transfer(self, op: str, address: bytes, items: list) -> None:
        ep = await self.endpoint(address)
        call = ep.send if op == "send" else ep.recv
        await asyncio.gather(*(call(part, tag=tag, force_tag=True) for tag, part in items))


class Runtime:
    """This process's UCX workers ("lanes"): each has its own progress thread, so the parts
    of one transfer move on several cores at once (on one host each lane's copy is a
    single-threaded CMA read: two lanes moved 256 MiB at ~9 GB/s here, one at ~6).

    A transfer's part ``i`` travels with tag ``tag + i`` on lane ``i % n``, from this
    process's lane to the peer's lane of the same number; ``n`` is the number of peer
    addresses the transfer names (at most :attr:`lanes`)."""

    def __init__(self) -> None:
        try:
            import ucxx
        except ImportError as e:  # also: its native libraries failed to load
            raise Unavailable(f"UCX is not available here: {e}") from None
        self.pid = os.getpid()
        count = int(os.environ.get("TORCH_TQ_UCX_LANES", 0)) or min(4, os.cpu_count() or 1)
        try:
            self._lanes = [_Lane(ucxx, i) for i in range(max(1, min(count, MAX_LANES)))]
        except Exception as e:
            raise Unavailable(f"UCX failed to start: {e}") from None
        self.addresses = [lane.address for lane in self._lanes]
        self.addresses_b64 = [base64.b64encode(a).decode() for a in self.addresses]

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def start(self, op: str, peers: list[bytes], tag: int, parts: list,
              timeout: float = DEFAULT_TIMEOUT_S) -> concurrent.futures.Future:
        """Starts sending (``op="send"``) or receiving the parts; returns a future that
        completes when all have, or fails with the first failure (:class:`Unavailable` on
        a timeout)."""
        n = min(len(peers), self.lanes)
        if n < 1:
            raise InvalidArgument("a UCX transfer needs the peer's worker addresses")
        per_lane: list[list] = [[] for _ in range(n)]
        for i, part in enumerate(parts):
            if len(part):
                per_lane[i % n].append(((tag + i) & _MASK, part))
        futures = [
            asyncio.run_coroutine_threadsafe(
                _timed(self._lanes[k].transfer(op, peers[k], items), timeout),
                self._lanes[k].loop)
            for k, items in enumerate(per_lane) if items
        ]
        return _all(futures)

    def run(self, op: str, peers: list[bytes], tag: int, parts: list,
            timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """:meth:`start`, then waits for it.

        Raises:
            Unavailable: it timed out or failed (the caller falls back to gRPC).
        """
        future = self.start(op, peers, tag, parts, timeout)
        try:
            future.result(timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Unavailable(f"UCX transfer timed out after {timeout:g}s") from None
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable(f"UCX transfer failed: {e}") from None

    def connect(self, peers: list[bytes], timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Makes the endpoints to the peer's lanes (so that the first transfer does not).

        Raises:
            Unavailable: an endpoint could not be made in time.
        """
        n = min(len(peers), self.lanes)
        futures = [asyncio.run_coroutine_threadsafe(
            _timed(self._lanes[k].endpoint(peers[k]), timeout), self._lanes[k].loop)
            for k in range(n)]
        try:
            _all(futures).result(timeout + 5)
        except Exception as e:
            raise Unavailable(f"UCX endpoints could not be made: {e}") from None

    def unknown(self, peers: list[bytes]) -> list[bytes]:
        """The peer addresses that have no endpoint yet on their lane."""
        return [a for lane, a in zip(self._lanes, peers) if a not in lane._endpoints]

    def forget(self, peers: list[bytes]) -> None:
        """Drops cached endpoints (after a failure: the next transfer makes new ones)."""
        for lane, address in zip(self._lanes, peers):
            lane._endpoints.pop(address, None)


MAX_LANES = 16
# The parts of a transfer are at least this large: enough of them to keep every lane busy,
# few enough that ucxx's pool of request futures (refilled by its notifier thread) keeps up
# (4 MiB parts of a 1 GiB matrix drained it, and ucxx warned on stdout).
PART_BYTES = 16 << 20
MAX_ENDPOINTS = 256  # per lane; the least recently used goes first
JOIN_BYTES = 1 << 20  # pieces of a transfer under this size are joined into parts


async def _timed(coro, timeout: float):
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise Unavailable(f"UCX transfer timed out after {timeout:g}s") from None


def _all(futures: list) -> concurrent.futures.Future:
    """One future for several: done when all are, failed with the first failure;
    cancelling it cancels them all."""
    combined: concurrent.futures.Future = concurrent.futures.Future()
    pending = [len(futures)]
    lock = threading.Lock()

    def done(f: concurrent.futures.Future) -> None:
        with lock:
            pending[0] -= 1
            last = pending[0] == 0
        if combined.done():
            return
        if f.cancelled():
            combined.cancel()
        elif f.exception() is not None:
            try:
                combined.set_exception(f.exception())
            except concurrent.futures.InvalidStateError:
                pass
        elif last:
            try:
                combined.set_result(None)
            except concurrent.futures.InvalidStateError:
                pass

    if not futures:
        combined.set_result(None)
        return combined
    combined.add_done_callback(lambda c: [f.cancel() for f in futures] if c.cancelled() else None)
    for f in futures:
        f.add_done_callback(done)
    return combined


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value != "0"


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's UCX runtime, started on first use.

    Raises:
        Unavailable: ucxx is not installed or UCX cannot start.
    """
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime()
        return _runtime


def decode_address(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 8192:
        raise InvalidArgument("address must be a base64 UCX worker address")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidArgument("address must be a base64 UCX worker address") from None


def decode_addresses(value: Any) -> list[bytes]:
    """A peer's lanes: a list of 1 to MAX_LANES base64 worker addresses (or one, as text),
    each checked against UCX's address layout (:func:`torch_tq.transport.ucx_address.parse`)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LANES:
        raise InvalidArgument(f"addresses must be a list of 1 to {MAX_LANES} base64 UCX "
                              "worker addresses")
    peers = [decode_address(v) for v in value]
    for address in peers:
        ucx_address.parse(address)
    return peers


def split(nbytes: int, part_bytes: int) -> list[int]:
    """Byte sizes of the parts of a transfer (the last one shorter)."""
    if nbytes == 0:
        return []
    full, rest = divmod(nbytes, part_bytes)
    return [part_bytes] * full + ([rest] if rest else [])


def coalesce(pieces: list, lanes: int) -> list:
    """The parts of a transfer of many pieces (byte arrays, sent end to end): runs of
    pieces under :data:`JOIN_BYTES` joined into one part of about an even share of the
    lanes, every other piece its own parts, without a copy. For small pieces a UCX message
    each cost more than the copy: 32 pieces of 256 KiB read in 22-23 ms joined into two
    parts, 30-32 ms as 32 (and 13.6 against 16.8 ms written); 8 of 4 MiB read at 2.3 GB/s
    from their own memory, 0.8 GB/s joined (a copy into new memory)."""
    total = sum(p.nbytes for p in pieces)
    target = max(1, min(JOIN_BYTES * 4, -(-total // max(1, lanes))))
    parts: list = []
    run: list = []
    held = 0

    def flush() -> None:
        nonlocal run, held
        if run:
            parts.append(run[0] if len(run) == 1 else np.concatenate(run))
        run, held = [], 0

    for piece in pieces:
        if not piece.nbytes:
            continue
        if piece.nbytes >= min(target, JOIN_BYTES):
            flush()
            parts.extend(views(piece, split(piece.nbytes, PART_BYTES)))
            continue
        run.append(piece)
        held += piece.nbytes
        if held >= target:
            flush()
    flush()
    return parts


def views(whole, sizes: list[int]) -> list:
    """Consecutive slices of the byte array ``whole`` of the given sizes (no copy)."""
    out, start = [], 0
    for size in sizes:
        out.append(whole[start : start + size])
        start += size
    return out
