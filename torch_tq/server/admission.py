"""Every Flight call passes here first: who the caller is, whether the limits admit it, and
that only clean Flight errors (the seed's code and message, never a traceback) leave."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import pyarrow.flight as flight

from torch_tq.errors import TQError, Unavailable
from torch_tq.protocol import actions
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.errors import WIRE_ERRORS, to_wire_error
from torch_tq.server.errors import internal_error
from torch_tq.server.limits import Limiter, client_identity, peer_host
from torch_tq.server.stats import ServerStats

log = logging.getLogger(__name__)

MIDDLEWARE = "torch_tq"


class _CallMiddleware(flight.ServerMiddleware):
    """Per call: who the caller is and whether the limiter admitted it; tells the limiter
    when the call has completed (also after a cancelled or broken stream)."""

    def __init__(self, limiter: Limiter, headers: dict) -> None:
        self.limiter = limiter
        self.headers = headers
        self.client: str | None = None
        self.host = ""

    def call_completed(self, exception) -> None:
        if self.client is not None:
            self.limiter.release(self.client, self.host)
            self.client = None


class CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def start_call(self, info, headers):
        return _CallMiddleware(self.limiter, headers)


def admit(server, context, method: str, args) -> None:
    mw = context.get_middleware(MIDDLEWARE)
    if mw is None:  # no middleware: nothing could release the call, so nothing is admitted
        return
    peer = context.peer() or ""
    host = peer_host(peer)
    client = client_identity(mw.headers, peer)
    # a transfer over UCX draws on the client's UCX quota (the seed's 10,000/s)
    action = actions.lookup(args[0].type) if method == "do_action" and args else None
    ucx_call = action is not None and action.quota == "ucx"
    try:
        server.limiter.admit(client, ucx=ucx_call, host=host)
    except Unavailable:
        if action is not None and action.name in (protocol.UCX_PUT, protocol.UCX_PUT_BATCH):
            server.ucx.drain_refused(args[0].body, action.name)
        raise
    mw.client, mw.host = client, host


def guard(method):
    """Runs a handler so that only clean Flight errors reach the client; counts it and
    admits it against the limits first."""

    @functools.wraps(method)
    def wrapper(self, context, *args, **kwargs):
        self.stats.begin(method.__name__)
        error = None
        try:
            admit(self, context, method.__name__, args)
            return method(self, context, *args, **kwargs)
        except Exception as e:
            error = e
            raise wire(e, method.__name__) from None
        finally:
            self.stats.end(error)

    return wrapper


def guard_iter(it: Iterator, where: str, stats: ServerStats | None = None) -> Iterator:
    try:
        for item in it:  # a RecordBatch, or (RecordBatch, app_metadata)
            if stats is not None:
                stats.add_bytes(sent=(item[0] if isinstance(item, tuple) else item).nbytes)
            yield item
    except Exception as e:
        if stats is not None:
            stats.error(e)
        raise wire(e, where) from None


def wire(e: BaseException, where: str) -> Exception:
    if isinstance(e, TQError):
        return to_wire_error(e)
    if isinstance(e, (flight.FlightError, *WIRE_ERRORS)):
        # pyarrow's own Flight errors (e.g. a cancelled call) carry no traceback.
        return e
    return to_wire_error(internal_error(e, where, log))
