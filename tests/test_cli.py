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
