"""The wire protocol's commands: the names of every command and action, and the matrix and
batch commands (DoPut descriptors, DoGet tickets) with their strict validation.

Everything a client sends is parsed here before it reaches the store. Bodies are JSON
objects; parsing rejects duplicate keys, NaN/Infinity, non-integer ids (``true``, ``1.0``,
``"12"``), ids outside ``[0, 2**64 - 1]``, unknown keys and over-long input, so nothing
that reaches a file path or the catalog is unchecked (RELIABILITY.md §11).

Forms accepted for a matrix address (DoPut descriptor, GetFlightInfo descriptor, DoGet ticket):

* the seed's JSON: ``{"action": "WriteMatrix", "index_id": 12345, "matrix_type": "prompt"}``
  (``action`` may be left out; ``ReadMatrix``/``read_matrix`` spellings both work);
* the seed's command envelope: ``{"command": "write_matrix", "body": {...}}`` (``body`` an
  object or a JSON string);
* a path descriptor ``["12345", "prompt"]``.

Errors travel as ``"<CODE>: <message>"`` in the Flight status message, with the closest
gRPC status (NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, INTERNAL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow.flight as flight

from torch_tq.model import (  # noqa: F401 - the protocol's names for the data model
    DTYPES,
    GROUP_RE,
    MAX_DIMS,
    MAX_INDEX_ID,
    Key,
    not_found,
    validate_index_id,
    validate_matrix_type,
    validate_shape,
)
from torch_tq.protocol.bodies import (  # noqa: F401 - the protocol's names
    MAX_COMMAND_BYTES,
    check_keys,
    dumps,
    ok,
    parse_empty_body,
    parse_json_object,
    validate_int,
)
from torch_tq.codec.compression import COMPRESSIONS  # noqa: F401
from torch_tq.codec.compression import validate as validate_compression
from torch_tq.errors import InvalidArgument, TQError

WRITE_MATRIX = "WriteMatrix"
READ_MATRIX = "ReadMatrix"
DELETE_MATRIX = "DeleteMatrix"
GET_METADATA = "GetMetadata"
HEALTH = "Health"
STATS = "Stats"
CONSUME = "Consume"
ACK = "Ack"
RELEASE = "Release"
RENEW = "Renew"
FINISH_STREAM = "FinishStream"
REOPEN_STREAM = "ReopenStream"
GROUP_STATUS = "GroupStatus"
DELETE_GROUP = "DeleteGroup"
UCX_INFO = "UcxInfo"
UCX_GET = "UcxGet"
UCX_PUT = "UcxPut"
UCX_PUT_BATCH = "UcxPutBatch"
UCX_GET_BATCH = "UcxGetBatch"
LOCAL_INFO = "LocalInfo"
PUBLISH_LOCAL = "PublishLocal"
PUBLISH_LOCAL_BATCH = "PublishLocalBatch"
LOCATE_LOCAL = "LocateLocal"
BATCH_WRITE = "BatchWrite"  # a DoPut whose stream is a table of items
BATCH_READ = "BatchRead"  # a DoGet whose stream is a table of results

def spellings(name: str) -> frozenset[str]:
    """How a command or action may be spelt: ``DeleteMatrix``, ``deletematrix``,
    ``delete_matrix`` (matched case-insensitively)."""
    snake = "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")
    return frozenset({name.lower(), snake})


# The spellings of the commands that name a stream (a DoPut descriptor, a DoGet ticket).
_ACTION_SPELLINGS = {s: name for name in (WRITE_MATRIX, READ_MATRIX, BATCH_WRITE, BATCH_READ)
                     for s in spellings(name)}

CLIENT_ID_HEADER = "x-tq-client-id"  # who a call counts against, while authentication is off
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,19}", re.ASCII)
_HEX64_RE = re.compile(r"[0-9a-f]{16}", re.ASCII)


@dataclass(frozen=True)
class PutCommand:
    """A parsed WriteMatrix command: the key and what the client declares is coming."""

    key: Key
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    nbytes: int | None = None
    xxh3: str | None = None
    ack: bool = True  # False: the call's OK status is the acknowledgement, no message


# --------------------------------------------------------------------------- parsing


def _unwrap_envelope(body: dict[str, Any], what: str) -> tuple[dict[str, Any], str | None]:
    """Handles the seed's ``{"command": ..., "body": ...}`` envelope.

    Returns the inner body and the action it names (or None when it names none).
    """
    if "command" not in body:
        action = body.get("action")
        return body, action
    check_keys(body, {"command", "body"}, {"command", "body"}, what)
    inner = body["body"]
    if isinstance(inner, str):
        inner = parse_json_object(inner, f"{what} body")
    if not isinstance(inner, dict):
        raise InvalidArgument(f"{what} body must be a JSON object")
    if "command" in inner:
        raise InvalidArgument(f"{what} body must not nest another command envelope")
    if "action" in inner and _spelling(inner["action"]) != _spelling(body["command"]):
        raise InvalidArgument(f"{what}: body action {inner['action']!r:.80} contradicts command")
    inner = {k: v for k, v in inner.items() if k != "action"}
    return inner, body["command"]


def _spelling(action: Any) -> str | None:
    return _ACTION_SPELLINGS.get(action.lower()) if isinstance(action, str) else None


def _check_action(action: Any, expected: str, what: str) -> None:
    if action is None:
        return
    if _spelling(action) != expected:
        raise InvalidArgument(f"{what} expects action {expected!r}, got {action!r:.80}")


def _key_from_path(path: list[bytes], what: str) -> Key:
    if len(path) != 2:
        raise InvalidArgument(
            f"{what}: a path descriptor must be [index_id, matrix_type], got {len(path)} part(s)"
        )
    try:
        raw_id, raw_type = (p.decode("utf-8") for p in path)
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what}: path is not valid UTF-8") from None
    if not _DECIMAL_RE.fullmatch(raw_id):
        raise InvalidArgument(f"{what}: index_id {raw_id[:40]!r} is not a plain decimal integer")
    return Key(validate_index_id(int(raw_id)), validate_matrix_type(raw_type))


_PUT_FIELDS = {"action", "index_id", "matrix_type", "shape", "dtype", "nbytes", "xxh3", "ack"}
_READ_FIELDS = {"action", "index_id", "matrix_type"}


def parse_put_descriptor(descriptor: flight.FlightDescriptor) -> PutCommand:
    """Parses a DoPut descriptor into a :class:`PutCommand`."""
    what = "WriteMatrix command"
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        return PutCommand(_key_from_path(list(descriptor.path), what))
    if descriptor.descriptor_type != flight.DescriptorType.CMD:
        raise InvalidArgument(f"{what}: unsupported descriptor type")
    body, action = _unwrap_envelope(parse_json_object(descriptor.command, what), what)
    return _put_command(body, action, what)


def _put_command(body: dict[str, Any], action: str | None, what: str) -> PutCommand:
    _check_action(action, WRITE_MATRIX, what)
    check_keys(body, _PUT_FIELDS, {"index_id", "matrix_type"}, what)
    key = Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"]))
    shape = validate_shape(body["shape"]) if "shape" in body else None
    dtype = body.get("dtype")
    if dtype is not None:

        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InvalidArgument(f"unsupported dtype {dtype!r:.80}; supported: {sorted(DTYPES)}")
    nbytes = body.get("nbytes")
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        raise InvalidArgument(f"nbytes must be an integer >= 0, got {nbytes!r:.80}")
    digest = body.get("xxh3")
    if digest is not None and (not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest)):
        raise InvalidArgument("xxh3 must be 16 lower-case hex digits (XXH3-64 of the raw bytes)")
    ack = body.get("ack", True)
    if not isinstance(ack, bool):
        raise InvalidArgument(f"ack must be true or false, got {ack!r:.80}")
    return PutCommand(key, shape, dtype, nbytes, digest, ack)


def parse_read_body(raw: bytes, what: str) -> Key:
    body, action = _unwrap_envelope(parse_json_object(raw, what), what)
    _check_action(action, READ_MATRIX, what)
    check_keys(body, _READ_FIELDS, {"index_id", "matrix_type"}, what)
    return Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"]))


def parse_read_descriptor(descriptor: flight.FlightDescriptor) -> Key:
    what = "ReadMatrix descriptor"
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        return _key_from_path(list(descriptor.path), what)
    if descriptor.descriptor_type != flight.DescriptorType.CMD:
        raise InvalidArgument(f"{what}: unsupported descriptor type")
    return parse_read_body(descriptor.command, what)


def parse_ticket(raw: bytes) -> Key:
    return parse_read_body(raw, "ticket")


@dataclass(frozen=True)
class ReadRequest:
    """A parsed ReadMatrix ticket: the key and how to send it."""

    key: Key
    compression: str | None = None


@dataclass(frozen=True)
class BatchWriteCommand:
    """A parsed BatchWrite DoPut command (the items are the rows of the uploaded table)."""


@dataclass(frozen=True)
class BatchReadCommand:
    """A parsed BatchRead ticket. ``items`` holds a :class:`Key` per well-formed item and an
    :class:`InvalidArgument` (with what could be read of the address) per bad one."""

    items: tuple
    max_inline_bytes: int
    compression: str | None = None
    pad: int | tuple[int, ...] = 0

    def pad_for(self, nbytes: int) -> int:
        """The padding asked for before a result batch of ``nbytes`` (see :func:`size_class`)."""
        if isinstance(self.pad, int):
            return self.pad
        cls = size_class(nbytes)
        return self.pad[cls - 1] if cls <= len(self.pad) else 0


MAX_SIZE_CLASSES = 6


def size_class(nbytes: int) -> int:
    """How many bytes the length of a message of ``nbytes`` takes in gRPC's framing (a
    protobuf varint): where gRPC puts a message's body shifts with it, so the padding
    (``app_metadata``) that puts batch data 8-byte aligned is learnt per class."""
    return max(1, (nbytes.bit_length() + 6) // 7)


def _validate_pad(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, list):
        if len(value) > MAX_SIZE_CLASSES:
            raise InvalidArgument(f"BatchRead ticket: pad lists at most {MAX_SIZE_CLASSES} "
                                  f"size classes, got {len(value)}")
        return tuple(validate_int(v, "pad", 0, 63) for v in value)
    return validate_int(value, "pad", 0, 63)


class BadItem(NamedTuple):
    """An item of a batch that failed validation on its own."""

    index_id: int | None
    matrix_type: str | None
    error: TQError


MAX_BATCH_TICKET_BYTES = 1 << 20
DEFAULT_MAX_INLINE_BYTES = 256 << 20
MAX_INLINE_BYTES = 1 << 30  # one Arrow record batch stays well under 2 GiB


def batch_item(item: Any, pos: int) -> Key | BadItem:
    if not isinstance(item, dict):
        return BadItem(None, None, InvalidArgument(f"item {pos} must be a JSON object"))
    raw_id, raw_type = item.get("index_id"), item.get("matrix_type", item.get("type"))
    index_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= MAX_INDEX_ID else None
    mtype = raw_type if isinstance(raw_type, str) and len(raw_type) <= 64 else None
    try:
        check_keys(item, {"index_id", "matrix_type", "type"}, {"index_id"}, f"item {pos}")
        if "matrix_type" in item and "type" in item:
            raise InvalidArgument(f"item {pos} names both 'matrix_type' and 'type'")
        if raw_type is None:
            raise InvalidArgument(f"missing field(s) ['matrix_type'] in item {pos}")
        return Key(validate_index_id(raw_id), validate_matrix_type(raw_type))
    except InvalidArgument as e:
        return BadItem(index_id, mtype, e)


def parse_get_ticket(raw: bytes, max_items: int = 0) -> ReadRequest | BatchReadCommand:
    """Parses any DoGet ticket: a ReadMatrix (with an optional ``compression``) or a
    BatchRead ``{"action": "BatchRead", "items": [{"index_id", "matrix_type"}, ...],
    "max_inline_bytes": N, "compression": ...}``.

    Raises:
        InvalidArgument: a malformed ticket, or more than ``max_items`` items (0: no cap).
    """
    what = "ticket"
    body, action = _unwrap_envelope(parse_json_object(raw, what, MAX_BATCH_TICKET_BYTES), what)
    if _spelling(action) == BATCH_READ:
        what = "BatchRead ticket"
        check_keys(body, {"action", "items", "max_inline_bytes", "compression", "pad"}, {"items"},
                    what)
        items = body["items"]
        if not isinstance(items, list):
            raise InvalidArgument(f"{what}: items must be a list of {{index_id, matrix_type}} objects")
        if max_items and len(items) > max_items:
            raise InvalidArgument(
                f"{what}: {len(items)} items; the limit is {max_items} per call (split the batch)"
            )
        inline = validate_int(body.get("max_inline_bytes", DEFAULT_MAX_INLINE_BYTES),
                               "max_inline_bytes", 0, MAX_INLINE_BYTES)
        return BatchReadCommand(tuple(batch_item(it, i) for i, it in enumerate(items)), inline,
                                validate_compression(body.get("compression")),
                                _validate_pad(body.get("pad", 0)))
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(f"{what} is {len(raw)} bytes; the limit is {MAX_COMMAND_BYTES}")
    _check_action(action, READ_MATRIX, what)
    check_keys(body, _READ_FIELDS | {"compression"}, {"index_id", "matrix_type"}, what)
    key = Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"]))
    return ReadRequest(key, validate_compression(body.get("compression")))


def parse_put_request(descriptor: flight.FlightDescriptor) -> PutCommand | BatchWriteCommand:
    """Parses any DoPut descriptor: a WriteMatrix or a BatchWrite ``{"action": "BatchWrite"}``."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:  # parsed once, either way
        what = "WriteMatrix command"  # what a command that does not parse was meant to be
        body, action = _unwrap_envelope(parse_json_object(descriptor.command, what), what)
        if _spelling(action) == BATCH_WRITE:
            check_keys(body, {"action"}, set(), "BatchWrite command")
            return BatchWriteCommand()
        return _put_command(body, action, what)
    return parse_put_descriptor(descriptor)


def batch_read_command(
    keys: list[Key], max_inline_bytes: int | None = None, compression: str | None = None,
    pad: int | list[int] = 0,
) -> bytes:
    body: dict[str, Any] = {
        "action": BATCH_READ,
        "items": [{"index_id": k.index_id, "matrix_type": k.matrix_type} for k in keys],
    }
    if max_inline_bytes is not None:
        body["max_inline_bytes"] = max_inline_bytes
    if compression is not None:
        body["compression"] = compression
    if pad:
        body["pad"] = pad
    return dumps(body)


def parse_delete_body(raw: bytes) -> tuple[int, str | None]:
    """Returns ``(index_id, matrix_type or None for every type)``."""
    what = "DeleteMatrix body"
    body = parse_json_object(raw, what)
    check_keys(body, {"index_id", "matrix_type"}, {"index_id"}, what)
    index_id = validate_index_id(body["index_id"])
    mtype = body.get("matrix_type", "")
    if mtype == "":
        return index_id, None
    return index_id, validate_matrix_type(mtype)


def parse_metadata_body(raw: bytes) -> int:
    what = "GetMetadata body"
    body = parse_json_object(raw, what)
    check_keys(body, {"index_id"}, {"index_id"}, what)
    return validate_index_id(body["index_id"])


def parse_list_criteria(raw: bytes) -> int | None:
    """ListFlights criteria: empty for everything, or ``{"index_id": N}``."""
    if not raw:
        return None
    what = "ListFlights criteria"
    body = parse_json_object(raw, what)
    check_keys(body, {"index_id"}, set(), what)
    if "index_id" not in body:
        return None
    return validate_index_id(body["index_id"])


# --------------------------------------------------------------------------- building


def read_command(key: Key, compression: str | None = None) -> bytes:
    """The ReadMatrix command, used as both descriptor command and ticket."""
    body: dict[str, Any] = {"action": READ_MATRIX, "index_id": key.index_id,
                            "matrix_type": key.matrix_type}
    if compression is not None:
        body["compression"] = compression
    return dumps(body)


def write_command(
    key: Key,
    shape: tuple[int, ...],
    dtype: str,
    nbytes: int,
    xxh3: str | None = None,
    ack: bool = True,
) -> bytes:
    body: dict[str, Any] = {
        "action": WRITE_MATRIX,
        "index_id": key.index_id,
        "matrix_type": key.matrix_type,
        "shape": list(shape),
        "dtype": dtype,
        "nbytes": nbytes,
    }
    if xxh3 is not None:
        body["xxh3"] = xxh3
    if not ack:
        body["ack"] = False
    return dumps(body)


