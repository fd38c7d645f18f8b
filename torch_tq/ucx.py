"""The UCX data plane: bulk bytes of put/get over UCX (RDMA, shared memory, CMA or TCP, as
UCX picks), with gRPC/Flight as the control plane.

gRPC carries everything but the bytes: the request, its validation, limits, metadata,
errors, the acknowledgement. The bytes move between the client's and the server's buffers
over UCX endpoints created from *worker addresses* exchanged over gRPC (``UcxInfo`` and the
``address`` field of each request): measured here, that is what lets UCX choose shared
memory on one host (~6.8 GB/s), where endpoints from a listener's socket address stay on
TCP (~0.6 GB/s). So the data plane needs no port of its own.

* **get** (``UcxGet``): the server opens and verifies the matrix, answers its dtype, shape
  and the byte size of each part (one part per stored batch), and sends the parts tagged
  ``tag + i``; the client receives them straight into the result tensor.
* **put** (``UcxPut``): the client starts sending its parts tagged ``tag + i``, then makes
  the call; the server checks the request (size limit, free space), receives the parts
  into one buffer, stores and publishes the matrix as a gRPC upload would, and answers.

The tag is a random 64-bit number the client picks per transfer: it names the transfer and
is honoured only for the call that carries it. Endpoints are created without UCX's error
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
from typing import Any

from torch_tq.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("TORCH_TQ_UCX_TIMEOUT", "30"))
_MASK = (1 << 64) - 1


class Runtime:
    """One UCX worker per process, progressed by an asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        try:
            import ucxx
        except ImportError as e:  # also: its native libraries failed to load
            raise Unavailable(f"UCX is not available here: {e}") from None
        self._ucxx = ucxx
        self.loop = asyncio.new_event_loop()
        self._endpoints: dict[bytes, Any] = {}
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self.pid = os.getpid()

        def start() -> None:  # runs on the loop, so ucxx binds its futures to it
            try:
                ucxx.init(enable_python_future=_env_flag("UCXPY_ENABLE_PYTHON_FUTURE", True))
                ready.set_result(ucxx.get_worker_address().tobytes())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                ready.set_exception(e)
                self.loop.stop()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(start)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name="torch_tq-ucx")
        self.thread.start()
        try:
            self.address = ready.result(timeout=60)
        except Exception as e:
            raise Unavailable(f"UCX failed to start: {e}") from None
        self.address_b64 = base64.b64encode(self.address).decode()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float):
        future = self.submit(asyncio.wait_for(coro, timeout))
        try:
            return future.result(timeout + 5)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            raise Unavailable(f"UCX transfer timed out after {timeout:g}s") from None

    async def endpoint(self, address: bytes):
        ep = self._endpoints.get(address)
        if ep is None:
            ucxx = self._ucxx
            ep = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(address), endpoint_error_handling=False)
            self._endpoints[address] = ep
        return ep

    async def send_parts(self, address: bytes, tag: int, parts: list) -> None:
        ep = await self.endpoint(address)
        await asyncio.gather(*(ep.send(part, tag=(tag + i) & _MASK, force_tag=True)
                               for i, part in enumerate(parts) if len(part)))

    async def recv_parts(self, address: bytes, tag: int, parts: list) -> None:
        ep = await self.endpoint(address)
        await asyncio.gather(*(ep.recv(part, tag=(tag + i) & _MASK, force_tag=True)
                               for i, part in enumerate(parts) if len(part)))

    def forget(self, address: bytes) -> None:
        """Drops a cached endpoint (after a failure: the next transfer makes a new one)."""
        self._endpoints.pop(address, None)


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


def split(nbytes: int, part_bytes: int) -> list[int]:
    """Byte sizes of the parts of a transfer (the last one shorter)."""
    if nbytes == 0:
        return []
    full, rest = divmod(nbytes, part_bytes)
    return [part_bytes] * full + ([rest] if rest else [])


def views(whole, sizes: list[int]) -> list:
    """Consecutive slices of the byte array ``whole`` of the given sizes (no copy)."""
    out, start = [], 0
    for size in sizes:
        out.append(whole[start : start + size])
        start += size
    return out
