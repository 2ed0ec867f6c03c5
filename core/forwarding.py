"""What a forwarding intermediary does to headers (RFC 9110 7.6).

Pure functions over ``Headers``; the exchange calls them once per message.
"""

from __future__ import annotations

import random

from .messages import Headers

__all__ = ["VIA", "add_forwarded", "add_via", "ensure_request_id", "strip_hop_by_hop"]

VIA = b"1.1 sluice"

# Connection-specific fields a proxy must not forward (RFC 9110 7.6.1, plus
# the de-facto Proxy-Connection and Keep-Alive). Transfer-Encoding is re-added
# by the outgoing framing when needed.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


def strip_hop_by_hop(headers: Headers) -> None:
    """Remove hop-by-hop fields and every field the Connection header names."""
    fields = headers.raw()
    drop = _HOP_BY_HOP
    named = [v for n, v in fields if n == b"connection"]
    if named:
        drop = set(drop)
        for value in named:
            drop.update(t.strip(b" \t").lower() for t in value.split(b","))
    if any(n in drop for n, _ in fields):
        fields[:] = [(n, v) for n, v in fields if n not in drop]


def add_via(headers: Headers) -> None:
    """Append our hop to Via (one comma-joined field, as RFC 9110 7.6.3 allows)."""
    fields = headers.raw()
    for i, (n, v) in enumerate(fields):
        if n == b"via":
            fields[i] = (n, v + b", " + VIA)
            return
    fields.append((b"via", VIA))


def add_forwarded(
    headers: Headers, *, client_ip: str, scheme: str, trusted: bool
) -> None:
    """Set X-Forwarded-For/-Proto/-Host.

    ``trusted`` says whether the downstream peer is a proxy whose
    X-Forwarded-* we believe: then we append to XFF and keep its Proto/Host;
    otherwise whatever the client claimed is replaced.
    """
    fields = headers.raw()
    xff = headers.get_raw(b"x-forwarded-for") if trusted else None
    proto = headers.get_raw(b"x-forwarded-proto") if trusted else None
    fhost = headers.get_raw(b"x-forwarded-host") if trusted else None
    host = headers.get_raw(b"host")
    fields[:] = [
        (n, v)
        for n, v in fields
        if n not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
    ]
    ip = client_ip.encode("ascii")
    fields.append((b"x-forwarded-for", xff + b", " + ip if xff else ip))
    fields.append((b"x-forwarded-proto", proto or scheme.encode("ascii")))
    if fhost or host:
        fields.append((b"x-forwarded-host", fhost or host))


def ensure_request_id(headers: Headers) -> str:
    """Return the request's x-request-id, generating one when absent."""
    rid = headers.get_raw(b"x-request-id")
    if rid:
        return rid.decode("latin-1")
    # 128 random bits, like a UUID4's 122; from the fast PRNG because a
    # request id is a correlation key, not a secret.
    new = "%032x" % random.getrandbits(128)
    headers.raw().append((b"x-request-id", new.encode("ascii")))
    return new
