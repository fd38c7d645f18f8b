"""The bodies of the consumer-group actions (Consume, Ack, Release, Renew, FinishStream,
ReopenStream, GroupStatus, DeleteGroup)."""

from __future__ import annotations

from typing import Any

from torch_tq.errors import InvalidArgument
from torch_tq.model import GROUP_RE
from torch_tq.protocol.bodies import (
    check_keys,
    parse_json_object,
    validate_bool,
    validate_ids,
    validate_int,
    validate_types,
)
from torch_tq.protocol.commands import (
    ACK,
    CONSUME,
    DELETE_GROUP,
    FINISH_STREAM,
    GROUP_STATUS,
    RELEASE,
    RENEW,
    REOPEN_STREAM,
)
from torch_tq.store.rounds import parse_spec

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
    check_keys(body, allowed, required, what)
    out: dict[str, Any] = {}
    if "group" in body:
        out["group"] = validate_group(body["group"])
    if "types" in body:
        out["types"] = validate_types(body["types"])
    if "index_ids" in body:
        out["index_ids"] = validate_ids(body["index_ids"], "index_ids")
    if "ack" in body:
        out["ack"] = validate_ids(body["ack"], "ack")
    if "delete" in body:
        out["delete"] = validate_bool(body["delete"], "delete")
    if "rounds" in body:
        out["rounds"] = parse_spec(body["rounds"], MAX_ITEMS)
    if "rank" in body:
        out["rank"] = validate_int(body["rank"], "rank", 0, 1 << 20)
    if "dp_rank" in body:
        out["dp_rank"] = validate_int(body["dp_rank"], "dp_rank", 0, 1 << 20)
    if action == CONSUME:
        out["max_items"] = validate_int(body.get("max_items", 1), "max_items", 1, MAX_ITEMS)
        out["wait_s"] = validate_int(
            body.get("timeout_ms", 0), "timeout_ms", 0, int(MAX_WAIT_S * 1000)) / 1000
    if action in (CONSUME, RENEW):
        out["lease_s"] = validate_int(
            body.get("lease_ms", 60_000), "lease_ms", 50, int(MAX_LEASE_S * 1000)) / 1000
    return out
