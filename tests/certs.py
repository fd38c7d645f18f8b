"""Certificates the TLS tests make for themselves (``cryptography``): a CA, a server
certificate for localhost and 127.0.0.1, and client certificates signed by the CA."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          sans=None, days: int = 2):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: str) -> dict[str, str]:
    """Writes ca.pem, server.pem/server.key (localhost, 127.0.0.1, ::1), client.pem/
    client.key (CN trainer-0, signed by the CA) and rogue.pem/rogue.key (CN trainer-0,
    signed by another CA) under ``directory``; returns their paths by name."""
    ca_key = _key()
    ca = _cert("torch_tq test CA", ca_key, _name("torch_tq test CA"), ca_key, ca=True)
    other_key = _key()
    other = _name("someone else's CA")
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
    for name, cn, issuer, issuer_key, extra in (
            ("server", "localhost", ca.subject, ca_key, sans),
            ("client", "trainer-0", ca.subject, ca_key, None),
            ("rogue", "trainer-0", other, other_key, None)):
        key = _key()
        cert = _cert(cn, key, issuer, issuer_key, sans=extra)
        files[f"{name}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{name}.key"] = _pem_key(key)
    paths = {}
    for name, data in files.items():
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        paths[name.replace(".", "_")] = path
    return paths
