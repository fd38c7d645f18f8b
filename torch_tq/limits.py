"""Limits and quotas: per-client QPS and concurrent streams, calls per node.

pyarrow.flight enforces none of these (RELIABILITY.md §5): one OS thread serves each call in
flight, with no cap. :class:`Limiter` is consulted at the start of every handler and told when
the call has completed (from a server middleware, which gRPC calls even when the client
cancels or dies mid-stream).

A client is who it says it is in the ``x-tq-client-id`` header (``torch_tq.Client`` sends a
random id per client, kept across reconnects and pickling). ``context.peer()`` changes per
connection, so a caller without the header is keyed by its IP address only: every such
caller on one host shares one quota.

What the server cannot see: TCP connections as such (gRPC accepts and multiplexes them below
Python), so "connections per node" is enforced as concurrent calls per node; calls rejected
by gRPC itself before a handler runs are not counted.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import asdict, dataclass

from torch_tq.errors import InvalidArgument, Unavailable

CLIENT_ID_HEADER = "x-tq-client-id"
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}", re.ASCII)
_MAX_IDLE_CLIENTS = 4096


@dataclass(frozen=True)
class Limits:
    """A server's limits (the seed's defaults); 0 switches a limit off.

    Attributes:
        qps: calls per second per client over gRPC/TCP (a batch costs one per item).
        qps_ucx: the same over UCX (used by the UCX transport).
        qps_burst: how many calls a client may make at once after a quiet spell (the token
            bucket's size); default a tenth of a second's worth, at least 1.
        streams_per_client: concurrent calls (streams) per client.
        max_calls: concurrent calls per node.
        max_batch_items: items per BatchWrite/BatchRead call (the seed recommends 10-100).
        max_batch_bytes: bytes one BatchWrite call may carry.
    """

    qps: float = 1000.0
    qps_ucx: float = 10000.0
    qps_burst: float | None = None
    streams_per_client: int = 100
    max_calls: int = 1000
    max_batch_items: int = 1000
    max_batch_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("qps", "qps_ucx"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
                0 <= value < math.inf
            ):
                raise InvalidArgument(f"{name} must be a number >= 0 (0: no limit), got {value!r}")
        if self.qps_burst is not None and not (
            isinstance(self.qps_burst, (int, float)) and 1 <= self.qps_burst < math.inf
        ):
            raise InvalidArgument(f"qps_burst must be a number >= 1, got {self.qps_burst!r}")
        for name in ("streams_per_client", "max_calls", "max_batch_items", "max_batch_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be an integer >= 0 (0: no limit), got {value!r}")

    def burst(self, qps: float) -> float:
        if self.qps_burst is not None:
            return float(self.qps_burst)
        return max(1.0, qps / 10)

    def describe(self) -> dict:
        out = asdict(self)
        out["qps_burst"] = self.burst(self.qps) if self.qps else None
        return out


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class _Client:
    __slots__ = ("active", "stamp", "tokens", "ucx")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.active = 0
        self.ucx: _Bucket | None = None  # the UCX quota, made on first use


class Limiter:
    """Admission control for one server: a token bucket and a stream count per client, and a
    call count for the node. Thread-safe; O(1) per call."""

    def __init__(self, limits: Limits, clock=time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self.active = 0
        self.rejected: dict[str, int] = {}

    def _count(self, reason: str) -> None:  # the caller holds the lock
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _reject(self, reason: str, message: str, retry_after_s: float) -> Unavailable:
        self._count(reason)
        ms = max(1, int(math.ceil(retry_after_s * 1000)))
        return Unavailable(f"{message} (retry_after_ms={ms})")

    def _client(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            if len(self._clients) >= _MAX_IDLE_CLIENTS:
                self._forget_idle(now)
            state = _Client(self.limits.burst(self.limits.qps), now)
            self._clients[client] = state
        return state

    def _forget_idle(self, now: float) -> None:
        qps = self.limits.qps
        refill = self.limits.burst(qps) / qps if qps else 0.0
        for key in [k for k, s in self._clients.items() if s.active == 0 and now - s.stamp > refill]:
            del self._clients[key]

    def _refill(self, bucket, now: float, qps: float | None = None) -> None:
        qps = self.limits.qps if qps is None else qps
        if qps:
            burst = self.limits.burst(qps)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * qps)
        bucket.stamp = now

    def admit(self, client: str, ucx: bool = False) -> None:
        """Starts a call of ``client``, or raises :class:`Unavailable` with a retry hint.
        ``ucx``: a transfer over UCX, which draws on the UCX quota (``qps_ucx``).

        A call that was admitted must be :meth:`release`-d exactly once."""
        lim = self.limits
        with self._lock:
            now = self._clock()
            if lim.max_calls and self.active >= lim.max_calls:
                raise self._reject(
                    "node_calls", f"server busy: {self.active} calls in flight, the limit is "
                    f"{lim.max_calls} per node", 0.05)
            state = self._client(client, now)
            if lim.streams_per_client and state.active >= lim.streams_per_client:
                raise self._reject(
                    "client_streams", f"too many concurrent streams: client {client} has "
                    f"{state.active}, the limit is {lim.streams_per_client}", 0.05)
            qps = lim.qps_ucx if ucx else lim.qps
            bucket = state
            if ucx:
                if state.ucx is None:
                    state.ucx = _Bucket(lim.burst(lim.qps_ucx), now)
                bucket = state.ucx
            self._refill(bucket, now, qps)
            if qps:
                if bucket.tokens < 1:
                    raise self._reject(
                        "qps_ucx" if ucx else "qps",
                        f"rate limit: client {client} is over {qps:g} calls/s"
                        f"{' over UCX' if ucx else ''}", (1 - bucket.tokens) / qps)
                bucket.tokens -= 1
            state.active += 1
            self.active += 1

    def charge(self, client: str, n: int) -> None:
        """Charges ``n`` more calls' worth (the items of a batch beyond its first) to an
        admitted call. The bucket may go into debt: the client's next calls wait it off."""
        if n <= 0 or not self.limits.qps:
            return
        with self._lock:
            state = self._clients.get(client)
            if state is not None:
                self._refill(state, self._clock())
                state.tokens -= n

    def release(self, client: str) -> None:
        with self._lock:
            self.active -= 1
            state = self._clients.get(client)
            if state is not None:
                state.active -= 1

    def count_rejection(self, reason: str) -> None:
        with self._lock:
            self._count(reason)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "calls_in_flight": self.active,
                "clients_active": sum(1 for s in self._clients.values() if s.active),
                "clients_known": len(self._clients),
                "rejected": dict(sorted(self.rejected.items())),
                "limits": self.limits.describe(),
            }


def client_identity(headers: dict, peer: str | None) -> str:
    """The quota key of a call: its ``x-tq-client-id`` header, else its peer's IP address.

    Raises:
        InvalidArgument: a malformed client id.
    """
    values = headers.get(CLIENT_ID_HEADER) or []
    if values:
        raw = values[0]
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        if not _CLIENT_ID_RE.fullmatch(text):
            raise InvalidArgument(
                f"{CLIENT_ID_HEADER} must be 1-128 ASCII letters, digits or _.:@/+=-"
            )
        return "id:" + text
    return "ip:" + peer_host(peer or "")


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``."""
    rest = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if rest.count(":") == 1:
        return rest.rsplit(":", 1)[0]
    return rest or "unknown"


LIMIT_OPTIONS = ("qps", "qps_ucx", "qps_burst", "streams_per_client", "max_calls",
                 "max_batch_items", "max_batch_bytes")


def limits_from(**options) -> Limits:
    """A :class:`Limits` from keyword options (None: ``TORCH_TQ_<NAME>``, else the default)."""
    from torch_tq._config import parse_size, resolve

    unknown = set(options) - set(LIMIT_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown limit option(s) {sorted(unknown)}")
    values = {}
    for name in LIMIT_OPTIONS:
        convert = float if name.startswith("qps") else int
        if name == "max_batch_bytes":
            convert = parse_size
        value = resolve(options.get(name), name.upper(), None, convert)
        if value is not None:
            values[name] = value
    return Limits(**values)
