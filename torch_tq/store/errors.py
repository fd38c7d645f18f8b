"""What the store makes of the failures of the disk and of Arrow I/O."""

from __future__ import annotations

import errno
import logging

from torch_tq.errors import InternalError, TQError, Unavailable

log = logging.getLogger(__name__)


def io_error(e: BaseException, what: str) -> TQError:
    """Maps an OS/Arrow I/O failure to UNAVAILABLE (space) or INTERNAL_ERROR."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text.lower():
        return Unavailable(f"{what}: storage is full; free space or retry later")
    log.error("%s failed: %s", what, text)
    return InternalError(f"{what}: storage I/O error")


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
