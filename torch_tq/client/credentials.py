"""What a client proves itself with: a bearer token for an authenticating server, and the
TLS material of a ``grpc+tls://`` one (the CA that signed the server's certificate; for
mutual TLS, the client's own certificate and key)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from torch_tq._config import resolve
from torch_tq.errors import InvalidArgument

_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,512}")  # one header value: no spaces, no newlines


def _pem(value, what: str) -> bytes | None:
    """PEM bytes from bytes, a str of PEM text, or a path."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        data = value.encode()
    elif isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            raise InvalidArgument(f"{what} {os.fspath(value)}: {e.strerror}") from None
    else:
        raise InvalidArgument(f"{what} must be a path or PEM bytes, got {type(value).__name__}")
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"{what} is not PEM (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    tls_root_certs: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.token is None:
            return []
        return [(b"authorization", b"Bearer " + self.token.encode())]

    def client_options(self) -> dict:
        """The TLS keywords of ``flight.FlightClient``."""
        options = {}
        if self.tls_root_certs is not None:
            options["tls_root_certs"] = self.tls_root_certs
        if self.tls_cert is not None:
            options["cert_chain"] = self.tls_cert
            options["private_key"] = self.tls_key
        return options

    def __repr__(self) -> str:  # never the token or the key
        return (f"Credentials(token={'set' if self.token else None}, tls_root_certs="
                f"{'set' if self.tls_root_certs else None}, tls_cert="
                f"{'set' if self.tls_cert else None})")


def credentials_from(token=None, tls_root_certs=None, tls_cert=None,
                     tls_key=None) -> Credentials:
    """A client's credentials from its arguments or the environment: ``TORCH_TQ_TOKEN``,
    ``TORCH_TQ_TLS_ROOT_CERTS``, ``TORCH_TQ_CLIENT_CERT``, ``TORCH_TQ_CLIENT_KEY`` (paths).

    Raises:
        InvalidArgument: a token that cannot be a header value; a certificate without its
            key (or the reverse); a file that cannot be read or is not PEM.
    """
    token = resolve(token, "TOKEN", None)
    if token == "":
        token = None
    if token is not None and (not isinstance(token, str) or not _TOKEN_RE.fullmatch(token)):
        raise InvalidArgument("token must be 1-512 printable ASCII characters without spaces")
    cert = _pem(resolve(tls_cert, "CLIENT_CERT", None), "tls_cert")
    key = _pem(resolve(tls_key, "CLIENT_KEY", None), "tls_key")
    if (cert is None) != (key is None):
        raise InvalidArgument("a client certificate needs both tls_cert and tls_key")
    return Credentials(token, _pem(resolve(tls_root_certs, "TLS_ROOT_CERTS", None),
                                   "tls_root_certs"), cert, key)
