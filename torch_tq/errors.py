"""The error model: one exception class per seed error code.

Every class subclasses :class:`TQError` and a builtin that users already catch, so
``except KeyError`` works for a missing matrix just as ``except torch_tq.NotFound`` does.
The ``code`` attribute is the seed's code string (``NOT_FOUND``, ``INVALID_ARGUMENT``,
``UNAVAILABLE``, ``INTERNAL_ERROR``), or one of the two codes of an authenticating server
(``UNAUTHENTICATED``, ``PERMISSION_DENIED``).
"""

from __future__ import annotations

import re

_RETRY_RE = re.compile(r"\(retry_after_ms=([0-9]{1,9})\)")


class TQError(Exception):
    """Base class of every torch_tq error.

    Attributes:
        code: the seed error code (``NOT_FOUND``, ``INVALID_ARGUMENT``, ``UNAVAILABLE`` or
            ``INTERNAL_ERROR``).
        message: the human-readable message, e.g.
            ``matrix not found: index_id=12345, type=prompt``.
    """

    code = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # KeyError would otherwise print the message with quotes around it.
        return self.message

    def __reduce__(self):  # keep the message when pickled across processes
        return (type(self), (self.message,))


class NotFound(TQError, KeyError):
    """The matrix (or index_id) does not exist."""

    code = "NOT_FOUND"


class InvalidArgument(TQError, ValueError):
    """The request was malformed; nothing was changed."""

    code = "INVALID_ARGUMENT"


class Unavailable(TQError, ConnectionError):
    """The server cannot serve the request now (unreachable, full, shutting down); retry later."""

    code = "UNAVAILABLE"

    @property
    def retry_after_ms(self) -> int | None:
        """The server's hint when it turned the call away over a limit (nothing was done:
        the call may be retried after that many milliseconds); None otherwise."""
        match = _RETRY_RE.search(self.message)
        return int(match.group(1)) if match else None


class InternalError(TQError, RuntimeError):
    """The server failed (for example a stored file failed its checksum); see the server log."""

    code = "INTERNAL_ERROR"


class Unauthenticated(TQError, PermissionError):
    """The call carried no valid credential (missing, wrong, expired or revoked token, or
    bad basic credentials); nothing was done. Pass ``token=`` (or ``$TORCH_TQ_TOKEN``)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(TQError, PermissionError):
    """The caller's role does not allow this call (roles: ``read``, ``write``, ``admin``);
    nothing was done."""

    code = "PERMISSION_DENIED"


class WrongNode(TQError, LookupError):
    """A node of a cluster was asked to store an index_id another node owns (the client's
    map of the cluster is not the node's: a node was added, removed or renamed); nothing
    was stored. The message names the owner and the node's cluster epoch."""

    code = "FAILED_PRECONDITION"


class ForkedProcessError(TQError, RuntimeError):
    """This process was forked from one that had already used gRPC (a Flight client or
    server), so a new connection here could hang (RELIABILITY.md section 9). Start such
    processes with ``spawn`` or ``forkserver`` (for a DataLoader:
    ``multiprocessing_context="forkserver"``), or fork before the first call."""

    code = "FAILED_PRECONDITION"


ERROR_CLASSES: dict[str, type[TQError]] = {
    cls.code: cls for cls in (NotFound, InvalidArgument, Unavailable, InternalError,
                              Unauthenticated, PermissionDenied, WrongNode)
}
