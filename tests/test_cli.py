"""The command line: `torch-tq serve` / `python -m torch_tq serve`, clean shutdown, the demo."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq

LISTENING = re.compile(r"^listening on grpc://127\.0\.0\.1:(\d+)$")


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Servers a failing test left running are killed, never leaked."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _start(args: list[str], tmp_path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(args + ["--data-dir", str(tmp_path / "d")], stdout=subprocess.PIPE,
                            text=True)
    _STARTED.append(proc)
    line = proc.stdout.readline().strip()
    match = LISTENING.match(line)
    assert match, f"unexpected first line {line!r}"
    return proc, f"grpc://127.0.0.1:{match.group(1)}"


@pytest.mark.parametrize("entry", ["module", "script"])
def test_serve_prints_parseable_line_and_stops_on_sigterm(tmp_path, entry):
    if entry == "script":
        exe = shutil.which("torch-tq")
        if exe is None:
            pytest.skip("console script not on PATH (package not installed)")
        args = [exe, "serve", "--port", "0"]
    else:
        args = [sys.executable, "-m", "torch_tq", "serve", "--port", "0"]
    proc, location = _start(args, tmp_path)
    try:
        with torch_tq.Client(location) as c:
            c.put(1, "prompt", torch.arange(3))
            assert torch.equal(c.get(1, "prompt"), torch.arange(3))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # the data is on disk for the next server
    proc, location = _start([sys.executable, "-m", "torch_tq", "serve", "--port", "0"], tmp_path)
    try:
        with torch_tq.Client(location) as c:
            assert torch.equal(c.get(1, "prompt"), torch.arange(3))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_stalled_upload_does_not_block_shutdown_past_deadline(tmp_path):
    proc, location = _start([sys.executable, "-m", "torch_tq", "serve", "--port", "0",
                             "--shutdown-grace", "1"], tmp_path)
    with torch_tq.Client(location) as c:
        c.put(2, "prompt", torch.zeros(16 << 20))  # 64 MiB: more than gRPC buffers
    fc = flight.FlightClient(location)
    schema = pa.schema([pa.field("data", pa.float32())])
    cmd = json.dumps({"index_id": 1, "matrix_type": "prompt", "shape": [1 << 20]})
    writer, _ = fc.do_put(flight.FlightDescriptor.for_command(cmd), schema)
    writer.write_batch(pa.record_batch([pa.array([1.0] * 10, pa.float32())], schema=schema))
    # a reader that takes one batch and then stops reading
    reader = fc.do_get(flight.Ticket(json.dumps({"index_id": 2, "matrix_type": "prompt"}).encode()))
    reader.read_chunk()
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert time.monotonic() - t0 < 15
    del writer, reader
    # the unfinished upload was never published
    proc, location = _start([sys.executable, "-m", "torch_tq", "serve", "--port", "0"], tmp_path)
    try:
        with torch_tq.Client(location) as c, pytest.raises(torch_tq.NotFound):
            c.get(1, "prompt")
    finally:
        proc.terminate()
        proc.wait(30)


def test_bad_arguments_exit_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch_tq", "serve", "--storage", "tape"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "torch_tq", "serve", "--chunk-bytes", "12 parsecs"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


def test_demo_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch_tq", "demo", "--shape", "4,512,64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "bit-exact yes" in out
    assert "transport same-host" in out  # the demo's disk store is on this host
    assert re.search(r"put .* GB/s", out) and re.search(r"get .* GB/s", out)
    assert "types=['prompt']" in out


def test_start_server_reports_typed_failure(tmp_path):
    with torch_tq.start_server(data_dir=str(tmp_path / "d")) as srv:
        with pytest.raises(torch_tq.Unavailable, match="in use"):
            torch_tq.start_server(data_dir=str(tmp_path / "d"))
        assert srv.alive
    assert not srv.alive


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch_tq", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_tools_against_a_real_server(memory_server, unique_id, tmp_path):
    loc = ["--location", memory_server.location]
    c = torch_tq.Client(memory_server.location, transport="grpc")
    c.put(unique_id, "prompt", torch.arange(12, dtype=torch.int32).reshape(3, 4))
    c.put(unique_id, "resp", torch.randn(2, 1024).bfloat16())
    proc = _cli("ls", *loc, "--index-id", str(unique_id))
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"{unique_id}\s+prompt\s+int32\s+3x4\s+48 B", proc.stdout)
    assert re.search(r"resp\s+bfloat16\s+2x1024\s+4 KiB", proc.stdout)
    assert "2 matrices, 4.0 KiB" in proc.stdout
    rows = json.loads(_cli("ls", *loc, "--index-id", str(unique_id), "--type", "resp",
                           "--json").stdout)
    assert rows == [{"index_id": unique_id, "matrix_type": "resp", "dtype": "bfloat16",
                     "shape": [2, 1024], "nbytes": 4096}]
    meta = json.loads(_cli("info", *loc, str(unique_id), "--json").stdout)
    assert sorted(meta["types"]) == ["prompt", "resp"]
    # export, delete, import: the same bits come back
    path = str(tmp_path / "x.safetensors")
    out = json.loads(_cli("export", *loc, path, "--ids", str(unique_id), "--json").stdout)
    assert out["matrices"] == 2 and out["bytes"] == 48 + 4096
    assert json.loads(_cli("rm", *loc, str(unique_id), "--json").stdout)["deleted"] == [
        "prompt", "resp"]
    assert _cli("info", *loc, str(unique_id)).returncode == 1  # NOT_FOUND
    proc = _cli("import", *loc, path)
    assert proc.returncode == 0 and "imported 2 matrices" in proc.stdout, proc.stderr
    assert torch.equal(c.get(unique_id, "prompt"), torch.arange(12, dtype=torch.int32).reshape(3, 4))
    # exit codes that mean something, and clear messages
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0hello")
    proc = _cli("import", *loc, str(bad))
    assert proc.returncode == 2 and "INVALID_ARGUMENT" in proc.stderr
    proc = _cli("ls", "--location", "grpc://127.0.0.1:1", "--no-retry")
    assert proc.returncode == 3 and "UNAVAILABLE" in proc.stderr
    assert "check that it runs" in proc.stderr


def test_env_reports_versions_and_devices():
    info = json.loads(_cli("env", "--json").stdout)
    assert info["torch_tq"] == torch_tq.__version__ and info["torch"] == torch.__version__
    assert info["pyarrow"] == pa.__version__ and isinstance(info["cuda"], bool)
    assert "ucx_usable" in info and info["cpus"] >= 1


def test_bench_prints_the_table_and_json():
    proc = _cli("bench", "--sizes", "4KiB,64KiB", "--runs", "2", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    methods = {r["method"] for r in rows}
    assert {"memcpy", "tcp", "pyarrow.flight", "torch_tq grpc", "torch_tq same-host"} <= methods
    assert {r["size"] for r in rows} == {4096, 65536}
    assert all(r["gbps"] > 0 and r["us"] > 0 for r in rows)
    proc = _cli("bench", "--sizes", "4KiB", "--runs", "1", "--transports", "grpc", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"4 KiB\s+torch_tq grpc\s+[0-9.]+\s+[0-9.]+", proc.stdout)
    assert "GET vs flight" in proc.stdout


def test_commands_wait_for_a_server_that_is_starting(tmp_path):
    import subprocess
    import sys
    import threading

    from .conftest import free_port

    port = free_port()
    servers = []
    starter = threading.Timer(2.0, lambda: servers.append(
        torch_tq.start_server(port=port, data_dir=str(tmp_path / "d"))))
    starter.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "torch_tq", "ls", "--location",
                               f"grpc://127.0.0.1:{port}", "--timeout", "20", "--json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == []
        assert proc.stderr.count("not reachable yet") <= 1  # one line, not one per try
    finally:
        starter.join()
        for srv in servers:
            srv.stop()


def test_stats_takes_json_and_log_level_goes_after_the_command(memory_server):
    loc = ["--location", memory_server.location]
    stats = json.loads(_cli("stats", *loc, "--json").stdout)
    assert stats["status"] == "SERVING" and "limits" in stats
    text = _cli("stats", *loc).stdout
    assert "status: SERVING" in text and text.lstrip()[0] != "{"
    quiet = _cli("ls", *loc, "--json", "--log-level", "ERROR")
    assert quiet.returncode == 0, quiet.stderr
    assert isinstance(json.loads(quiet.stdout), list)
    assert _cli("--log-level", "ERROR", "ls", *loc).returncode == 0


def test_local_failures_are_one_line_with_their_exit_code(memory_server, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _cli("serve", "--port", str(busy.getsockname()[1]), "--storage", "memory")
    assert proc.returncode == 3, proc.stderr
    assert "torch-tq: UNAVAILABLE: cannot listen on" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = _cli("serve", "--port", "0", "--data-dir", str(tmp_path / "file" / "below"))
    assert proc.returncode == 2 and "torch-tq: INVALID_ARGUMENT: data directory" in proc.stderr
    torch_tq.Client(memory_server.location).put(880_001, "prompt", torch.ones(3))
    proc = _cli("export", str(tmp_path / "missing" / "x.safetensors"), "--ids", "880001",
                "--location", memory_server.location)
    assert proc.returncode == 2 and "torch-tq: INVALID_ARGUMENT: No such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_is_plain_text():
    out = _cli("--help").stdout
    assert "``" not in out and "serve a storage node" in out
