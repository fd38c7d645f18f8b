"""Every Flight call passes here first: who the caller is (its credentials, when the server
authenticates), whether its role and the limits admit it, and that only clean Flight errors
(the seed's code and message, never a traceback) leave."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import pyarrow.flight as flight

from torch_tq.errors import PermissionDenied, TQError, Unavailable
from torch_tq.protocol import actions
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.errors import WIRE_ERRORS, to_wire_error
from torch_tq.server.auth import AUTH_HEADER, Authenticator, Grant, allows
from torch_tq.server.errors import internal_error
from torch_tq.server.limits import Limiter, client_identity, peer_host
from torch_tq.server.stats import ServerStats

log = logging.getLogger(__name__)

MIDDLEWARE = "torch_tq"


class _CallMiddleware(flight.ServerMiddleware):
    """Per call: who the caller is (its grant, when the server authenticates) and whether
    the limiter admitted it; tells the limiter when the call has completed (also after a
    cancelled or broken stream)."""

    def __init__(self, limiter: Limiter, headers: dict, grant: Grant | None = None,
                 issued: str | None = None) -> None:
        self.limiter = limiter
        self.headers = headers
        self.grant = grant
        self.issued = issued  # a session token the handshake sends back
        self.client: str | None = None
        self.host = ""

    def sending_headers(self):
        if self.issued is None:
            return {}
        return {AUTH_HEADER: f"Bearer {self.issued}"}

    def call_completed(self, exception) -> None:
        if self.client is not None:
            self.limiter.release(self.client, self.host)
            self.client = None


class CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    """With an :class:`Authenticator`, a call without a valid credential is refused here,
    before any handler runs, with UNAUTHENTICATED and nothing more."""

    def __init__(self, limiter: Limiter, auth: Authenticator | None = None,
                 stats: ServerStats | None = None) -> None:
        self.limiter = limiter
        self.auth = auth
        self.stats = stats

    def start_call(self, info, headers):
        if self.auth is None:
            return _CallMiddleware(self.limiter, headers)
        try:
            grant, issued = self.auth.authenticate(
                headers, info.method == flight.FlightMethod.HANDSHAKE)
        except flight.FlightUnauthenticatedError:
            if self.stats is not None:
                self.stats.refused("UNAUTHENTICATED")
            raise
        return _CallMiddleware(self.limiter, headers, grant, issued)


# the role each Flight method needs; DoAction's is its action's (protocol.actions)
_METHOD_ROLES = {"do_put": ("DoPut", "write"), "do_get": ("DoGet", "read"),
                 "get_flight_info": ("GetFlightInfo", "read"),
                 "get_schema": ("GetSchema", "read"), "list_flights": ("ListFlights", "read"),
                 "list_actions": ("ListActions", "read"), "do_exchange": ("DoExchange", "read")}


def grant_of(context) -> Grant | None:
    """The caller's grant; None where the server does not authenticate."""
    mw = context.get_middleware(MIDDLEWARE)
    return mw.grant if mw is not None else None


def authorize(grant: Grant | None, needed: str, what: str) -> None:
    """Raises PermissionDenied unless ``grant`` (None: no authentication) may do ``what``,
    which needs the ``needed`` role."""
    if grant is not None and not allows(grant.role, needed):
        raise PermissionDenied(f"{what} needs the {needed} role; {grant.identity} has "
                               f"{grant.role}")


def admit(server, context, method: str, args) -> None:
    mw = context.get_middleware(MIDDLEWARE)
    if mw is None:  # no middleware: nothing could release the call, so nothing is admitted
        return
    action = actions.lookup(args[0].type) if method == "do_action" and args else None
    if mw.grant is not None:
        if action is not None:
            authorize(mw.grant, action.role, action.name)
        elif method != "do_action":  # an unknown action: dispatch refuses it
            name, role = _METHOD_ROLES[method]
            authorize(mw.grant, role, name)
    peer = context.peer() or ""
    host = peer_host(peer)
    # the quota key: the authenticated identity (a token's; under mutual TLS alone, the
    # certificate's subject), else the client's own header or address
    if mw.grant is not None:
        client = "user:" + mw.grant.identity
    elif server.security.mutual_tls:
        client = "cert:" + context.peer_identity().decode("utf-8", "replace")
    else:
        client = client_identity(mw.headers, peer)
    # a transfer over UCX draws on the client's UCX quota (the seed's 10,000/s)
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
        started = self.stats.begin(method.__name__)
        error = None
        try:
            admit(self, context, method.__name__, args)
            return method(self, context, *args, **kwargs)
        except Exception as e:
            error = e
            raise wire(e, method.__name__) from None
        finally:
            self.stats.end(error, method.__name__, started)

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
