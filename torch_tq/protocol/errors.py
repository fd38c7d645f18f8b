"""Errors on the wire, both ways: a torch_tq error as the Flight status a client of any
language reads (``"<CODE>: <message>"``, with the closest gRPC status), and a Flight error
back into the torch_tq error it carries."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from torch_tq.errors import (
    ERROR_CLASSES,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TQError,
    Unauthenticated,
    Unavailable,
    WrongNode,
)
from torch_tq.protocol.bodies import dumps


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

# Arrow sends a handler's exception with a detail that names its class (``Python exception:
# <module>.<class>: ...``): a client of any language sees the builtin each one stands for,
# never a name from inside the server.
for _cls, _shown in zip(WIRE_ERRORS, ("KeyError", "ValueError", "NotImplementedError")):
    _cls.__module__, _cls.__qualname__ = "builtins", _shown


def to_wire_error(err: TQError) -> Exception:
    """The exception a Flight handler raises for ``err``.

    The server process sets ``sys.tracebacklimit = 0`` (see ``server``), so the Arrow
    status built from these carries no traceback, only the class name and message.
    """
    text = f"{err.code}: {err.message}"
    extra = dumps({"code": err.code, "message": err.message})
    if isinstance(err, NotFound):
        return _WireNotFound(text)
    if isinstance(err, (InvalidArgument, WrongNode)):  # Arrow has no FAILED_PRECONDITION
        return _WireInvalid(text)
    if isinstance(err, Unavailable):
        return flight.FlightUnavailableError(text, extra_info=extra)
    if isinstance(err, Unauthenticated):
        return flight.FlightUnauthenticatedError(text, extra_info=extra)
    if isinstance(err, PermissionDenied):
        return flight.FlightUnauthorizedError(text, extra_info=extra)
    return flight.FlightInternalError(text, extra_info=extra)


def unimplemented(what: str) -> Exception:
    return _WireUnimplemented(f"INVALID_ARGUMENT: {what} is not supported by torch_tq")


_CODE_RE = re.compile(r"(NOT_FOUND|INVALID_ARGUMENT|UNAVAILABLE|INTERNAL_ERROR|UNAUTHENTICATED|"
                      r"PERMISSION_DENIED|FAILED_PRECONDITION): (.*)", re.DOTALL)


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
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return Unauthenticated(f"{prefix}{text}")
    if isinstance(exc, flight.FlightUnauthorizedError):
        return PermissionDenied(f"{prefix}{text}")
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


@contextlib.contextmanager
def flight_errors(what: str = "") -> Iterator[None]:
    """Around Flight calls: whatever they raise leaves as the torch_tq error it carries (a
    torch_tq error raised inside passes as it is). The one place a client wraps them."""
    try:
        yield
    except TQError:
        raise
    except Exception as exc:
        raise from_flight_error(exc, what) from None
