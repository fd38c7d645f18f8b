"""What the server does with an exception it did not expect: log it in full with a reference,
and answer the caller with that reference only (no traceback, path or class name)."""

from __future__ import annotations

import logging
import traceback
import uuid

from torch_tq.errors import InternalError


def format_exception(e: BaseException) -> str:
    """A full traceback, whatever ``sys.tracebacklimit`` says (the server sets it to 0)."""
    return "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=100))


def internal_error(e: BaseException, where: str, log: logging.Logger) -> InternalError:
    """Logs ``e`` with its traceback under a fresh reference; the error to answer with."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s failed (ref %s):\n%s", where, ref, format_exception(e))
    return InternalError(f"internal server error (ref {ref}); see the server log")
