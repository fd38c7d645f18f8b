"""Limits and quotas: per-client QPS and concurrent streams, calls per node shared fairly.

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

**Fair shares of the node's call slots.** While nobody waits, a client may use every free
slot. Once the node is full, a caller that holds less than its fair share waits (up to
``slot_wait_s``) and is handed a slot as one frees up; a caller that holds its share or
more is turned away at once, with a retry hint. Shares are max-min fair on two levels:
the node's slots are split evenly among the hosts that hold or wait for slots (the peer's
IP address, which a client cannot forge over TCP), a host's share evenly among its client
ids; a free slot goes to the waiting call whose host holds the least of its share, then
whose id does. Until authentication gives real identities, a host can split its own share
into as many ids as it likes, but never take another host's.
"""

from __future__ import annotations

import collections
import math
import re
import threading
import time
from dataclasses import asdict, dataclass

from torch_tq.protocol.commands import CLIENT_ID_HEADER
from torch_tq.errors import InvalidArgument, Unavailable

_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}", re.ASCII)
_MAX_IDLE_CLIENTS = 4096


@dataclass(frozen=True)
class Limits:
    """A server's limits (the seed's defaults); 0 switches a limit off.

    Attributes:
        qps: calls per second per client over gRPC/TCP (a batch call is one call, however
            many items it carries: the quota counts queries, not rows).
        qps_ucx: the same over UCX (used by the UCX transport).
        qps_burst: how many calls a client may make at once after a quiet spell (the token
            bucket's size); default a tenth of a second's worth, at least 1.
        streams_per_client: concurrent calls (streams) per client.
        max_calls: concurrent calls per node.
        max_batch_items: items per BatchWrite/BatchRead call (the seed recommends 10-100).
        max_batch_bytes: bytes one BatchWrite call may carry.
        slot_wait_s: how long a call within its fair share waits for a slot of a full node
            before it is turned away (0: never waits).
    """

    qps: float = 1000.0
    qps_ucx: float = 10000.0
    qps_burst: float | None = None
    streams_per_client: int = 100
    max_calls: int = 1000
    max_batch_items: int = 1000
    max_batch_bytes: int = 1 << 30
    slot_wait_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("qps", "qps_ucx", "slot_wait_s"):
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
        self.active = 0  # its calls admitted or waiting for a slot (its streams)
        self.ucx: _Bucket | None = None  # the UCX quota, made on first use


class _Share:
    """Slots held and awaited by one host, or by one client id on a host, and when it last
    went idle (it stays *present*, and keeps its share, for ``PRESENCE_S`` after that)."""

    __slots__ = ("active", "idle_since", "members", "waiting")

    def __init__(self) -> None:
        self.active = 0
        self.waiting = 0
        self.members = 0  # a host's present client ids
        self.idle_since: float | None = None

    @property
    def busy(self) -> bool:
        return self.active + self.waiting > 0


class _Waiter:
    __slots__ = ("event", "granted", "host", "member", "over_share")

    def __init__(self, host: str, member: tuple[str, str]) -> None:
        self.host = host
        self.member = member
        self.granted = False
        self.over_share = False  # turned away: others came while it waited
        self.event = threading.Event()


# A host or client id keeps its share this long after its last call ended: a client that
# makes short calls one after another is never idle for long, and must not lose its share
# to a flood of long calls between two of its own.
PRESENCE_S = 1.0


class Limiter:
    """Admission control for one server: a token bucket and a stream count per client, and
    the node's call slots shared fairly (see the module docstring). Thread-safe; O(1) per
    call while the node has free slots, O(waiting calls) per release while calls wait."""

    def __init__(self, limits: Limits, clock=time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._hosts: dict[str, _Share] = {}  # the present hosts
        self._members: dict[tuple[str, str], _Share] = {}  # their present client ids
        self._present_hosts = 0
        self._idle: collections.deque = collections.deque()  # (expiry, kind, key, idle since)
        self._waiters: list[_Waiter] = []
        self.active = 0
        self.peak_waiting = 0
        self.rejected: dict[str, int] = {}
        self._last_call = clock()  # when a call last started or ended

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

    # -------------------------------------------------------------- the node's slots

    def _move(self, host: str, member: tuple[str, str], active: int, waiting: int,
              now: float) -> None:
        """Adds to the slots a host and one of its ids hold and await, keeping the counts
        of present hosts and ids that the shares divide by."""
        h, m = self._present(host, member, now)
        for kind, key, entry in (("member", member, m), ("host", host, h)):
            was = entry.busy
            entry.active += active
            entry.waiting += waiting
            if was and not entry.busy:
                self._goes_idle(kind, key, entry, now)
            elif entry.busy:
                entry.idle_since = None
        self.active += active

    def _present(self, host: str, member: tuple[str, str], now: float) -> tuple[_Share, _Share]:
        """The entries of a host and one of its ids, made present (idle) if they were not."""
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Share()
            self._present_hosts += 1
            self._goes_idle("host", host, h, now)
        m = self._members.get(member)
        if m is None:
            m = self._members[member] = _Share()
            h.members += 1
            self._goes_idle("member", member, m, now)
        return h, m

    def _goes_idle(self, kind: str, key, entry: _Share, now: float) -> None:
        """``entry`` holds and awaits nothing from ``now``: it leaves after PRESENCE_S."""
        entry.idle_since = now
        self._idle.append((now + PRESENCE_S, kind, key, now))

    def _expire(self, now: float) -> None:
        """Forgets hosts and ids idle for longer than PRESENCE_S (their shares go back to
        the others). A host stays while one of its ids does."""
        while self._idle and self._idle[0][0] <= now:
            _, kind, key, since = self._idle.popleft()
            table = self._members if kind == "member" else self._hosts
            entry = table.get(key)
            if entry is None or entry.idle_since != since:
                continue  # busy again since
            if kind == "host" and entry.members:
                self._idle.append((now + PRESENCE_S, kind, key, since))  # after its ids
                continue
            del table[key]
            if kind == "member":
                self._hosts[key[0]].members -= 1
            else:
                self._present_hosts -= 1

    def _caps(self, host: str, member: tuple[str, str]) -> tuple[int, int, int, int]:
        """(present hosts, present ids of ``host``, the most slots ``host`` may hold, the
        most ``member`` may): the node's slots split evenly among the present hosts, a
        host's among its present ids (counting these two present), at least one each."""
        h = self._hosts.get(host)
        hosts = self._present_hosts + (0 if h is not None else 1)
        members = (h.members if h is not None else 0) + (0 if member in self._members else 1)
        host_cap = max(1, self.limits.max_calls // hosts)
        return hosts, members, host_cap, max(1, host_cap // members)

    def _within(self, host: str, member: tuple[str, str]) -> bool:
        """Whether a call of ``member`` on ``host`` stays within their shares. A host alone
        on the node, or an id alone on its host, has no share to keep to: when the node is
        full, it waits for its own calls' slots."""
        hosts, members, host_cap, member_cap = self._caps(host, member)
        h = self._hosts.get(host)
        m = self._members.get(member)
        if hosts > 1 and (h.active if h else 0) >= host_cap:
            return False
        return members == 1 or (m.active if m else 0) < member_cap

    def _usage(self, waiter: _Waiter) -> tuple[float, float]:
        _, _, host_cap, member_cap = self._caps(waiter.host, waiter.member)
        return (self._hosts[waiter.host].active / host_cap,
                self._members[waiter.member].active / member_cap)

    def _take_slot(self, host: str, member: tuple[str, str], now: float) -> _Waiter | None:
        """Takes a slot for a call, or returns the waiter to wait on; raises when the call
        may neither have a slot nor wait for one. The caller holds the lock."""
        lim = self.limits
        self._expire(now)
        if not lim.max_calls:
            self._move(host, member, 1, 0, now)
            return None
        self._present(host, member, now)  # it counts in the shares from now on
        if not self._within(host, member):
            raise self._reject(
                "fair_share", f"server busy: this client holds its fair share of the node's "
                f"{lim.max_calls} call slots while others use them", 0.05)
        if self.active < lim.max_calls:
            self._move(host, member, 1, 0, now)
            return None
        if len(self._waiters) >= lim.max_calls:
            self._turn_away_over_share()
        if not lim.slot_wait_s or len(self._waiters) >= lim.max_calls:
            raise self._reject(
                "node_calls", f"server busy: {self.active} calls in flight, the limit is "
                f"{lim.max_calls} per node", 0.05)
        waiter = _Waiter(host, member)
        self._waiters.append(waiter)
        self._move(host, member, 0, 1, now)
        self.peak_waiting = max(self.peak_waiting, len(self._waiters))
        return waiter

    def _turn_away_over_share(self) -> None:
        """Ends the wait of calls that are no longer within their shares (another host or
        id has come since they began to wait): they are turned away, as they would be now."""
        now = self._clock()
        for waiter in [w for w in self._waiters if not self._within(w.host, w.member)]:
            self._waiters.remove(waiter)
            self._move(waiter.host, waiter.member, 0, -1, now)
            self._count("fair_share")
            waiter.over_share = True
            waiter.event.set()

    def _hand_over(self, now: float) -> None:
        """Gives free slots to waiting calls still within their shares: the one whose host
        holds the least of its share first, then whose id does, then the longest waiting."""
        if self._waiters:
            self._turn_away_over_share()
        while self._waiters and self.active < self.limits.max_calls:
            best = min(range(len(self._waiters)), key=lambda i: self._usage(self._waiters[i]))
            waiter = self._waiters.pop(best)
            self._move(waiter.host, waiter.member, 1, -1, now)
            waiter.granted = True
            waiter.event.set()

    def _wait(self, waiter: _Waiter) -> bool:
        """Waits for ``waiter`` to be handed a slot; False when it was turned away or the
        wait timed out."""
        if waiter.event.wait(self.limits.slot_wait_s):
            return waiter.granted
        with self._lock:
            if waiter.granted:
                return True
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._move(waiter.host, waiter.member, 0, -1, self._clock())
                self._count("node_calls")
            return False

    # -------------------------------------------------------------- calls

    def admit(self, client: str, ucx: bool = False, host: str = "") -> None:
        """Starts a call of ``client`` from ``host`` (the peer's address), or raises
        :class:`Unavailable` with a retry hint. ``ucx``: a transfer over UCX, which draws
        on the UCX quota (``qps_ucx``). May wait up to ``slot_wait_s`` for a slot.

        A call that was admitted must be :meth:`release`-d exactly once, with the same
        ``host``."""
        lim = self.limits
        member = (host, client)
        with self._lock:
            now = self._clock()
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
            if qps and bucket.tokens < 1:
                raise self._reject(
                    "qps_ucx" if ucx else "qps",
                    f"rate limit: client {client} is over {qps:g} calls/s"
                    f"{' over UCX' if ucx else ''}", (1 - bucket.tokens) / qps)
            self._last_call = now
            waiter = self._take_slot(host, member, now)
            if qps:
                bucket.tokens -= 1
            state.active += 1
        if waiter is None or self._wait(waiter):
            return
        with self._lock:  # turned away after all: its stream and its token come back
            state.active -= 1
            if qps:
                bucket.tokens += 1
        if waiter.over_share:
            raise Unavailable(
                "server busy: this client holds its fair share of the node's "
                f"{lim.max_calls} call slots while others use them (retry_after_ms=50)")
        raise Unavailable(
            f"server busy: no call slot freed up within {lim.slot_wait_s:g}s (the limit is "
            f"{lim.max_calls} calls per node) (retry_after_ms=50)")

    def release(self, client: str, host: str = "") -> None:
        with self._lock:
            now = self._clock()
            self._last_call = now
            self._move(host, (host, client), -1, 0, now)
            state = self._clients.get(client)
            if state is not None:
                state.active -= 1
            self._hand_over(now)

    def quiet_for(self) -> float:
        """Seconds since the node last had a call in flight (0 while it has one)."""
        with self._lock:
            return 0.0 if self.active else self._clock() - self._last_call

    def count_rejection(self, reason: str) -> None:
        with self._lock:
            self._count(reason)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "calls_in_flight": self.active,
                "calls_waiting": len(self._waiters),
                "peak_calls_waiting": self.peak_waiting,
                "clients_active": sum(1 for s in self._clients.values() if s.active),
                "clients_known": len(self._clients),
                "hosts_present": self._present_hosts,
                "rejected": dict(sorted(self.rejected.items())),
                "limits": self.limits.describe(),
            }


# Every call names its client and peer again: what they came to is kept (bounded), so a
# call does not check the same id or split the same address anew.
_KNOWN_IDS: dict = {}
_KNOWN_PEERS: dict[str, str] = {}
_KNOWN_MAX = 4096


def client_identity(headers: dict, peer: str | None) -> str:
    """The quota key of a call: its ``x-tq-client-id`` header, else its peer's IP address.

    Raises:
        InvalidArgument: a malformed client id.
    """
    values = headers.get(CLIENT_ID_HEADER) or []
    if values:
        raw = values[0]
        known = _KNOWN_IDS.get(raw)
        if known is not None:
            return known
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        if not _CLIENT_ID_RE.fullmatch(text):
            raise InvalidArgument(
                f"{CLIENT_ID_HEADER} must be 1-128 ASCII letters, digits or _.:@/+=-"
            )
        if len(_KNOWN_IDS) >= _KNOWN_MAX:
            _KNOWN_IDS.clear()
        _KNOWN_IDS[raw] = known = "id:" + text
        return known
    return "ip:" + peer_host(peer or "")


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``."""
    host = _KNOWN_PEERS.get(peer)
    if host is None:
        if len(_KNOWN_PEERS) >= _KNOWN_MAX:
            _KNOWN_PEERS.clear()
        host = _KNOWN_PEERS[peer] = _peer_host(peer)
    return host


def _peer_host(peer: str) -> str:
    rest = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if rest.count(":") == 1:
        return rest.rsplit(":", 1)[0]
    return rest or "unknown"


LIMIT_OPTIONS = ("qps", "qps_ucx", "qps_burst", "streams_per_client", "max_calls",
                 "max_batch_items", "max_batch_bytes", "slot_wait_s")


def limits_from(**options) -> Limits:
    """A :class:`Limits` from keyword options (None: ``TORCH_TQ_<NAME>``, else the default)."""
    from torch_tq._config import parse_size, resolve

    unknown = set(options) - set(LIMIT_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown limit option(s) {sorted(unknown)}")
    values = {}
    for name in LIMIT_OPTIONS:
        convert = float if name.startswith("qps") or name.endswith("_s") else int
        if name == "max_batch_bytes":
            convert = parse_size
        value = resolve(options.get(name), name.upper(), None, convert)
        if value is not None:
            values[name] = value
    return Limits(**values)
