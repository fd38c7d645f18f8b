"""The GPU check of torch_tq: run on a CUDA machine (no network needed), under 3 minutes.

1. builds the extension in place and runs the GPU and extension tests;
2. measures host-to-device bandwidth for a 256 MiB matrix, median of ``--runs``:

   * ``get(device="cuda")``: receive into a pooled pinned block, non-blocking copy;
   * pageable: ``get()`` then ``.to("cuda")``;
   * raw: a pinned tensor's ``.to("cuda", non_blocking=True)`` alone (cudaMemcpy speed);
   * same-host: ``get(device="cuda")`` from a disk store on this host (the stored file is
     mapped, copied once into a pinned block, then a non-blocking copy);
   * UCX (when ucxx is installed): ``get(device="cuda")`` over UCX into a pinned block, and
     with ``TORCH_TQ_UCX_CUDA=1`` straight into the CUDA tensor (checked bit-exact; it must
     not have fallen back);

   and the H2D leg alone (the transfer from the received host tensor to the device), which
   is what pinning changes. Prints the ratios; the last line is the headline.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_s(fn, runs: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(size: int, runs: int) -> dict:
    import torch

    import torch_tq

    src = torch.randn(size // 4)
    out = {}
    with torch_tq.start_server(storage="memory", same_host=False) as srv:
        c = torch_tq.Client(srv.location, timeout=600, transport="grpc")
        c.put(1, "prompt", src)
        pinned_host = torch.empty_like(src).pin_memory()
        pageable_host = c.get(1, "prompt")
        out["get(device=cuda), pinned"] = _median_s(lambda: c.get(1, "prompt", device="cuda"), runs)
        out["get() + .to(cuda), pageable"] = _median_s(
            lambda: c.get(1, "prompt").to("cuda"), runs)
        out["H2D pageable .to(cuda)"] = _median_s(lambda: pageable_host.to("cuda"), runs)
        out["H2D pinned (raw cudaMemcpy)"] = _median_s(
            lambda: pinned_host.to("cuda", non_blocking=True), runs)
        got = c.get(1, "prompt", device="cuda")
        assert torch.equal(got.cpu(), src), "pinned path returned different data"
    import tempfile

    with tempfile.TemporaryDirectory() as d, torch_tq.start_server(data_dir=d) as srv:
        c = torch_tq.Client(srv.location, timeout=600, transport="same-host")
        c.put(1, "prompt", src)
        out["same-host get(device=cuda)"] = _median_s(
            lambda: c.get(1, "prompt", device="cuda"), runs)
        got = c.get(1, "prompt", device="cuda")
        assert torch.equal(got.cpu(), src), "same-host device path returned different data"
    try:
        import ucxx  # noqa: F401
    except ImportError:
        return {k: size / v / 1e9 for k, v in out.items()}
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    with torch_tq.start_server(storage="memory", same_host=False) as srv:
        host = srv.location.split("://", 1)[1].rsplit(":", 1)[0]
        where = [f"ucx://{host}:8081", srv.location]
        c = torch_tq.Client(where, timeout=600, transport="ucx")
        c.put(1, "prompt", src)
        out["ucx get(device=cuda), pinned"] = _median_s(
            lambda: c.get(1, "prompt", device="cuda"), runs)
        os.environ["TORCH_TQ_UCX_CUDA"] = "1"  # UCX writes the CUDA tensor itself
        try:
            d = torch_tq.Client(where, timeout=600, transport="ucx")
            got = d.get(1, "prompt", device="cuda")
            assert got.is_cuda and torch.equal(got.cpu(), src), "UCX into CUDA: wrong data"
            assert d._ucx_cuda, "UCX into CUDA memory failed and fell back to pinned"
            out["ucx get(device=cuda), into CUDA"] = _median_s(
                lambda: d.get(1, "prompt", device="cuda"), runs)
        finally:
            del os.environ["TORCH_TQ_UCX_CUDA"]
    return {k: size / v / 1e9 for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256 << 20)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                   check=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc = 0
    if not args.skip_tests:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_gpu.py", "tests/test_ext.py"], cwd=ROOT, env=env).returncode
    sys.path.insert(0, ROOT)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    r = bandwidth(args.size, args.runs)
    for name, gbps in r.items():
        print(f"  {name:<36}{gbps:8.2f} GB/s")
    pinned_vs_pageable = r["get(device=cuda), pinned"] / r["get() + .to(cuda), pageable"]
    pinned_vs_raw = r["get(device=cuda), pinned"] / r["H2D pinned (raw cudaMemcpy)"]
    same_host_vs_raw = r["same-host get(device=cuda)"] / r["H2D pinned (raw cudaMemcpy)"]
    if "ucx get(device=cuda), into CUDA" in r:
        print(f"ucx: into CUDA memory {r['ucx get(device=cuda), into CUDA']:.2f} GB/s = "
              f"{r['ucx get(device=cuda), into CUDA'] / r['ucx get(device=cuda), pinned']:.2f}x "
              "the pinned path (TORCH_TQ_UCX_CUDA=1 pays when > 1)")
    print(f"ratio: get to cuda {pinned_vs_pageable:.2f}x pageable path, {pinned_vs_raw:.2f}x raw "
          f"pinned cudaMemcpy, same-host {same_host_vs_raw:.2f}x raw | tests "
          f"{'passed' if rc == 0 else 'FAILED'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
