"""The transports side by side, in one run: gRPC, same-host, and the baselines.

For a ``-n`` matrix (default 256 MiB float32) and a ``--small`` one (default 1 KiB):

* **grpc**: ``Client(transport="grpc")`` against a disk-store server (fsync on, its
  default) and against a memory-store server;
* **same-host**: ``Client(transport="same-host")`` against the same disk-store server (get
  maps the stored file, put stages a file the server checks and publishes) and against
  the memory-store server (the same through files in /dev/shm; its put is measured twice:
  into fresh files, and in the steady state of overwrites, where it reuses the pages of
  the files they replace);
* **ucx**: ``Client(["ucx://...", "grpc://..."], transport="ucx")`` against the
  memory-store server, when ucxx is installed (bytes over UCX, control over gRPC);
* baselines: **memcpy** of the same bytes into a reused buffer; **shm rewrite**, the same
  bytes written over the existing pages of a ``/dev/shm`` file (``pwrite``, and through a
  mapping), what a same-host put into a recycled file can reach at best; raw loopback **TCP**
  between two Python processes (``sendall``/``recv_into`` a reused buffer); **write+fsync**
  of the same bytes to a file in the store's directory (what a durable put cannot beat;
  measured in alternation with the same-host disk puts, as the disk's speed drifts);
  ``ucx_perftest`` (from the PATH, or the one the ``libucx`` wheel ships) when there is one.

Large figures are GB/s (medians of ``--runs``); small ones are p50/p99 latency in µs over
``--small-count`` calls. A get returns a usable tensor: every byte has been read once
(same-host gets from the disk store verify each batch's digest, which reads it; one from
the memory store maps the file and reads nothing, as its files carry no digests, so its
figure includes one pass over the bytes). The last lines print the ratios the project
tracks.

Example:
    python benchmarks/transports.py -n 256MiB --runs 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

# UCX may pick any interface for its TCP transport: this benchmark stays on loopback.
os.environ.setdefault("UCX_NET_DEVICES", "lo")

import torch_tq
from torch_tq._config import parse_size

from torch_tq.tools.bench import TcpBaseline, median_time, timings  # the baselines of torch-tq bench


def _median_time(fn, runs: int) -> float:
    return median_time(fn, runs, warm=False)  # each measurement below warms up itself


def _alternating(fn_a, fn_b, runs: int) -> tuple[float, float]:
    """Median seconds of ``fn_a`` and of ``fn_b``, run in turn ``runs`` times each."""
    a, b = [], []
    for _ in range(runs):
        for fn, times in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def _latency(fn, count: int) -> tuple[float, float]:
    for _ in range(min(100, count)):
        fn()
    times = sorted(timings(fn, count))
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def _read_all(t: torch.Tensor) -> None:
    """Reads every byte of ``t`` once (a sum over its 8-byte words)."""
    flat = t.reshape(-1).view(torch.uint8)
    words = flat[: flat.numel() // 8 * 8].view(torch.int64)
    words.sum()
    flat[words.numel() * 8:].sum()


def _write_fsync(path: str, data: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def _have_ucxx() -> bool:
    try:
        import ucxx  # noqa: F401
    except ImportError:
        return False
    return True


def _find_perftest() -> tuple[str | None, dict]:
    """``ucx_perftest`` from the PATH, else the one the ``libucx`` wheel (ucxx's) ships,
    with the environment that finds its libraries."""
    env = dict(os.environ)
    exe = shutil.which("ucx_perftest")
    if exe is None:
        try:
            import libucx
        except ImportError:
            return None, env
        root = os.path.dirname(libucx.__file__)
        exe = os.path.join(root, "bin", "ucx_perftest")
        if not os.access(exe, os.X_OK):
            return None, env
        libs = os.path.join(root, "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libs, os.environ.get("LD_LIBRARY_PATH")) if p)
    return exe, env


def _ucx_perftest(size: int) -> float | None:
    exe, env = _find_perftest()
    if exe is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    try:
        time.sleep(0.5)
        out = subprocess.run([exe, "127.0.0.1", "-p", str(port), "-t", "tag_bw", "-s", str(size),
                              "-n", "20"], capture_output=True, text=True, timeout=60,
                             env=env).stdout
        for line in reversed(out.splitlines()):
            parts = line.split()
            if len(parts) > 6 and (parts[0] == "Final:" or parts[0].isdigit()):
                return float(parts[-3]) * 2**20 / 1e9  # overall MB/s (MiB/s) -> GB/s
    except (subprocess.TimeoutExpired, ValueError):
        return None
    finally:
        server.kill()
        server.wait()
    return None


def _shm_rewrite(src: np.ndarray, runs: int) -> tuple[float, float] | None:
    """GB/s of writing ``src`` over the existing pages of a /dev/shm file of its size, with
    ``pwrite`` and through a shared mapping (``MAP_POPULATE``): what a same-host put into
    a recycled file can reach at best. None without /dev/shm."""
    import mmap

    if not os.path.isdir("/dev/shm"):
        return None
    size = src.nbytes
    fd, path = tempfile.mkstemp(prefix="tq-shm-rewrite-", dir="/dev/shm")
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, src, 0)  # its pages exist from here on

        def pwrite() -> None:
            view, done = memoryview(src).cast("B"), 0
            while done < size:
                done += os.pwrite(fd, view[done:], done)

        def mapped() -> None:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            try:
                dst = np.frombuffer(mm, np.uint8)
                np.copyto(dst, src)
                del dst
            finally:
                mm.close()

        return (size / _median_time(pwrite, runs) / 1e9, size / _median_time(mapped, runs) / 1e9)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--size", type=parse_size, default=256 << 20)
    ap.add_argument("--small", type=parse_size, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--small-count", type=int, default=1000)
    args = ap.parse_args(argv)
    size, runs = args.size, args.runs

    big = torch.randn(size // 4)
    small = torch.randn(max(1, args.small // 4))
    gbps: dict[str, float] = {}
    lat: dict[str, tuple[float, float]] = {}

    dst = np.empty(size, np.uint8)
    src = big.view(torch.uint8).numpy()
    dst[:] = src
    gbps["memcpy"] = size / _median_time(lambda: np.copyto(dst, src), runs) / 1e9
    shm = _shm_rewrite(src, runs)
    if shm:
        gbps["shm rewrite (pwrite)"], gbps["shm rewrite (mapped)"] = shm
    tcp = TcpBaseline(size)
    try:
        gbps["tcp put"] = size / _median_time(lambda: tcp.put(src), runs) / 1e9
        gbps["tcp get"] = size / _median_time(lambda: tcp.get(dst), runs) / 1e9
    finally:
        tcp.close()

    recycle = None
    tmp = tempfile.mkdtemp(prefix="tq-transports-")
    try:
        with torch_tq.start_server(data_dir=tmp, qps=0, stderr=open(os.devnull, "w")) as disk, \
             torch_tq.start_server(storage="memory", qps=0, stderr=open(os.devnull, "w")) as mem:
            probe = os.path.join(tmp, "fsync-probe")
            clients = {
                "grpc memory": torch_tq.Client(mem.location, transport="grpc"),
                "grpc disk": torch_tq.Client(disk.location, transport="grpc"),
                "same-host disk": torch_tq.Client(disk.location, transport="same-host"),
                "same-host memory": torch_tq.Client(mem.location, transport="same-host"),
            }
            if _have_ucxx():
                host = mem.location.split("://", 1)[1].rsplit(":", 1)[0]
                clients["ucx memory"] = torch_tq.Client([f"ucx://{host}:8081", mem.location],
                                                        transport="ucx")
            assert clients["same-host disk"].transport == "same-host"
            fresh_ids: list[int] = []
            # A memory store's same-host put writes over the pages of a recycled file (one of
            # an overwritten or deleted matrix) when there is one: measure the first puts,
            # into fresh files, before anything was replaced.
            fresh = clients["same-host memory"]
            gbps["same-host memory put (fresh)"] = size / _median_time(
                lambda: fresh.put(1000 + len(fresh_ids), "big", big) or fresh_ids.append(1), runs) / 1e9
            for i in range(len(fresh_ids)):
                fresh.delete(1000 + i)
            for name, c in clients.items():
                c.put(1, "big", big)  # warm-up, and a check
                assert torch.equal(c.get(1, "big"), big)
                if name == "same-host disk":
                    # the disk's speed drifts within a run: its baseline, write+fsync of the
                    # same bytes, is measured in alternation with the puts
                    base, put = _alternating(lambda: _write_fsync(probe, src),
                                             lambda c=c: c.put(1, "big", big), runs)
                    gbps["write+fsync"], gbps[f"{name} put"] = size / base / 1e9, size / put / 1e9
                else:
                    gbps[f"{name} put"] = size / _median_time(lambda c=c: c.put(1, "big", big),
                                                              runs) / 1e9
                if name == "same-host memory":
                    # a memory store's files carry no digests: the get maps the file and
                    # reads nothing, so one pass over the bytes makes it a usable tensor
                    gbps[f"{name} get (mapped only)"] = size / _median_time(
                        lambda c=c: c.get(1, "big"), runs) / 1e9
                    gbps[f"{name} get"] = size / _median_time(
                        lambda c=c: _read_all(c.get(1, "big")), runs) / 1e9
                else:
                    gbps[f"{name} get"] = size / _median_time(lambda c=c: c.get(1, "big"),
                                                              runs) / 1e9
                c.put(2, "small", small)
                lat[f"{name} put"] = _latency(lambda c=c: c.put(2, "small", small),
                                              max(10, args.small_count // 10))
                lat[f"{name} get"] = _latency(lambda c=c: c.get(2, "small"), args.small_count)
                if name == "same-host memory":
                    recycle = c.server_stats().get("recycle")
                c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    perftest = _ucx_perftest(size)

    print(f"{size} bytes, medians of {runs} runs (GB/s)")
    for name, value in gbps.items():
        print(f"  {name:<34}{value:8.2f}")
    print(f"  {'ucx_perftest tag_bw':<34}{perftest:8.2f}" if perftest else
          f"  {'ucx_perftest':<34} not found")
    print(f"{args.small} bytes, {args.small_count} calls (latency µs, p50 / p99)")
    for name, (p50, p99) in lat.items():
        print(f"  {name:<34}{p50:8.0f} /{p99:8.0f}")
    print("ratios:")
    print(f"  same-host get {gbps['same-host disk get']:.2f} GB/s (target >= 8) = "
          f"{gbps['same-host disk get'] / gbps['grpc disk get']:.2f}x grpc get, "
          f"{gbps['same-host disk get'] / gbps['memcpy']:.2f}x memcpy")
    print(f"  same-host put (disk store, fsync) = "
          f"{gbps['same-host disk put'] / gbps['write+fsync']:.2f}x write+fsync (target >= 0.8); "
          f"(memory store) = {gbps['same-host memory put'] / gbps['memcpy']:.2f}x memcpy "
          f"(target >= 0.8; {gbps['same-host memory put (fresh)'] / gbps['memcpy']:.2f}x into "
          f"fresh files)")
    if shm:
        bound = max(shm)
        print(f"  writing over an existing /dev/shm file, the same-host put's bound: "
              f"{bound:.2f} GB/s = {bound / gbps['memcpy']:.2f}x memcpy; the memory-store "
              f"put reaches {gbps['same-host memory put'] / bound:.2f}x of it")
    if recycle:
        print(f"  memory store recycle pool: {recycle}")
    print(f"  small get p50: same-host {lat['same-host disk get'][0]:.0f} µs (target <= 150), "
          f"grpc {lat['grpc disk get'][0]:.0f} µs")
    if "ucx memory get" in gbps:
        print(f"  ucx get {gbps['ucx memory get']:.2f} GB/s = "
              f"{gbps['ucx memory get'] / gbps['grpc memory get']:.2f}x grpc get (target >= 2), "
              f"ucx put = {gbps['ucx memory put'] / gbps['grpc memory put']:.2f}x grpc put; "
              f"small get p50 {lat['ucx memory get'][0]:.0f} µs")
    else:
        print("  ucx: not measured (ucxx is not installed)")
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    sys.exit(main())
