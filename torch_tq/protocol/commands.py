"""The wire protocol: command and action bodies, their strict validation, and error codes.

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

import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
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
from torch_tq.store.rounds import parse_spec
from torch_tq.errors import (
    ERROR_CLASSES,
    InternalError,
    InvalidArgument,
    NotFound,
    TQError,
    Unavailable,
)

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
LOCAL_INFO = "LocalInfo"
PUBLISH_LOCAL = "PublishLocal"
BATCH_WRITE = "BatchWrite"  # a DoPut whose stream is a table of items
BATCH_READ = "BatchRead"  # a DoGet whose stream is a table of results
COMPRESSIONS = ("zstd", "lz4", "snappy")

def spellings(name: str) -> frozenset[str]:
    """How a command or action may be spelt: ``DeleteMatrix``, ``deletematrix``,
    ``delete_matrix`` (matched case-insensitively)."""
    snake = "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")
    return frozenset({name.lower(), snake})


# The spellings of the commands that name a stream (a DoPut descriptor, a DoGet ticket).
_ACTION_SPELLINGS = {s: name for name in (WRITE_MATRIX, READ_MATRIX, BATCH_WRITE, BATCH_READ)
                     for s in spellings(name)}

MAX_COMMAND_BYTES = 64 * 1024
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


# --------------------------------------------------------------------------- parsing


def _reject_constant(name: str) -> Any:
    raise InvalidArgument(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidArgument(f"duplicate key {k!r:.80} in JSON object")
        out[k] = v
    return out


def parse_json_object(raw: bytes | str, what: str, limit: int = MAX_COMMAND_BYTES) -> dict[str, Any]:
    """Parses ``raw`` as one strict JSON object.

    Raises:
        InvalidArgument: not UTF-8, not JSON, not an object, too long, duplicate keys, NaN.
    """
    if len(raw) > limit:
        raise InvalidArgument(f"{what} is {len(raw)} bytes; the limit is {limit}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{what} is not valid UTF-8") from None
    else:
        text = raw
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except InvalidArgument:
        raise
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {_short(e)}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _short(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_keys(body: dict[str, Any], allowed: set[str], required: set[str], what: str) -> None:
    """Every field known, every required one there, and none null: a field is given with a
    value of its type or left out (``null`` is not taken for "absent")."""
    nulls = sorted(k for k, v in body.items() if v is None)
    if nulls:
        raise InvalidArgument(
            f"field(s) {nulls} in {what} are null: give a value or leave the field out"
        )
    unknown = set(body) - allowed
    if unknown:
        raise InvalidArgument(
            f"unknown field(s) {sorted(unknown)} in {what}; allowed: {sorted(allowed)}"
        )
    missing = required - set(body)
    if missing:
        raise InvalidArgument(f"missing field(s) {sorted(missing)} in {what}")


def _unwrap_envelope(body: dict[str, Any], what: str) -> tuple[dict[str, Any], str | None]:
    """Handles the seed's ``{"command": ..., "body": ...}`` envelope.

    Returns the inner body and the action it names (or None when it names none).
    """
    if "command" not in body:
        action = body.get("action")
        return body, action
    _check_keys(body, {"command", "body"}, {"command", "body"}, what)
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


_PUT_FIELDS = {"action", "index_id", "matrix_type", "shape", "dtype", "nbytes", "xxh3"}
_READ_FIELDS = {"action", "index_id", "matrix_type"}


def parse_put_descriptor(descriptor: flight.FlightDescriptor) -> PutCommand:
    """Parses a DoPut descriptor into a :class:`PutCommand`."""
    what = "WriteMatrix command"
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        return PutCommand(_key_from_path(list(descriptor.path), what))
    if descriptor.descriptor_type != flight.DescriptorType.CMD:
        raise InvalidArgument(f"{what}: unsupported descriptor type")
    body, action = _unwrap_envelope(parse_json_object(descriptor.command, what), what)
    _check_action(action, WRITE_MATRIX, what)
    _check_keys(body, _PUT_FIELDS, {"index_id", "matrix_type"}, what)
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
    return PutCommand(key, shape, dtype, nbytes, digest)


def parse_read_body(raw: bytes, what: str) -> Key:
    body, action = _unwrap_envelope(parse_json_object(raw, what), what)
    _check_action(action, READ_MATRIX, what)
    _check_keys(body, _READ_FIELDS, {"index_id", "matrix_type"}, what)
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
    pad: int = 0


class BadItem(NamedTuple):
    """An item of a batch that failed validation on its own."""

    index_id: int | None
    matrix_type: str | None
    error: TQError


MAX_BATCH_TICKET_BYTES = 1 << 20
DEFAULT_MAX_INLINE_BYTES = 256 << 20
MAX_INLINE_BYTES = 1 << 30  # one Arrow record batch stays well under 2 GiB


def validate_compression(value: Any, wire_only_ok: bool = True) -> str | None:
    if value is None or value == "" or value == "none":
        return None
    if not isinstance(value, str) or value.lower() not in COMPRESSIONS:
        raise InvalidArgument(f"compression must be one of {list(COMPRESSIONS)} or none, got {value!r:.40}")
    return value.lower()


def _batch_item(item: Any, pos: int) -> Key | BadItem:
    if not isinstance(item, dict):
        return BadItem(None, None, InvalidArgument(f"item {pos} must be a JSON object"))
    raw_id, raw_type = item.get("index_id"), item.get("matrix_type", item.get("type"))
    index_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= MAX_INDEX_ID else None
    mtype = raw_type if isinstance(raw_type, str) and len(raw_type) <= 64 else None
    try:
        _check_keys(item, {"index_id", "matrix_type", "type"}, {"index_id"}, f"item {pos}")
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
        _check_keys(body, {"action", "items", "max_inline_bytes", "compression", "pad"}, {"items"},
                    what)
        items = body["items"]
        if not isinstance(items, list):
            raise InvalidArgument(f"{what}: items must be a list of {{index_id, matrix_type}} objects")
        if max_items and len(items) > max_items:
            raise InvalidArgument(
                f"{what}: {len(items)} items; the limit is {max_items} per call (split the batch)"
            )
        inline = _validate_int(body.get("max_inline_bytes", DEFAULT_MAX_INLINE_BYTES),
                               "max_inline_bytes", 0, MAX_INLINE_BYTES)
        return BatchReadCommand(tuple(_batch_item(it, i) for i, it in enumerate(items)), inline,
                                validate_compression(body.get("compression")),
                                _validate_int(body.get("pad", 0), "pad", 0, 63))
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(f"{what} is {len(raw)} bytes; the limit is {MAX_COMMAND_BYTES}")
    _check_action(action, READ_MATRIX, what)
    _check_keys(body, _READ_FIELDS | {"compression"}, {"index_id", "matrix_type"}, what)
    key = Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"]))
    return ReadRequest(key, validate_compression(body.get("compression")))


def parse_put_request(descriptor: flight.FlightDescriptor) -> PutCommand | BatchWriteCommand:
    """Parses any DoPut descriptor: a WriteMatrix or a BatchWrite ``{"action": "BatchWrite"}``."""
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        what = "BatchWrite command"
        try:
            body, action = _unwrap_envelope(parse_json_object(descriptor.command, what), what)
        except InvalidArgument:
            body, action = {}, None  # parse_put_descriptor reports it as a WriteMatrix
        if _spelling(action) == BATCH_WRITE:
            _check_keys(body, {"action"}, set(), what)
            return BatchWriteCommand()
    return parse_put_descriptor(descriptor)


def batch_read_command(
    keys: list[Key], max_inline_bytes: int | None = None, compression: str | None = None,
    pad: int = 0,
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
    _check_keys(body, {"index_id", "matrix_type"}, {"index_id"}, what)
    index_id = validate_index_id(body["index_id"])
    mtype = body.get("matrix_type", "")
    if mtype == "":
        return index_id, None
    return index_id, validate_matrix_type(mtype)


def parse_metadata_body(raw: bytes) -> int:
    what = "GetMetadata body"
    body = parse_json_object(raw, what)
    _check_keys(body, {"index_id"}, {"index_id"}, what)
    return validate_index_id(body["index_id"])


def parse_list_criteria(raw: bytes) -> int | None:
    """ListFlights criteria: empty for everything, or ``{"index_id": N}``."""
    if not raw:
        return None
    what = "ListFlights criteria"
    body = parse_json_object(raw, what)
    _check_keys(body, {"index_id"}, set(), what)
    if "index_id" not in body:
        return None
    return validate_index_id(body["index_id"])


MAX_IDS_PER_CALL = 10_000
MAX_ITEMS = 10_000
MAX_WAIT_S = 60.0
MAX_LEASE_S = 24 * 3600.0


def validate_group(value: Any) -> str:
    """Returns the canonical (lower-case) consumer group name: 1-64 of ``[a-z0-9_.-]``,
    starting with a letter or digit (it names a directory of the store)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"group must be a string, got {type(value).__name__}")
    if not value.isascii() or not GROUP_RE.fullmatch(value.lower()):
        raise InvalidArgument(
            f"invalid group {value[:80]!r}: use 1-64 ASCII letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value.lower()


def _validate_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _validate_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{name} must be a list of index_ids, got {type(value).__name__}")
    if len(value) > MAX_IDS_PER_CALL:
        raise InvalidArgument(f"{name} has {len(value)} entries; the limit is {MAX_IDS_PER_CALL}")
    return [validate_index_id(v) for v in value]


def _validate_types(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument("types must be a non-empty list of matrix types")
    if len(value) > 64:
        raise InvalidArgument(f"types has {len(value)} entries; the limit is 64")
    return frozenset(validate_matrix_type(t) for t in value)


def _validate_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r:.80}")
    return value


_QUEUE_FIELDS = {
    CONSUME: ({"group", "types", "max_items", "timeout_ms", "lease_ms", "ack", "delete",
               "rounds"}, {"group"}),
    ACK: ({"group", "index_ids", "delete", "rank"}, {"group", "index_ids"}),
    RELEASE: ({"group", "index_ids"}, {"group", "index_ids"}),
    RENEW: ({"group", "index_ids", "lease_ms", "dp_rank"}, {"group", "index_ids", "lease_ms"}),
    FINISH_STREAM: ({"types"}, {"types"}),
    REOPEN_STREAM: ({"types"}, {"types"}),
    GROUP_STATUS: ({"group"}, {"group"}),
    DELETE_GROUP: ({"group"}, {"group"}),
}


def parse_queue_body(raw: bytes, action: str) -> dict[str, Any]:
    """Parses the body of a consumer-group action into checked Python values.

    ``group`` is returned as given (the queue checks and canonicalizes names); ``types`` as
    a frozenset of canonical names; times in seconds.
    """
    what = f"{action} body"
    body = parse_json_object(raw, what)
    allowed, required = _QUEUE_FIELDS[action]
    _check_keys(body, allowed, required, what)
    out: dict[str, Any] = {}
    if "group" in body:
        out["group"] = validate_group(body["group"])
    if "types" in body:
        out["types"] = _validate_types(body["types"])
    if "index_ids" in body:
        out["index_ids"] = _validate_ids(body["index_ids"], "index_ids")
    if "ack" in body:
        out["ack"] = _validate_ids(body["ack"], "ack")
    if "delete" in body:
        out["delete"] = _validate_bool(body["delete"], "delete")
    if "rounds" in body:
        out["rounds"] = parse_spec(body["rounds"], MAX_ITEMS)
    if "rank" in body:
        out["rank"] = _validate_int(body["rank"], "rank", 0, 1 << 20)
    if "dp_rank" in body:
        out["dp_rank"] = _validate_int(body["dp_rank"], "dp_rank", 0, 1 << 20)
    if action == CONSUME:
        out["max_items"] = _validate_int(body.get("max_items", 1), "max_items", 1, MAX_ITEMS)
        out["wait_s"] = _validate_int(
            body.get("timeout_ms", 0), "timeout_ms", 0, int(MAX_WAIT_S * 1000)) / 1000
    if action in (CONSUME, RENEW):
        out["lease_s"] = _validate_int(
            body.get("lease_ms", 60_000), "lease_ms", 50, int(MAX_LEASE_S * 1000)) / 1000
    return out


def parse_local_info_body(raw: bytes) -> str:
    what = "LocalInfo body"
    body = parse_json_object(raw, what)
    _check_keys(body, {"host_id"}, {"host_id"}, what)
    if not isinstance(body["host_id"], str) or not _HOST_ID_RE.fullmatch(body["host_id"]):
        raise InvalidArgument("host_id must be 32 lower-case hex digits")
    return body["host_id"]


def parse_publish_local_body(raw: bytes) -> tuple[Key, str]:
    what = "PublishLocal body"
    body = parse_json_object(raw, what)
    _check_keys(body, {"index_id", "matrix_type", "file"}, {"index_id", "matrix_type", "file"},
                what)
    key = Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"]))
    if not isinstance(body["file"], str) or not _STAGED_RE.fullmatch(body["file"]):
        raise InvalidArgument("file must be a staged file name: 32 hex digits + '.arrow'")
    return key, body["file"]


def parse_ucx_body(raw: bytes, action: str) -> dict[str, Any]:
    """Parses a UcxGet/UcxPut body; ``addresses`` (the client's lanes; ``address``, one
    lane, is accepted too) stay base64 text (the ucx module decodes)."""
    what = f"{action} body"
    body = parse_json_object(raw, what)
    if "address" in body and "addresses" not in body:
        body["addresses"] = body.pop("address")
    common = {"index_id", "matrix_type", "addresses", "tag"}
    if action == UCX_GET:
        _check_keys(body, common | {"inline_max"}, common, what)
    else:
        required = common | {"shape", "dtype", "nbytes", "parts"}
        _check_keys(body, required | {"xxh3"}, required, what)
    out: dict[str, Any] = {
        "key": Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"])),
        "addresses": body["addresses"],
        "tag": _validate_int(body["tag"], "tag", 0, 2**64 - 1),
    }
    if action == UCX_GET:
        out["inline_max"] = _validate_int(body.get("inline_max", 0), "inline_max", 0, 1 << 20)
    if action == UCX_PUT:

        out["shape"] = validate_shape(body["shape"])
        if not isinstance(body["dtype"], str) or body["dtype"] not in DTYPES:
            raise InvalidArgument(f"unsupported dtype {body['dtype']!r:.40}")
        out["dtype"] = body["dtype"]
        out["nbytes"] = _validate_int(body["nbytes"], "nbytes", 0, 2**62)
        parts = body["parts"]
        if not isinstance(parts, list) or len(parts) > 1 << 20:
            raise InvalidArgument("parts must be a list of byte sizes")
        out["parts"] = [_validate_int(p, "part size", 1, 2**62) for p in parts]
        if sum(out["parts"]) != out["nbytes"]:
            raise InvalidArgument("parts must add up to nbytes")
        digest = body.get("xxh3")
        if digest is not None and (not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest)):
            raise InvalidArgument("xxh3 must be 16 lower-case hex digits")
        out["xxh3"] = digest
    return out


_HOST_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_STAGED_RE = re.compile(r"[0-9a-f]{32}\.arrow", re.ASCII)


def ok(**fields: Any) -> dict[str, Any]:
    """A successful reply: the seed's ``success``/``message`` and ``fields``."""
    return {"success": True, "message": "success", **fields}


def parse_empty_body(raw: bytes, what: str) -> None:
    if raw and parse_json_object(raw, what):
        raise InvalidArgument(f"{what} takes no fields")


# --------------------------------------------------------------------------- building


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


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
    return dumps(body)


# --------------------------------------------------------------------------- errors on the wire


class _WireNotFound(pa.ArrowKeyError):
    """Travels as gRPC NOT_FOUND (Arrow's KeyError status)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _WireInvalid(pa.ArrowInvalid):
    """Travels as gRPC INVALID_ARGUMENT (Arrow's Invalid status)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _WireUnimplemented(pa.ArrowNotImplementedError):
    """Travels as gRPC UNIMPLEMENTED."""

    def __str__(self) -> str:
        return str(self.args[0])


WIRE_ERRORS = (_WireNotFound, _WireInvalid, _WireUnimplemented)


def to_wire_error(err: TQError) -> Exception:
    """The exception a Flight handler raises for ``err``.

    The server process sets ``sys.tracebacklimit = 0`` (see ``server``), so the Arrow
    status built from these carries no traceback, only the class name and message.
    """
    text = f"{err.code}: {err.message}"
    extra = dumps({"code": err.code, "message": err.message})
    if isinstance(err, NotFound):
        return _WireNotFound(text)
    if isinstance(err, InvalidArgument):
        return _WireInvalid(text)
    if isinstance(err, Unavailable):
        return flight.FlightUnavailableError(text, extra_info=extra)
    return flight.FlightInternalError(text, extra_info=extra)


def unimplemented(what: str) -> Exception:
    return _WireUnimplemented(f"INVALID_ARGUMENT: {what} is not supported by torch_tq")


_CODE_RE = re.compile(r"(NOT_FOUND|INVALID_ARGUMENT|UNAVAILABLE|INTERNAL_ERROR): (.*)", re.DOTALL)


def _strip_detail(text: str) -> str:
    # Arrow appends ". Detail: ..." and gRPC adds a debug context; neither is ours.
    for marker in (". Detail: ", ". gRPC client debug context: "):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text


def from_flight_error(exc: BaseException, what: str = "") -> TQError:
    """Maps an exception raised by a pyarrow Flight call to a typed torch_tq error."""
    if isinstance(exc, TQError):
        return exc
    text = _strip_detail(str(exc))
    match = _CODE_RE.search(text)
    if match:
        return ERROR_CLASSES[match.group(1)](match.group(2))
    prefix = f"{what}: " if what else ""
    if isinstance(exc, flight.FlightTimedOutError):
        return Unavailable(f"{prefix}call timed out ({text}); retry or raise the timeout")
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightCancelledError, ConnectionError)):
        return Unavailable(f"{prefix}server unavailable ({text}); check that it runs and retry")
    if isinstance(exc, pa.ArrowKeyError):
        return NotFound(prefix + text)
    if isinstance(exc, pa.ArrowInvalid):
        return InvalidArgument(prefix + text)
    if isinstance(exc, OSError) and "connect" in text.lower():
        return Unavailable(f"{prefix}{text}")
    return InternalError(prefix + text)
