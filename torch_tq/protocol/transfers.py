"""The bodies of the fast paths' control actions: UcxGet/UcxPut (a UCX transfer's key,
lanes, tag and parts), UcxPutBatch/UcxGetBatch (many items in one UCX transfer) and LocalInfo/PublishLocal/PublishLocalBatch/LocateLocal (same-host
access)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from torch_tq.codec.tensors import numel
from torch_tq.errors import InvalidArgument
from torch_tq.model import DTYPES, Key, validate_index_id, validate_matrix_type, validate_shape
from torch_tq.protocol.bodies import check_keys, parse_json_object, validate_int
from torch_tq.protocol.commands import (
    MAX_BATCH_TICKET_BYTES,
    UCX_GET,
    UCX_GET_BATCH,
    UCX_PUT,
    UCX_PUT_BATCH,
    BadItem,
    batch_item,
)

_HEX64_RE = re.compile(r"[0-9a-f]{16}", re.ASCII)
_HOST_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_STAGED_RE = re.compile(r"[0-9a-f]{32}\.arrow", re.ASCII)
_PACK_RE = re.compile(r"[0-9a-f]{32}\.pack", re.ASCII)
PACK_ALIGN = 64  # every item of a staged pack starts at a multiple of this offset
MAX_PACK_ITEMS = 1 << 16  # items one PublishLocalBatch/LocateLocal body may name at all


class PackItem(NamedTuple):
    """One item of a staged pack: its key, and where its raw element bytes lie."""

    key: Key
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


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


def _items(body: dict, what: str) -> list:
    items = body["items"]
    if not isinstance(items, list):
        raise InvalidArgument(f"{what}: items must be a list of objects")
    if len(items) > MAX_PACK_ITEMS:
        raise InvalidArgument(f"{what}: {len(items)} items; at most {MAX_PACK_ITEMS}")
    return items


def _layout(item: dict, nbytes: int) -> tuple[str, tuple[int, ...]]:
    """An item's ``dtype`` and ``shape``, checked to hold exactly ``nbytes``."""
    dtype = item["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidArgument(f"unsupported dtype {dtype!r:.40}; supported: "
                              f"{', '.join(DTYPES)}")
    shape = validate_shape(item["shape"])
    holds = numel(shape) * DTYPES[dtype].itemsize
    if holds != nbytes:
        raise InvalidArgument(f"shape {list(shape)} of {dtype} holds {holds} bytes, "
                              f"nbytes is {nbytes}")
    return dtype, shape


def _pack_item(item: Any, pos: int) -> PackItem | BadItem:
    """One item of a PublishLocalBatch body; a bad one fails alone (as in a BatchWrite)."""
    if not isinstance(item, dict):
        return BadItem(None, None, InvalidArgument(f"item {pos} must be a JSON object"))
    fields = {"index_id", "matrix_type", "dtype", "shape", "offset", "nbytes"}
    key = batch_item({k: item[k] for k in ("index_id", "matrix_type") if k in item}, pos)
    if isinstance(key, BadItem):
        return key
    try:
        check_keys(item, fields, fields, f"item {pos}")
        offset = validate_int(item["offset"], "offset", 0, 2**62)
        nbytes = validate_int(item["nbytes"], "nbytes", 0, 2**62)
        if offset % PACK_ALIGN:
            raise InvalidArgument(f"offset {offset} is not a multiple of {PACK_ALIGN}")
        dtype, shape = _layout(item, nbytes)
    except InvalidArgument as e:
        return BadItem(key.index_id, key.matrix_type, e)
    return PackItem(key, dtype, shape, offset, nbytes)


def parse_publish_local_batch_body(raw: bytes) -> tuple[str, list[PackItem | BadItem]]:
    """``{"file": "<32 hex>.pack", "items": [{index_id, matrix_type, dtype, shape, offset,
    nbytes}, ...]}``: the staged pack and where each item lies in it."""
    what = "PublishLocalBatch body"
    body = parse_json_object(raw, what, MAX_BATCH_TICKET_BYTES)
    check_keys(body, {"file", "items"}, {"file", "items"}, what)
    if not isinstance(body["file"], str) or not _PACK_RE.fullmatch(body["file"]):
        raise InvalidArgument("file must be a staged pack's name: 32 hex digits + '.pack'")
    return body["file"], [_pack_item(it, i) for i, it in enumerate(_items(body, what))]


def parse_locate_local_body(raw: bytes) -> list[Key | BadItem]:
    """``{"items": [{index_id, matrix_type}, ...]}``: the items to find in shared memory."""
    what = "LocateLocal body"
    body = parse_json_object(raw, what, MAX_BATCH_TICKET_BYTES)
    check_keys(body, {"items"}, {"items"}, what)
    return [batch_item(it, i) for i, it in enumerate(_items(body, what))]


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
        out["xxh3"] = _digest(body.get("xxh3"))
    return out


def _digest(digest: Any) -> str | None:
    if digest is not None and (not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest)):
        raise InvalidArgument("xxh3 must be 16 lower-case hex digits")
    return digest


def _parts(value: Any, nbytes: int) -> list[int]:
    if not isinstance(value, list) or len(value) > 1 << 20:
        raise InvalidArgument("parts must be a list of byte sizes")
    parts = [validate_int(p, "part size", 1, 2**62) for p in value]
    if sum(parts) != nbytes:
        raise InvalidArgument(f"parts add up to {sum(parts)} bytes; the items hold {nbytes}")
    return parts


def _stream_item(item: Any, pos: int, offset: int) -> PackItem | BadItem:
    """One item of a UcxPutBatch body at ``offset`` of the transfer's bytes; a bad one
    fails alone (its declared ``nbytes`` still count: the client sent them)."""
    key = batch_item({k: item[k] for k in ("index_id", "matrix_type") if k in item}, pos)
    if isinstance(key, BadItem):
        return key
    try:
        fields = {"index_id", "matrix_type", "dtype", "shape", "nbytes"}
        check_keys(item, fields, fields, f"item {pos}")
        dtype, shape = _layout(item, item["nbytes"])
    except InvalidArgument as e:
        return BadItem(key.index_id, key.matrix_type, e)
    return PackItem(key, dtype, shape, offset, item["nbytes"])


def parse_ucx_batch_body(raw: bytes, action: str) -> dict[str, Any]:
    """Parses a UcxPutBatch or UcxGetBatch body.

    * UcxPutBatch ``{"items": [{index_id, matrix_type, dtype, shape, nbytes}, ...], "parts":
      [bytes...], "addresses", "tag", "xxh3"?}``: the items' raw bytes (whose XXH3-64, in
      hex, ``xxh3`` is: required by an authenticating server) travel end to end in item
      order, cut into ``parts`` (part ``i`` with tag ``tag + i``). Each item becomes a
      :class:`PackItem` at its offset in that stream, or a :class:`BadItem` that fails alone;
      an item whose ``nbytes`` is not a byte count makes the whole body invalid (the stream
      could not be cut).
    * UcxGetBatch ``{"items": [{index_id, matrix_type}, ...], "addresses", "tag",
      "inline_max"?, "max_bytes"?}``: the items to send, a :class:`Key` or :class:`BadItem`
      each.
    """
    what = f"{action} body"
    body = parse_json_object(raw, what, MAX_BATCH_TICKET_BYTES)
    common = {"items", "addresses", "tag"}
    if action == UCX_PUT_BATCH:
        check_keys(body, common | {"parts", "xxh3"}, common | {"parts"}, what)
    else:
        check_keys(body, common | {"inline_max", "max_bytes"}, common, what)
    items = _items(body, what)
    out: dict[str, Any] = {
        "addresses": body["addresses"],
        "tag": validate_int(body["tag"], "tag", 0, 2**64 - 1),
    }
    if action == UCX_GET_BATCH:
        out["items"] = [batch_item(it, i) for i, it in enumerate(items)]
        out["inline_max"] = validate_int(body.get("inline_max", 0), "inline_max", 0, 1 << 20)
        out["max_bytes"] = validate_int(body.get("max_bytes", 2**62), "max_bytes", 0, 2**62)
        return out
    parsed, offset = [], 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidArgument(f"{what}: item {i} must be a JSON object")
        nbytes = validate_int(item.get("nbytes"), f"item {i}: nbytes", 0, 2**62)
        parsed.append(_stream_item(item, i, offset))
        offset += nbytes
    out["items"] = parsed
    out["nbytes"] = offset
    out["parts"] = _parts(body["parts"], offset)
    out["xxh3"] = _digest(body.get("xxh3"))
    return out
