"""The fast HTTP/1.1 codec: llhttp (through httptools) reads fields, sluice frames. No I/O.

Division of labour, and why:

- ``heads.py`` cuts each head off the buffer and scans it, exactly as for
  the h11 codec, so pipelined bytes never reach a parser unscanned.
- The start line is matched here with h11's grammar (one regex): llhttp
  knows a fixed list of methods and accepts HTTP/0.9, h11 takes any token
  and refuses 0.9; matching it ourselves keeps the codecs' decisions equal.
- llhttp parses the field block, in C: it is fed a fixed ``204`` status
  line and the head's fields, so it validates names and values and never
  expects a body. One parser serves a connection's heads until a field
  block with a Connection field might have left it closed.
- Body framing (Content-Length, chunked, read-until-close) is ours: llhttp
  would run on into the next pipelined message, and httptools cannot say
  where one message ended. The chunked reader follows h11's grammar.
- Output goes through ``wire.py`` with the framing rules h11 applies
  (chunked for an HTTP/1.1 peer when no length is known, close-delimited
  for HTTP/1.0, ``Connection: close`` when either side will not keep alive).
"""

from __future__ import annotations

import re

import httptools

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
    NOTED,
    annotate,
    check_request,
    check_response_line,
    content_length,
    facts,
    proposed_upgrade,
    take_chunk_line,
    take_next_head,
    take_trailers,
    wants_close,
)
from .http1 import UpstreamSide
from .wire import chunk, last_chunk, request_head, response_head

__all__ = ["ClientConnection", "ServerConnection"]

# h11's grammar for start lines (h11/_abnf.py), anchored by fullmatch.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_FIELDS_PREFIX = b"HTTP/1.1 204 No Content\r\n"  # a head llhttp expects no body after

# Body framing modes, in and out.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)
# Input states (_SWITCHED: a 101 went out or came in; the bytes are a tunnel's).
_HEAD, _BODY, _DONE, _SWITCHED = range(4)


def _take(buf: bytearray, n: int) -> bytes:
    """Up to ``n`` bytes off the front of ``buf``."""
    if len(buf) <= n:
        data = bytes(buf)
        buf.clear()
        return data
    data = bytes(buf[:n])
    del buf[:n]
    return data


class _FieldSink:
    """Collects the fields llhttp reports, names lower-cased, values OWS-trimmed."""

    __slots__ = ("fields", "noted", "complete")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.noted: list[tuple[int, bytes, bytes]] = []  # the fields heads.NOTED names
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in (32, 9):  # llhttp trims leading OWS only
            value = value.rstrip(b" \t")
        name = name.lower()
        if name in NOTED:
            self.noted.append((len(self.fields), name, value))
        self.fields.append((name, value))

    def on_message_complete(self) -> None:
        self.complete = True


class _Peer:
    """What both roles share: head cutting, body framing in and out."""

    _REQUEST = False  # the heads read are requests (the server role)

    def __init__(self, *, max_head_bytes: int, max_header_count: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_header_count = max_header_count
        self._buf = bytearray()
        self._eof = False
        self._sink = _FieldSink()
        self._parser: httptools.HttpResponseParser | None = None
        self._state = _HEAD
        self._in_mode = _NONE
        self._in_left = 0  # Content-Length bytes, or bytes of the current chunk
        self._chunk_crlf = False  # the CRLF after a chunk's data is due
        self._trailers = False  # the last chunk was read: a trailer section is due
        self._in_keep_alive = True
        self._out_mode = _NONE
        self._out_left = 0
        self._out_done = False
        self._out_keep_alive = True

    # -- input ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give bytes received from the peer; ``b""`` means it closed."""
        if data:
            self._buf += data
        else:
            self._eof = True

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

    def next_event(self):
        """The next event, ``NEED_DATA``, or raises ``ProtocolError``."""
        state = self._state
        if state == _BODY:
            return self._body_event()
        if state >= _DONE:
            return NEED_DATA  # the caller must start the next cycle first (or tunnel)
        head = None
        try:
            head = take_next_head(self._buf, self.max_head_bytes, self._eof, self._REQUEST)
            if not head:
                return NEED_DATA if head is None else self._closed_at_boundary()
            line_end = head.find(b"\r\n")
            return self._head(head[:line_end], self._fields(head, line_end + 2))
        except ProtocolError as exc:
            if self._REQUEST:  # a head refused while cut stays in the buffer
                annotate(exc, head or self._buf)
            raise

    def _closed_at_boundary(self):
        return Closed()

    def _head(self, line: bytes, fields: list[tuple[bytes, bytes]]):  # pragma: no cover - per role
        raise NotImplementedError

    def _fields(self, block: bytes, start: int) -> list[tuple[bytes, bytes]]:
        """The fields of a head or trailer section from ``start`` on, parsed by llhttp."""
        if len(block) - start == 2:  # no fields at all (or an empty trailer section)
            self._sink.noted = []
            return []
        sink = self._sink
        sink.fields = fields = []
        sink.noted = []
        sink.complete = False
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(sink)
        try:
            parser.feed_data(_FIELDS_PREFIX + block[start:])
        except httptools.HttpParserUpgrade:
            self._parser = None  # done with this block; the parser is spent
        except httptools.HttpParserError as exc:
            self._parser = None
            raise ProtocolError(f"malformed header field: {exc}") from None
        else:
            # After ``Connection: close`` llhttp refuses all further bytes
            # (and should_keep_alive() no longer says so once complete).
            if not sink.complete or any(n == b"connection" for _, n, _ in sink.noted):
                self._parser = None
        return fields

    def _start_body(self, mode: int, length: int = 0) -> None:
        self._state = _BODY
        self._in_mode = mode
        self._in_left = length
        self._chunk_crlf = False
        self._trailers = False

    def _body_event(self):
        mode = self._in_mode
        if mode == _LENGTH:
            return self._length_event()
        if mode == _CHUNKED:
            return self._chunked_event()
        if mode == _UNTIL_CLOSE:
            buf = self._buf
            if buf:
                data = bytes(buf)
                buf.clear()
                return Body(data)
            if self._eof:
                return self._end(None)
            return NEED_DATA
        return self._end(None)

    def _end(self, trailers: Headers | None) -> End:
        self._state = _DONE
        return End(trailers)

    def _length_event(self):
        left = self._in_left
        if not left:
            return self._end(None)
        buf = self._buf
        if not buf:
            if self._eof:
                raise ProtocolError("peer closed the connection mid-body")
            return NEED_DATA
        data = _take(buf, left)
        self._in_left = left - len(data)
        return Body(data)

    def _chunked_event(self):
        buf = self._buf
        while True:
            left = self._in_left
            if left:
                if not buf:
                    break
                data = _take(buf, left)
                self._in_left = left - len(data)
                self._chunk_crlf = not self._in_left
                return Body(data)
            if self._chunk_crlf:
                if buf[:2] != b"\r\n":
                    if b"\r\n".startswith(buf):  # b"" or b"\r": the rest is due
                        break
                    raise ProtocolError("malformed chunk: data not followed by CRLF")
                del buf[:2]
                self._chunk_crlf = False
            if self._trailers:
                block = take_trailers(buf, self.max_head_bytes, self.max_header_count)
                if block is None:
                    break
                fields = self._fields(block, 0)
                return self._end(Headers._trusted(fields) if fields else None)
            size = take_chunk_line(buf)
            if size is None:
                break
            if size:
                self._in_left = size
            else:
                self._trailers = True
        if self._eof:
            raise ProtocolError("peer closed the connection mid-body")
        return NEED_DATA

    # -- output -----------------------------------------------------------

    def data(self, data: bytes) -> bytes:
        if not data:
            return b""
        mode = self._out_mode
        if mode == _CHUNKED:
            return chunk(data)
        if mode == _LENGTH:
            self._out_left -= len(data)
            if self._out_left < 0:
                raise LocalProtocolError("body longer than its Content-Length")
            return data
        if mode == _UNTIL_CLOSE:
            return data
        raise LocalProtocolError("a body on a message that cannot have one")

    def end(self, trailers: Headers | None = None) -> bytes:
        mode = self._out_mode
        self._out_done = True
        if mode == _CHUNKED:
            return last_chunk(trailers.raw() if trailers else None)
        if mode == _LENGTH and self._out_left:
            raise LocalProtocolError("body shorter than its Content-Length")
        return b""  # a Content-Length body cannot carry trailers

    def _out_framing(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Set the outgoing framing from ``fields`` by h11's rules, and return
        the fields to write.

        Transfer-Encoding (``chunked``, nothing else) wins over Content-Length,
        which is then dropped: a head with both is the classic smuggling shape.
        Repeated equal Content-Lengths become one. Neither field: ``_NONE``.
        """
        length = None
        chunked = False
        lengths = 0
        for n, v in fields:
            if n == b"content-length":
                try:
                    value = content_length(v)
                except ProtocolError:
                    raise LocalProtocolError(f"malformed Content-Length {v!r}") from None
                if length is not None and value != length:
                    raise LocalProtocolError("conflicting Content-Length fields")
                length = value
                lengths += 1
            elif n == b"transfer-encoding":
                if chunked or v.lower() != b"chunked":
                    raise LocalProtocolError("only one Transfer-Encoding: chunked can be sent")
                chunked = True
        if chunked:
            self._out_mode = _CHUNKED
        elif length is not None:
            self._out_mode = _LENGTH
            self._out_left = length
        else:
            self._out_mode = _NONE
        if chunked and lengths or lengths > 1:
            fields = [f for f in fields if f[0] != b"content-length"]
            if not chunked:
                fields.append((b"content-length", b"%d" % length))
        return fields

    @property
    def cycle_done(self) -> bool:
        """Both sides finished the current message cleanly."""
        return self._state == _DONE and self._out_done

    def reusable(self) -> bool:
        """True when the connection may carry another exchange: both messages
        complete, and neither side asked to close or spoke HTTP/1.0."""
        return (
            self._state == _DONE
            and self._out_done
            and self._in_keep_alive
            and self._out_keep_alive
            and not self._eof
        )

    def next_cycle(self) -> None:
        """Forget the finished cycle; the next head starts a new one."""
        self._state = _HEAD
        self._out_mode = _NONE
        self._out_done = False


class ServerConnection(_Peer):
    """The downstream side: parses requests, serialises responses."""

    _REQUEST = True

    def __init__(self, **limits: int) -> None:
        super().__init__(**limits)
        self._version = b"1.1"
        self._method = b""
        self._expect = False
        self._started = False
        self.upgrade: bytes | None = None  # the Upgrade value the request proposes (heads.py)

    def _head(self, line, fields):
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            raise ProtocolError("malformed request line")
        method, target, version = match.groups()
        known = facts(fields, self._sink.noted)
        target, version = check_request(method, target, version, fields, known,
                                        self.max_header_count)
        length = known.length
        chunked = known.chunked  # take_head let it through as chunked only, and alone
        self._version = version
        self._method = method
        # HTTP/1.0 keeps the connection only when it asks to (RFC 9112 9.3).
        self._in_keep_alive = not known.close and (version == b"1.1" or known.keep_alive)
        self._expect = version == b"1.1" and known.expect
        self._started = False
        self.upgrade = proposed_upgrade(known, version, chunked or bool(length)) if known.upgrade else None
        if chunked:
            self._start_body(_CHUNKED)
        else:
            self._start_body(_LENGTH, length or 0)
        request = Request(
            method=method.decode("ascii"),
            target=target.decode("latin-1"),
            headers=Headers._trusted(fields),
            http_version=version.decode("ascii"),
        )
        return RequestHead(
            request,
            expect_continue=self._expect,
            has_body=chunked or bool(length),
            content_length=length,
        )

    def next_event(self):
        event = super().next_event()
        if self._expect and (type(event) is Body or type(event) is End):
            self._expect = False  # the client did not wait, or sent no body
        return event

    @property
    def peer_http_version(self) -> bytes:
        return self._version

    @property
    def waiting_for_100_continue(self) -> bool:
        return self._expect

    @property
    def response_started(self) -> bool:
        """A response head has gone out (or can no longer go out)."""
        return self._started

    def informational(self, response: Response) -> bytes:
        # As h11: a 1xx; a 101 goes out through switch().
        if not 100 <= response.status < 200 or response.status == 101:
            raise LocalProtocolError(f"{response.status} is not an informational response sluice sends")
        self._expect = False
        return response_head(response.status, response.reason.encode("latin-1"), response.headers.raw())

    def switch(self, response: Response) -> bytes:
        """The 101 accepting the proposed upgrade; the connection is then a
        tunnel (``take_buffered()`` has its first bytes). LocalProtocolError
        unless the request proposed one and is complete."""
        if self.upgrade is None or response.status != 101 or self._state != _DONE or self._started:
            raise LocalProtocolError("no upgrade to switch to")
        self._state = _SWITCHED
        self._started = True
        self._out_done = True
        self._in_keep_alive = False
        return response_head(101, response.reason.encode("latin-1"), response.headers.raw())

    def respond(self, response: Response) -> bytes:
        """The response head, with the framing fields h11 would write."""
        status = response.status
        if not 200 <= status < 1000:  # as h11
            raise LocalProtocolError(f"{status} is not a final status")
        fields = self._out_framing(response.headers.raw())
        self._expect = False
        self._started = True
        keep_alive = self._in_keep_alive and not wants_close(fields)
        if status in (204, 304):
            self._out_mode = _NONE
        elif self._out_mode == _NONE or self._version != b"1.1" and self._out_mode == _CHUNKED:
            # No length: chunked to HTTP/1.1, else until close (chunked is
            # only for HTTP/1.1 peers, RFC 9112 6.1).
            fields = [f for f in fields if f[0] != b"transfer-encoding"]
            if self._version == b"1.1":
                fields.append((b"transfer-encoding", b"chunked"))
                self._out_mode = _CHUNKED
            else:
                self._out_mode = _UNTIL_CLOSE
                keep_alive = False
        if self._method == b"HEAD":
            self._out_mode = _NONE  # the fields describe the GET's body
        self._out_keep_alive = keep_alive
        if not keep_alive and not wants_close(fields):
            fields = [f for f in fields if f[0] != b"connection"]
            fields.append((b"connection", b"close"))
        elif keep_alive and self._version == b"1.0":
            fields = [*fields, (b"connection", b"keep-alive")]  # 1.0 closes unless told
        return response_head(status, response.reason.encode("latin-1"), fields)


class ClientConnection(UpstreamSide, _Peer):
    """The upstream side: serialises requests, parses responses."""

    def __init__(self, **limits: int) -> None:
        super().__init__(**limits)
        self._method = b""
        self._requested = False

    def _awaiting_response(self) -> bool:
        return self._requested

    def request(self, request: Request, *, chunked: bool) -> bytes:
        """Start a cycle by serialising a request head."""
        method = request.method.encode("ascii")
        fields = request.headers.raw()
        if chunked:
            fields = [*fields, (b"transfer-encoding", b"chunked")]
        fields = self._out_framing(fields)
        self._method = method
        self._requested = True
        self._out_done = False
        self._out_keep_alive = not wants_close(fields)
        self._request_fields = fields
        self.response_bytes_seen = False
        return request_head(method, request.target.encode("latin-1"), fields)

    def next_cycle(self) -> None:
        super().next_cycle()
        self._requested = False

    def _head(self, line, fields):
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise ProtocolError("malformed status line")
        version, status, reason = match.groups()
        status = int(status)
        check_response_line(version, status, status == 101 and self._proposed())
        if len(fields) > self.max_header_count:
            raise ProtocolError("too many header fields in response")
        response = Response(
            status=status,
            headers=Headers._trusted(fields),
            reason=(reason or b"").decode("latin-1"),
            http_version=version.decode("ascii"),
        )
        known = facts(fields, self._sink.noted)
        length = known.length
        if status < 200:
            if status == 101:  # check_response_line let it through: the request proposed it
                self._state = _SWITCHED
                self._in_keep_alive = False
            return Informational(response)  # the final head is still to come (or a tunnel)
        self._in_keep_alive = version == b"1.1" and not known.close
        if self._method == b"HEAD" or status in (204, 304):
            self._start_body(_NONE)
        elif length is not None:
            self._start_body(_LENGTH, length)
        elif known.chunked:
            self._start_body(_CHUNKED)
        else:
            self._start_body(_UNTIL_CLOSE)
            self._in_keep_alive = False
        return ResponseHead(response)
