"""Trying a caller's UCX worker address in a sacrificial process before the server uses it.

A worker address that is well formed (:mod:`torch_tq.transport.ucx_address`) can still name
transport resources that UCX trusts blindly: a bit flipped in a shared-memory interface
address makes UCX map another file of the peer's as its message queue, and the process
dies of SIGBUS while the endpoint is being made (seen here with 1 of 1,503 single-bit
flips of a real address). So the first time the server meets an address, a helper process
(``python -m torch_tq.server.ucx_probe``, started with the server's UCX runtime) makes an endpoint
from it and reports back. If the helper dies or hangs, the address is refused
(:class:`~torch_tq.errors.InvalidArgument`) and a new helper starts for the next one; the
server itself only ever makes endpoints that a helper has made before it.

The helper speaks over its stdin/stdout: a request is a 4-byte little-endian length and
the address; the answer is one line, ``ok`` or ``error <message>``.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import threading
import time

from torch_tq.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0


class AddressProbe:
    """The server's side: one helper process at a time, one address at a time."""

    def __init__(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.tried = 0
        self.refused = 0
        self.helper_deaths = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, TORCH_TQ_UCX_LANES="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch_tq.server.ucx_probe"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        line = _readline(proc, START_TIMEOUT_S)
        if line != b"ready":
            _kill(proc)
            raise Unavailable("the UCX address probe did not start")
        return proc

    def check(self, address: bytes) -> None:
        """Makes an endpoint from ``address`` in the helper.

        Raises:
            InvalidArgument: the helper could not make it, died or hung trying.
            Unavailable: no helper could be started.
        """
        with self._lock:
            self.tried += 1
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(struct.pack("<I", len(address)) + address)
                proc.stdin.flush()
                line = _readline(proc, self.timeout)
            except OSError:
                line = None
            if line == b"ok":
                return
            self.refused += 1
            if line is None or not line.startswith(b"error"):
                self.helper_deaths += 1
                _kill(proc)
                self._proc = None
                log.warning("a caller's UCX address killed the probe process; refused")
                raise InvalidArgument("UCX cannot use this worker address (it failed a "
                                      "trial in a separate process)")
            raise InvalidArgument("UCX cannot make an endpoint to this worker address: "
                                  + line[6:].decode("utf-8", "replace")[:200])

    def describe(self) -> dict:
        return {"tried": self.tried, "refused": self.refused,
                "helper_deaths": self.helper_deaths}

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                _kill(self._proc)
                self._proc = None


def _readline(proc: subprocess.Popen, timeout: float) -> bytes | None:
    """One line from the helper, or None when it ends or says nothing in time."""
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive() or not out or not out[0].endswith(b"\n"):
        return None
    return out[0].rstrip(b"\n")


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass


def _main() -> None:
    """The helper: makes (and drops) an endpoint per address it reads."""
    # UCX logs on stdout: the answers get a descriptor of their own, stdout goes to stderr
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    from torch_tq.transport import ucx

    rt = ucx.runtime()
    stdout.write(b"ready\n")
    stdout.flush()
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack("<I", head)
        address = stdin.read(n)
        try:
            start = time.monotonic()
            rt.connect([address], timeout=PROBE_TIMEOUT_S / 2)
            answer = b"ok"
            log.debug("endpoint made in %.1f ms", (time.monotonic() - start) * 1e3)
        except Exception as e:  # noqa: BLE001 - reported to the server
            answer = b"error " + str(e).replace("\n", " ").encode("utf-8", "replace")[:300]
        finally:
            rt.forget([address])
        stdout.write(answer + b"\n")
        stdout.flush()


if __name__ == "__main__":
    _main()
