"""End-to-end tests of every seed method and action against a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq
from torch_tq import NotFound

SEED_EXAMPLE = '''
import pyarrow.flight as flight
import pyarrow as pa
import numpy as np

# 创建Flight客户端（自动选择传输）
client = flight.FlightClient("grpc://localhost:8080")

# 写入矩阵（零拷贝）
prompt = np.random.randn(32, 512, 4096).astype(np.float32)
schema = pa.schema([pa.field("data", pa.list_(pa.float32()))])
table = pa.Table.from_arrays([pa.array([prompt.flatten()])], schema=schema)

descriptor = flight.FlightDescriptor.for_command(
    json.dumps({"action": "WriteMatrix", "index_id": 12345, "matrix_type": "prompt"})
)

writer, _ = client.do_put(descriptor, schema)
writer.write_table(table)
writer.close()

# 读取矩阵（零拷贝）
descriptor = flight.FlightDescriptor.for_command(
    json.dumps({"action": "ReadMatrix", "index_id": 12345, "matrix_type": "prompt"})
)

flight_info = client.get_flight_info(descriptor)
reader = client.do_get(flight_info.endpoints[0].ticket)
table = reader.read_all()
data = table.to_pandas()  # 零拷贝转换为pandas
'''


def _cmd(**body) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body))


def _action(fc: flight.FlightClient, name: str, body) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    results = list(fc.do_action(flight.Action(name, raw)))
    assert len(results) == 1
    return json.loads(results[0].body.to_pybytes())


@pytest.fixture
def fc(memory_server):
    c = flight.FlightClient(memory_server.location)
    yield c
    c.close()


def test_seed_python_example_verbatim(disk_server, tmp_path):
    """The seed's Python example, as written (plus the json import it forgot)."""
    try:
        srv = disk_server(port=8080)
        code = SEED_EXAMPLE
    except torch_tq.Unavailable:  # 8080 taken on this machine: the same code on another port
        srv = disk_server(port=0, data_dir=str(tmp_path / "other"))
        code = SEED_EXAMPLE.replace("grpc://localhost:8080", srv.location)
    scope: dict = {"json": json}
    exec(compile(code, "seed_example", "exec"), scope)
    prompt = scope["prompt"]
    data = scope["data"]
    assert list(data.columns) == ["data"]
    np.testing.assert_array_equal(data["data"].to_numpy(), prompt.flatten())
    # The same matrix through the torch client: the flattened upload keeps its flat shape.
    with torch_tq.Client(srv.location) as client:
        t = client.get(12345, "prompt")
        assert t.shape == (32 * 512 * 4096,) and t.dtype == torch.float32
        assert torch.equal(t, torch.from_numpy(prompt.flatten()))
        meta = client.metadata(12345)
        assert meta["types"] == ["prompt"] and meta["dimensions"]["prompt"] == [32 * 512 * 4096]


def test_shape_in_command_restores_flattened_upload(fc, client, unique_id):
    values = np.arange(2 * 3 * 4, dtype=np.float32)
    schema = pa.schema([pa.field("data", pa.list_(pa.float32()))])
    table = pa.Table.from_arrays([pa.array([values])], schema=schema)
    desc = _cmd(action="WriteMatrix", index_id=unique_id, matrix_type="prompt", shape=[2, 3, 4])
    writer, _ = fc.do_put(desc, schema)
    writer.write_table(table)
    writer.close()
    t = client.get(unique_id, "prompt")
    assert t.shape == (2, 3, 4)
    assert torch.equal(t, torch.arange(24, dtype=torch.float32).reshape(2, 3, 4))


def _upload(fc, desc, table, schema=None):
    writer, _ = fc.do_put(desc, schema or table.schema)
    writer.write_table(table)
    writer.close()


@pytest.mark.parametrize(
    "make, expected_shape",
    [
        (lambda v: pa.table({"data": v}), (24,)),
        (lambda v: pa.table({"data": pa.FixedSizeListArray.from_arrays(v, 24)}), (24,)),
        (lambda v: pa.table({"data": pa.FixedSizeListArray.from_arrays(v, 6)}), (4, 6)),
        (lambda v: pa.table({"data": pa.ListArray.from_arrays([0, 8, 16, 24], v)}), (3, 8)),
        (lambda v: pa.table({"data": pa.LargeListArray.from_arrays([0, 24], v)}), (24,)),
        (
            lambda v: pa.table(
                {"data": pa.FixedShapeTensorArray.from_numpy_ndarray(v.to_numpy().reshape(2, 3, 4))}
            ),
            (2, 3, 4),
        ),
    ],
    ids=["flat", "fixed_size_list_1row", "fixed_size_list_rows", "list_rows", "large_list",
         "fixed_shape_tensor"],
)
def test_accepted_upload_forms(fc, client, unique_id, make, expected_shape):
    values = pa.array(np.arange(24, dtype=np.int32))
    _upload(fc, _cmd(index_id=unique_id, matrix_type="resp"), make(values))
    t = client.get(unique_id, "resp")
    assert t.shape == expected_shape and t.dtype == torch.int32
    assert torch.equal(t.reshape(-1), torch.arange(24, dtype=torch.int32))


def test_seed_command_envelope_and_uppercase_type(fc, client, unique_id):
    body = json.dumps({"index_id": unique_id, "matrix_type": "PROMPT"})
    desc = _cmd(command="write_matrix", body=body)
    _upload(fc, desc, pa.table({"data": pa.array([1.5, 2.5], pa.float64())}))
    assert torch.equal(client.get(unique_id, "prompt"), torch.tensor([1.5, 2.5], dtype=torch.float64))
    # a path descriptor names the same matrix
    info = fc.get_flight_info(flight.FlightDescriptor.for_path(str(unique_id), "Prompt"))
    assert info.total_records == 2


def test_get_flight_info_and_schema(fc, client, unique_id):
    t = torch.randn(3, 5, dtype=torch.float64)
    client.put(unique_id, "advantage", t)
    desc = _cmd(action="ReadMatrix", index_id=unique_id, matrix_type="advantage")
    info = fc.get_flight_info(desc)
    assert info.total_records == 15
    assert info.total_bytes == 15 * 8
    md = info.schema.metadata
    assert json.loads(md[b"shape"]) == [3, 5] and md[b"dtype"] == b"float64"
    assert info.schema.field(0).name == "data" and info.schema.field(0).type == pa.float64()
    assert len(info.endpoints) == 1
    table = fc.do_get(info.endpoints[0].ticket).read_all()
    np.testing.assert_array_equal(table.column("data").to_numpy(), t.numpy().reshape(-1))
    schema = fc.get_schema(desc).schema
    assert schema.equals(info.schema, check_metadata=True)


def test_list_flights_all_and_filtered(fc, client, unique_id):
    for offset in range(3):
        for mtype in ("prompt", "resp"):
            client.put(unique_id + offset, mtype, torch.zeros(2, 2))
    everything = list(fc.list_flights())
    keys = {(json.loads(f.endpoints[0].ticket.ticket)["index_id"],
             json.loads(f.endpoints[0].ticket.ticket)["matrix_type"]) for f in everything}
    for offset in range(3):
        assert {(unique_id + offset, "prompt"), (unique_id + offset, "resp")} <= keys
    only = list(fc.list_flights(json.dumps({"index_id": unique_id + 1}).encode()))
    assert len(only) == 2
    for info in only:
        # every listed descriptor works with get_flight_info, every ticket with do_get
        assert fc.get_flight_info(info.descriptor).total_records == 4
        assert fc.do_get(info.endpoints[0].ticket).read_all().num_rows == 4
    listed = client.list(unique_id + 2)
    assert [(m.matrix_type, m.shape, m.dtype, m.nbytes) for m in listed] == [
        ("prompt", (2, 2), "float32", 16), ("resp", (2, 2), "float32", 16)]


def test_delete_one_type_and_all_types(fc, client, unique_id):
    for mtype in ("prompt", "resp", "ref_log_prob"):
        client.put(unique_id, mtype, torch.ones(4))
    reply = _action(fc, "DeleteMatrix", {"index_id": unique_id, "matrix_type": "resp"})
    assert reply["success"] is True and reply["message"] == "success"
    with pytest.raises(NotFound):
        client.get(unique_id, "resp")
    assert client.metadata(unique_id)["types"] == ["prompt", "ref_log_prob"]
    reply = _action(fc, "DeleteMatrix", {"index_id": unique_id, "matrix_type": ""})
    assert sorted(reply["deleted"]) == ["prompt", "ref_log_prob"]
    with pytest.raises(NotFound):
        client.metadata(unique_id)
    with pytest.raises(NotFound, match=f"matrix not found: index_id={unique_id}, type=resp"):
        client.delete(unique_id, "resp")
    with pytest.raises(NotFound):
        client.delete(unique_id)


def test_get_metadata_seed_response(fc, client, unique_id):
    before = int(time.time() * 1000)
    client.put(unique_id, "prompt", torch.zeros(32, 512, dtype=torch.bfloat16))
    client.put(unique_id, "advantage", torch.zeros(32, 512))
    meta = _action(fc, "GetMetadata", {"index_id": unique_id})
    after = int(time.time() * 1000)
    assert meta["success"] is True and meta["message"] == "success"
    assert meta["types"] == ["advantage", "prompt"]
    assert meta["dimensions"] == {"advantage": [32, 512], "prompt": [32, 512]}
    assert meta["dtypes"] == {"advantage": "float32", "prompt": "bfloat16"}
    assert before <= meta["created_at"] <= meta["updated_at"] <= after
    time.sleep(0.01)
    client.put(unique_id, "prompt", torch.ones(32, 512, dtype=torch.bfloat16))
    again = client.metadata(unique_id)
    assert again["matrices"]["prompt"]["created_at"] == meta["matrices"]["prompt"]["created_at"]
    assert again["matrices"]["prompt"]["updated_at"] > meta["matrices"]["prompt"]["updated_at"]
    assert again["updated_at"] > meta["updated_at"]


def test_list_actions_and_health(fc, client):
    actions = {a.type: a.description for a in fc.list_actions()}
    assert {"DeleteMatrix", "GetMetadata", "Health"} <= set(actions)
    health = _action(fc, "Health", b"")
    assert health["status"] == "SERVING" and health["success"] is True
    assert client.health()["matrices"] >= 0


def test_errors_carry_seed_code_and_message(fc, client):
    with pytest.raises(NotFound) as info:
        client.get(12345678901, "prompt")
    assert str(info.value) == "matrix not found: index_id=12345678901, type=prompt"
    assert isinstance(info.value, KeyError) and info.value.code == "NOT_FOUND"
    # A plain Flight client sees NOT_FOUND (Arrow's KeyError status), the message and no traceback.
    ticket = flight.Ticket(json.dumps({"action": "ReadMatrix", "index_id": 12345678901,
                                       "matrix_type": "PROMPT"}).encode())
    with pytest.raises(pa.ArrowKeyError) as raw:
        fc.do_get(ticket).read_all()
    text = str(raw.value)
    assert text.startswith("NOT_FOUND: matrix not found: index_id=12345678901, type=prompt")
    assert "Traceback" not in text and "File " not in text and ".py" not in text
    with pytest.raises(pa.ArrowInvalid) as raw:
        fc.get_flight_info(flight.FlightDescriptor.for_command(b"{"))
    assert str(raw.value).startswith("INVALID_ARGUMENT: ")
    assert "Traceback" not in str(raw.value)


def test_do_exchange_is_rejected_cleanly(fc):
    with pytest.raises(pa.ArrowNotImplementedError) as info:
        writer, reader = fc.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
        reader.read_all()
    assert "Traceback" not in str(info.value)


def test_put_is_acknowledged_through_app_metadata(fc, unique_id):
    schema = pa.schema([pa.field("data", pa.float32())])
    writer, acks = fc.do_put(_cmd(index_id=unique_id, matrix_type="prompt", shape=[4]), schema)
    writer.write_table(pa.table({"data": pa.array([1, 2, 3, 4], pa.float32())}))
    writer.done_writing()
    ack = json.loads(acks.read().to_pybytes())
    writer.close()
    assert ack["success"] is True and ack["shape"] == [4] and ack["nbytes"] == 16


def test_put_with_ack_false_is_acknowledged_by_its_status_alone(fc, client, unique_id):
    """``"ack": false`` (what torch_tq's client sends): no acknowledgement message, the
    call's OK status, which follows the commit, is the acknowledgement; a refused upload
    still fails the call."""
    schema = pa.schema([pa.field("data", pa.float32())])
    writer, acks = fc.do_put(_cmd(index_id=unique_id, matrix_type="quiet", shape=[4],
                                  ack=False), schema)
    writer.write_table(pa.table({"data": pa.array([1, 2, 3, 4], pa.float32())}))
    writer.done_writing()
    assert acks.read() is None  # the stream ends with no message
    writer.close()
    assert torch.equal(client.get(unique_id, "quiet"), torch.tensor([1.0, 2, 3, 4]))

    writer, _ = fc.do_put(_cmd(index_id=unique_id, matrix_type="short", shape=[5],
                               ack=False), schema)
    writer.write_table(pa.table({"data": pa.array([1, 2, 3, 4], pa.float32())}))
    writer.done_writing()
    with pytest.raises(pa.ArrowInvalid, match="ended after 4 of 5"):
        writer.close()
    assert [m.matrix_type for m in client.list(unique_id)] == ["quiet"]
    with pytest.raises(pa.ArrowInvalid, match="ack must be true or false"):
        writer, _ = fc.do_put(_cmd(index_id=unique_id, matrix_type="x", ack="no"), schema)
        writer.write_table(pa.table({"data": pa.array([1.0], pa.float32())}))
        writer.close()


def test_stats_count_calls_errors_and_bytes():
    with torch_tq.start_server(storage="memory") as srv:
        c = torch_tq.Client(srv.location, transport="grpc")
        t = torch.randn(1000)
        c.put(1, "prompt", t)
        c.get(1, "prompt")
        with pytest.raises(torch_tq.NotFound):
            c.get(2, "prompt")
        with pytest.raises(torch_tq.InvalidArgument):
            c.consume("bad/group", ["prompt"])
        stats = c.server_stats()
        assert stats["calls"]["do_put"] == 1 and stats["calls"]["do_get"] == 2
        assert stats["calls"]["action:Consume"] == 1 and stats["calls"]["action:Stats"] == 1
        assert stats["errors"] == {"INVALID_ARGUMENT": 1, "NOT_FOUND": 1}
        assert stats["bytes_in"] >= 4000 and stats["bytes_out"] >= 4000
        assert stats["active_calls"] == 1  # this very Stats call
        assert stats["matrices"] == 1 and stats["status"] == "SERVING"
        proc = subprocess.run([sys.executable, "-m", "torch_tq", "stats", "--location", srv.location, "--json"],
                       capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        printed = json.loads(proc.stdout)
        assert printed["calls"]["do_put"] == 1 and printed["active_calls"] == 1


def test_start_server_keeps_its_info_logs_to_itself_unless_asked(tmp_path):
    quiet, chatty = tmp_path / "quiet.log", tmp_path / "chatty.log"
    with open(quiet, "wb") as f, torch_tq.start_server(storage="memory", stderr=f):
        pass
    with open(chatty, "wb") as f, torch_tq.start_server(storage="memory", stderr=f,
                                                         log_level="INFO"):
        pass
    assert "INFO" not in quiet.read_text()
    assert "INFO torch_tq.server.run" in chatty.read_text()  # "serving: ..."
