"""One function per action: the arguments the registry's parser checked -> the call -> the
reply. :func:`dispatch` is the server's ``DoAction``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.flight as flight

from torch_tq.errors import InvalidArgument
from torch_tq.protocol import actions as registry
from torch_tq.protocol import commands as protocol
from torch_tq.server.admission import authorize
from torch_tq.server.auth import Grant

if TYPE_CHECKING:
    from torch_tq.server.flight import TQFlightServer

Handler = Callable[["TQFlightServer", Any], Any]


def _delete_matrix(server, args) -> dict:
    index_id, mtype = args
    return protocol.ok(index_id=index_id, deleted=server.store.delete(index_id, mtype))


def _get_metadata(server, index_id) -> dict:
    return protocol.ok(**server.store.metadata(index_id))


def _health(server, _) -> dict:
    return server.health()


def _stats(server, _) -> dict:
    result = {**server.health(), **server.stats.snapshot(), **server.limiter.snapshot()}
    pool = getattr(server.store.backend, "pool", None)
    if pool is not None:  # a memory store's recycled same-host files
        result["recycle"] = pool.describe()
    result["ucx_address_probe"] = server.ucx.probe.describe()
    memory = server.store.memory()
    if memory is not None:
        result["memory"] = memory
    return result


def _ucx_get(server, req) -> list[flight.Result] | dict:
    result, inline = server.ucx.get(req)
    if inline is None:
        return result
    # a small matrix comes back with the answer itself
    return [flight.Result(pa.py_buffer(protocol.dumps(result))), flight.Result(inline)]


def _ucx_get_batch(server, req) -> list[flight.Result]:
    result, inline = server.ucx.get_batch(req, server.limits, server.limiter)
    out = [flight.Result(pa.py_buffer(protocol.dumps(result)))]
    if inline is not None:
        out.append(flight.Result(inline))
    return out


def _queue(call: Callable[[Any, dict], dict]) -> Handler:
    return lambda server, args: protocol.ok(**call(server.queue, args))


HANDLERS: dict[str, Handler] = {
    protocol.DELETE_MATRIX: _delete_matrix,
    protocol.GET_METADATA: _get_metadata,
    protocol.HEALTH: _health,
    protocol.STATS: _stats,
    protocol.CONSUME: _queue(lambda q, a: q.consume(
        a["group"], a.get("types"), a["max_items"], a["wait_s"], a["lease_s"],
        a.get("ack", []), a.get("delete", False), a.get("rounds"))),
    protocol.ACK: _queue(lambda q, a: q.ack(a["group"], a["index_ids"], a.get("delete", False),
                                            a.get("rank"))),
    protocol.RELEASE: _queue(lambda q, a: q.release(a["group"], a["index_ids"])),
    protocol.RENEW: _queue(lambda q, a: q.renew(a["group"], a["index_ids"], a["lease_s"],
                                                a.get("dp_rank"))),
    protocol.FINISH_STREAM: _queue(lambda q, a: q.finish(a["types"], True)),
    protocol.REOPEN_STREAM: _queue(lambda q, a: q.finish(a["types"], False)),
    protocol.GROUP_STATUS: _queue(lambda q, a: q.status(a["group"])),
    protocol.DELETE_GROUP: _queue(lambda q, a: q.delete_group(a["group"])),
    protocol.UCX_INFO: lambda server, _: server.ucx.info(),
    protocol.UCX_GET: _ucx_get,
    protocol.UCX_PUT: lambda server, req: server.ucx.put(req),
    protocol.UCX_PUT_BATCH: lambda server, req: server.ucx.put_batch(req, server.limits,
                                                                    server.limiter),
    protocol.UCX_GET_BATCH: _ucx_get_batch,
    protocol.LOCAL_INFO: lambda server, host: server.same_host.info(host),
    protocol.PUBLISH_LOCAL: lambda server, args: server.same_host.publish(*args),
    protocol.PUBLISH_LOCAL_BATCH: lambda server, args: server.same_host.publish_batch(
        *args, server.limits, server.limiter),
    protocol.LOCATE_LOCAL: lambda server, items: server.same_host.locate(items, server.limits),
}


def dispatch(server: TQFlightServer, action: flight.Action,
             grant: Grant | None = None) -> list[flight.Result]:
    """``DoAction``: look the action up, parse its body, run its handler (the caller's
    ``grant`` was checked against the action's role on admission; a Consume or Ack that
    also deletes needs ``write``)."""
    spec = registry.lookup(action.type)
    body = action.body.to_pybytes() if action.body is not None else b""
    server.stats.count(f"action:{spec.name if spec is not None else 'unknown'}")
    if spec is None:
        raise InvalidArgument(
            f"unknown action {action.type[:64]!r}; available: "
            f"{', '.join(registry.ACTIONS)}"
        )
    args = spec.parse(body)  # a stream command's parser says how to send it instead
    if grant is not None and isinstance(args, dict) and args.get("delete") is True and (
            spec.name == protocol.ACK or args.get("ack")):  # Consume deletes what it acks
        authorize(grant, "write", f"{spec.name} with delete")
    result = HANDLERS[spec.name](server, args)
    if isinstance(result, list):
        return result
    return [flight.Result(pa.py_buffer(protocol.dumps(result)))]
