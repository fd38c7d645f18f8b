"""A sweep of every documented action and upload form with malformed bodies, against a live
server: no answer may be an INTERNAL_ERROR (that code is kept for real server faults), none
may leak a traceback, nothing stored may change, and the server's log must stay clean."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq
from torch_tq.server import batch as batch_ops
from torch_tq.protocol import actions
from torch_tq.protocol import commands as protocol
from torch_tq.protocol import errors as wire_errors

KEEP = 555_000  # stored before the sweep; every mutation aims elsewhere
AIM = 556_000
ALLOWED = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE")
LEAKS = ("Traceback", 'File "', ".py", "/tmp", "/dev/shm", "site-packages")

# values every field is tried with: the wrong type, null, out of range, odd text
VALUES = [None, True, False, 0, -1, 1.5, 2**64, 2**70, "", "x", "\u0663", "a/../b", "A" * 5000,
          [], [None], [1, "2"], [[1]], {}, {"a": 1}]
RAW_BODIES = [b"", b"null", b"[]", b"1", b'"s"', b"\xff\xfe", b"{", b"{}{}", b'{"a": NaN}',
              b'{"a": 1, "a": 2}', b"{" * 5000, b" " * 70_000]


def _ucx_addresses() -> list[str]:
    try:
        from torch_tq.transport import ucx

        return ucx.runtime().addresses_b64[:1]
    except Exception:  # noqa: BLE001 - no UCX here: the UCX bodies are refused earlier
        return [base64.b64encode(bytes(40)).decode()]


def _action_bases() -> dict[str, dict]:
    ids = {"index_id": AIM, "matrix_type": "prompt"}
    return {
        "DeleteMatrix": dict(ids),
        "GetMetadata": {"index_id": AIM},
        "Health": {},
        "Stats": {},
        "UcxInfo": {},
        "Consume": {"group": "sweep", "types": ["prompt"], "max_items": 2, "timeout_ms": 0,
                    "lease_ms": 1000, "ack": [], "delete": False},
        "Ack": {"group": "sweep", "index_ids": [AIM], "delete": False},
        "Release": {"group": "sweep", "index_ids": [AIM]},
        "Renew": {"group": "sweep", "index_ids": [AIM], "lease_ms": 1000},
        "FinishStream": {"types": ["sweep_type"]},
        "ReopenStream": {"types": ["sweep_type"]},
        "GroupStatus": {"group": "sweep"},
        "DeleteGroup": {"group": "sweep_gone"},
        "UcxGet": {**ids, "addresses": _ucx_addresses(), "tag": 9, "inline_max": 1 << 20},
        "UcxPut": {**ids, "addresses": _ucx_addresses(), "tag": 9, "shape": [0],
                   "dtype": "float32", "nbytes": 0, "parts": []},
        "UcxPutBatch": {"items": [{**ids, "dtype": "float32", "shape": [0], "nbytes": 0}],
                        "parts": [], "addresses": _ucx_addresses(), "tag": 9},
        "UcxGetBatch": {"items": [ids], "addresses": _ucx_addresses(), "tag": 9,
                        "inline_max": 1 << 20, "max_bytes": 1 << 20},
        "LocalInfo": {"host_id": "0" * 32},
        "PublishLocal": {**ids, "file": "0" * 32 + ".arrow"},
        "PublishLocalBatch": {"file": "0" * 32 + ".pack", "items": [
            {**ids, "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}]},
        "LocateLocal": {"items": [ids]},
    }


def _mutations(base: dict) -> list[bytes]:
    out = [json.dumps(base).encode()]
    for field in base:
        for value in VALUES:
            out.append(json.dumps({**base, field: value}).encode())
        out.append(json.dumps({k: v for k, v in base.items() if k != field}).encode())
    out.append(json.dumps({**base, "unknown_field": 1}).encode())
    out.extend(RAW_BODIES)
    return out


class Sweep:
    def __init__(self, fc: flight.FlightClient) -> None:
        self.fc = fc
        self.calls = 0
        self.refused: dict[str, int] = {}

    def outcome(self, fn, what: str) -> None:
        """Runs one call; an error must carry one of our codes (not INTERNAL_ERROR)."""
        self.calls += 1
        try:
            result = fn()
        except (flight.FlightError, pa.ArrowException) as e:
            text = str(e)
            code = text.split(":", 1)[0]
            assert code in ALLOWED, f"{what}: {text[:400]}"
            for leak in LEAKS:
                assert leak not in wire_errors._strip_detail(text), f"{what}: {leak!r} in {text[:400]}"
            self.refused[code] = self.refused.get(code, 0) + 1
            return None
        return result


@pytest.fixture(scope="module")
def sweep_server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sweep") / "server.log"
    with open(log_path, "wb") as log_file:
        srv = torch_tq.start_server(data_dir=str(tmp_path_factory.mktemp("sweep_data")),
                                    stderr=log_file, qps=0, qps_ucx=0)
    fc = flight.FlightClient(srv.location)
    with torch_tq.Client(srv.location, transport="grpc") as c:
        c.put(KEEP, "prompt", torch.arange(16, dtype=torch.float32))
    before = _listing(fc)
    yield srv, fc, log_path
    after = _listing(fc)
    assert after.get(KEEP) == before[KEEP], "a stored matrix changed during the sweep"
    fc.close()
    srv.stop()
    log = log_path.read_text()
    assert "Traceback" not in log and "failed (ref" not in log, log[-4000:]


def _listing(fc) -> dict:
    return {json.loads(i.descriptor.command)["index_id"]: (i.total_records, i.total_bytes)
            for i in fc.list_flights()}


def _health(fc) -> dict:
    return json.loads(list(fc.do_action(flight.Action("Health", b"")))[0].body.to_pybytes())


def test_every_action_with_malformed_bodies(sweep_server):
    srv, fc, _ = sweep_server
    sweep = Sweep(fc)
    bases = _action_bases()
    assert set(bases) == set(actions.ACTIONS)  # every registered action
    for name, base in bases.items():
        for body in _mutations(base):
            sweep.outcome(lambda: list(fc.do_action(flight.Action(name, body))),
                          f"{name} {body[:120]!r}")
    for name in ("DropTable", "", "x" * 10_000, "BatchRead", "BatchWrite"):
        sweep.outcome(lambda: list(fc.do_action(flight.Action(name, b"{}"))), name[:20])
    print(f"\nactions: {sweep.calls} calls, refused {sweep.refused}")
    assert sweep.refused.get("INVALID_ARGUMENT", 0) > sweep.calls // 2
    assert _health(fc)["status"] == "SERVING"


FORMS = {
    "flat": pa.table({"data": pa.array(np.arange(8, dtype=np.float32))}),
    "seed_list": pa.table({"data": pa.array([list(range(8))], pa.list_(pa.float32()))}),
    "rows": pa.table({"data": pa.array([[1, 2, 3, 4], [5, 6, 7, 8]],
                                       pa.list_(pa.float32(), 4))}),
    "tensor": pa.table({"data": pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.float32(), [2, 2]),
        pa.array([[1, 2, 3, 4], [5, 6, 7, 8]], pa.list_(pa.float32(), 4)))}),
    "bf16": pa.table({"data": pa.array(np.arange(8, dtype=np.uint16))}),
}


def _put(fc, command: bytes, table: pa.Table):
    writer, reader = fc.do_put(flight.FlightDescriptor.for_command(command), table.schema)
    try:
        writer.write_table(table)
        writer.done_writing()
        ack = reader.read()
    finally:
        writer.close()
    return ack


def test_every_upload_form_with_malformed_commands(sweep_server):
    srv, fc, _ = sweep_server
    sweep = Sweep(fc)
    base = {"action": "WriteMatrix", "index_id": AIM, "matrix_type": "prompt", "shape": [8],
            "dtype": "float32", "nbytes": 32}
    for form, table in FORMS.items():
        form_base = dict(base, dtype="bfloat16", nbytes=16) if form == "bf16" else base
        if form in ("rows", "tensor"):
            form_base = dict(form_base, shape=[2, 4] if form == "rows" else [2, 2, 2])
        for command in _mutations(form_base):
            sweep.outcome(lambda: _put(fc, command, table), f"{form} {command[:120]!r}")
    print(f"\nuploads: {sweep.calls} calls, refused {sweep.refused}")
    assert sweep.refused.get("INVALID_ARGUMENT", 0) > sweep.calls // 2


def test_an_error_never_echoes_a_huge_value(sweep_server):
    """A refusal quotes at most a short prefix of what it refuses: the whole of a 5,000
    character field, echoed in the status and its details, could pass gRPC's 16 KiB limit on
    a reply's metadata and turn the refusal into a transport error."""
    _, fc, _ = sweep_server
    table = FORMS["flat"]
    for field in ("action", "dtype", "nbytes", "matrix_type", "index_id"):
        command = {"action": "WriteMatrix", "index_id": AIM, "matrix_type": "prompt",
                   "shape": [8], "dtype": "float32", "nbytes": 32, field: "A" * 5000}
        with pytest.raises((flight.FlightError, pa.ArrowException)) as e:
            _put(fc, json.dumps(command).encode(), table)
        assert str(e.value).startswith("INVALID_ARGUMENT") and len(str(e.value)) < 2000, field


def _batch_write(fc, table: pa.Table) -> list[dict]:
    ack = _put(fc, b'{"action": "BatchWrite"}', table)
    return json.loads(ack.to_pybytes())["results"]


def test_batch_write_items_with_malformed_columns(sweep_server):
    srv, fc, _ = sweep_server
    sweep = Sweep(fc)
    four = np.arange(4, dtype=np.float32).tobytes()
    columns = {
        "index_id": [pa.array([AIM, AIM + 1], pa.uint64()), pa.array([-1, AIM], pa.int64()),
                     pa.array([None, AIM], pa.int64()), pa.array([2**64 - 1, 0], pa.uint64()),
                     pa.array(["1", "2"])],
        "matrix_type": [pa.array(["a", "b"]), pa.array([None, "b"]), pa.array(["../x", "b"]),
                        pa.array([1, 2]), pa.array(["a" * 65, "\u212a"])],
        "data": [pa.array([four, four], pa.binary()), pa.array([four[:7], b""], pa.binary()),
                 pa.array([None, four], pa.binary()), pa.array([four + b"x", four], pa.binary()),
                 pa.array([[1.0], [2.0, None]], pa.list_(pa.float32())),
                 pa.array([1.0, 2.0])],
        "dtype": [pa.array(["float32", "float32"]), pa.array(["complex", None]),
                  pa.array(["bool", "bfloat16"]), pa.array([1, 2])],
        "shape": [pa.array([[4], [2, 2]], pa.list_(pa.int64())),
                  pa.array([[-1], [3, 3]], pa.list_(pa.int64())),
                  pa.array([None, [2**62, 2**62]], pa.list_(pa.int64())),
                  pa.array([[None], []], pa.list_(pa.int64())), pa.array([4, 4])],
    }
    good = {name: values[0] for name, values in columns.items()}
    tables = []
    for name, values in columns.items():
        for value in values[1:]:
            tables.append(pa.table({**good, name: value}))
        tables.append(pa.table({k: v for k, v in good.items() if k != name}))
    tables.append(pa.table({**good, "type": good["matrix_type"]}))  # ambiguous: two type columns
    for table in tables:
        results = sweep.outcome(lambda: _batch_write(fc, table), f"BatchWrite {table.schema}")
        for item in results or ():
            assert item["code"] != "INTERNAL_ERROR", (table.schema, item)
    print(f"\nbatch writes: {sweep.calls} calls, refused {sweep.refused}")


def test_reads_with_malformed_tickets_descriptors_and_items(sweep_server):
    srv, fc, _ = sweep_server
    sweep = Sweep(fc)
    read = {"action": "ReadMatrix", "index_id": KEEP, "matrix_type": "prompt"}
    for command in _mutations(read) + _mutations({**read, "compression": "zstd"}):
        sweep.outcome(lambda: fc.do_get(flight.Ticket(command)).read_all(), f"DoGet {command[:80]!r}")
        desc = flight.FlightDescriptor.for_command(command)
        sweep.outcome(lambda: fc.get_flight_info(desc), f"GetFlightInfo {command[:80]!r}")
        sweep.outcome(lambda: fc.get_schema(desc), f"GetSchema {command[:80]!r}")
    for criteria in _mutations({"index_id": KEEP}):
        sweep.outcome(lambda: list(fc.list_flights(criteria)), f"ListFlights {criteria[:80]!r}")
    item = {"index_id": KEEP, "matrix_type": "prompt"}
    for mutated in _mutations(item)[:-len(RAW_BODIES)]:
        ticket = protocol.dumps({"action": "BatchRead", "items": [json.loads(mutated), item]})
        table = sweep.outcome(lambda: fc.do_get(flight.Ticket(ticket)).read_all(), "BatchRead")
        if table is not None:
            assert table.schema.equals(batch_ops.RESULT_SCHEMA)
            assert "INTERNAL_ERROR" not in table.column("code").to_pylist(), ticket[:200]
    batch_read = {"action": "BatchRead", "items": [item], "max_inline_bytes": 1024,
                  "compression": "lz4", "pad": 8}
    for ticket in _mutations(batch_read) + _mutations({**batch_read, "pad": [0, 3, 7]}):
        sweep.outcome(lambda: fc.do_get(flight.Ticket(ticket)).read_all(), f"BatchRead {ticket[:80]!r}")
    print(f"\nreads: {sweep.calls} calls, refused {sweep.refused}")


def test_a_path_descriptor_that_is_not_utf8_leaves_the_server_healthy(sweep_server):
    """gRPC itself refuses it: FlightDescriptor.path is a protobuf ``string``, and protobuf
    parsing fails before any server code runs, with gRPC's own INTERNAL and an empty
    message (no torch_tq code, nothing the server can answer instead)."""
    srv, fc, log_path = sweep_server
    desc = flight.FlightDescriptor.for_path(b"\xff\xfe", b"prompt")
    with pytest.raises(flight.FlightInternalError) as info:
        fc.get_flight_info(desc)
    assert "INTERNAL_ERROR" not in str(info.value) and "Traceback" not in str(info.value)
    assert _health(fc)["status"] == "SERVING"
    assert os.path.getsize(log_path) < 1 << 20


def _refused(fn) -> str:
    try:
        fn()
    except (flight.FlightError, pa.ArrowException) as e:
        return str(e).split(":", 1)[0]
    return "accepted"


def test_null_is_never_taken_for_an_absent_field(sweep_server):
    srv, fc, _ = sweep_server
    before = _listing(fc)
    for name, base in _action_bases().items():
        for field in base:
            body = json.dumps({**base, field: None}).encode()
            assert _refused(lambda: list(fc.do_action(flight.Action(name, body)))) == \
                "INVALID_ARGUMENT", (name, field)
    put = {"action": "WriteMatrix", "index_id": AIM, "matrix_type": "prompt", "shape": [8],
           "dtype": "float32", "nbytes": 32, "xxh3": "0" * 16}
    for field in put:
        command = json.dumps({**put, field: None}).encode()
        assert _refused(lambda: _put(fc, command, FORMS["flat"])) == "INVALID_ARGUMENT", field
    for ticket in ({"action": "ReadMatrix", "index_id": KEEP, "matrix_type": "prompt",
                    "compression": None},
                   {"action": "BatchRead", "items": [], "compression": None}):
        assert _refused(lambda: fc.do_get(flight.Ticket(protocol.dumps(ticket))).read_all()) \
            == "INVALID_ARGUMENT"
    assert _refused(lambda: list(fc.list_flights(b'{"index_id": null}'))) == "INVALID_ARGUMENT"
    assert _listing(fc) == before


def test_a_batch_write_table_with_two_type_columns_is_refused_whole(sweep_server):
    srv, fc, _ = sweep_server
    table = pa.table({"index_id": pa.array([AIM + 9], pa.uint64()), "matrix_type": ["a"],
                      "type": ["b"], "data": pa.array([[1.0]], pa.list_(pa.float32()))})
    assert _refused(lambda: _batch_write(fc, table)) == "INVALID_ARGUMENT"
    assert AIM + 9 not in _listing(fc)


def test_a_size_declared_without_a_shape_is_checked_and_shaped(sweep_server):
    srv, fc, _ = sweep_server
    sixteen = pa.table({"data": pa.array(np.arange(16, dtype=np.float32))})

    def command(nbytes: int) -> bytes:
        return json.dumps({"index_id": AIM + 7, "matrix_type": "prompt", "nbytes": nbytes}).encode()

    assert _refused(lambda: _put(fc, command(128), sixteen)) == "INVALID_ARGUMENT"  # 64 came
    assert AIM + 7 not in _listing(fc)
    ack = json.loads(_put(fc, command(64), sixteen).to_pybytes())
    assert ack["shape"] == [16] and ack["nbytes"] == 64
