"""What a server has done, for the ``Stats`` action."""

from __future__ import annotations

import threading

from torch_tq.errors import TQError


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

    def begin(self, method: str) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def end(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.active -= 1
        if error is not None:
            self.error(error)

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
