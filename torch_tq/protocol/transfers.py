"""The bodies of the fast paths' control actions: UcxGet/UcxPut (a UCX transfer's key,
lanes, tag and parts) and LocalInfo/PublishLocal (same-host access)."""

from __future__ import annotations

import re
from typing import Any

from torch_tq.errors import InvalidArgument
from torch_tq.model import DTYPES, Key, validate_index_id, validate_matrix_type, validate_shape
from torch_tq.protocol.bodies import check_keys, parse_json_object, validate_int
from torch_tq.protocol.commands import UCX_GET, UCX_PUT

_HEX64_RE = re.compile(r"[0-9a-f]{16}", re.ASCII)
_HOST_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_STAGED_RE = re.compile(r"[0-9a-f]{32}\.arrow", re.ASCII)


def parse_local_info_body(raw: bytes) -> str:
    what = "LocalInfo body"
    body = parse_json_object(raw, what)
    check_keys(body, {"host_id"}, {"host_id"}, what)
    if not isinstance(body["host_id"], str) or not _HOST_ID_RE.fullmatch(body["host_id"]):
        raise InvalidArgument("host_id must be 32 lower-case hex digits")
    return body["host_id"]


def parse_publish_local_body(raw: bytes) -> tuple[Key, str]:
    what = "PublishLocal body"
    body = parse_json_object(raw, what)
    check_keys(body, {"index_id", "matrix_type", "file"}, {"index_id", "matrix_type", "file"},
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
        check_keys(body, common | {"inline_max"}, common, what)
    else:
        required = common | {"shape", "dtype", "nbytes", "parts"}
        check_keys(body, required | {"xxh3"}, required, what)
    out: dict[str, Any] = {
        "key": Key(validate_index_id(body["index_id"]), validate_matrix_type(body["matrix_type"])),
        "addresses": body["addresses"],
        "tag": validate_int(body["tag"], "tag", 0, 2**64 - 1),
    }
    if action == UCX_GET:
        out["inline_max"] = validate_int(body.get("inline_max", 0), "inline_max", 0, 1 << 20)
    if action == UCX_PUT:

        out["shape"] = validate_shape(body["shape"])
        if not isinstance(body["dtype"], str) or body["dtype"] not in DTYPES:
            raise InvalidArgument(f"unsupported dtype {body['dtype']!r:.40}")
        out["dtype"] = body["dtype"]
        out["nbytes"] = validate_int(body["nbytes"], "nbytes", 0, 2**62)
        parts = body["parts"]
        if not isinstance(parts, list) or len(parts) > 1 << 20:
            raise InvalidArgument("parts must be a list of byte sizes")
        out["parts"] = [validate_int(p, "part size", 1, 2**62) for p in parts]
        if sum(out["parts"]) != out["nbytes"]:
            raise InvalidArgument("parts must add up to nbytes")
        digest = body.get("xxh3")
        if digest is not None and (not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest)):
            raise InvalidArgument("xxh3 must be 16 lower-case hex digits")
        out["xxh3"] = digest
    return out
