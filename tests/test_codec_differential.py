"""The two HTTP/1.1 codecs take the same decisions and produce the same events.

A proxy whose parser accepts what the next hop reads differently is how
requests get smuggled; a proxy whose two codecs disagree is that proxy twice.
So the same bytes, cut at the same points, go to h11's codec and to
httptools', and what each makes of them is written down as a *trace*:

- ``("request", method, target, version, fields, has_body, content_length,
  expect_continue, peer_http_version, waiting_for_100_continue)`` for a
  request head; ``(kind, status, reason, fields, version)`` for a response's;
- ``("body", bytes)``: the body bytes since the last entry, concatenated
  (h11 and sluice's reader cut Body events at different places, which
  means nothing);
- ``("need data",)`` each time a codec has read all it can of a piece, so
  that both must refuse at the same byte, not merely in the end;
- ``("end", trailers, ...)``, then ``("reusable", reusable, has_buffered)``
  once a response is sent (the server then reads on if it may);
- ``("closed",)``, or ``("refused", status)`` for a ProtocolError.

The traces must be equal, except where ``KNOWN_DIFFERENCES`` says otherwise.

Inputs are a table of hand-picked cases, each with the decision it must get
(the known smuggling shapes first), fed whole and a byte at a time; and
messages from a grammar of valid ones (pipelined one to three deep), edited
at random (bytes flipped, inserted, deleted, lines doubled, case changed,
the stream cut short) and fed in random pieces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.messages import Headers, Request, Response
from sluice.protocol.events import (
    NEED_DATA,
    Body,
    End,
    Informational,
    ProtocolError,
    RequestHead,
    ResponseHead,
)
from sluice.protocol.http1 import select

H11 = select("h11")
FAST = select("httptools")
LIMITS = {"max_head_bytes": 512, "max_header_count": 12}


@dataclass(frozen=True)
class KnownDifference:
    """A divergence kept on purpose.

    ``applies(h11_trace, fast_trace)`` is true of exactly the traces it
    excuses; ``why`` says why a proxy can live with it. Two codecs refusing
    one input with different statuses is not such a difference.
    """

    name: str
    applies: Callable[[list, list], bool]
    why: str


# Every difference the codecs are allowed, in one place. There is none: each
# one the test found was a bug, fixed in ``sluice/protocol`` (the rules it
# changed are in the tables of ``heads.py``, and a case below pins each).
KNOWN_DIFFERENCES: list[KnownDifference] = []


def assert_same(h11_trace: list, fast_trace: list) -> None:
    if h11_trace == fast_trace or any(d.applies(h11_trace, fast_trace) for d in KNOWN_DIFFERENCES):
        return
    at = next(i for i, (a, b) in enumerate(zip([*h11_trace, None], [*fast_trace, None], strict=False)) if a != b)
    start = max(0, at - 2)
    raise AssertionError(
        f"codecs disagree from entry {at} on\n"
        f"  h11:       ...{h11_trace[start:at + 2]!r}\n  httptools: ...{fast_trace[start:at + 2]!r}"
    )


# -- driving a connection -------------------------------------------------------


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (taken modulo its length), then ``b""`` for EOF."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[i:j] for i, j in zip(bounds, bounds[1:], strict=False)] + [b""]


class _Trace(list):
    """Entries as comparable tuples; Body events merged until the next entry."""

    def __init__(self) -> None:
        super().__init__()
        self._body = bytearray()

    def body(self, data: bytes) -> None:
        self._body += data

    def add(self, *entry) -> None:
        if self._body:
            self.append(("body", bytes(self._body)))
            self._body.clear()
        self.append(entry)


def _trailers(end: End):
    return None if end.trailers is None else list(end.trailers.raw())


def _drive(conn, data: bytes, cuts, on_event) -> list:
    """Feed ``data`` in pieces, then EOF, tracing each event; ``on_event``
    traces the role's own events and says whether the trace is complete."""
    trace = _Trace()
    for piece in _pieces(data, cuts):
        conn.feed(piece)
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                trace.add("refused", exc.status)
                return trace
            if event is NEED_DATA:
                trace.add("need data")
                break
            if type(event) is Body:
                trace.body(event.data)
            elif on_event(trace, event):
                return trace
    trace.add("stuck")  # NEED_DATA after EOF: a codec would hang
    return trace


def server_trace(codec, data: bytes, cuts: list[int] = ()) -> list:
    """What a codec's ServerConnection makes of ``data`` fed in pieces, then EOF.

    After each request a ``200`` with an empty body is sent, and the next
    pipelined request is read only if the connection is ``reusable()``.
    """
    conn = codec.server(**LIMITS)

    def on_event(trace, event) -> bool:
        kind = type(event)
        if kind is RequestHead:
            r = event.request
            trace.add("request", r.method, r.target, r.http_version, list(r.headers.raw()),
                      event.has_body, event.content_length, event.expect_continue,
                      conn.peer_http_version, conn.waiting_for_100_continue)
            return False
        if kind is End:
            trace.add("end", _trailers(event), conn.waiting_for_100_continue)
            conn.respond(Response(200, Headers([(b"content-length", b"0")])))
            conn.end()
            trace.add("reusable", conn.reusable(), conn.has_buffered)
            if not conn.reusable():
                return True
            conn.next_cycle()
            return False
        trace.add(kind.__name__)  # Closed, or a codec broke the interface
        return True

    return _drive(conn, data, cuts, on_event)


def client_trace(codec, method: str, data: bytes, cuts: list[int] = ()) -> list:
    """What a codec's ClientConnection makes of a response to ``method /``."""
    conn = codec.client(**LIMITS)
    conn.request(Request(method, "/", Headers([(b"host", b"a.test")])), chunked=False)
    conn.end()

    def on_event(trace, event) -> bool:
        kind = type(event)
        if kind in (Informational, ResponseHead):
            r = event.response
            trace.add(kind.__name__, r.status, r.reason, list(r.headers.raw()), r.http_version)
            return False
        if kind is End:
            trace.add("end", _trailers(event))
            trace.add("reusable", conn.reusable(), conn.has_buffered)
        else:
            trace.add(kind.__name__)
        return True

    return _drive(conn, data, cuts, on_event)


def _every_byte(data: bytes) -> list[int]:
    return list(range(1, len(data)))


def outcome(trace: list):
    """The decision a trace ends in: the status refused with, or what was read
    (request targets, or response statuses)."""
    if trace[-1][0] == "refused":
        return trace[-1][1]
    return [e[2] if e[0] == "request" else e[1] for e in trace if e[0] in ("request", "Informational", "ResponseHead")]


# -- hand-picked cases ----------------------------------------------------------


def _request(*fields: bytes, start: bytes = b"POST / HTTP/1.1", body: bytes = b"") -> bytes:
    return start + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def _chunked(body: bytes, *fields: bytes) -> bytes:
    return _request(b"Host: a", b"Transfer-Encoding: chunked", *fields, body=body)


def _get(*fields: bytes, start: bytes = b"GET / HTTP/1.1") -> bytes:
    return _request(*fields, start=start)


def _case(case_id: str, raw: bytes, expected) -> pytest.param:
    return pytest.param(raw, expected, id=case_id)


_HEAD_ROOM = LIMITS["max_head_bytes"] - len(_get(b"Host: a", b"X: "))
# The start of a TLS ClientHello (record, handshake header, version, random, session id,
# cipher suites), as a client speaking TLS to a plain listener sends it.
_TLS_CLIENT_HELLO = (bytes.fromhex("16030102000100 01fc 0303") + bytes(32) + b"\x20" + bytes(32)
                     + bytes.fromhex("0024 1302 1303 1301 c02c c02b"))

REQUESTS = [
    # Content-Length against Transfer-Encoding, and Content-Length alone.
    _case("cl-then-te", _request(b"Host: a", b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    _case("te-then-cl", _request(b"Host: a", b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    _case("cl-twice-equal", _request(b"Host: a", b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    _case("cl-twice-different", _request(b"Host: a", b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400),
    _case("cl-list-equal", _request(b"Host: a", b"Content-Length: 5, 5", body=b"hello"), 400),
    _case("cl-list-no-space", _request(b"Host: a", b"Content-Length: 5,5", body=b"hello"), 400),
    _case("cl-plus", _request(b"Host: a", b"Content-Length: +5", body=b"hello"), 400),
    _case("cl-minus", _request(b"Host: a", b"Content-Length: -5", body=b"hello"), 400),
    _case("cl-hex", _request(b"Host: a", b"Content-Length: 0x5", body=b"hello"), 400),
    _case("cl-empty", _request(b"Host: a", b"Content-Length: ", body=b"hello"), 400),
    _case("cl-space-inside", _request(b"Host: a", b"Content-Length: 5 5", body=b"hello"), 400),
    _case("cl-space-before-colon", _request(b"Host: a", b"Content-Length : 5", body=b"hello"), 400),
    _case("cl-leading-zeros", _request(b"Host: a", b"Content-Length: 0005", body=b"hello"), ["/"]),
    _case("cl-20-digits", _request(b"Host: a", b"Content-Length: " + b"5".zfill(20), body=b"hello"), ["/"]),
    _case("cl-21-digits", _request(b"Host: a", b"Content-Length: " + b"5".zfill(21), body=b"hello"), 400),
    _case("cl-2**63", _request(b"Host: a", b"Content-Length: %d" % 2**63, body=b"hello"), 400),
    _case("cl-2**64+5", _request(b"Host: a", b"Content-Length: %d" % (2**64 + 5), body=b"hello"), 400),
    _case("cl-in-http/1.0", _request(b"Content-Length: 2", start=b"POST / HTTP/1.0", body=b"hi"), ["/"]),
    # Transfer-Encoding obfuscation.
    _case("te-chunked", _chunked(b"0\r\n\r\n"), ["/"]),
    _case("te-Chunked", _request(b"Host: a", b"Transfer-Encoding: Chunked", body=b"0\r\n\r\n"), ["/"]),
    _case("te-trailing-space", _request(b"Host: a", b"Transfer-Encoding: chunked ", body=b"0\r\n\r\n"), ["/"]),
    _case("te-tab-before", _request(b"Host: a", b"Transfer-Encoding:\tchunked", body=b"0\r\n\r\n"), ["/"]),
    _case("te-two-fields", _request(b"Host: a", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
    _case("te-chunked-twice", _request(b"Host: a", b"Transfer-Encoding: chunked, chunked"), 400),
    _case("te-xchunked", _request(b"Host: a", b"Transfer-Encoding: xchunked"), 400),
    _case("te-identity", _request(b"Host: a", b"Transfer-Encoding: identity"), 400),
    _case("te-chunked-then-identity", _request(b"Host: a", b"Transfer-Encoding: chunked, identity"), 400),
    _case("te-quoted", _request(b"Host: a", b'Transfer-Encoding: "chunked"'), 400),
    _case("te-parameter", _request(b"Host: a", b"Transfer-Encoding: chunked;q=1"), 400),
    _case("te-empty-member", _request(b"Host: a", b"Transfer-Encoding: , chunked"), 400),
    _case("te-empty", _request(b"Host: a", b"Transfer-Encoding: "), 400),
    _case("te-vertical-tab", _request(b"Host: a", b"Transfer-Encoding: chunked\x0b"), 400),
    _case("te-form-feed", _request(b"Host: a", b"Transfer-Encoding:\x0cchunked"), 400),
    _case("te-latin-1", _request(b"Host: a", b"Transfer-Encoding: \xe7hunked"), 400),
    _case("te-space-before-colon", _request(b"Host: a", b"Transfer-Encoding : chunked"), 400),
    _case("te-underscore", _request(b"Host: a", b"Transfer_Encoding: chunked", body=b"0\r\n\r\n"), 400),
    _case("te-gzip-chunked", _request(b"Host: a", b"Transfer-Encoding: gzip, chunked"), 501),
    _case("te-in-http/1.0", _request(b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0", body=b"0\r\n\r\n"), ["/"]),
    # Chunk-size lines.
    _case("chunk-extensions", _chunked(b"5;a=b;c\r\nhello\r\n0; q=\"x\"\r\n\r\n"), ["/"]),
    _case("chunk-size-leading-zeros", _chunked(b"0005\r\nhello\r\n0000\r\n\r\n"), ["/"]),
    _case("chunk-size-trailing-space", _chunked(b"5 \r\nhello\r\n0\r\n\r\n"), ["/"]),
    _case("chunk-size-space-before-ext", _chunked(b"5 ;a\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-size-overflow", _chunked(b"8000000000000000\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-size-2**64+5", _chunked(b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-size-21-digits", _chunked(b"5".zfill(21) + b"\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-size-negative", _chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-size-0x", _chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-size-empty", _chunked(b"\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-too-long-for-its-size", _chunked(b"3\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-too-short-for-its-size", _chunked(b"6\r\nhello\r\n0\r\n\r\n"), 400),
    _case("chunk-ext-nul", _chunked(b"5;a\x00\r\nhello\r\n0\r\n\r\n"), ["/"]),
    _case("last-chunk-missing", _chunked(b"5\r\nhello\r\n"), 400),
    # Bare LF and bare CR, in every place a line ends.
    _case("lf-request-line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    _case("lf-field-line", _get(b"Host: a\nX: y"), 400),
    _case("lf-head-end", b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    _case("lf-everywhere", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    _case("lf-chunk-size", _chunked(b"5\nhello\r\n0\r\n\r\n"), 400),
    _case("lf-after-chunk-data", _chunked(b"5\r\nhello\n0\r\n\r\n"), 400),
    _case("lf-last-chunk", _chunked(b"0\n\r\n"), 400),
    _case("lf-trailer-line", _chunked(b"0\r\nX: 1\nY: 2\r\n\r\n"), 400),
    _case("lf-trailer-end", _chunked(b"0\r\nX: 1\r\n\n"), 400),
    _case("lf-empty-trailers", _chunked(b"0\r\n\n"), 400),
    _case("cr-request-line", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    _case("cr-field-value", _get(b"Host: a", b"X: a\rb"), 400),
    _case("cr-field-end", _get(b"Host: a", b"X: a\r"), 400),
    _case("cr-chunk-size", _chunked(b"5\rhello\r\n0\r\n\r\n"), 400),
    _case("cr-chunk-extension", _chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n"), 400),
    _case("cr-after-chunk-data", _chunked(b"5\r\nhello\r0\r\n\r\n"), 400),
    _case("cr-trailer", _chunked(b"0\r\nX: a\rb\r\n\r\n"), 400),
    # Folding, control bytes.
    _case("obs-fold-space", _get(b"Host: a", b"X: a", b" b"), 400),
    _case("obs-fold-tab", _get(b"Host: a", b"X: a", b"\tb"), 400),
    _case("obs-fold-first-line", _get(b" Host: a"), 400),
    _case("obs-fold-trailer", _chunked(b"0\r\nX: a\r\n b\r\n\r\n"), 400),
    _case("nul-target", _get(b"Host: a", start=b"GET /\x00 HTTP/1.1"), 400),
    _case("nul-field-value", _get(b"Host: a", b"X: a\x00b"), 400),
    _case("del-field-value", _get(b"Host: a", b"X: a\x7fb"), 400),
    _case("del-trailer-value", _chunked(b"0\r\nX: \x7fa\r\n\r\n"), 400),
    _case("obs-text-field-value", _get(b"Host: a", b"X: caf\xe9"), ["/"]),
    # Trailers.
    _case("trailers", _chunked(b"3\r\nabc\r\n0\r\nX-Sum: 9\r\nExpires: 0\r\n\r\n"), ["/"]),
    _case("trailer-content-length", _chunked(b"0\r\nContent-Length: 5\r\n\r\n"), 400),
    _case("trailer-transfer-encoding", _chunked(b"0\r\nTransfer-Encoding: gzip\r\n\r\n"), 400),
    _case("trailer-without-colon", _chunked(b"0\r\nX\r\n\r\n"), 400),
    _case("trailer-space-before-colon", _chunked(b"0\r\nX : 1\r\n\r\n"), 400),
    _case("trailers-at-the-limit", _chunked(b"0\r\nX: " + b"a" * (LIMITS["max_head_bytes"] - 7) + b"\r\n\r\n"), ["/"]),
    _case("trailer-fields-over-the-count",
          _chunked(b"0\r\n" + b"X: y\r\n" * (LIMITS["max_header_count"] + 1) + b"\r\n"), 431),
    _case("trailer-fields-at-the-count",
          _chunked(b"0\r\n" + b"X: y\r\n" * LIMITS["max_header_count"] + b"\r\n"), ["/"]),
    _case("trailers-over-the-limit", _chunked(b"0\r\nX: " + b"a" * (LIMITS["max_head_bytes"] - 6) + b"\r\n\r\n"), 431),
    # Start lines.
    _case("http/0.9", b"GET /\r\n\r\n", 400),
    _case("http/1.2", _get(b"Host: a", start=b"GET / HTTP/1.2"), ["/"]),  # served as 1.1
    _case("http/2.0", _get(b"Host: a", start=b"GET / HTTP/2.0"), 505),
    _case("http/0.9-line", _get(b"Host: a", start=b"GET / HTTP/0.9"), 505),
    _case("http/1.0-keep-alive", 2 * _get(b"Connection: keep-alive", start=b"GET / HTTP/1.0"), ["/", "/"]),
    _case("http/1.0-closes", 2 * _get(start=b"GET / HTTP/1.0"), ["/"]),
    _case("http/1.0-keep-alive-and-close", 2 * _get(b"Connection: keep-alive, close", start=b"GET / HTTP/1.0"),
          ["/"]),
    _case("target-over-the-limit", _get(b"Host: a", start=b"GET /" + b"a" * LIMITS["max_head_bytes"] + b" HTTP/1.1"),
          414),
    _case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    _case("http/10.0", _get(b"Host: a", start=b"GET / HTTP/10.0"), 400),
    _case("version-lower-case", _get(b"Host: a", start=b"GET / http/1.1"), 400),
    _case("two-spaces", _get(b"Host: a", start=b"GET  / HTTP/1.1"), 400),
    _case("tab-separated", _get(b"Host: a", start=b"GET\t/ HTTP/1.1"), 400),
    _case("space-after-version", _get(b"Host: a", start=b"GET / HTTP/1.1 "), 400),
    _case("method-lower-case", _get(b"Host: a", start=b"get / HTTP/1.1"), ["/"]),
    _case("method-not-a-token", _get(b"Host: a", start=b"G(T / HTTP/1.1"), 400),
    _case("connect", _get(b"Host: a:443", start=b"CONNECT a:443 HTTP/1.1"), 501),
    _case("leading-empty-line", b"\r\n" + _get(b"Host: a"), ["/"]),  # RFC 9112 2.2
    _case("leading-empty-lines", b"\r\n\r\n" + _get(b"Host: a"), ["/"]),
    _case("leading-bare-lf", b"\n" + _get(b"Host: a"), 400),
    _case("empty-line-between-requests", _get(b"Host: a") + b"\r\n" + _get(b"Host: a"), ["/", "/"]),
    # Targets and Host.
    _case("absolute-form", _get(b"Host: ignored", start=b"GET http://a.test:8080/p?q HTTP/1.1"), ["/p?q"]),
    _case("absolute-form-no-path", _get(b"Host: a", start=b"GET https://a.test HTTP/1.1"), ["/"]),
    _case("absolute-form-without-host", _get(start=b"GET http://a.test/ HTTP/1.1"), 400),
    _case("absolute-form-userinfo", _get(b"Host: a", start=b"GET http://u@a.test/ HTTP/1.1"), 400),
    _case("absolute-form-ftp", _get(b"Host: a", start=b"GET ftp://a.test/ HTTP/1.1"), 400),
    _case("authority-form", _get(b"Host: a", start=b"GET a.test:80 HTTP/1.1"), 400),
    _case("asterisk", _get(b"Host: a", start=b"OPTIONS * HTTP/1.1"), ["*"]),
    _case("dot-segments", _get(b"Host: a", start=b"GET /public/%2e%2E/admin/./x HTTP/1.1"), ["/admin/x"]),
    _case("no-host-http/1.1", _get(), 400),
    _case("no-host-http/1.0", _get(start=b"GET / HTTP/1.0"), ["/"]),
    _case("two-hosts", _get(b"Host: a", b"Host: b"), 400),
    _case("two-hosts-http/1.0", _get(b"Host: a", b"Host: a", start=b"GET / HTTP/1.0"), 400),
    _case("no-host-and-connect", _get(start=b"CONNECT a:443 HTTP/1.1"), 400),
    # Limits: the Host rule is checked before the count.
    _case("head-at-the-limit", _get(b"Host: a", b"X: " + b"a" * _HEAD_ROOM), ["/"]),
    _case("head-over-the-limit", _get(b"Host: a", b"X: " + b"a" * (_HEAD_ROOM + 1)), 431),
    _case("head-over-the-limit-unfinished", b"GET / HTTP/1.1\r\nX: " + b"a" * LIMITS["max_head_bytes"], 431),
    _case("fields-at-the-limit", _get(b"Host: a", *[b"X: y"] * (LIMITS["max_header_count"] - 1)), ["/"]),
    _case("fields-over-the-limit", _get(b"Host: a", *[b"X: y"] * LIMITS["max_header_count"]), 431),
    _case("fields-over-the-limit-no-host", _get(*[b"X: y"] * (LIMITS["max_header_count"] + 1)), 400),
    # Pipelining.
    _case("pipelined-after-chunked-with-trailers",
          _chunked(b"3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n") + _get(b"Host: a", start=b"GET /2 HTTP/1.1"), ["/", "/2"]),
    _case("pipelined-after-length",
          _request(b"Host: a", b"Content-Length: 3", body=b"abc") + _get(b"Host: a", start=b"GET /2 HTTP/1.1"), ["/", "/2"]),
    _case("pipelined-three",
          _get(b"Host: a") + _chunked(b"0\r\n\r\n") + _get(b"Host: a", start=b"HEAD /3 HTTP/1.1"), ["/", "/", "/3"]),
    _case("pipelined-after-close", _get(b"Host: a", b"Connection: close") + _get(b"Host: a", start=b"GET /2 HTTP/1.1"), ["/"]),
    _case("pipelined-after-http/1.0", _get(start=b"GET / HTTP/1.0") + _get(b"Host: a", start=b"GET /2 HTTP/1.1"), ["/"]),
    _case("pipelined-bad-second", _get(b"Host: a") + b"GET /2 HTTP/1.1\nHost: a\n\n", 400),
    _case("smuggled-in-a-body", _request(b"Host: a", b"Content-Length: 32", body=_get(b"Host: a", start=b"GET /admin HTTP/1.1")), ["/"]),
    # The security review's inputs not already above (conformance/README.md has them all,
    # side by side with nginx); what the proxy then does with them is the conformance
    # suite's to check, and both codecs must first read them alike.
    _case("review-connection-host", _get(b"Host: a", b"Connection: host"), ["/"]),
    _case("review-connection-keep-alive-host", _get(b"Host: a", b"Connection: keep-alive, Host"), ["/"]),
    _case("review-cl-0010", _request(b"Host: a", b"Content-Length: 0010", body=b"0123456789"), ["/"]),
    _case("review-lf-only-chunk-lines", _chunked(b"5\nhello\n0\n\n"), 400),
    _case("review-chunk-size-26-digits", _chunked(b"5".zfill(26) + b"\r\nhello\r\n0\r\n\r\n"), 400),
    _case("review-trailer-host", _chunked(b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\nHost: evil.test\r\n\r\n"), ["/"]),
    _case("review-trailer-authorization",
          _chunked(b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\nAuthorization: Basic Zm9vOmJhcg==\r\n\r\n"), ["/"]),
    _case("review-3001-trailer-fields",
          _chunked(b"5\r\nhello\r\n0\r\n" + b"".join(b"X-Trailer-%04d: %s\r\n" % (i, b"v" * 16) for i in range(3001))
                   + b"\r\n"), 431),
    _case("review-tls-client-hello", _TLS_CLIENT_HELLO, 400),
]


@pytest.mark.parametrize(("raw", "expected"), REQUESTS)
def test_hand_picked_requests_get_one_decision(raw, expected):
    """``expected``: the status of the refusal, or the targets read."""
    for cuts in ([], _every_byte(raw)):
        h11_trace = server_trace(H11, raw, cuts)
        assert_same(h11_trace, server_trace(FAST, raw, cuts))
        assert outcome(h11_trace) == expected


@pytest.mark.parametrize(
    ("raw", "waiting"),
    [
        (_get(b"Host: a", b"Expect: 100-continue"), True),
        (_get(b"Host: a", b"Expect: 100-Continue"), True),
        (_get(b"Host: a", b"Expect:  100-continue "), True),
        (_get(b"Host: a", b"Expect: 100-continue, x"), True),
        (_get(b"Host: a", b"Expect: x", b"Expect: 100-continue"), True),
        (_get(b"Host: a", b"Expect: 100-continuex"), False),
        (_get(b"Host: a", b"Expect: 200-ok"), False),
        (_get(b"Expect: 100-continue", start=b"GET / HTTP/1.0"), False),
    ],
)
def test_expect_100_continue_is_read_alike(raw, waiting):
    """Expect is a list (h11 reads it so); an HTTP/1.0 client never waits; and
    once the request is read (End), nobody is waiting any more."""
    for codec in (H11, FAST):
        trace = server_trace(codec, raw)
        assert trace[0][7] is waiting and trace[0][9] is waiting  # expect_continue, waiting_for_100_continue
        assert trace[1] == ("end", None, False)
    assert_same(server_trace(H11, raw), server_trace(FAST, raw))


def test_framing_fields_are_forwarded_canonical():
    for codec in (H11, FAST):
        length = server_trace(codec, _request(b"Host: a", b"Content-Length: 0005", body=b"hello"))
        chunked = server_trace(codec, _request(b"Host: a", b"Transfer-Encoding:  Chunked ", body=b"0\r\n\r\n"))
        assert length[0][4] == [(b"host", b"a"), (b"content-length", b"5")]
        assert chunked[0][4] == [(b"host", b"a"), (b"transfer-encoding", b"chunked")]


def _response(status_line: bytes, *fields: bytes, body: bytes = b"") -> bytes:
    return _request(*fields, start=status_line, body=body)


RESPONSES = [
    _case("length", _response(b"HTTP/1.1 200 OK", b"Content-Length: 2", body=b"ok"), [200]),
    _case("chunked-with-trailers", _response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                             body=b"2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n"), [200]),
    _case("until-close", _response(b"HTTP/1.1 200 OK", body=b"all of it"), [200]),
    _case("http/1.0", _response(b"HTTP/1.0 200 OK", body=b"all of it"), [200]),
    _case("no-reason", _response(b"HTTP/1.1 200", b"Content-Length: 0"), [200]),
    _case("empty-reason", _response(b"HTTP/1.1 200 ", b"Content-Length: 0"), [200]),
    _case("informational-with-length", _response(b"HTTP/1.1 103 Early Hints", b"Content-Length: 00")
          + _response(b"HTTP/1.1 200 OK", b"Content-Length: 0"), [103, 200]),
    _case("informational-first", _response(b"HTTP/1.1 103 Early Hints", b"Link: </a>")
          + _response(b"HTTP/1.1 100 Continue") + _response(b"HTTP/1.1 200 OK", b"Content-Length: 0"), [103, 100, 200]),
    _case("204-with-bytes-after", _response(b"HTTP/1.1 204 No Content", b"Content-Length: 5", body=b"hello"), [204]),
    _case("304-chunked", _response(b"HTTP/1.1 304 Not Modified", b"Transfer-Encoding: chunked"), [304]),
    _case("101-unasked", _response(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: h2c"), 400),
    _case("http/1.2", _response(b"HTTP/1.2 200 OK", b"Content-Length: 0"), 400),
    _case("http/0.9-status", _response(b"HTTP/0.9 200 OK", b"Content-Length: 0"), 400),
    _case("http/2.0", _response(b"HTTP/2.0 200 OK", b"Content-Length: 0"), 400),
    _case("status-099", _response(b"HTTP/1.1 099 Odd", b"Content-Length: 0"), 400),
    _case("status-two-digits", _response(b"HTTP/1.1 20 OK", b"Content-Length: 0"), 400),
    _case("no-status-line", b"Content-Length: 0\r\n\r\n", 400),
    _case("cl-and-te", _response(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Transfer-Encoding: chunked",
                                 body=b"0\r\n\r\n"), 400),
    _case("cl-twice", _response(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Length: 2", body=b"ok"), 400),
    _case("cl-list", _response(b"HTTP/1.1 200 OK", b"Content-Length: 2, 2", body=b"ok"), 400),
    _case("te-gzip-chunked", _response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked"), 501),
    _case("te-gzip", _response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip", body=b"x"), 400),
    _case("chunk-size-overflow", _response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                           body=b"8000000000000000\r\nok\r\n"), {"GET": 400, "HEAD": [200]}),
    _case("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", 400),
    _case("obs-fold", _response(b"HTTP/1.1 200 OK", b"X: a", b" b", b"Content-Length: 0"), 400),
    _case("fields-over-the-limit", _response(b"HTTP/1.1 200 OK", *[b"X: y"] * (LIMITS["max_header_count"] + 1)), 400),
    _case("closed-in-head", b"HTTP/1.1 200 OK\r\nContent-Le", 400),
    _case("closed-before-anything", b"", 400),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("raw", "expected"), RESPONSES)
def test_hand_picked_responses_get_one_decision(raw, expected, method):
    """``expected``: the status of the refusal, or the statuses read (by
    method where a response to HEAD has no body to get wrong)."""
    if isinstance(expected, dict):
        expected = expected[method]
    for cuts in ([], _every_byte(raw)):
        h11_trace = client_trace(H11, method, raw, cuts)
        assert_same(h11_trace, client_trace(FAST, method, raw, cuts))
        assert outcome(h11_trace) == expected


# -- the grammar of valid messages ----------------------------------------------
# Hypothesis pays per draw, so the small choices of a message (which extra
# fields, their spelling, how the body is chunked) are bits of one integer,
# its *recipe*, read a few at a time. This keeps thousands of examples inside
# seconds. Recipes are drawn as bytes, whose bits come out evenly (integers
# come out mostly small), and shrink to zeros: 0 is the plainest message.

CRLF = b"\r\n"
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"M-SEARCH", b"get"]
TARGETS = [
    b"/", b"/a/b?c=d&e", b"/public/../admin", b"/a/./b/", b"/%2e%2E/x", b"/x%2Fy", b"/~u/%41",
    b"http://h.test/p?q", b"https://h.test:8443", b"HTTP://H.test/", b"*", b"/a;b=c",
]
HOSTS = [None, b"a.test", b"a.test:8080", b"[::1]:80"]
FIELDS = [
    (b"User-Agent", b"curl/8.0"),
    (b"Accept", b"*/*"),
    (b"X-Empty", b""),
    (b"X-Tab", b"a\tb"),
    (b"X-Latin", b"caf\xe9"),
    (b"X-Spaces", b"  padded  "),
    (b"Connection", b"close"),
    (b"Connection", b"keep-alive"),
    (b"Connection", b"Keep-Alive, Upgrade"),
    (b"Connection", b"x-a, CLOSE"),
    (b"Expect", b"100-continue"),
    (b"Expect", b"100-Continue"),
    (b"Expect", b"100-continue, x"),
    (b"Cookie", b"a=b; c=d"),
    (b"X-Content-Length", b"3"),
    (b"X-Transfer-Encoding", b"gzip"),
    (b"Upgrade", b"websocket"),
]
TRAILERS = [(b"X-Sum", b"9"), (b"Expires", b"0"), (b"X-Empty", b""), (b"Server-Timing", b"a;dur=1")]
SPELLINGS = [bytes, bytes.lower, bytes.upper, bytes.swapcase]
COLONS = [b": ", b":", b":\t", b":  "]
SIZE_FORMS = [b"%x", b"%X", b"0%x", b"%x"]
EXTENSIONS = [b"", b";a=b", b";x", b'; q="v, w"', b"  ", b";", b"", b""]
STATUSES = [200, 200, 201, 204, 304, 404, 500, 599]
REASONS = [b" OK", b" ", b"", b" Custom reason \xe9", b" Not\tFound"]
STRAYS = [b"HTTP/1.1 200 OK\r\n\r\n", b"x", b"\r\n"]


class _Bits:
    """A recipe read a few bits at a time (never exhausted: zeros after the end)."""

    def __init__(self, recipe: int) -> None:
        self.recipe = recipe

    def take(self, n: int) -> int:
        value = self.recipe & ((1 << n) - 1)
        self.recipe >>= n
        return value

    def pick(self, options: list, n: int):
        """One of ``options`` (indexed by ``n`` bits, modulo); the first for 0."""
        return options[self.take(n) % len(options)]


def _chunked(bits: _Bits, payload: bytes) -> bytes:
    """``payload`` in up to four chunks, spelt variously, then zero to two trailers."""
    out = []
    while payload:
        size = bits.take(4) or len(payload)
        piece, payload = payload[:size], payload[size:]
        out.append(bits.pick(SIZE_FORMS, 2) % len(piece) + bits.pick(EXTENSIONS, 3) + CRLF + piece + CRLF)
    out.append(bits.pick(SIZE_FORMS, 2) % 0 + bits.pick(EXTENSIONS, 3) + CRLF)
    for _ in range(2):
        if index := bits.take(3):
            n, v = TRAILERS[(index - 1) % len(TRAILERS)]
            out.append(n + b": " + v + CRLF)
    return b"".join(out) + CRLF


def _message(start_line: bytes, fields: list, framing: str, payload: bytes, recipe: int) -> bytes:
    """A head of ``fields`` plus up to four more, framed as asked, spelt by ``recipe``."""
    bits = _Bits(recipe)
    fields = list(fields)
    for _ in range(4):
        if index := bits.take(5):  # about half of the slots hold a field
            if index <= len(FIELDS):
                fields.append(FIELDS[index - 1])
    if bits.take(4) == 0:  # now and then, a head near the size limit
        fields.append((b"X-Big", b"b" * (300 + bits.take(8))))
    body = b""
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(payload)))
        body = payload
    elif framing == "chunked":
        fields.append((b"Transfer-Encoding", bits.pick([b"chunked", b"Chunked"], 1)))
        body = _chunked(bits, payload)
    if bits.take(1):
        random.Random(recipe).shuffle(fields)
    head = [start_line]
    for n, v in fields:
        head.append(bits.pick(SPELLINGS, 2)(n) + bits.pick(COLONS, 2) + v + CRLF)
    return b"".join(head) + CRLF + body


def _bits(n: int):
    return st.binary(min_size=n // 8, max_size=n // 8).map(lambda b: int.from_bytes(b, "little"))


_recipe = _bits(128)
_framing = st.sampled_from(["none", "length", "chunked"])
_payload = st.binary(max_size=40)
_request_line = st.tuples(st.sampled_from(METHODS), st.sampled_from(TARGETS),
                          st.sampled_from([b"1.1", b"1.1", b"1.0"]), st.sampled_from(HOSTS))


@st.composite
def requests(draw) -> bytes:
    """One request, valid in grammar (a rule may still refuse it)."""
    method, target, version, host = draw(_request_line)
    if host is None and version == b"1.1":
        host = b"a.test"
    start_line = method + b" " + target + b" HTTP/" + version + CRLF
    return _message(start_line, [(b"Host", host)] if host else [], draw(_framing), draw(_payload), draw(_recipe))


@st.composite
def responses(draw) -> bytes:
    """Zero to two 1xx heads, a final response, and now and then stray bytes after it."""
    bits = _Bits(draw(_recipe))
    out = []
    for _ in range(bits.take(2) % 3):
        status = bits.pick([100, 103, 101], 2)
        framing = bits.pick(["none", "length"], 1)  # "Content-Length: 0", which a 1xx may carry
        out.append(_message(b"HTTP/1.1 %d Info\r\n" % status, [], framing, b"", bits.take(32)))
    status_line = (b"HTTP/" + bits.pick([b"1.1", b"1.1", b"1.0"], 2) + b" %d" % bits.pick(STATUSES, 3)
                   + bits.pick(REASONS, 3) + CRLF)
    out.append(_message(status_line, [], draw(_framing), draw(_payload), draw(_recipe)))
    if bits.take(3) == 1:
        out.append(bits.pick(STRAYS, 2))
    return b"".join(out)


def pipelined(messages, most: int = 3):
    return st.lists(messages, min_size=1, max_size=most).map(b"".join)


# -- mutations ------------------------------------------------------------------

INSERTS = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b"\x01", b"\x0b", b"\x7f", b"\x80", b",",
           b":", b";", b"0", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n"]
MUTATIONS = ["insert", "flip", "insert", "duplicate", "delete", "case", "truncate", "insert"]
FLIPS = [0x01, 0x20, 0x80, 0xff]
_edits = st.lists(_bits(40), max_size=3)


def _edit(data: bytearray, edit: int) -> bytearray:
    """One edit, its kind, place and argument packed in ``edit``."""
    bits = _Bits(edit)
    kind = bits.pick(MUTATIONS, 3)
    at = bits.take(16) % (len(data) + 1)
    if kind == "flip" and at < len(data):
        data[at] ^= bits.pick(FLIPS, 2)
    elif kind == "insert":
        data[at:at] = bits.pick(INSERTS, 5)
    elif kind == "duplicate":  # the line containing ``at``
        start = data.rfind(CRLF, 0, at) + 2 if data.rfind(CRLF, 0, at) >= 0 else 0
        stop = data.find(CRLF, at)
        stop = len(data) if stop < 0 else stop + 2
        data[start:start] = data[start:stop]
    elif kind == "delete":
        del data[at:at + 1 + bits.take(4)]
    elif kind == "case":
        data[at:at + 16] = bytes(data[at:at + 16]).swapcase()
    elif kind == "truncate":
        del data[at:]
    return data


@st.composite
def mutated(draw, messages) -> bytes:
    """``messages`` with up to three random edits."""
    data = bytearray(draw(messages))
    for edit in draw(_edits):
        data = _edit(data, edit)
    return bytes(data)


# Up to three cut points, 16 bits each, modulo the stream's length.
_cuts = _bits(56).map(lambda c: [c >> s & 0xFFFF for s in (8, 24, 40)][:c & 3])


# 3000 examples a side take about 5 s each on one core: the whole file stays
# well under 30 s, and no health check fires.
EXAMPLES = settings(max_examples=3000, deadline=None)


@EXAMPLES
@given(data=mutated(pipelined(requests())), cuts=_cuts)
def test_server_side_codecs_agree(data, cuts):
    assert_same(server_trace(H11, data, cuts), server_trace(FAST, data, cuts))


@EXAMPLES
@given(method=st.sampled_from(["GET", "HEAD"]), data=mutated(responses()), cuts=_cuts)
def test_client_side_codecs_agree(method, data, cuts):
    assert_same(client_trace(H11, method, data, cuts), client_trace(FAST, method, data, cuts))


# -- protocol upgrades ----------------------------------------------------------
# A proposal (heads.py's upgrade table) is read alike; a server that switches
# writes the same 101 and hands back the same tunnel bytes, however the
# bytes were cut; a client takes a 101 only after proposing, alike.

_SWITCH = Response(101, Headers([(b"connection", b"upgrade"), (b"upgrade", b"websocket")]))


def upgrade_trace(codec, data: bytes, cuts: list[int], switch: bool) -> list:
    """Read the first request; then switch (and trace the tunnel's bytes) or
    answer plainly (and trace the next request)."""
    conn = codec.server(**LIMITS)
    trace = _Trace()
    pieces = _pieces(data, cuts)[:-1]  # a tunnel's peer has not closed
    while pieces:
        conn.feed(pieces.pop(0))
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                if type(event) is RequestHead:
                    trace.add("request", event.request.target, conn.upgrade)
                elif type(event) is End:
                    break
            else:
                continue
        except ProtocolError as exc:
            trace.add("refused", exc.status)
            return trace
        break
    else:
        trace.add("incomplete")
        return trace
    if switch and conn.upgrade is not None:
        trace.add("switched", conn.switch(_SWITCH), conn.response_started)
        for piece in pieces:
            conn.feed(piece)
        trace.add("tunnel", conn.take_buffered(), conn.next_event() is NEED_DATA, conn.reusable())
        return trace
    conn.respond(Response(200, Headers([(b"content-length", b"0")])))
    conn.end()
    trace.add("reusable", conn.reusable())
    for piece in pieces:
        conn.feed(piece)
    if conn.reusable():
        conn.next_cycle()
        try:
            event = conn.next_event()
        except ProtocolError as exc:
            trace.add("next refused", exc.status)
        else:
            trace.add("next", event.request.target if type(event) is RequestHead else repr(event))
    return trace


_WS = b"Upgrade: websocket"
UPGRADES = [
    _case("websocket", _get(b"Host: a", b"Connection: Upgrade", _WS), b"websocket"),
    _case("keep-alive-and-upgrade", _get(b"Host: a", b"Connection: keep-alive, Upgrade", _WS), b"websocket"),
    _case("connection-twice", _get(b"Host: a", b"Connection: keep-alive", b"connection: UPGRADE", _WS),
          b"websocket"),
    _case("two-upgrade-fields", _get(b"Host: a", b"Connection: upgrade", b"Upgrade: foo/1", _WS),
          b"foo/1, websocket"),
    _case("h2c", _get(b"Host: a", b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                      b"HTTP2-Settings: AAMAAABkAAQAAP__"), b"h2c"),
    _case("no-connection-option", _get(b"Host: a", b"Connection: keep-alive", _WS), None),
    _case("connection-upgrades", _get(b"Host: a", b"Connection: upgrades", _WS), None),
    _case("http/1.0", _get(b"Host: a", b"Connection: upgrade", _WS, start=b"GET / HTTP/1.0"), None),
    _case("with-a-body", _request(b"Host: a", b"Connection: upgrade", _WS, b"Content-Length: 2", body=b"hi"),
          None),
    _case("chunked-body", _request(b"Host: a", b"Connection: upgrade", _WS, b"Transfer-Encoding: chunked")
          + b"0\r\n\r\n", None),
    _case("empty-body", _request(b"Host: a", b"Connection: upgrade", _WS, b"Content-Length: 0"), b"websocket"),
]


@pytest.mark.parametrize("switch", [True, False])
@pytest.mark.parametrize(("raw", "expected"), UPGRADES)
def test_upgrade_proposals_are_read_and_switched_alike(raw, expected, switch):
    data = raw + b"\x81\x05hello" if switch else raw + _get(b"Host: a", start=b"GET /next HTTP/1.1")
    for cuts in ([], _every_byte(data)):
        h11_trace = upgrade_trace(H11, data, cuts, switch)
        assert_same(h11_trace, upgrade_trace(FAST, data, cuts, switch))
        assert h11_trace[0][2] == expected


def upgrade_client_trace(codec, proposed: bool, data: bytes, cuts: list[int]) -> list:
    conn = codec.client(**LIMITS)
    fields = [(b"host", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    conn.request(Request("GET", "/", Headers(fields if proposed else fields[:1])), chunked=False)
    conn.end()

    def on_event(trace, event) -> bool:
        if type(event) in (Informational, ResponseHead):
            trace.add(type(event).__name__, event.response.status)
            if event.response.status == 101:
                trace.add("tunnel", conn.take_buffered(), conn.reusable())
                return True
            return False
        trace.add(type(event).__name__)
        return True

    return _drive(conn, data, cuts, on_event)


_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize("proposed", [True, False])
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_101, id="101"),
        pytest.param(_101 + b"\x81\x02hi", id="101-and-frame"),
        pytest.param(_response(b"HTTP/1.1 103 Early Hints", b"Link: </a>") + _101 + b"x", id="103-then-101"),
        pytest.param(_response(b"HTTP/1.1 426 Upgrade Required", b"Content-Length: 2", body=b"no"), id="426"),
    ],
)
def test_upgrade_answers_are_read_alike(proposed, data):
    for cuts in ([], _every_byte(data)):
        h11_trace = upgrade_client_trace(H11, proposed, data, cuts)
        assert_same(h11_trace, upgrade_client_trace(FAST, proposed, data, cuts))
        if b" 101 " in data:
            assert (h11_trace[-1][0] == "refused") is not proposed
