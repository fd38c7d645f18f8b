"""Who a caller is and what it may do: bearer tokens from a file, basic credentials
exchanged for a session token through Flight's handshake, and the three roles.

The token file (``serve(auth_tokens=PATH)``) holds one grant per line::

    # identity  role   token
    trainer-0   read   3f9c...   (at least 16 characters)
    rollout     write  a71e...
    ops         admin  c02d...

It must be readable by its owner alone (mode 0600 or stricter), else the server refuses to
start; ``SIGHUP`` reads it again (a file that fails to load leaves the old grants in force).
A client sends ``authorization: Bearer <token>`` on every call. A stock Flight client may
instead call ``authenticate_basic_token(identity, token)``: the handshake answers with a
session token, valid for ``session_ttl_s`` and only while the grant it came from is still
in the file. Tokens are kept as SHA-256 digests and looked up by digest.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass

import pyarrow.flight as flight

from torch_tq.errors import InvalidArgument

log = logging.getLogger(__name__)

READ, WRITE, ADMIN = "read", "write", "admin"
ROLES = (READ, WRITE, ADMIN)
_RANK = {role: rank for rank, role in enumerate(ROLES)}

AUTH_HEADER = "authorization"
MIN_TOKEN_CHARS = 16
DEFAULT_SESSION_TTL_S = 3600.0
_MAX_SESSIONS = 65536  # issued only to callers whose basic credentials were good
_IDENTITY_RE = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{%d,512}" % MIN_TOKEN_CHARS)
# what every refused call says: nothing about the server, the token, or why
REFUSED = "UNAUTHENTICATED: missing or invalid credentials"


def allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed`` (admin > write > read)."""
    return _RANK[role] >= _RANK[needed]


@dataclass(frozen=True)
class Grant:
    """An authenticated caller: its identity (the quota key) and role."""

    identity: str
    role: str


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def load_tokens(path: str) -> dict[bytes, Grant]:
    """The grants of the token file ``path``, by token digest.

    Raises:
        InvalidArgument: the file is missing, readable or writable by others, or malformed
            (the message names the line, never a token).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise InvalidArgument(f"auth token file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"auth token file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise InvalidArgument(
                f"auth token file {path} is open to other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); make it private: chmod 600 {path}")
        with os.fdopen(fd, "r", encoding="utf-8", errors="strict") as f:
            fd = -1
            text = f.read(1 << 20)
    except UnicodeDecodeError:
        raise InvalidArgument(f"auth token file {path} is not UTF-8 text") from None
    finally:
        if fd >= 0:
            os.close(fd)
    grants: dict[bytes, Grant] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3:
            raise InvalidArgument(f"auth token file {path}, line {n}: expected "
                                  "'<identity> <role> <token>'")
        identity, role, token = fields
        if not _IDENTITY_RE.fullmatch(identity):
            raise InvalidArgument(f"auth token file {path}, line {n}: the identity must be "
                                  "1-128 ASCII letters, digits or _.:@/+=-")
        if role not in _RANK:
            raise InvalidArgument(f"auth token file {path}, line {n}: role {role[:16]!r} is "
                                  f"not one of {', '.join(ROLES)}")
        if not _TOKEN_RE.fullmatch(token):
            raise InvalidArgument(f"auth token file {path}, line {n}: a token must be "
                                  f"{MIN_TOKEN_CHARS}-512 printable ASCII characters")
        digest = _digest(token)
        if digest in grants:
            raise InvalidArgument(f"auth token file {path}, line {n}: this token is given "
                                  "twice (each grant needs its own)")
        grants[digest] = Grant(identity, role)
    if not grants:
        raise InvalidArgument(f"auth token file {path} grants nothing: add lines "
                              "'<identity> <role> <token>'")
    return grants


class Authenticator:
    """The server's credentials: the token file's grants and the sessions handshakes
    issued. Thread-safe; :meth:`reload` swaps the grants in one step."""

    def __init__(self, path: str, session_ttl_s: float = DEFAULT_SESSION_TTL_S) -> None:
        if not session_ttl_s > 0:
            raise InvalidArgument(f"session_ttl_s must be > 0, got {session_ttl_s}")
        self.path = path
        self.session_ttl_s = float(session_ttl_s)
        self._grants = load_tokens(path)
        # session digest -> (grant, expiry on the monotonic clock, the file token's digest)
        self._sessions: dict[bytes, tuple[Grant, float, bytes]] = {}
        self._lock = threading.Lock()

    def reload(self) -> bool:
        """Reads the token file again; on failure keeps the grants in force (and logs why).
        Sessions of grants no longer in the file end with them."""
        try:
            grants = load_tokens(self.path)
        except InvalidArgument as e:
            log.error("auth tokens not reloaded, the previous ones stay in force: %s", e)
            return False
        with self._lock:
            self._grants = grants
        log.info("auth tokens reloaded from %s: %d grant(s)", self.path, len(grants))
        return True

    def bearer(self, token: str) -> Grant | None:
        """The grant of a bearer token: a file token, or a live session; else None."""
        digest = _digest(token)
        grant = self._grants.get(digest)
        if grant is not None:
            return grant
        session = self._sessions.get(digest)
        if session is None:
            return None
        grant, expires, source = session
        if time.monotonic() >= expires or self._grants.get(source) != grant:
            with self._lock:
                self._sessions.pop(digest, None)
            return None
        return grant

    def basic(self, identity: str, token: str) -> tuple[Grant, str] | None:
        """Basic credentials (an identity and its file token) -> (grant, a new session
        token); None when they do not match a grant."""
        source = _digest(token)
        grant = self._grants.get(source)
        if grant is None or not secrets.compare_digest(grant.identity, identity):
            return None
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._sessions) >= _MAX_SESSIONS:
                self._sessions = {d: s for d, s in self._sessions.items() if s[1] > now}
                while len(self._sessions) >= _MAX_SESSIONS:  # all live: the oldest go
                    self._sessions.pop(next(iter(self._sessions)))
            self._sessions[_digest(session)] = (grant, now + self.session_ttl_s, source)
        return grant, session

    def authenticate(self, headers: dict, handshake: bool) -> tuple[Grant, str | None]:
        """A call's grant from its ``authorization`` header, and the session token to send
        back (a ``handshake`` with basic credentials: only a handshake may carry them), or
        None.

        Raises:
            flight.FlightUnauthenticatedError: missing, malformed, wrong or expired.
        """
        values = headers.get(AUTH_HEADER) or ()
        if len(values) == 1:
            value = values[0]
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, credential = value.partition(" ")
            scheme = scheme.lower()
            credential = credential.strip()
            if scheme == "bearer" and credential:
                grant = self.bearer(credential)
                if grant is not None:
                    return grant, None
            elif scheme == "basic" and credential and handshake:
                try:
                    user, sep, password = base64.b64decode(
                        credential, validate=True).decode("utf-8").partition(":")
                except (ValueError, UnicodeDecodeError):
                    sep = ""
                if sep:
                    issued = self.basic(user, password)
                    if issued is not None:
                        return issued
        raise flight.FlightUnauthenticatedError(REFUSED)


class HandshakeOnly(flight.ServerAuthHandler):
    """Lets Flight's handshake through (the middleware has checked its basic credentials
    and sends the session token as a header, as ``authenticate_basic_token`` expects);
    the credentials of every other call are the middleware's to check, too."""

    def authenticate(self, outgoing, incoming) -> None:
        return None

    def is_valid(self, token) -> bytes:
        return b""
