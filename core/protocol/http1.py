"""HTTP/1.1 over h11, both roles, with the checks h11 leaves to us. No I/O.

h11 parses and frames; it is deliberately lenient where a proxy must not be,
because a proxy that accepts what the next hop reads differently is how
requests get smuggled. Every message head therefore passes through our own
scan *before* h11 sees it, and is rejected when:

====================================================  ======  =============
what the head contains                                status  why
====================================================  ======  =============
a bare LF (a line ending without CR)                  400     RFC 9112 2.2
a bare CR not followed by LF                          400     RFC 9112 2.2
a line starting with SP or HTAB (obs-fold)            400     RFC 9112 5.2
Transfer-Encoding together with Content-Length        400     RFC 9112 6.1
more than one Transfer-Encoding field                 400     ambiguity
Transfer-Encoding whose last coding is not chunked    400     RFC 9112 6.3
a Transfer-Encoding value that is not a token list    400     obfuscation
well-formed codings before chunked (gzip, chunked)    501     not supported
more bytes than ``max_head_bytes``                    431     limit
more fields than ``max_header_count``                 431     limit
====================================================  ======  =============

h11 itself rejects conflicting Content-Length values, bad chunk sizes and
malformed lines (400). Each cycle (one request and its response) gets a fresh
``h11.Connection``: bytes left after a message go back through our scan
instead of straight into h11's parser.
"""

from __future__ import annotations

import re

import h11

from ..messages import Headers, Request, Response
from .events import (
    NEED_DATA,
    Body,
    Closed,
    End,
    Informational,
    ProtocolError,
    RequestHead,
    ResponseHead,
)

__all__ = ["ClientConnection", "ServerConnection", "normalize_path", "simple_response"]

_HEAD_END = b"\r\n\r\n"
# A bare CR, a bare LF, or a continuation line (obs-fold). A CR as the very
# last byte is not matched: its LF may still be in flight.
_BAD_LINE = re.compile(rb"\r[^\n]|(?<!\r)\n|\n[ \t]")
# h11 accepts chunk sizes of up to 20 hex digits; anything past 63 bits is
# an overflow attack on whoever parses it next.
_MAX_CHUNK = 2**63
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KNOWN_CODINGS = {b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"}

# A slack for h11's own size limit: we only hand it whole heads we measured,
# so its limit only guards chunk-size and trailer lines.
_H11_MAX_EVENT = 64 * 1024

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
    413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "")


def simple_response(
    status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] = (), close: bool = True
) -> bytes:
    """Serialise a complete response outside of any h11 cycle.

    Used to answer a head that never became a request (h11 has not seen it),
    so the connection is closed afterwards by default.
    """
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}".encode()]
    lines += [n + b": " + v for n, v in headers]
    lines.append(b"content-length: %d" % len(body))
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + _HEAD_END + body


def _check_framing(head: bytes) -> None:
    """Reject ambiguous Transfer-Encoding / Content-Length combinations."""
    if b"transfer-encoding" not in head.lower():
        return
    te_values: list[bytes] = []
    has_cl = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lname = name.lower()
        if lname == b"transfer-encoding":
            te_values.append(value.strip(b" \t"))
        elif lname == b"content-length":
            has_cl = True
        elif lname.strip(b" \t") == b"transfer-encoding":
            raise ProtocolError("whitespace around a Transfer-Encoding field name")
    if not te_values:
        return
    if has_cl:
        raise ProtocolError("Content-Length together with Transfer-Encoding")
    if len(te_values) > 1:
        raise ProtocolError("more than one Transfer-Encoding field")
    value = te_values[0].lower()
    if value == b"chunked":
        return
    codings = [c.strip(b" \t") for c in value.split(b",")]
    well_formed = all(_TOKEN.fullmatch(c) for c in codings)
    if (
        well_formed
        and codings[-1] == b"chunked"
        and codings.count(b"chunked") == 1
        and all(c in _KNOWN_CODINGS for c in codings[:-1])
    ):
        raise ProtocolError("transfer codings other than chunked are not supported", 501)
    raise ProtocolError("malformed Transfer-Encoding")


class _Peer:
    """What both roles share: head scanning, h11 cycles, event translation."""

    _role: type[h11.Sentinel]
    # The peer's h11 states in which its next bytes are not part of the
    # current message: a head to scan, or (once DONE) the next cycle's bytes.
    _HEAD_STATES = (h11.IDLE, h11.SEND_RESPONSE)
    _AFTER_STATES = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def __init__(self, *, max_head_bytes: int, max_header_count: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_header_count = max_header_count
        self._h11: h11.Connection | None = None
        self._buf = bytearray()  # bytes not yet handed to h11
        self._eof = False
        self._eof_fed = False  # h11 of this cycle has been told of the close

    # -- input ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give bytes received from the peer; ``b""`` means it closed."""
        if not data:
            self._eof = True
        if self._buffering():
            self._buf += data
        else:
            self._h11.receive_data(data)
            self._eof_fed = not data

    @property
    def has_buffered(self) -> bool:
        """Bytes of a next message are already here (pipelining)."""
        return bool(self._buf)

    def _buffering(self) -> bool:
        """Bytes go to our buffer (a head to scan, or the next cycle's)."""
        c = self._h11
        return c is None or c.their_state in self._HEAD_STATES or c.their_state in self._AFTER_STATES

    def _take_head(self) -> bytes | None:
        """Split one scanned head off the buffer, or None if incomplete."""
        buf = self._buf
        idx = buf.find(_HEAD_END)
        if idx < 0:
            if len(buf) > self.max_head_bytes:
                raise ProtocolError("message head too large", 431)
            # A bare LF means the head would never end in CRLF CRLF: fail now,
            # not at the header-read timeout.
            if _BAD_LINE.search(buf):
                raise ProtocolError("bare CR or LF, or obs-fold, in message head")
            return None
        end = idx + 4
        if end > self.max_head_bytes:
            raise ProtocolError("message head too large", 431)
        head = bytes(buf[:end])
        del buf[:end]
        # h11 tolerates empty lines before a request line; so do we, but
        # they must still be CRLF.
        if _BAD_LINE.search(head):
            raise ProtocolError("bare CR or LF, or obs-fold, in message head")
        _check_framing(head)
        return head

    def _new_cycle(self) -> h11.Connection:
        self._h11 = h11.Connection(self._role, max_incomplete_event_size=_H11_MAX_EVENT)
        return self._h11

    def next_event(self):
        """The next event, ``NEED_DATA``, or raises ``ProtocolError``."""
        conn = self._h11
        if conn is not None and conn.their_state in self._AFTER_STATES:
            return NEED_DATA  # the caller must start the next cycle first
        if conn is None or conn.their_state in self._HEAD_STATES:
            head = self._take_head()
            if head is None:
                if self._eof:
                    if self._buf:
                        raise ProtocolError("connection closed inside a message head")
                    return self._closed_at_boundary()
                return NEED_DATA
            if conn is None:
                conn = self._new_cycle()
            conn.receive_data(head)
        elif self._buf or (self._eof and not self._eof_fed):
            if self._buf:
                conn.receive_data(bytes(self._buf))
                self._buf.clear()
            if self._eof:
                conn.receive_data(b"")
                self._eof_fed = True
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(str(exc), exc.error_status_hint) from None
        # h11 keeps the current chunk's size private; read it defensively.
        if getattr(getattr(conn, "_reader", None), "_bytes_in_chunk", 0) >= _MAX_CHUNK:
            raise ProtocolError("chunk size too large")
        return self._translate(event)

    def _closed_at_boundary(self):
        return Closed()

    def _translate(self, event):
        if type(event) is h11.Data:
            return Body(event.data if type(event.data) is bytes else bytes(event.data))
        if type(event) is h11.EndOfMessage:
            trailers = list(event.headers)
            # Bytes after the message go back through the head scan; the
            # buffer was empty or is appended to (order is preserved).
            leftover, _ = self._h11.trailing_data
            if leftover:
                self._buf[:0] = leftover
            return End(Headers._trusted(trailers) if trailers else None)
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return NEED_DATA
        if type(event) is h11.ConnectionClosed:
            return Closed()
        return self._translate_head(event)

    def _translate_head(self, event):  # pragma: no cover - per role
        raise NotImplementedError

    # -- output -----------------------------------------------------------

    def data(self, chunk: bytes) -> bytes:
        return self._h11.send(h11.Data(data=chunk)) if chunk else b""

    def end(self, trailers: Headers | None = None) -> bytes:
        fields = trailers.raw() if trailers else []
        if fields and not self._out_chunked:
            fields = []  # a Content-Length body cannot carry trailers
        return self._h11.send(h11.EndOfMessage(headers=fields))

    _out_chunked = False

    @property
    def cycle_done(self) -> bool:
        """Both sides finished the current message cleanly."""
        c = self._h11
        return c is not None and c.our_state is h11.DONE and c.their_state is h11.DONE

    def reusable(self) -> bool:
        """True when the connection may carry another exchange.

        h11 moves a side to MUST_CLOSE rather than DONE when either peer
        asked for ``Connection: close`` or spoke HTTP/1.0 without keep-alive.
        """
        return self.cycle_done and not self._eof

    def next_cycle(self) -> None:
        """Forget the finished cycle; the next head starts a new one."""
        self._h11 = None
        self._out_chunked = False
        self._eof_fed = False


def _origin_form(target: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """Rewrite an absolute-form target to origin form (RFC 9112 3.2.2).

    The target's authority replaces the Host field, as the RFC requires of
    a server receiving absolute form.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise ProtocolError("request target is neither origin nor absolute form")
    authority, slash, path = rest.partition(b"/")
    if not authority or b"@" in authority:
        raise ProtocolError("bad authority in request target")
    fields[:] = [(n, v) for n, v in fields if n != b"host"]
    fields.insert(0, (b"host", authority))
    return slash + path if slash else b"/"


_ENCODED_DOT = re.compile(rb"%2[eE]")


def normalize_path(target: bytes) -> bytes:
    """Remove dot-segments from a target's path (RFC 3986 5.2.4).

    ``/public/../admin`` must route (and reach the upstream) as ``/admin``,
    or a route that exempts ``/public`` from authentication exempts
    everything. ``%2e`` is a dot in disguise (RFC 3986 2.3) and counts too.
    The query is left alone.
    """
    path, sep, query = target.partition(b"?")
    path = _ENCODED_DOT.sub(b".", path)
    if b"/." not in path:
        return target if path == target.partition(b"?")[0] else path + sep + query
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    for segment in segments:
        if segment == b"..":
            if out:
                out.pop()
        elif segment != b".":
            out.append(segment)
    if segments and segments[-1] in (b".", b".."):
        out.append(b"")  # "/a/b/.." names the directory "/a/"
    return b"/" + b"/".join(out) + sep + query


def _is_chunked(fields: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response with these fields goes out chunked (no Content-Length)."""
    for n, _ in fields:
        if n == b"transfer-encoding":
            return True
        if n == b"content-length":
            return False
    return True


_STARTED = (h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class ServerConnection(_Peer):
    """The downstream side: parses requests, serialises responses."""

    _role = h11.SERVER

    def _translate_head(self, event):
        if type(event) is not h11.Request:
            raise ProtocolError(f"unexpected {type(event).__name__}")
        fields = list(event.headers)
        if len(fields) > self.max_header_count:
            raise ProtocolError("too many header fields", 431)
        if event.http_version not in (b"1.1", b"1.0"):
            raise ProtocolError("HTTP version not supported", 505)
        if event.method == b"CONNECT":
            raise ProtocolError("CONNECT is not supported", 501)
        target = event.target
        if target[:1] != b"/" and target != b"*":
            target = _origin_form(target, fields)
        if b"/." in target or b"%2" in target:
            target = normalize_path(target)
        content_length = None
        has_body = False
        for n, v in fields:
            if n == b"content-length":
                content_length = int(v)
                has_body = content_length > 0
            elif n == b"transfer-encoding":
                has_body = True
        request = Request(
            method=event.method.decode("ascii"),
            target=target.decode("latin-1"),
            headers=Headers._trusted(fields),
            http_version=event.http_version.decode("ascii"),
        )
        return RequestHead(
            request,
            expect_continue=self._h11.they_are_waiting_for_100_continue,
            has_body=has_body,
            content_length=content_length,
        )

    @property
    def peer_http_version(self) -> bytes:
        return self._h11.their_http_version if self._h11 is not None else b"1.1"

    @property
    def waiting_for_100_continue(self) -> bool:
        return self._h11 is not None and self._h11.they_are_waiting_for_100_continue

    @property
    def response_started(self) -> bool:
        """A response head has gone out (or can no longer go out)."""
        return self._h11 is not None and self._h11.our_state in _STARTED

    def informational(self, response: Response) -> bytes:
        return self._h11.send(
            h11.InformationalResponse(
                status_code=response.status, headers=response.headers.raw()
            )
        )

    def respond(self, response: Response) -> bytes:
        fields = response.headers.raw()
        self._out_chunked = _is_chunked(fields)
        return self._h11.send(
            h11.Response(
                status_code=response.status,
                headers=fields,
                reason=(response.reason or reason_phrase(response.status)).encode("latin-1"),
            )
        )


class ClientConnection(_Peer):
    """The upstream side: serialises requests, parses responses."""

    _role = h11.CLIENT

    def __init__(self, **limits: int) -> None:
        super().__init__(**limits)
        self.response_bytes_seen = False  # for the safe-retry decision

    def feed(self, data: bytes) -> None:
        if data:
            self.response_bytes_seen = True
        super().feed(data)

    def reusable(self) -> bool:
        # Bytes after a complete response are a broken upstream.
        return super().reusable() and not self._buf

    def _closed_at_boundary(self):
        if self._h11 is not None and self._h11.our_state is not h11.IDLE:
            raise ProtocolError("upstream closed the connection before responding")
        return Closed()

    def request(self, request: Request, *, chunked: bool) -> bytes:
        """Start a cycle by serialising a request head."""
        conn = self._new_cycle()
        self.response_bytes_seen = False
        fields = request.headers.raw()
        if chunked:
            fields = [*fields, (b"transfer-encoding", b"chunked")]
        self._out_chunked = chunked
        return conn.send(
            h11.Request(
                method=request.method.encode("ascii"),
                target=request.target.encode("latin-1"),
                headers=fields,
            )
        )

    def _translate_head(self, event):
        fields = list(event.headers)
        if len(fields) > self.max_header_count:
            raise ProtocolError("too many header fields in response")
        response = Response(
            status=event.status_code,
            headers=Headers._trusted(fields),
            reason=event.reason.decode("latin-1"),
            http_version=event.http_version.decode("ascii"),
        )
        if type(event) is h11.InformationalResponse:
            return Informational(response)
        return ResponseHead(response)
