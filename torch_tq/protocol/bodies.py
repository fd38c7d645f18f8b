"""Strict JSON bodies: what every command and action body is parsed with, and the form of
a reply. Parsing rejects duplicate keys, NaN/Infinity, non-integer ids (``true``, ``1.0``,
``"12"``), unknown and null fields and over-long input (RELIABILITY.md §11)."""

from __future__ import annotations

import json
from typing import Any

from torch_tq.errors import InvalidArgument
from torch_tq.model import validate_index_id, validate_matrix_type

MAX_COMMAND_BYTES = 64 * 1024
MAX_IDS_PER_CALL = 10_000  # index_ids one group call may name


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
        raise InvalidArgument(f"{what} is not valid JSON: {short(e)}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def short(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "..."


def check_keys(body: dict[str, Any], allowed: set[str], required: set[str], what: str) -> None:
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


def validate_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def validate_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{name} must be a list of index_ids, got {type(value).__name__}")
    if len(value) > MAX_IDS_PER_CALL:
        raise InvalidArgument(f"{name} has {len(value)} entries; the limit is {MAX_IDS_PER_CALL}")
    return [validate_index_id(v) for v in value]


def validate_types(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument("types must be a non-empty list of matrix types")
    if len(value) > 64:
        raise InvalidArgument(f"types has {len(value)} entries; the limit is 64")
    return frozenset(validate_matrix_type(t) for t in value)


def validate_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r:.80}")
    return value


def ok(**fields: Any) -> dict[str, Any]:
    """A successful reply: the seed's ``success``/``message`` and ``fields``."""
    return {"success": True, "message": "success", **fields}


def parse_empty_body(raw: bytes, what: str) -> None:
    if raw and parse_json_object(raw, what):
        raise InvalidArgument(f"{what} takes no fields")


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one per call


def dumps(obj: Any) -> bytes:
    return _COMPACT.encode(obj).encode()
