"""The reference HTTP/1.1 codec: h11, both roles, behind sluice's events. No I/O.

h11 parses and frames, and writes what goes out. It is the codec every
decision is checked against (``tests/test_codec_differential.py``), and the
fallback where httptools does not import. Every head first passes the scan
of ``heads.py``; each cycle (one request and its response) gets a fresh
``h11.Connection``, so bytes left after a message go back through that scan
instead of straight into h11's parser.

h11 reads chunked bodies itself, and is lenient there where heads are not
(a CR inside a chunk extension; bare LF, obs-fold and DEL in trailers; a
trailer section up to its own 64 KiB). So its chunked reader is swapped for
``_ChunkedReader``, which puts each chunk-size line and the trailer section
through ``heads.py`` before h11 reads them. That, and the current chunk's
size, are the h11 internals used here (``_reader``, the receive buffer's
``_data``, ``ChunkedReader``'s fields), with ``_writer`` to know whether
trailers can be sent, and ``_cstate.keep_alive`` to keep an HTTP/1.0
connection that asked for keep-alive (h11 closes every HTTP/1.0 one); pinned
by h11>=0.16.
"""

from __future__ import annotations

import h11
from h11._readers import ChunkedReader
from h11._writers import ChunkedWriter

from ..messages import Headers, Request, Response
from .events import (
    NEED_DATA,
    Body,
    Closed,
    End,
    Informational,
    LocalProtocolError,
    ProtocolError,
    RequestHead,
    ResponseHead,
)
from .heads import (
    MAX_CHUNK_LINE,
    annotate,
    check_request,
    check_response_line,
    facts,
    proposed_upgrade,
    take_chunk_line,
    take_next_head,
    take_trailers,
)
from .http1 import UpstreamSide
from .wire import reason_phrase

__all__ = ["ClientConnection", "ServerConnection"]

# A slack for h11's own size limit: we only hand it whole heads we measured,
# so its limit only guards chunk-size and trailer lines.
_H11_MAX_EVENT = 64 * 1024


class _ChunkedReader(ChunkedReader):
    """h11's chunked reader, with the lines between chunks held to ``heads.py``.

    Before h11 reads a chunk-size line or the trailer section, the same bytes
    are checked as the httptools codec checks them (on a copy of just those
    bytes: h11 then reads the buffer as usual). ProtocolError passes through
    h11 unchanged.
    """

    def __init__(self, max_trailer_bytes: int, max_trailer_count: int) -> None:
        super().__init__()
        self._max_trailer_bytes = max_trailer_bytes
        self._max_trailer_count = max_trailer_count

    def __call__(self, buf):
        if self._bytes_in_chunk == 0:  # a line is next, after any CRLF still due
            data = buf._data
            at = len(self._bytes_to_discard)
            if data[:at] == self._bytes_to_discard:  # else h11 refuses it
                if not self._reading_trailer:
                    end = data.find(b"\r\n", at)
                    line = data[at:end + 2] if end >= 0 else data[at:at + MAX_CHUNK_LINE + 1]
                    if take_chunk_line(line) != 0:  # a chunk, or more bytes needed
                        return super().__call__(buf)
                    at = end + 2
                # Enough of the trailer section to find its end or pass the limit.
                take_trailers(data[at:at + self._max_trailer_bytes + 4], self._max_trailer_bytes,
                              self._max_trailer_count)
        return super().__call__(buf)


class _Peer:
    """What both roles share: head scanning, h11 cycles, event translation."""

    _role: type[h11.Sentinel]
    _REQUEST = False  # the heads read are requests (the server role)
    # The peer's h11 states in which its next bytes are not part of the
    # current message: a head to scan, or (once DONE) the next cycle's bytes,
    # or (an upgrade proposed or accepted) what may become a tunnel's.
    _HEAD_STATES = (h11.IDLE, h11.SEND_RESPONSE)
    _AFTER_STATES = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.MIGHT_SWITCH_PROTOCOL,
                     h11.SWITCHED_PROTOCOL)

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

    def take_buffered(self) -> bytes:
        """The bytes received after the switch's head (the tunnel's first);
        the connection is the tunnel's from here on."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def _buffering(self) -> bool:
        """Bytes go to our buffer (a head to scan, or the next cycle's)."""
        c = self._h11
        return c is None or c.their_state in self._HEAD_STATES or c.their_state in self._AFTER_STATES

    def _new_cycle(self) -> h11.Connection:
        self._h11 = h11.Connection(self._role, max_incomplete_event_size=_H11_MAX_EVENT)
        return self._h11

    def next_event(self):
        """The next event, ``NEED_DATA``, or raises ``ProtocolError``."""
        conn = self._h11
        if conn is not None and conn.their_state in self._AFTER_STATES:
            return NEED_DATA  # the caller must start the next cycle first
        if conn is None or conn.their_state in self._HEAD_STATES:
            head = None
            try:
                head = take_next_head(self._buf, self.max_head_bytes, self._eof, self._REQUEST)
                if not head:
                    return NEED_DATA if head is None else self._closed_at_boundary()
                if conn is None:
                    conn = self._new_cycle()
                conn.receive_data(head)
                return self._read_event(conn)
            except ProtocolError as exc:
                if self._REQUEST:  # a head refused while cut stays in the buffer
                    annotate(exc, head or self._buf)
                raise
        if self._buf or (self._eof and not self._eof_fed):
            if self._buf:
                conn.receive_data(bytes(self._buf))
                self._buf.clear()
            if self._eof:
                conn.receive_data(b"")
                self._eof_fed = True
        return self._read_event(conn)

    def _read_event(self, conn: h11.Connection):
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(str(exc), exc.error_status_hint) from None
        if type(conn._reader) is ChunkedReader:  # a head just chose chunked framing
            conn._reader = _ChunkedReader(self.max_head_bytes, self.max_header_count)
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

    def _send(self, event) -> bytes:
        """h11's bytes for ``event``; its refusals become sluice's LocalProtocolError."""
        try:
            return self._h11.send(event)
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None

    def _send_head(self, event) -> bytes:
        """As ``_send``, for a head: it also decides whether trailers can go out."""
        data = self._send(event)
        # h11 picked the body's writer from the head: chunked only to an
        # HTTP/1.1 peer, and only where the message has a body at all.
        self._out_chunked = type(self._h11._writer) is ChunkedWriter
        return data

    def data(self, chunk: bytes) -> bytes:
        return self._send(h11.Data(data=chunk)) if chunk else b""

    def end(self, trailers: Headers | None = None) -> bytes:
        fields = trailers.raw() if trailers else []
        if fields and not self._out_chunked:
            fields = []  # only a chunked body can carry trailers
        return self._send(h11.EndOfMessage(headers=fields))

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
        self.upgrade = None
        self._keep_alive_10 = False
        self._out_chunked = False
        self._eof_fed = False


_STARTED = (h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR, h11.SWITCHED_PROTOCOL)


class ServerConnection(_Peer):
    """The downstream side: parses requests, serialises responses."""

    _role = h11.SERVER
    _REQUEST = True
    _version = b"1.1"  # the version served (check_request's)
    _keep_alive_10 = False  # an HTTP/1.0 client asked to keep the connection
    upgrade: bytes | None = None  # the Upgrade value the request proposes (heads.py)

    def _translate_head(self, event):
        if type(event) is not h11.Request:
            raise ProtocolError(f"unexpected {type(event).__name__}")
        fields = list(event.headers)
        known = facts(fields)
        target, version = check_request(event.method, event.target, event.http_version, fields,
                                        known, self.max_header_count)
        self._version = version
        self._keep_alive_10 = version == b"1.0" and known.keep_alive and not known.close
        if self._keep_alive_10:
            self._h11._cstate.keep_alive = True  # h11 would close it (RFC 9112 9.3 allows it)
        content_length = known.length
        has_body = bool(content_length) or known.chunked
        self.upgrade = proposed_upgrade(known, version, has_body) if known.upgrade else None
        request = Request(
            method=event.method.decode("ascii"),
            target=target.decode("latin-1"),
            headers=Headers._trusted(fields),
            http_version=version.decode("ascii"),
        )
        return RequestHead(
            request,
            expect_continue=self._h11.they_are_waiting_for_100_continue,
            has_body=has_body,
            content_length=content_length,
        )

    @property
    def peer_http_version(self) -> bytes:
        return self._version

    @property
    def waiting_for_100_continue(self) -> bool:
        return self._h11 is not None and self._h11.they_are_waiting_for_100_continue

    @property
    def response_started(self) -> bool:
        """A response head has gone out (or can no longer go out)."""
        return self._h11 is not None and self._h11.our_state in _STARTED

    def informational(self, response: Response) -> bytes:
        if response.status == 101:  # as the httptools codec: switch() is the way
            raise LocalProtocolError("a 101 goes out through switch()")
        return self._send_response(h11.InformationalResponse, response, response.headers.raw())

    def switch(self, response: Response) -> bytes:
        """The 101 accepting the proposed upgrade; the connection is then a
        tunnel (``take_buffered()`` has its first bytes). LocalProtocolError
        unless the request proposed one (h11 alone would take an Upgrade
        without ``Connection: upgrade``)."""
        if self.upgrade is None or response.status != 101:
            raise LocalProtocolError("no upgrade to switch to")
        return self._send_response(h11.InformationalResponse, response, response.headers.raw())

    def respond(self, response: Response) -> bytes:
        fields = response.headers.raw()
        if any(n == b"transfer-encoding" for n, _ in fields):
            # h11 drops a Content-Length beside Transfer-Encoding only when it
            # frames a body; drop it always, as the httptools codec does.
            fields = [f for f in fields if f[0] != b"content-length"]
        if self._keep_alive_10 and self._h11._cstate.keep_alive:
            # HTTP/1.0 closes unless told; h11 turns this into close itself
            # when the body has no length and must end with the connection.
            fields = [*fields, (b"connection", b"keep-alive")]
        return self._send_response(h11.Response, response, fields)

    def _send_response(self, kind, response: Response, fields: list[tuple[bytes, bytes]]) -> bytes:
        try:
            event = kind(
                status_code=response.status,
                headers=fields,
                reason=(response.reason or reason_phrase(response.status)).encode("latin-1"),
            )
        except h11.LocalProtocolError as exc:  # a status or field h11 will not send
            raise LocalProtocolError(str(exc)) from None
        return self._send_head(event)


class ClientConnection(UpstreamSide, _Peer):
    """The upstream side: serialises requests, parses responses."""

    _role = h11.CLIENT

    def _awaiting_response(self) -> bool:
        return self._h11 is not None and self._h11.our_state is not h11.IDLE

    def request(self, request: Request, *, chunked: bool) -> bytes:
        """Start a cycle by serialising a request head."""
        self._new_cycle()
        self.response_bytes_seen = False
        fields = request.headers.raw()
        if chunked:
            fields = [*fields, (b"transfer-encoding", b"chunked")]
        self._request_fields = fields  # h11 reads a proposal from its Upgrade field too
        if any(n == b"transfer-encoding" for n, _ in fields):
            # h11 frames by Transfer-Encoding but would write a Content-Length
            # beside it, the smuggling shape: drop it, as the httptools codec does.
            fields = [f for f in fields if f[0] != b"content-length"]
        try:
            event = h11.Request(
                method=request.method.encode("ascii"),
                target=request.target.encode("latin-1"),
                headers=fields,
            )
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return self._send_head(event)

    def _translate_head(self, event):
        status = event.status_code
        check_response_line(event.http_version, status, status == 101 and self._proposed())
        fields = list(event.headers)
        if len(fields) > self.max_header_count:
            raise ProtocolError("too many header fields in response")
        facts(fields)  # canonical framing fields
        response = Response(
            status=event.status_code,
            headers=Headers._trusted(fields),
            reason=event.reason.decode("latin-1"),
            http_version=event.http_version.decode("ascii"),
        )
        if type(event) is h11.InformationalResponse:
            return Informational(response)
        return ResponseHead(response)
