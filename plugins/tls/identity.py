"""Who a certificate names: the peer identity in ``ctx.tls_peer`` and the XFCC element.

The stdlib gives subject and SANs only as nested tuples and has no RFC 4514
form; ``cryptography`` (already under joserfc, declared in pyproject) parses
the DER once per handshake, and its ``rfc4514_string`` is the standard form
other engineers' RBAC rules compare against.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["Peer", "describe", "names", "not_after"]

log = structlog.get_logger("sluice.tls")

NO_CERT: dict[str, Any] = {"verified": False, "subject": None, "dns_sans": [], "uri_sans": [],
                           "spiffe_id": None, "cert_sha256": None}


def names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The DNS and URI SANs (empty when it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.UniformResourceIdentifier)


class Peer(dict):
    """``ctx.tls_peer``: a plain dict to everyone, carrying this connection's XFCC
    element (made once at the handshake, not per request) as an attribute."""

    xfcc: bytes | None = None


def describe(der: bytes | None, details: list[str], by: str | None) -> Peer:
    """The identity fields of ``ctx.tls_peer`` for a verified peer certificate (DER), or
    for none: ``verified`` is True only when the client showed a certificate that chained
    to ``client_ca`` (an untrusted one never gets this far: the handshake failed)."""
    peer = Peer(NO_CERT, dns_sans=[], uri_sans=[])  # lists of its own: a filter may change them
    if not der:
        return peer
    peer.update(verified=True, cert_sha256=hashlib.sha256(der).hexdigest())
    try:
        cert = x509.load_der_x509_certificate(der)
        dns, uris = names(cert)
        subject = cert.subject.rfc4514_string()
    except ValueError as exc:  # OpenSSL verified what cryptography cannot read (a duplicate extension)
        log.warning("tls peer certificate unreadable", error=str(exc), cert_sha256=peer["cert_sha256"])
        return peer
    peer.update(subject=subject, dns_sans=dns, uri_sans=uris,
                spiffe_id=next((u for u in uris if u.startswith("spiffe://")), None))
    peer.xfcc = _xfcc_element(peer, cert, details, by)
    return peer


def not_after(cert: x509.Certificate) -> float:
    """When it expires, as a Unix timestamp."""
    return cert.not_valid_after_utc.timestamp()


def _quoted(value: str, always: bool = False) -> str:
    # A header value is bytes: a character beyond ASCII is written as its UTF-8 bytes in
    # RFC 4514's \XX escapes (as OpenSSL's RFC 2253 output does for Envoy), not mangled.
    if not value.isascii():
        value = "".join(c if c.isascii() else "".join(f"\\{b:02X}" for b in c.encode()) for c in value)
    # Envoy: a value holding , ; = or " is double-quoted, a " in it becomes \".
    if always or any(c in value for c in ',;="'):
        return '"' + value.replace('"', '\\"') + '"'
    return value


def _xfcc_element(peer: dict[str, Any], cert: x509.Certificate, details: list[str],
                  by: str | None) -> bytes | None:
    """This connection's element of ``x-forwarded-client-cert`` in Envoy's format
    (``By=..;Hash=..;Subject="..";URI=..;DNS=..``). ``by`` is the URI SAN of sluice's
    own certificate (Envoy's By), when it has one."""
    parts = []
    if "by" in details and by:
        parts.append("By=" + _quoted(by))
    if "hash" in details:
        parts.append("Hash=" + peer["cert_sha256"])
    if "cert" in details:
        pem = cert.public_bytes(Encoding.PEM).decode("ascii")
        parts.append('Cert="' + quote(pem, safe="") + '"')
    if "subject" in details:
        parts.append("Subject=" + _quoted(peer["subject"], always=True))
    if "uri" in details:
        parts.extend("URI=" + _quoted(u) for u in peer["uri_sans"])
    if "dns" in details:
        parts.extend("DNS=" + _quoted(d) for d in peer["dns_sans"])
    return ";".join(parts).encode("ascii") if parts else None
