"""RELIABILITY.md's Input row: every malformed request is INVALID_ARGUMENT (or NOT_FOUND),
carries no traceback or server path, stores nothing, and leaves the server healthy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

ID = 777_000_111  # every malformed upload below aims here; nothing may ever appear under it

LEAKS = ("Traceback", "File \"", ".py", "/tmp", "/dev/shm", "site-packages", "torch_tq/")


@pytest.fixture
def fc(memory_server):
    c = flight.FlightClient(memory_server.location)
    yield c
    _assert_nothing_stored(c)
    health = json.loads(list(c.do_action(flight.Action("Health", b"")))[0].body.to_pybytes())
    assert health["status"] == "SERVING"
    assert "g" not in health["groups"]  # no malformed Consume created its group
    c.close()


def _assert_nothing_stored(fc):
    listed = list(fc.list_flights(json.dumps({"index_id": ID}).encode()))
    assert listed == []


def _assert_clean(exc: BaseException, code: str = "INVALID_ARGUMENT") -> None:
    text = str(exc)
    assert text.startswith(code + ": "), text
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked in {text!r}"


def _put(fc, command: bytes | flight.FlightDescriptor, table: pa.Table, batches=None):
    desc = command if isinstance(command, flight.FlightDescriptor) else (
        flight.FlightDescriptor.for_command(command))
    writer, _ = fc.do_put(desc, table.schema)
    try:
        if batches is None:
            writer.write_table(table)
        else:
            for b in batches:
                writer.write_batch(b)
    finally:
        writer.close()


GOOD_TABLE = pa.table({"data": pa.array(np.arange(8, dtype=np.float32))})


def _body(**overrides) -> bytes:
    body = {"action": "WriteMatrix", "index_id": ID, "matrix_type": "prompt"}
    body.update(overrides)
    return json.dumps(body).encode()


BAD_COMMANDS = {
    "not_json": b"not json",
    "truncated_json": b'{"index_id": 1',
    "json_array": b"[1, 2]",
    "json_string": b'"WriteMatrix"',
    "not_utf8": b'{"index_id": 1, "matrix_type": "\xff"}',
    "duplicate_key": f'{{"index_id": {ID}, "matrix_type": "prompt", "matrix_type": "resp"}}'.encode(),
    "duplicate_id": f'{{"index_id": 1, "index_id": {ID}, "matrix_type": "prompt"}}'.encode(),
    "nan_shape": f'{{"index_id": {ID}, "matrix_type": "prompt", "shape": [NaN]}}'.encode(),
    "infinity_id": b'{"index_id": Infinity, "matrix_type": "prompt"}',
    "id_true": _body(index_id=True),
    "id_float": _body(index_id=float(ID)),
    "id_string": _body(index_id=str(ID)),
    "id_arabic_digit": _body(index_id="\u0663"),
    "id_fullwidth": _body(index_id="\uff11\uff12"),
    "id_negative": _body(index_id=-1),
    "id_too_big": _body(index_id=2**64),
    "id_null": _body(index_id=None),
    "id_missing": json.dumps({"matrix_type": "prompt"}).encode(),
    "type_missing": json.dumps({"index_id": ID}).encode(),
    "type_slash": _body(matrix_type="a/b"),
    "type_dotdot": _body(matrix_type=".."),
    "type_abs_path": _body(matrix_type="/etc/passwd"),
    "type_nul": _body(matrix_type="prompt\x00x"),
    "type_fullwidth": _body(matrix_type="\uff50rompt"),
    "type_kelvin": _body(matrix_type="\u212aey"),
    "type_cyrillic": _body(matrix_type="pr\u043empt"),
    "type_empty": _body(matrix_type=""),
    "type_too_long": _body(matrix_type="a" * 65),
    "type_newline": _body(matrix_type="prompt\n"),
    "type_number": _body(matrix_type=5),
    "unknown_field": _body(matrx_type="prompt"),
    "wrong_action": _body(action="ReadMatrix"),
    "unknown_action": _body(action="DropTable"),
    "oversized": _body(pad="x" * 100_000),
    "shape_negative": _body(shape=[-1, 8]),
    "shape_float": _body(shape=[8.0]),
    "shape_bool": _body(shape=[True, 8]),
    "shape_string": _body(shape="8"),
    "shape_mismatch": _body(shape=[3, 3]),
    "nbytes_mismatch": _body(nbytes=31),
    "nbytes_contradicts_shape": _body(shape=[8], nbytes=64),
    "dtype_unknown": _body(dtype="complex64"),
    "dtype_contradicts_values": _body(dtype="int32"),
    "checksum_malformed": _body(xxh3="xyz"),
    "checksum_mismatch": _body(xxh3="0123456789abcdef"),
    "envelope_bad_body": json.dumps({"command": "write_matrix", "body": 5}).encode(),
    "envelope_extra": json.dumps({"command": "write_matrix", "body": {}, "x": 1}).encode(),
    "envelope_wrong_command": json.dumps(
        {"command": "read_matrix", "body": {"index_id": ID, "matrix_type": "prompt"}}).encode(),
}


@pytest.mark.parametrize("name", sorted(BAD_COMMANDS))
def test_bad_put_command(fc, name):
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, BAD_COMMANDS[name], GOOD_TABLE)
    _assert_clean(info.value)


@pytest.mark.parametrize(
    "path",
    [[str(ID)], [str(ID), "prompt", "x"], ["+12", "prompt"], [" 12", "prompt"], ["1_000", "prompt"],
     ["\u0663", "prompt"], ["012", "prompt"], [str(2**64), "prompt"], [str(ID), "../x"]],
)
def test_bad_path_descriptor(fc, path):
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, flight.FlightDescriptor.for_path(*path), GOOD_TABLE)
    _assert_clean(info.value)


def _schema_table(arr: pa.Array) -> pa.Table:
    return pa.table({"data": arr})


BAD_TABLES = {
    "two_columns": pa.table({"data": pa.array([1.0]), "extra": pa.array([2.0])}),
    "string_column": _schema_table(pa.array(["a", "b"])),
    "nested_list": _schema_table(pa.array([[[1.0]]])),
    "uint16_without_bf16": _schema_table(pa.array([1, 2], pa.uint16())),
    "uint32": _schema_table(pa.array([1, 2], pa.uint32())),
    "nulls": _schema_table(pa.array([1.0, None, 3.0])),
    "null_list_row": _schema_table(pa.array([[1.0, 2.0], None], pa.list_(pa.float32()))),
    "null_in_list": _schema_table(pa.array([[1.0, None]], pa.list_(pa.float32()))),
    "ragged_rows": _schema_table(pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))),
    "dictionary": _schema_table(pa.array([1, 2]).dictionary_encode()),
    "struct": _schema_table(pa.array([{"x": 1}])),
    "timestamp": _schema_table(pa.array([1, 2], pa.timestamp("s"))),
}


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_bad_upload_schema_or_values(fc, name):
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, _body(), BAD_TABLES[name])
    _assert_clean(info.value)


def test_fewer_bytes_than_declared(fc):
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, _body(shape=[16]), GOOD_TABLE)
    _assert_clean(info.value)
    assert "8 of 16" in str(info.value)


def test_more_bytes_than_declared(fc):
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, _body(shape=[4]), GOOD_TABLE)
    _assert_clean(info.value)


def test_undeclared_multi_batch_upload_is_refused(fc):
    batch = GOOD_TABLE.to_batches()[0]
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, _body(), GOOD_TABLE, batches=[batch, batch])
    _assert_clean(info.value)
    assert "shape" in str(info.value)


def test_undeclared_empty_upload_is_refused(fc):
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, _body(), GOOD_TABLE, batches=[])
    _assert_clean(info.value)


def test_bad_bf16_declaration(fc):
    table = _schema_table(pa.array([1.0], pa.float32()))
    with pytest.raises(pa.ArrowInvalid) as info:
        _put(fc, _body(dtype="bfloat16"), table)
    _assert_clean(info.value)


@pytest.mark.parametrize(
    "ticket",
    [b"", b"garbage", b"\x00\x01\x02", b"{}", b'{"action": "WriteMatrix", "index_id": 1, '
     b'"matrix_type": "prompt"}', json.dumps({"index_id": -5, "matrix_type": "prompt"}).encode()],
)
def test_garbage_ticket(fc, ticket):
    with pytest.raises(pa.ArrowInvalid) as info:
        fc.do_get(flight.Ticket(ticket)).read_all()
    _assert_clean(info.value)


@pytest.mark.parametrize(
    "body",
    [
        {"action": "BatchRead"},                                   # no items
        {"action": "BatchRead", "items": {"index_id": 1}},         # not a list
        {"action": "BatchRead", "items": [], "extra": 1},          # unknown field
        {"action": "BatchRead", "items": [], "max_inline_bytes": -1},
        {"action": "BatchRead", "items": [], "max_inline_bytes": 1 << 40},
        {"action": "BatchRead", "items": [], "pad": 64},
        {"action": "BatchRead", "items": [], "pad": [0, 1, 2, 3, 4, 5, 6]},  # 7 classes
        {"action": "BatchRead", "items": [], "pad": [0, -1]},
        {"action": "BatchRead", "items": [], "pad": [0, True]},
        {"action": "BatchRead", "items": [], "compression": "gzip"},
        {"action": "BatchRead", "items": [{"index_id": i, "matrix_type": "x"} for i in range(1001)]},
        {"command": "batch_read", "body": {"items": 5}},
        {"action": "ReadMatrix", "index_id": 1, "matrix_type": "x", "compression": 1},
    ],
)
def test_bad_batch_read_or_read_options(fc, body):
    with pytest.raises(pa.ArrowInvalid) as info:
        fc.do_get(flight.Ticket(json.dumps(body).encode())).read_all()
    _assert_clean(info.value)


def test_oversized_batch_ticket_is_refused(fc):
    items = [{"index_id": 1, "matrix_type": "x" * 60}] * 20_000  # over 1 MiB of JSON
    with pytest.raises(pa.ArrowInvalid) as info:
        fc.do_get(flight.Ticket(json.dumps({"action": "BatchRead", "items": items}).encode()))\
            .read_all()
    _assert_clean(info.value)


@pytest.mark.parametrize(
    "command",
    [{"action": "BatchWrite", "index_id": 1}, {"command": "batch_write", "body": {"x": 1}}],
)
def test_bad_batch_write_command(fc, command):
    table = pa.table({"index_id": [1], "matrix_type": ["a"], "data": [[1.0]]})
    writer, _ = fc.do_put(flight.FlightDescriptor.for_command(json.dumps(command)), table.schema)
    with pytest.raises(pa.ArrowInvalid) as info:
        writer.write_table(table)
        writer.close()
    _assert_clean(info.value)


def test_missing_matrix_ticket_is_not_found(fc):
    ticket = json.dumps({"action": "ReadMatrix", "index_id": ID, "matrix_type": "prompt"}).encode()
    with pytest.raises(pa.ArrowKeyError) as info:
        fc.do_get(flight.Ticket(ticket)).read_all()
    _assert_clean(info.value, "NOT_FOUND")


@pytest.mark.parametrize(
    "action, body",
    [
        ("DropTable", b"{}"),
        ("x" * 10_000, b"{}"),
        ("DeleteMatrix", b"not json"),
        ("DeleteMatrix", b'{"matrix_type": "prompt"}'),
        ("DeleteMatrix", json.dumps({"index_id": "12", "matrix_type": "prompt"}).encode()),
        ("DeleteMatrix", json.dumps({"index_id": ID, "matrix_type": "../x"}).encode()),
        ("GetMetadata", json.dumps({"index_id": 1.5}).encode()),
        ("GetMetadata", json.dumps({"index_id": ID, "extra": 1}).encode()),
        ("GetMetadata", b""),
        ("Health", b'{"x": 1}'),
        # consumer groups: names become directories, so they are checked like matrix types
        ("Consume", b"{}"),
        ("Consume", json.dumps({"group": "../etc", "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": "a/b", "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": ".hidden", "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": "\u212a", "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": "g" * 65, "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": "", "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": 5, "types": ["prompt"]}).encode()),
        ("Consume", json.dumps({"group": "g", "types": []}).encode()),
        ("Consume", json.dumps({"group": "g", "types": "prompt"}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["../x"]}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "max_items": 0}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "max_items": True}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "max_items": 10**6}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "timeout_ms": -1}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "timeout_ms": 10**9}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "lease_ms": 1.5}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "lease_ms": 0}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "ack": [-1]}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "delete": 1}).encode()),
        ("Consume", json.dumps({"group": "g", "types": ["prompt"], "extra": 1}).encode()),
        ("Ack", json.dumps({"group": "g"}).encode()),
        ("Ack", json.dumps({"group": "g", "index_ids": [1, "2"]}).encode()),
        ("Ack", json.dumps({"group": "g", "index_ids": [2**64]}).encode()),
        ("Ack", json.dumps({"group": "g", "index_ids": list(range(10_001))}).encode()),
        ("Ack", json.dumps({"group": "g", "index_ids": 7}).encode()),
        ("Release", json.dumps({"group": "g", "index_ids": [True]}).encode()),
        ("Renew", json.dumps({"group": "g", "index_ids": [1]}).encode()),
        ("Renew", json.dumps({"group": "g", "index_ids": [1], "lease_ms": 10}).encode()),
        ("FinishStream", json.dumps({"types": ["prompt", "bad/type"]}).encode()),
        ("FinishStream", b"{}"),
        ("ReopenStream", json.dumps({"types": "prompt"}).encode()),
        ("GroupStatus", json.dumps({"group": None}).encode()),
        ("DeleteGroup", json.dumps({"group": "x", "types": ["prompt"]}).encode()),
    ],
)
def test_bad_action(fc, action, body):
    with pytest.raises(pa.ArrowInvalid) as info:
        list(fc.do_action(flight.Action(action, body)))
    _assert_clean(info.value)


@pytest.mark.parametrize("criteria", [b"nope", b"[]", b'{"index_id": "1"}', b'{"foo": 1}'])
def test_bad_list_criteria(fc, criteria):
    with pytest.raises(pa.ArrowInvalid) as info:
        list(fc.list_flights(criteria))
    _assert_clean(info.value)


@pytest.mark.parametrize(
    "desc",
    [
        flight.FlightDescriptor.for_command(b"{"),
        flight.FlightDescriptor.for_command(json.dumps({"index_id": ID}).encode()),
        flight.FlightDescriptor.for_path("a", "b"),
    ],
)
def test_bad_flight_info_descriptor(fc, desc):
    with pytest.raises(pa.ArrowInvalid) as info:
        fc.get_flight_info(desc)
    _assert_clean(info.value)
