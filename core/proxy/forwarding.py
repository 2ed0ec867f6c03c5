"""What a forwarding intermediary does to headers (RFC 9110 7.6).

Pure functions over ``Headers``; the exchange calls them once per message.
"""

from __future__ import annotations

import random
import re

from ..messages import Headers

__all__ = ["VIA", "add_via", "forward_request", "offer_upgrade", "set_host", "strip_hop_by_hop", "strip_trailers",
           "switched_protocol"]

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


# A Connection field may name other fields as hop-by-hop, but never one the
# proxy itself needs to frame or route the message.
_NEVER_NAMED = frozenset({b"host", b"content-length"})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def _named(value: bytes) -> set[bytes]:
    """The field names a Connection value lists, minus those it may not remove."""
    return {t.strip(b" \t").lower() for t in value.split(b",")} - _NEVER_NAMED


def strip_hop_by_hop(headers: Headers) -> None:
    """Remove hop-by-hop fields and every field the Connection header names."""
    fields = headers.raw()
    drop = None
    for n, v in fields:  # one pass finds what to drop; most messages need no rebuild
        if n in _HOP_BY_HOP:
            if n == b"connection":
                drop = (_HOP_BY_HOP if drop is None else drop) | _named(v)
            elif drop is None:
                drop = _HOP_BY_HOP
    if drop is not None:
        fields[:] = [f for f in fields if f[0] not in drop]


_XFCC = b"x-forwarded-client-cert"


def forward_request(headers: Headers, *, client_ip: str, scheme: str, trusted: bool,
                    drop_expect: bool, client_cert: tuple[str, bytes | None] = ("sanitize", None),
                    ) -> tuple[str, str]:
    """Everything sluice does to a request head it forwards, in one pass over
    its fields; returns the request id and the trace id.

    Hop-by-hop fields go, and those Connection names; ``Expect`` goes when
    sluice answered it; ``x-request-id`` is kept or made; ``traceparent`` is
    kept or started (``_trace``); X-Forwarded-For, -Proto and -Host are set.
    ``trusted`` says whether the downstream peer is a proxy whose
    X-Forwarded-* we believe: then we append to its XFF and keep its Proto
    and Host; otherwise whatever the client claimed is replaced.
    ``client_cert`` is the listener's ``forward_client_cert`` mode and this
    connection's XFCC element (None: no client certificate): see ``_xfcc``.
    One pass costs a third of what a pass per rule did on a plain GET.
    """
    fields = headers.raw()
    kept = []
    named = None
    xff = proto = fhost = host = rid = None
    xfcc: list[bytes] = []  # incoming x-forwarded-client-cert values
    traces = 0  # traceparent fields seen: more than one makes the trace invalid
    parent = None
    state = False  # a tracestate is kept
    for f in fields:
        n = f[0]
        if n in _HOP_BY_HOP:
            if n == b"connection":
                named = _named(f[1]) if named is None else named | _named(f[1])
            continue
        if n in _FORWARDED:
            if trusted:
                if n == b"x-forwarded-for":
                    xff = xff or f[1]
                elif n == b"x-forwarded-proto":
                    proto = proto or f[1]
                else:
                    fhost = fhost or f[1]
            continue
        if n == b"host":
            host = host or f[1]
        elif n == b"x-request-id":
            rid = rid or f[1]
        elif n == b"traceparent":
            traces += 1
            parent = f
            continue  # put back by _trace, after the fields kept
        elif n == b"tracestate":
            state = True
        elif n == b"expect" and drop_expect:
            continue
        elif n == _XFCC:
            xfcc.append(f[1])
            continue
        kept.append(f)
    if named:  # as if the fields Connection names had never been sent
        kept = [f for f in kept if f[0] not in named]
        rid = None if b"x-request-id" in named else rid
        xff = None if b"x-forwarded-for" in named else xff
        proto = None if b"x-forwarded-proto" in named else proto
        fhost = None if b"x-forwarded-host" in named else fhost
        traces = 0 if b"traceparent" in named else traces
        xfcc = [] if _XFCC in named else xfcc
    if rid:
        request_id = rid.decode("latin-1")
    else:
        request_id = _new_request_id()
        kept.append((b"x-request-id", request_id.encode("ascii")))
    ip = client_ip.encode("ascii")
    kept.append((b"x-forwarded-for", xff + b", " + ip if xff else ip))
    kept.append((b"x-forwarded-proto", proto or scheme.encode("ascii")))
    if fhost or host:
        kept.append((b"x-forwarded-host", fhost or host))
    if xfcc or client_cert[1] is not None:
        value = _xfcc(client_cert[0], b",".join(xfcc), client_cert[1])
        if value:
            kept.append((_XFCC, value))
    trace_id = _trace(kept, parent if traces == 1 else None, state)
    fields[:] = kept
    return request_id, trace_id


def _xfcc(mode: str, incoming: bytes, element: bytes | None) -> bytes | None:
    """The x-forwarded-client-cert sent upstream, by Envoy's forward_client_cert modes:
    sanitize (the default) strips what came; always_forward_only keeps it; on a
    connection with a verified client certificate (``element``), forward_only keeps
    it, append_forward appends this connection's element, sanitize_set replaces it
    with the element; without one those three strip it (a plain client cannot
    claim a certificate it never showed)."""
    if mode == "always_forward_only":
        return incoming
    if element is None or mode == "sanitize":
        return None
    if mode == "forward_only":
        return incoming
    if mode == "append_forward" and incoming:
        return incoming + b"," + element
    return element  # sanitize_set, or append_forward to nothing


# W3C Trace Context (https://www.w3.org/TR/trace-context/). sluice records no
# spans, so it takes no part in a trace: a valid traceparent goes upstream
# unchanged (a new parent-id would name a span nobody reports, and the
# upstream's span would hang off a hole), and tracestate with it. An absent
# one is started, so the upstream's logs and sluice's access log share a
# trace id; it is sampled (flags 01) because an upstream tracing with the
# usual parent-based sampler would otherwise stop recording the moment
# sluice was put in front of it. An invalid one (or two of them, or one
# the Connection field names) is replaced as if absent, and its tracestate,
# which belongs to the trace that could not be read, goes with it.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?", re.DOTALL)
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16


def _trace(kept: list, parent: tuple[bytes, bytes] | None, state: bool) -> str:
    """Append the traceparent to forward to ``kept``; drop tracestate (when
    ``state``: there is one) from it when the trace is new; return the trace
    id (32 hex digits)."""
    if parent is not None:
        m = _TRACEPARENT.fullmatch(parent[1])
        # Version ff is invalid; 00 has nothing after the flags; a later
        # version may add fields after a dash, and is forwarded as sent.
        if (m is not None and m[1] != b"ff" and (m[4] is None or m[1] != b"00")
                and m[2] != _ZERO_TRACE and m[3] != _ZERO_PARENT):
            kept.append(parent)
            return m[2].decode("ascii")
    if state:
        kept[:] = [f for f in kept if f[0] != b"tracestate"]
    ids = "%048x" % random.getrandbits(192)  # as the request id: a correlation key, not a secret
    trace_id, parent_id = ids[:32], ids[32:]
    if trace_id == "0" * 32 or parent_id == "0" * 16:  # all-zero ids are invalid (odds 2**-64)
        return _trace(kept, None, False)
    kept.append((b"traceparent", f"00-{trace_id}-{parent_id}-01".encode("ascii")))
    return trace_id


# Fields a trailer section may not carry (RFC 9110 6.5.1): a recipient that
# merges trailers into the head would let them reframe, reroute or
# re-authenticate a message already checked. Framing fields never get here
# (a trailer section with one is refused, heads.py); the proxy's own
# forwarding fields are in the list so a trailer cannot spoof them.
_NOT_TRAILERS = frozenset(
    {
        # framing and routing
        b"content-length", b"transfer-encoding", b"host", b"trailer",
        # request modifiers: controls and conditionals
        b"cache-control", b"expect", b"max-forwards", b"pragma", b"range", b"te",
        b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"if-range",
        # authentication and state
        b"authorization", b"proxy-authorization", b"www-authenticate", b"proxy-authenticate",
        b"cookie", b"set-cookie",
        # response control data
        b"age", b"expires", b"date", b"location", b"retry-after", b"vary", b"warning",
        # how to process the content
        b"content-encoding", b"content-type", b"content-range",
        # connection-specific, and the proxy's own
        b"connection", b"keep-alive", b"proxy-connection", b"upgrade",
        b"via", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
        b"x-request-id",
    }
)


def strip_trailers(trailers: Headers) -> list[str]:
    """Remove the fields a trailer section may not carry; return their names."""
    fields = trailers.raw()
    dropped = [n.decode("latin-1") for n, _ in fields if n in _NOT_TRAILERS]
    if dropped:
        fields[:] = [f for f in fields if f[0] not in _NOT_TRAILERS]
    return dropped


# Upgrades (RFC 9110 7.8). Upgrade and Connection are hop-by-hop, so
# forward_request drops them like any other; a proposal the route allows is
# offered again, as this hop's own. h2c never is: an upstream that switched
# to it would read the connection's later requests as HTTP/2, past every
# rule sluice applies to HTTP/1.1 (h2c smuggling).
_NEVER_OFFERED = "h2c"


def _protocol_name(token: str) -> str:
    """``WebSocket`` -> ``websocket``, ``foo/2`` -> ``foo``: a token as routes name it."""
    return token.strip(" \t").partition("/")[0].lower()


def offer_upgrade(headers: Headers, offered: str, allowed: frozenset[str]) -> str | None:
    """Add ``Connection: upgrade`` and an ``Upgrade`` field with the tokens of
    ``offered`` (the client's Upgrade value) that ``allowed`` names, never
    h2c; return the value offered, or None (and add nothing) when no token is
    left: the request then goes as plain HTTP, as nginx sends it (curl offers
    h2c to every http:// URL and must still get its answer)."""
    kept = [t.strip(" \t") for t in offered.split(",")
            if (name := _protocol_name(t)) in allowed and name != _NEVER_OFFERED]
    if not kept:
        return None
    value = ", ".join(kept)
    headers.raw().extend(((b"connection", b"upgrade"), (b"upgrade", value.encode("latin-1"))))
    return value


def switched_protocol(headers: Headers, offered: str) -> str | None:
    """The protocol a 101's ``headers`` switch to (by name, lower-case) when it
    is one of those ``offered``, else None. Then, as for any response, the
    hop-by-hop fields go and this hop's ``Connection: upgrade`` and
    ``Upgrade`` (the upstream's value) are set."""
    value = headers.get_raw(b"upgrade")
    if value is None or b"," in value:
        return None
    name = _protocol_name(value.decode("latin-1"))
    if name not in {_protocol_name(t) for t in offered.split(",")}:
        return None
    strip_hop_by_hop(headers)
    headers.raw().extend(((b"connection", b"upgrade"), (b"upgrade", value)))
    return name


def set_host(headers: Headers, host: bytes) -> None:
    """Replace the Host field in place (where it was: h2 makes it :authority)."""
    fields = headers.raw()
    for i, (n, _) in enumerate(fields):
        if n == b"host":
            fields[i] = (b"host", host)
            fields[i + 1:] = [f for f in fields[i + 1:] if f[0] != b"host"]
            return
    fields.append((b"host", host))


def add_via(headers: Headers) -> None:
    """Append our hop to Via (one comma-joined field, as RFC 9110 7.6.3 allows)."""
    fields = headers.raw()
    for i, (n, v) in enumerate(fields):
        if n == b"via":
            fields[i] = (n, v + b", " + VIA)
            return
    fields.append((b"via", VIA))


def _new_request_id() -> str:
    # 128 random bits, like a UUID4's 122; from the fast PRNG because a
    # request id is a correlation key, not a secret.
    return "%032x" % random.getrandbits(128)
