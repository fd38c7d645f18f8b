"""What a server has done, for the ``Stats`` action."""

from __future__ import annotations

import bisect
import threading
import time

from torch_tq.errors import TQError

# seconds: the upper bounds of the call-latency histogram's buckets (then +Inf)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class ServerStats:
    """What a server has done, for the ``Stats`` action: calls per method, failures per
    error code, bytes in and out, handlers running now (and the most at once).

    What it cannot see: connections as such (gRPC accepts them below Python), and the part
    of a memory-store DoGet that Arrow streams in C++ after the handler returned (its bytes
    are counted when the stream is handed over)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.realigned_bytes = 0  # BatchWrite data copied because it arrived misaligned
        self.active = 0
        self.peak_active = 0
        # per method: calls per latency bucket (LATENCY_BUCKETS, then +Inf) and their sum
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}

    def begin(self, method: str) -> float:
        """Counts a call of ``method``; returns its start, for :meth:`end`."""
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        return time.perf_counter()

    def end(self, error: BaseException | None = None, method: str | None = None,
            started: float | None = None) -> None:
        """A call is over (its handler returned: a stream it handed over may still be
        sending); with ``method`` and ``started``, how long it took goes to the histogram."""
        seconds = time.perf_counter() - started if started is not None else None
        with self._lock:
            self.active -= 1
            if method is not None and seconds is not None:
                counts = self.latency.get(method)
                if counts is None:
                    counts = self.latency[method] = [0] * (len(LATENCY_BUCKETS) + 1)
                counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self.latency_sum[method] = self.latency_sum.get(method, 0.0) + seconds
        if error is not None:
            self.error(error)

    def latencies(self) -> dict[str, tuple[list[int], float]]:
        """``{method: (calls per bucket, seconds in all)}``."""
        with self._lock:
            return {m: (list(c), self.latency_sum[m]) for m, c in self.latency.items()}

    def error(self, error: BaseException) -> None:
        code = error.code if isinstance(error, TQError) else "INTERNAL_ERROR"
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def refused(self, code: str) -> None:
        """A call refused before any handler (no valid credential)."""
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def add_bytes(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.bytes_in += received
            self.bytes_out += sent

    def add_realigned(self, nbytes: int) -> None:
        with self._lock:
            self.realigned_bytes += nbytes

    def count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "calls": dict(sorted(self.calls.items())),
                "errors": dict(sorted(self.errors.items())),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "realigned_bytes": self.realigned_bytes,
                "active_calls": self.active,
                "peak_active_calls": self.peak_active,
            }
