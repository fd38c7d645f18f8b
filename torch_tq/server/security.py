"""A server's security settings in one place: authentication (``auth_tokens``), TLS
(``tls_cert``/``tls_key``, mutual with ``tls_client_ca``), and the rule that a server
reachable from other hosts authenticates unless told ``insecure``.

Under mutual TLS without tokens, a client whose certificate the client CA signed may do
everything, and its certificate's subject (common name) is its identity for the quotas.
With tokens as well, the token decides identity and role; the certificate is then one more
requirement of the connection."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from torch_tq._config import parse_bool, resolve
from torch_tq.errors import InvalidArgument
from torch_tq.server.auth import DEFAULT_SESSION_TTL_S, Authenticator

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise InvalidArgument(f"{what} {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"{what} {path} is not PEM (no -----BEGIN line)")
    return data


@dataclass
class Security:
    """What :func:`security_from` settled: the authenticator (None: calls are not
    authenticated) and the Flight server's TLS keywords (empty: plaintext)."""

    auth: Authenticator | None = None
    tls: dict = field(default_factory=dict)

    @property
    def mutual_tls(self) -> bool:
        """Every client presents a certificate the client CA signed."""
        return bool(self.tls.get("verify_client"))

    @property
    def scheme(self) -> str:
        return "grpc+tls" if self.tls else "grpc"

    def describe(self) -> str:
        parts = ["mutual tls" if self.mutual_tls else "tls" if self.tls else "plaintext"]
        parts.append(f"tokens from {self.auth.path}" if self.auth else "no authentication")
        return ", ".join(parts)


def security_from(host: str, auth_tokens: str | None = None, tls_cert: str | None = None,
                  tls_key: str | None = None, tls_client_ca: str | None = None,
                  insecure: bool | None = None,
                  session_ttl_s: float | None = None) -> Security:
    """The security of a server binding ``host``, from these options or the environment
    (``TORCH_TQ_AUTH_TOKENS``, ``TORCH_TQ_TLS_CERT``, ``TORCH_TQ_TLS_KEY``,
    ``TORCH_TQ_TLS_CLIENT_CA``, ``TORCH_TQ_INSECURE``, ``TORCH_TQ_SESSION_TTL``).

    Raises:
        InvalidArgument: an unreadable or malformed file; a key without a certificate (or
            the reverse); a client CA without TLS; a non-loopback ``host`` without
            ``auth_tokens`` and without ``insecure``.
    """
    auth_tokens = resolve(auth_tokens, "AUTH_TOKENS", None)
    tls_cert = resolve(tls_cert, "TLS_CERT", None)
    tls_key = resolve(tls_key, "TLS_KEY", None)
    tls_client_ca = resolve(tls_client_ca, "TLS_CLIENT_CA", None)
    insecure = resolve(insecure, "INSECURE", False, parse_bool)
    ttl = float(resolve(session_ttl_s, "SESSION_TTL", DEFAULT_SESSION_TTL_S, float))
    security = Security()
    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("TLS needs both tls_cert and tls_key (PEM files)")
    if tls_client_ca and not tls_cert:
        raise InvalidArgument("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
    if tls_cert:
        security.tls = {"tls_certificates": [(_read(tls_cert, "TLS certificate"),
                                              _read(tls_key, "TLS key"))]}
        if tls_client_ca:
            security.tls["verify_client"] = True
            security.tls["root_certificates"] = _read(tls_client_ca, "TLS client CA")
    if auth_tokens:
        security.auth = Authenticator(auth_tokens, ttl)
    if not is_loopback(host):
        if security.auth is None and not security.mutual_tls and not insecure:
            raise InvalidArgument(
                f"refusing to serve {host} without authentication: any host that reaches "
                "it could read, overwrite and delete every matrix. Give auth_tokens= "
                "(--auth-tokens PATH), or insecure=True (--insecure) on a network you "
                "trust; loopback addresses need neither")
        if security.auth is None and not security.mutual_tls:
            log.warning("serving %s without authentication (insecure): anyone who reaches "
                        "the port can read, overwrite and delete every matrix", host)
        elif not security.tls:
            log.warning("serving %s with tokens but without TLS: tokens and data cross the "
                        "network in the clear (give tls_cert and tls_key)", host)
    return security
