"""Certificates for the TLS tests: trustme CAs, and leaves with a URI SAN (a
SPIFFE ID) or a chosen expiry, which trustme does not issue, signed by the
trustme CA's key with cryptography."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pair:
    cert: Path
    key: Path


def issue(ca: trustme.CA, where: Path, name: str, *dns: str, uri: str | None = None,
          common_name: str | None = None, days: float = 30) -> Pair:
    """A leaf for servers and clients, written as ``name.crt``/``name.key`` under ``where``."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sluice tests"),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = Pair(where / f"{name}.crt", where / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def ca_file(ca: trustme.CA, where: Path, name: str = "ca") -> Path:
    path = where / f"{name}.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
