"""Every benchmark and example runs at a tiny size, so none of them rots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_roundtrip_benchmark_tiny(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "roundtrip.py"), "-n", "2MiB",
         "--runs", "2", "--warmup", "1", "--batch-sizes", "256KiB,1MiB",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio: put [0-9.]+x flight, [0-9.]+x tcp \| get [0-9.]+x flight, "
                        r"[0-9.]+x tcp", lines[-1]), lines[-1]
    result = json.loads(out.read_text())
    for name in ("flight[256KiB] put", "flight[1MiB] get_into", "flight[256KiB] get"):
        assert result["calibration_gbps"][name] > 0
    # the compared rounds measure the calibration's choice, not every batch size again
    chosen = {result["best_flight_put"], result["best_flight_get"]}
    for name in ("tcp put", "tcp get", "torch_tq put", "torch_tq get", "torch_tq get_into", *chosen):
        assert result["gbps"][name] > 0
    assert result["best_flight_put"].endswith(" put") and "get" in result["best_flight_get"]
    assert set(result["ratio"]) == {"put_vs_flight", "get_vs_flight", "get_fresh_vs_flight_fresh",
                                    "put_vs_tcp", "get_vs_tcp"}


def test_roundtrip_benchmark_disk_store(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "roundtrip.py"), "-n", "1MiB",
         "--runs", "1", "--warmup", "0", "--batch-sizes", "1MiB",
         "--storage", "disk"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch_tq storage=disk" in proc.stdout


def test_dataloader_benchmark_tiny(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "dataloader.py"), "-n", "1MiB",
         "--count", "2", "--runs", "1", "--items", "20", "--workers", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio: dataloader [0-9.]+x Client.get loop \| streaming added p50 "
                        r"-?[0-9.]+ ms live, -?[0-9.]+ ms backlog", last), last
    result = json.loads(out.read_text())
    assert len(result["throughput"]) == 3
    assert all(r["gbps"] > 0 for r in result["throughput"].values())
    assert result["streaming"]["items"] == 20 and result["streaming"]["get_ms"] > 0


def test_rl_pipeline_example_runs():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "rl_pipeline.py"), "--items", "18"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # two rounds of 2 ranks x a batch of 4; 2 cannot fill a third and stay in the group
    assert "rank 0 got 8, rank 1 got 8 in batches of 4" in proc.stdout
    assert "2 left in the group" in proc.stdout


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_batch_benchmark_tiny():
    proc = _run("batch.py", "--items", "8", "--item-bytes", "256KiB", "--small-items", "50",
                "--runs", "1", "--json")
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[0])
    assert figures["large_get_many_vs_seq"] > 0 and figures["small_put_many_vs_seq"] > 0
    assert figures["group_put_vs_one"] > 0 and figures["group_get_vs_one"] > 0
    assert re.fullmatch(r"get_many vs sequential get, 8 x 262144 B: [0-9.]+x \(target >= 1.5\)",
                        lines[-1]), lines[-1]
    for line, op in zip(lines[-3:-1], ["put", "get"]):
        assert re.fullmatch(rf"{op}_many vs one {op} of its bytes: [0-9.]+x \(target >= 0.9\)",
                            line), line


def test_memory_benchmark_tiny():
    proc = _run("memory.py", "--total", "64MiB", "--matrix-bytes", "16MiB", "--runs", "1",
                "--settle", "1.5")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("memory store, matrices (grpc), 64 MiB held"), lines
    assert re.fullmatch(r"held RSS vs bytes held: -?[0-9.]+x \(target <= 1.15\)", lines[-2])
    assert re.fullmatch(r"left after deleting everything: -?[0-9]+ MiB \(target <= 64\)",
                        lines[-1]), lines[-1]


def test_compression_benchmark_tiny():
    proc = _run("compression.py", "-n", "256KiB", "--runs", "1", "--kinds", "int64_tokens")
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("int64_tokens")]
    assert [r[1] for r in rows] == ["none", "lz4", "zstd", "snappy"]
    ratios = {r[1]: float(r[2]) for r in rows}
    assert ratios["none"] == 1.0 and ratios["zstd"] < 0.5  # token ids < 32k compress well


def test_transports_benchmark_tiny():
    proc = _run("transports.py", "-n", "1MiB", "--runs", "1", "--small-count", "20")
    out = proc.stdout
    for name in ("memcpy", "tcp get", "write+fsync", "grpc disk get", "same-host disk get",
                 "same-host disk put"):
        assert re.search(rf"^  {re.escape(name)}\s+[0-9.]+$", out, re.M), name
    assert re.search(r"small get p50: same-host [0-9]+ µs", out)


def test_soak_benchmark_tiny(tmp_path):
    out = tmp_path / "soak.json"
    proc = _run("soak.py", "--minutes", "0.1", "--clients", "2", "--idle-s", "3",
                "--json", str(out))
    assert re.search(r"^drift: rss [0-9.]+x baseline \([+-][0-9.]+ MiB\), threads [+-]?[0-9]+, "
                     r"fds [+-]?[0-9]+; server alive: True$", proc.stdout, re.M), proc.stdout
    result = json.loads(out.read_text())
    assert result["calls"] > 100 and result["outcomes"]["put"] > 0
    assert "INTERNAL_ERROR" not in result["server_errors"]
    assert result["calls_in_flight_after"] == 0
    assert result["drift"]["fds"] <= 1 and result["drift"]["threads"] <= 1, result["drift"]
    assert result["drift"]["rss_mib"] < 256, result["drift"]


def test_rounds_benchmark_tiny():
    proc = _run("rounds.py", "--items", "64", "--runs", "1", "--json")
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-2])
    assert figures["per_rank"]["rounds"] == [32, 32]  # 4 rounds of 2 shares of 8
    assert sum(figures["per_rank"]["streaming"]) == 64
    assert re.fullmatch(r"rounds vs streaming, cost per item: [0-9.]+x \([+-][0-9.]+ us/item\)",
                        lines[-1]), lines[-1]


def test_compare_reads_json_lines_and_table_rows():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import compare
    finally:
        sys.path.pop(0)
    out = ('{"small_put_items_per_s": 5000, "note": "x"}\n'
           "256 bytes, medians of 5 runs (GB/s)\n"
           "  grpc memory get                    2.15\n"
           "  ucx get p50 / p99                   120 /     340\n"
           "ratios:\n")
    out += ("1024 bytes, 1000 calls (latency us, p50 / p99)\n"
            "  grpc memory get                     310 /     900\n")
    assert compare.figures(out) == {"small_put_items_per_s": 5000.0,
                                    "grpc memory get [GB/s]": 2.15,
                                    "ucx get p50 / p99 [GB/s]": 120.0,
                                    "grpc memory get [latency us, p50 / p99]": 310.0}


def test_compare_runs_a_benchmark_in_two_trees(tmp_path):
    """Before = this tree's HEAD in a worktree of its own, after = this working tree."""
    proc = _run("compare.py", "--before", "HEAD", "--rounds", "1", "--", "benchmarks/batch.py",
                "--items", "4", "--item-bytes", "64KiB", "--small-items", "20", "--runs", "1",
                "--json")
    lines = proc.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("  ")]  # one per figure
    assert any(line.split()[0] == "large_get_many_vs_seq" for line in rows), lines
    assert all(re.search(r"[0-9.]+x$", line) for line in rows), rows


def test_pipeline_benchmark_tiny():
    proc = _run("pipeline.py", "--items", "16", "--sizes", "4KiB", "--batch", "4", "--runs", "1",
                "--transports", "grpc,same-host", "--json")
    lines = proc.stdout.strip().splitlines()
    assert sum("(byte-exact;" in line for line in lines) == 2, proc.stdout
    figures = json.loads(lines[-3])
    assert figures["4096:grpc_items_per_s"] > 0 and figures["4096:tcp_GBps"] > 0
    for line, transport in zip(lines[-2:], ["grpc", "same-host"]):
        assert re.fullmatch(rf"ratio 4 KiB {transport}: [0-9.]+x tcp, [0-9.]+x memcpy, "
                            r"[0-9]+ items/s", line), line


def test_pipeline_benchmark_through_the_dataloader():
    proc = _run("pipeline.py", "--items", "12", "--sizes", "4KiB", "--batch", "4", "--runs", "1",
                "--transports", "grpc", "--dataloader", "--cpu")
    lines = proc.stdout.strip().splitlines()
    assert "consumer DataLoader(TQDataset)" in lines[0] and "(byte-exact;" in lines[-3], lines
    usage = re.fullmatch(r"    per batch \(user\+system CPU, minor page faults\): "
                         r"producer ([0-9.]+)\+([0-9.]+) ms, [0-9]+ faults; "
                         r"server ([0-9.]+)\+([0-9.]+) ms, [0-9]+ faults; "
                         r"consumer ([0-9.]+)\+([0-9.]+) ms, [0-9]+ faults", lines[-2])
    assert usage, lines[-2]
    # producer and consumer spent CPU on the batches (the server's, read from /proc in
    # clock ticks, may round to 0 for so small a run)
    cpu = [float(x) for x in usage.groups()]
    assert cpu[0] + cpu[1] > 0 and cpu[4] + cpu[5] > 0, lines[-2]
    assert re.fullmatch(r"ratio 4 KiB grpc: [0-9.]+x tcp, [0-9.]+x memcpy, [0-9]+ items/s",
                        lines[-1]), lines[-1]


def test_call_floor_benchmark_tiny():
    proc = _run("call_floor.py", "--calls", "20", "--runs", "1", "--warmup", "2", "--json")
    figures = json.loads(proc.stdout.splitlines()[0])
    for op in ("put", "get"):
        for side in ("plain", "floor", "torch_tq"):
            assert figures[f"{side}_{op}_ms"] > 0
        assert figures[f"torch_tq_{op}_vs_plain"] == pytest.approx(
            figures[f"torch_tq_{op}_ms"] / figures[f"plain_{op}_ms"], rel=1e-2)
    assert re.search(r"^get: floor [0-9.]+x plain Flight, torch_tq [0-9.]+x plain Flight "
                     r"\(target <= 1.2x\)$", proc.stdout, re.M), proc.stdout


def test_security_benchmark_tiny():
    proc = _run("security.py", "--big", "1MiB", "--calls", "5", "--runs", "1", "--json")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("{"))
    figures = json.loads(line)
    for side in ("plaintext", "tls", "tokens"):
        for fig in ("big put s", "big get s", "small put ms", "small get ms"):
            assert figures["medians"][f"{side} {fig}"] > 0
    ratio = figures["ratios"]["tls/plaintext big get"]
    assert ratio == pytest.approx(figures["medians"]["tls big get s"]
                                  / figures["medians"]["plaintext big get s"], rel=1e-6)
    assert re.search(r"^ratio tokens/none small put: [0-9.]+x time \(target <= 1.05\)$",
                     proc.stdout, re.M), proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_cluster_benchmark_tiny():
    proc = _run("cluster.py", "--nodes", "1,2", "--mb", "2", "--runs", "1", "--rate", "100mbit",
                "--json")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("{"))
    figures = json.loads(line)
    for n in ("1", "2"):
        assert figures["figures"][n]["put_MBps"] > 0 and figures["figures"][n]["get_MBps"] > 0
    assert figures["ratios"]["2"]["put"] == pytest.approx(
        figures["figures"]["2"]["put_MBps"] / figures["figures"]["1"]["put_MBps"])
    assert re.search(r"^ratio 2 nodes get: [0-9.]+x 1 node\(s\) \(target >= 1.6\)$",
                     proc.stdout, re.M), proc.stdout
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tqc" not in leftover  # every namespace removed
