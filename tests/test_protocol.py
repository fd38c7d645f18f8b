"""Parsing of commands, tickets and action bodies: strict, and never anything but typed errors."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_tq
from torch_tq.protocol import commands as protocol
from torch_tq.protocol import errors as wire_errors
from torch_tq.errors import InternalError, InvalidArgument, NotFound, TQError, Unavailable
from torch_tq.protocol.commands import Key


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_ticket_bytes_give_a_key_or_invalid_argument(raw):
    try:
        key = protocol.parse_ticket(raw)
    except InvalidArgument:
        return
    assert isinstance(key, Key)


@settings(max_examples=500, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12))
def test_arbitrary_json_commands_never_raise_untyped(value):
    raw = json.dumps(value).encode()
    try:
        protocol.parse_put_descriptor(flight.FlightDescriptor.for_command(raw))
    except InvalidArgument:
        pass


@given(st.text(max_size=80))
def test_matrix_type_is_ascii_identifier_or_rejected(name):
    try:
        canonical = protocol.validate_matrix_type(name)
    except InvalidArgument:
        return
    assert canonical.isascii() and canonical == name.lower()
    assert canonical[0].isalpha() and all(c.isalnum() or c == "_" for c in canonical)
    assert "/" not in canonical and ".." not in canonical and len(canonical) <= 64


@given(st.integers(0, 2**64 - 1), st.sampled_from(["prompt", "RESP", "ref_log_prob", "Advantage"]))
def test_read_command_roundtrip(index_id, mtype):
    key = Key(index_id, mtype.lower())
    assert protocol.parse_ticket(protocol.read_command(key)) == key
    cmd = protocol.write_command(key, (2, 3), "float32", 24)
    parsed = protocol.parse_put_descriptor(flight.FlightDescriptor.for_command(cmd))
    assert parsed == protocol.PutCommand(key, (2, 3), "float32", 24, None)


def test_seed_forms_parse_alike():
    expected = protocol.PutCommand(Key(12345, "prompt"))
    forms = [
        {"action": "WriteMatrix", "index_id": 12345, "matrix_type": "prompt"},
        {"index_id": 12345, "matrix_type": "PROMPT"},
        {"command": "write_matrix", "body": {"index_id": 12345, "matrix_type": "prompt"}},
        {"command": "write_matrix", "body": json.dumps({"index_id": 12345, "matrix_type": "prompt"})},
    ]
    for form in forms:
        desc = flight.FlightDescriptor.for_command(json.dumps(form))
        assert protocol.parse_put_descriptor(desc) == expected
    assert protocol.parse_put_descriptor(flight.FlightDescriptor.for_path("12345", "prompt")) == expected


def test_delete_and_metadata_bodies():
    assert protocol.parse_delete_body(b'{"index_id": 5, "matrix_type": ""}') == (5, None)
    assert protocol.parse_delete_body(b'{"index_id": 5}') == (5, None)
    assert protocol.parse_delete_body(b'{"index_id": 5, "matrix_type": "Resp"}') == (5, "resp")
    assert protocol.parse_metadata_body(b'{"index_id": 18446744073709551615}') == 2**64 - 1
    assert protocol.parse_list_criteria(b"") is None


@pytest.mark.parametrize("cls", [NotFound, InvalidArgument, Unavailable, InternalError])
def test_wire_errors_map_back_to_the_same_class(cls):
    wire = wire_errors.to_wire_error(cls("matrix not found: index_id=1, type=prompt"))
    # what a client receives: the message plus Arrow's detail suffix
    received = type(wire)(str(wire) + ". Detail: Python exception: x")
    back = wire_errors.from_flight_error(received)
    assert type(back) is cls and back.message == "matrix not found: index_id=1, type=prompt"


def test_errors_subclass_builtins():
    assert issubclass(NotFound, KeyError) and issubclass(InvalidArgument, ValueError)
    assert issubclass(Unavailable, ConnectionError) and issubclass(InternalError, RuntimeError)
    assert all(issubclass(c, TQError) for c in (NotFound, InvalidArgument, Unavailable, InternalError))
    assert str(NotFound("x y")) == "x y"  # no KeyError quotes
    assert isinstance(wire_errors.from_flight_error(flight.FlightUnavailableError("down")), Unavailable)
    assert isinstance(wire_errors.from_flight_error(pa.ArrowKeyError("k")), NotFound)


# --------------------------------------------------------------------------- the registry


def test_the_registry_is_the_one_list_of_actions():
    from torch_tq.protocol import actions
    from torch_tq.server import actions as handlers

    assert set(handlers.HANDLERS) == set(actions.ACTIONS)  # one handler per action, no more
    assert not set(actions.ACTIONS) & set(actions.STREAMS)
    for spec in (*actions.ACTIONS.values(), *actions.STREAMS.values()):
        for spelling in (spec.name, spec.name.upper(), *spec.spellings):
            assert actions.lookup(spelling) is spec, spelling
        assert spec.description and spec.quota in ("tcp", "ucx")
    assert {a.name for a in actions.ACTIONS.values() if a.quota == "ucx"} == {
        "UcxGet", "UcxPut", "UcxGetBatch", "UcxPutBatch"}
    assert actions.lookup("delete_matrix").name == "DeleteMatrix"
    assert actions.lookup("DropTable") is None and actions.lookup("x" * 100) is None


def test_every_registered_command_is_documented():
    from torch_tq.protocol import actions

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "protocol.md")) as f:
        page = f.read()
    for name in actions.ACTIONS:
        assert f"`DoAction` `{name}`" in page or f"`{name}`" in page, name
    for name in actions.STREAMS:
        assert name in page, name


def test_list_actions_answers_from_the_registry():
    from torch_tq.protocol import actions

    with torch_tq.start_server(storage="memory") as srv:
        listed = {a.type: a.description for a in flight.FlightClient(srv.location).list_actions()}
    assert listed == dict(actions.descriptions())
