"""safetensors export/import against a real server: bit-exact round trips for every dtype,
files other tools wrote, bad files that store nothing, and an export whose memory stays
bounded however large the matrix."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import torch_tq

from .conftest import proc_status_kib


DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32",
          "float64"]


def test_chosen_types_and_files_written_by_others(client, unique_id, tmp_path):
    client.put(unique_id, "prompt", torch.arange(6).reshape(2, 3))
    client.put(unique_id, "resp", torch.ones(4))
    path = tmp_path / "p.safetensors"
    assert client.export_safetensors(path, unique_id, types=["prompt"])["keys"] == [
        (unique_id, "prompt")]
    assert list(load_file(str(path))) == [f"{unique_id}/prompt"]
    # safetensors.torch.save_file's own file: tensor names are the types under index_id
    theirs = tmp_path / "theirs.safetensors"
    save_file({"advantage": torch.randn(5, 2), "ref_log_prob": torch.randn(3).bfloat16()},
              str(theirs), metadata={"who": "someone else"})
    keys = client.import_safetensors(theirs, index_id=unique_id + 7)
    assert sorted(keys) == [(unique_id + 7, "advantage"), (unique_id + 7, "ref_log_prob")]
    assert torch.equal(client.get(unique_id + 7, "advantage"), load_file(str(theirs))["advantage"])
    # names of the form "<index_id>/<type>" need no index_id
    named = tmp_path / "named.safetensors"
    save_file({f"{unique_id + 8}/prompt": torch.ones(2)}, str(named))
    assert client.import_safetensors(named) == [(unique_id + 8, "prompt")]
    with pytest.raises(torch_tq.NotFound, match="nothing to export"):
        client.export_safetensors(tmp_path / "none.safetensors", unique_id + 999)
    assert not (tmp_path / "none.safetensors").exists()


def test_bad_files_store_nothing(client, unique_id, tmp_path):
    def bad(header: dict, data: bytes = b"", raw: bytes | None = None):
        path = tmp_path / f"bad{len(os.listdir(tmp_path))}.safetensors"
        body = raw if raw is not None else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + data)
        return path

    cases = [
        (bad({}, raw=b"not json"), "not JSON"),
        (bad({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
         "do not hold"),
        (bad({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
         "dtype 'C64'"),
        (bad({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "malformed"),
        (bad({"prompt": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "names no index_id"),
        (bad({f"{unique_id}/ok": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              f"{unique_id}/later": {"dtype": "C64", "shape": [1], "data_offsets": [4, 12]}},
             b"\0" * 12), "dtype 'C64'"),
    ]
    for path, match in cases:
        with pytest.raises(torch_tq.InvalidArgument, match=match):
            client.import_safetensors(path)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(torch_tq.InvalidArgument, match="shorter than 8 bytes"):
        client.import_safetensors(short)
    with pytest.raises(torch_tq.NotFound):
        client.get(unique_id, "ok")  # the valid tensor of a bad file was not stored


def test_export_of_a_large_matrix_streams_with_bounded_memory(tmp_path):
    """An export of a 1 GiB matrix from a separate process: its RSS grows by far less
    than the matrix (it never holds it), and the file matches."""
    with torch_tq.start_server(data_dir=str(tmp_path / "data"), durable=False) as srv:
        writer = torch_tq.Client(srv.location, transport="grpc")
        size = 1 << 30
        chunk = torch.arange(1 << 24, dtype=torch.int64)  # 128 MiB, written 8 times
        big = chunk.repeat(size // chunk.nbytes)
        writer.put(1, "big", big)
        del big
        path = tmp_path / "big.safetensors"
        code = textwrap.dedent(f"""
            import sys, torch_tq
            sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
            from tests.conftest import proc_status_kib
            import os
            c = torch_tq.Client({srv.location!r}, transport="grpc")
            before = proc_status_kib(os.getpid(), "VmRSS")
            c.export_safetensors({str(path)!r}, [1])
            print(before, proc_status_kib(os.getpid(), "VmHWM"))
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        before, peak = (int(x) for x in proc.stdout.split())
        print(f"export of 1 GiB: RSS {before} KiB -> peak {peak} KiB")
        assert (peak - before) * 1024 < size // 4, (before, peak)  # under 256 MiB of 1 GiB
        assert os.path.getsize(path) > size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n + size - chunk.nbytes)
            tail = torch.frombuffer(bytearray(f.read(chunk.nbytes)), dtype=torch.int64)
        assert torch.equal(tail, chunk)
    assert proc_status_kib(os.getpid(), "VmRSS") > 0


def test_hugging_face_names_come_back_out_as_they_went_in(memory_server, unique_id, tmp_path):
    state = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
             "model.layers.0.Bias": torch.randn(4),
             "model_layers_0_bias": torch.ones(1),  # a name that is a type already
             "lm_head.weight": torch.randn(2, 4),
             "vision_tower." + "x" * 70: torch.zeros(3)}
    src = tmp_path / "hf.safetensors"
    save_file(state, src, metadata={"format": "pt", "source": "hf-hub"})
    a, b = unique_id, unique_id + 1
    with torch_tq.Client(memory_server.location) as c:
        keys = c.import_safetensors(src, index_id=a)
        types = {t for i, t in keys if i == a}
        assert len(types) == len(state) + 1 and "safetensors_names" in types
        assert all(len(t) <= 64 for t in types)
        assert torch.equal(c.get(a, "lm_head_weight"), state["lm_head.weight"])
        out = tmp_path / "out.safetensors"
        c.export_safetensors(out, [a])
        back = load_file(out)
        assert sorted(back) == sorted(state)  # the same names; safetensors_names left out
        assert all(torch.equal(back[k], v) for k, v in state.items())
        from safetensors import safe_open

        with safe_open(out, "pt") as f:
            assert f.metadata()["source"] == "hf-hub"
        # our export imports back to the same keys; two index_ids with the same names
        # export as <index_id>/<name>
        c.import_safetensors(out)
        c.import_safetensors(src, index_id=b)
        both = tmp_path / "both.safetensors"
        c.export_safetensors(both, [a, b])
        names = set(load_file(both))
        assert f"{a}/lm_head.weight" in names and f"{b}/lm_head.weight" in names
        assert len(names) == 2 * len(state)
