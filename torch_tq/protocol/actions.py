"""The one registry of what a client may ask: every DoAction and every stream command, with
its spellings, the parser of its body, its description (``ListActions`` and
docs/protocol.md) and the quota it draws on.

The server dispatches ``DoAction`` through :func:`lookup` (one handler per action,
:mod:`torch_tq.server.actions`), answers ``ListActions`` with :func:`descriptions`, and
admits a call against :attr:`Action.quota`; ``tests/test_protocol.py`` checks that the
handlers and docs/protocol.md cover exactly what is registered here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch_tq.errors import InvalidArgument
from torch_tq.protocol import commands as c
from torch_tq.protocol import groups, transfers


@dataclass(frozen=True)
class Action:
    """One thing a client may ask, by its canonical name."""

    name: str
    description: str
    parse: Callable[[bytes], Any]  # the body -> checked arguments (raises InvalidArgument)
    quota: str = "tcp"  # the client quota it draws on: "tcp" or "ucx" (transfers)
    method: str = "DoAction"  # or the Flight method that carries it ("DoPut", "DoGet")
    # the role a caller needs where the server authenticates: "read", "write" or "admin"
    # (Consume and Ack that also delete need "write": the server checks the body)
    role: str = "read"

    @property
    def spellings(self) -> frozenset[str]:
        return c.spellings(self.name)


def _empty(name: str) -> Callable[[bytes], None]:
    return functools.partial(c.parse_empty_body, what=f"{name} body")


def _queue(name: str) -> Callable[[bytes], dict]:
    return functools.partial(groups.parse_queue_body, action=name)


def _ucx(name: str) -> Callable[[bytes], dict]:
    return functools.partial(transfers.parse_ucx_body, action=name)


def _ucx_batch(name: str) -> Callable[[bytes], dict]:
    return functools.partial(transfers.parse_ucx_batch_body, action=name)


_HOW = {
    c.WRITE_MATRIX: 'send it as a DoPut with the descriptor {"action": "WriteMatrix", '
                    '"index_id": N, "matrix_type": "prompt"} and the matrix as the stream',
    c.READ_MATRIX: 'send it as a DoGet ticket {"action": "ReadMatrix", "index_id": N, '
                   '"matrix_type": "prompt"}',
    c.BATCH_WRITE: 'send BatchRead as a DoGet ticket {"action": "BatchRead", "items": [...]}, '
                   'BatchWrite as a DoPut with the command {"action": "BatchWrite"} and a '
                   'table of items',
}
_HOW[c.BATCH_READ] = _HOW[c.BATCH_WRITE]


def _not_an_action(name: str) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        raise InvalidArgument(f"{name} carries matrices, so it is not an action: {_HOW[name]} "
                              "(see docs/protocol.md)")
    return parse


_ROUNDS = ('"rounds"?: {"rank": R, "world_size": W, "dp_rank": D, "dp_size": S, "share": B, '
           '"unit": "matrix"|"sample", "group_by": N, "balance_by": "type"}')

ACTIONS: dict[str, Action] = {a.name: a for a in (
    Action(c.DELETE_MATRIX, 'Delete one matrix, or every type of an index_id: {"index_id": N, '
           '"matrix_type": "prompt"|""}', c.parse_delete_body, role="write"),
    Action(c.GET_METADATA, 'Types, dimensions, dtypes, sizes and timestamps of an index_id: '
           '{"index_id": N}', c.parse_metadata_body),
    Action(c.HEALTH, "Server status: matrices and bytes stored, uptime", _empty(c.HEALTH)),
    Action(c.STATS, "Health plus calls per method, errors per code, bytes in/out, active calls",
           _empty(c.STATS), role="admin"),
    Action(c.CONSUME, 'Lease up to max_items index_ids whose types are all present and not yet '
           'consumed by the group, waiting up to timeout_ms: {"group": "g", "types": '
           '["prompt", ...], "max_items": N, "timeout_ms": T, "lease_ms": L, "ack": [ids], '
           f'"delete": false, {_ROUNDS}}} (rounds: the next share of a round dealt equally to '
           'every data-parallel rank)', _queue(c.CONSUME)),
    Action(c.ACK, 'Consume leased index_ids for good: {"group": "g", "index_ids": [...], '
           '"delete": false, "rank"?: R}', _queue(c.ACK)),
    Action(c.RELEASE, 'Give leased index_ids back at once: {"group": "g", "index_ids": [...]}',
           _queue(c.RELEASE)),
    Action(c.RENEW, 'Extend leases (a consumer heartbeat): {"group": "g", "index_ids": [...], '
           '"lease_ms": L, "dp_rank"?: D}', _queue(c.RENEW)),
    Action(c.FINISH_STREAM, 'Mark matrix types finished (no more will be written): '
           '{"types": [...]}', _queue(c.FINISH_STREAM), role="write"),
    Action(c.REOPEN_STREAM, 'Clear the finished mark of matrix types: {"types": [...]}',
           _queue(c.REOPEN_STREAM), role="write"),
    Action(c.GROUP_STATUS, 'Ready, leased and consumed counts of a consumer group: '
           '{"group": "g"}', _queue(c.GROUP_STATUS)),
    Action(c.DELETE_GROUP, 'Forget a consumer group and what it consumed: {"group": "g"}',
           _queue(c.DELETE_GROUP), role="admin"),
    Action(c.UCX_INFO, "The server's UCX worker addresses (base64, one per lane), for the UCX "
           "data plane", _empty(c.UCX_INFO)),
    Action(c.UCX_GET, 'Send a matrix over UCX: {"index_id": N, "matrix_type": "prompt", '
           '"address": "<client worker address, base64>", "tag": T, "inline_max"?: B}; answers '
           'dtype, shape, parts (a matrix of at most B bytes comes back as a second result '
           'instead)', _ucx(c.UCX_GET), quota="ucx"),
    Action(c.UCX_PUT, 'Receive a matrix over UCX and store it: {"index_id", "matrix_type", '
           '"shape", "dtype", "nbytes", "parts": [bytes...], "address", "tag", "xxh3"?}',
           _ucx(c.UCX_PUT), quota="ucx", role="write"),
    Action(c.UCX_PUT_BATCH, 'Receive many matrices in one UCX transfer and store each on its '
           'own: {"items": [{"index_id", "matrix_type", "dtype", "shape", "nbytes"}, ...], '
           '"parts": [bytes...], "addresses", "tag"} (the items\' bytes end to end, in order); '
           'answers a result per item', _ucx_batch(c.UCX_PUT_BATCH), quota="ucx",
           role="write"),
    Action(c.UCX_GET_BATCH, 'Send many matrices in one UCX transfer: {"items": [{"index_id", '
           '"matrix_type"}, ...], "addresses", "tag", "inline_max"?: B, "max_bytes"?: M}; '
           'answers a result per item with its dtype, shape and parts (at most B bytes in all '
           'come back as a second result instead; an item over M bytes is left for UcxGet)',
           _ucx_batch(c.UCX_GET_BATCH), quota="ucx"),
    Action(c.LOCAL_INFO, 'Same-host access: the store directory, if the caller runs on this '
           'host: {"host_id": "32 hex"}', transfers.parse_local_info_body),
    Action(c.PUBLISH_LOCAL, 'Check and publish a matrix file a same-host client staged: '
           '{"index_id": N, "matrix_type": "prompt", "file": "<32 hex>.arrow"}',
           transfers.parse_publish_local_body, role="write"),
    Action(c.PUBLISH_LOCAL_BATCH, 'Check and publish many matrices a same-host client staged '
           'in one shared-memory file (memory store): {"file": "<32 hex>.pack", "items": '
           '[{"index_id", "matrix_type", "dtype", "shape", "offset", "nbytes"}, ...]}; answers '
           'a result per item, as BatchWrite', transfers.parse_publish_local_batch_body,
           role="write"),
    Action(c.LOCATE_LOCAL, 'Where same-host readers find items in shared memory: {"items": '
           '[{"index_id", "matrix_type"}, ...]}; answers, per item, its file, offset, dtype '
           'and shape, or that it is held elsewhere, or its error',
           transfers.parse_locate_local_body),
)}

# The commands that carry matrices, and so travel as Flight streams rather than actions.
STREAMS: dict[str, Action] = {a.name: a for a in (
    Action(c.WRITE_MATRIX, "Store one matrix: a DoPut descriptor; the stream is its values",
           _not_an_action(c.WRITE_MATRIX), method="DoPut", role="write"),
    Action(c.READ_MATRIX, "Read one matrix: a DoGet ticket (or GetFlightInfo descriptor)",
           _not_an_action(c.READ_MATRIX), method="DoGet"),
    Action(c.BATCH_WRITE, "Store many matrices: a DoPut whose stream is a table of items",
           _not_an_action(c.BATCH_WRITE), method="DoPut", role="write"),
    Action(c.BATCH_READ, "Read many matrices: a DoGet ticket; the stream is a table of results",
           _not_an_action(c.BATCH_READ), method="DoGet"),
)}

_BY_SPELLING = {s: a for a in (*ACTIONS.values(), *STREAMS.values()) for s in a.spellings}


def lookup(action_type: str) -> Action | None:
    """The registered action or stream command ``action_type`` spells (any registered
    spelling, case-insensitive), or None."""
    if not isinstance(action_type, str) or len(action_type) > 64:
        return None
    return _BY_SPELLING.get(action_type.lower())


def descriptions() -> list[tuple[str, str]]:
    """``(name, description)`` of every DoAction, for ``ListActions``."""
    return [(a.name, a.description) for a in ACTIONS.values()]
