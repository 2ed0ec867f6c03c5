"""The HTTP/2 server side: the h2 library behind sluice's events. No I/O.

One ``H2Server`` is one HTTP/2 connection. The edge feeds it bytes and gets
back ``(stream_id, event)`` pairs, using the events the HTTP/1.1 codecs
produce (``RequestHead``, ``Body``, ``End``) plus the few HTTP/2 adds
(``Data``, ``StreamReset``, ``WindowOpen``, ``Refused``, ``Terminated``); what the
edge asks for (a response head, data, trailers, a reset) becomes bytes in
``pending()``. h2 validates frames, HPACK and pseudo-headers itself; this
module adds sluice's own request rules, so a request reaches the exchange
the same whatever protocol carried it:

=====================================================  ==================  =============
what a request stream carries                          becomes             why
=====================================================  ==================  =============
a frame or sequence h2 refuses (a connection error)    GOAWAY, the         RFC 9113 5.4.1
                                                         connection ends
a WINDOW_UPDATE of 0 on a stream, a body that breaks   RST_STREAM          RFC 9113 6.9,
  its content-length, trailers without END_STREAM        PROTOCOL_ERROR      8.1, 8.1.1
  (h2 would end the connection: ``FrameGate``)
a malformed header block (uppercase name, a            RST_STREAM          RFC 9113 8.1.1
  connection-specific field, bad pseudo-headers)         PROTOCOL_ERROR
  that h2 finds
a plain CONNECT (no ``:protocol``)                     501 on the stream   no forward proxy
an extended CONNECT for another protocol than          501 on the stream   RFC 9110 15.6.2:
  ``websocket`` (``connect-udp``, ...)                                      not implemented
``:protocol`` outside a CONNECT, or an extended        RST_STREAM          RFC 8441 4
  CONNECT without ``:scheme`` or ``:path``               PROTOCOL_ERROR
no ``:authority`` and no Host, or a Host that is not   400 on the stream   RFC 9113 8.3.1
  an authority
a target ``targets.py`` refuses                        400 on the stream   as HTTP/1.1
more fields than ``max_header_count``                  431 on the stream   as HTTP/1.1
=====================================================  ==================  =============

``:authority`` becomes Host (replacing one that was sent too: RFC 9113
8.3.1 makes them the same), the cookie crumbs of RFC 9113 8.2.3 are joined
with ``; `` (an HTTP/1.1 upstream expects one field), and the request's
``http_version`` is ``"2"``.

WebSocket over HTTP/2 (RFC 8441). With ``extended_connect`` (the default:
a listener that speaks HTTP/2 offers it, and a route that allows no
``websocket`` upgrade still decides, as for HTTP/1.1) the SETTINGS say
ENABLE_CONNECT_PROTOCOL = 1, and an extended CONNECT with ``:protocol
websocket`` becomes a ``WebSocketHead``: the HTTP/1.1 handshake an upstream
expects (RFC 6455 4.1), a GET of ``:path`` with ``Upgrade: websocket``,
``Connection: upgrade``, ``Sec-WebSocket-Version: 13`` (unless the client
named one) and a fresh ``Sec-WebSocket-Key``, the client's other fields
(Sec-WebSocket-Protocol, -Extensions, Origin, ...) kept. The upstream's 101
goes back as ``open_tunnel()`` says: a ``:status 200`` without the fields
only a 101 has, once its Sec-WebSocket-Accept answers our key; the stream's
DATA are then the tunnel's bytes, END_STREAM its half-close.

Flow control is the edge's backpressure: received DATA is acknowledged
(``acknowledge``) only when the exchange has taken it, so a client can
have at most the stream's window of request body in flight; ``send_data``
sends no more than the peer's windows allow and says how much it took.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack.exceptions
from hyperframe.frame import GoAwayFrame

from ..messages import Headers, Request, Response
from .events import End, ProtocolError, RequestHead
from .h2_events import PREFACE, Data, Refused, StreamReset, Terminated, WebSocketHead, WindowOpen
from .h2_gate import DROP, OVER, PASS, WAIT, FrameGate
from .heads import content_length
from .targets import check_host, request_target

__all__ = ["PREFACE", "Data", "H2Server", "Refused", "StreamReset", "Terminated", "WebSocketHead",
           "WindowOpen", "websocket_accept"]

# Fields an HTTP/2 message may not carry (RFC 9113 8.2.2); what a response
# from an HTTP/1.1 upstream may still have is dropped on the way out.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# What a response or trailer section never carries over HTTP/2: the above,
# and TE (a request field, and then only "trailers").
_NOT_SENT = _CONNECTION_SPECIFIC | {b"te"}


class _Peer:
    """What both roles share: flow control, body and trailer sending, resets."""

    _h2: h2.connection.H2Connection
    _out = b""  # bytes to write before h2's own

    def _connection_error(self, exc: h2.exceptions.ProtocolError) -> int:
        """The code of a connection error h2 raised (it queued its GOAWAY).

        A field block that does not decode is COMPRESSION_ERROR (RFC 9113
        4.3), which h2 reports as PROTOCOL_ERROR: its GOAWAY, the last frame
        it queued, is rewritten with the right code.
        """
        code = int(getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
        if isinstance(exc.__cause__, _DECODING_ERRORS):
            data = self._h2.data_to_send()
            if len(data) >= 17 and data[-14] == 0x07:  # a GOAWAY with no debug data, last
                frame = GoAwayFrame(0)
                frame.last_stream_id = int.from_bytes(data[-8:-4], "big") & 0x7FFFFFFF
                frame.error_code = code = h2.errors.ErrorCodes.COMPRESSION_ERROR
                data = data[:-17] + frame.serialize()
            self._out += data
        return int(code)

    def _shared(self, event: h2.events.Event, out: list[tuple[int, object]]) -> None:
        """Translate into ``out`` the events both roles read alike (body,
        trailers, resets, windows); others (StreamEnded, PINGs, ...) need no event."""
        kind = type(event)
        if kind is h2.events.DataReceived:
            out.append((event.stream_id, Data(event.data, event.flow_controlled_length)))
            if event.stream_ended is not None:
                out.append((event.stream_id, End(None)))
        elif kind is h2.events.TrailersReceived:
            if _malformed(event.headers, request=False) is not None:
                self.reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                out.append((event.stream_id, StreamReset(int(h2.errors.ErrorCodes.PROTOCOL_ERROR))))
            else:
                out.append((event.stream_id, End(Headers._trusted(list(event.headers)) or None)))
        elif kind is h2.events.StreamReset:
            out.append((event.stream_id, StreamReset(int(event.error_code))))
        elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
            out.append((getattr(event, "stream_id", 0), WindowOpen()))

    def has_pending(self) -> bool:
        """Whether ``pending()`` would give bytes."""
        return bool(self._out) or bool(self._h2._data_to_send)

    def pending(self) -> bytes:
        """The bytes to write now (possibly empty)."""
        if self._out:
            data, self._out = self._out + self._h2.data_to_send(), b""
            return data
        return self._h2.data_to_send()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The exchange took ``size`` flow-controlled bytes of ``stream_id``:
        let the peer send as much again."""
        if size:
            try:
                self._h2.acknowledge_received_data(size, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                # The stream is gone: still give the connection's window back.
                self._h2.increment_flow_control_window(size)

    def window(self, stream_id: int) -> int:
        """How many body bytes ``send_data`` may take now."""
        try:
            return min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
        except h2.exceptions.StreamClosedError:
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview, *, end: bool = False) -> None:
        """Raises h2's StreamClosedError when the stream is closed to us."""
        try:
            self._h2.send_data(stream_id, data, end_stream=end)
        except KeyError:
            # An empty frame skips the window check that would have raised
            # StreamClosedError, and h2 looks a forgotten stream up directly.
            raise h2.exceptions.StreamClosedError(stream_id) from None

    def trailers(self, stream_id: int, trailers: Headers) -> None:
        fields = [f for f in trailers.raw() if f[0] not in _NOT_SENT and f[0][:1] != b":"]
        self._h2.send_headers(stream_id, fields, end_stream=True)

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        try:
            self._h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already over, or the whole connection is

    def remote_open(self, stream_id: int) -> bool:
        """Whether the peer may still send on ``stream_id``."""
        try:
            return self._h2.streams[stream_id].state_machine.state in _INBOUND_OPEN
        except KeyError:
            return False


class H2Server(_Peer):
    """One HTTP/2 server connection's protocol state."""

    def __init__(self, *, max_concurrent_streams: int, initial_window: int,
                 max_header_list_size: int, max_header_count: int, extended_connect: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``extended_connect``: offer RFC 8441's extended CONNECT (WebSockets)."""
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,  # names and values stay bytes, as in Headers
            # Header blocks are checked here (``_malformed``): h2 would make
            # every malformed one a connection error, and RFC 9113 8.1.1
            # makes it a stream error, which spares the client's other streams.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,  # (cookie crumbs: ``_request`` joins them)
            # What goes out is sluice's own ``Headers``: names already lower
            # case, connection-specific fields and pseudo-header look-alikes
            # dropped by ``respond``/``trailers``. h2's checks and
            # normalisation of the same cost 3-4% of an h2c answer's time.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        codes = h2.settings.SettingCodes
        advertised = {
            codes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            codes.INITIAL_WINDOW_SIZE: initial_window,
            codes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        if extended_connect:
            advertised[codes.ENABLE_CONNECT_PROTOCOL] = 1
        self.extended_connect = extended_connect
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values=advertised)
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_count = max_header_count
        self._clock = clock
        self._opened = 0  # streams the client opened
        self._resets = 0  # streams the client reset
        self._control = _Bucket(_CONTROL_BURST, _CONTROL_RATE, clock())
        self._out = b""  # bytes to write before h2's own (a graceful GOAWAY)
        self._last_served: int | None = None  # once a GOAWAY went out: the last stream served
        self._gate = FrameGate()
        self._held = b""  # the start of a frame header, until the rest comes
        self._h2.initiate_connection()
        # h2 enforces the settings it holds as a connection error. It is
        # given a looser stream cap than the client was told, so that streams
        # past ours are refused one at a time (REFUSED_STREAM) and the others
        # go on; only a client far past it loses the connection.
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values={
            **advertised, codes.MAX_CONCURRENT_STREAMS: 2 * max_concurrent_streams + 100})
        self._h2.decoder.max_header_list_size = max_header_list_size
        # The connection's window starts at 65,535 whatever SETTINGS say
        # (RFC 9113 6.9.2): open it to as many streams' worth as allowed.
        grow = min(initial_window * max_concurrent_streams, 2**31 - 1) - 65535
        if grow > 0:
            self._h2.increment_flow_control_window(grow)

    # -- input ------------------------------------------------------------

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        """The events in ``data``; a connection error gives ``Terminated``
        last, and our GOAWAY in ``pending()``.

        Frames are looked at (their 9-byte header, and at most 4 bytes of a
        payload) before h2 sees them, for the errors RFC 9113 makes
        stream errors and h2 connection errors, or gives another code
        (``FrameGate``'s table); runs of the others go to h2 whole.
        """
        if self._held:
            data, self._held = self._held + data, b""
        out: list[tuple[int, object]] = []
        gate = self._gate
        given = 0
        pos = gate.preface(len(data))  # the preface is h2's to check
        end = len(data)
        while pos < end:
            if gate.through:  # the rest of a payload: h2's
                step = min(gate.through, end - pos)
                gate.through -= step
                pos += step
                continue
            verdict = gate.look(data, pos, self)
            if verdict is WAIT:  # a header (or a peek) not all here yet
                break
            if verdict is not PASS:
                # What came before goes first: the verdict may depend on
                # the streams it opened, and events keep their order.
                if given < pos and not self._give(data[given:pos], out):
                    return out
                given = pos
                verdict = gate.decide(data, pos, self, out)
                if verdict is OVER:
                    return out
                if verdict is DROP:
                    pos = given = pos + 9 + gate.dropped
                    continue
                if type(verdict) is bytes:  # the header, rewritten
                    if not self._give(verdict, out):
                        return out
                    given = pos + 9
            gate.through = int.from_bytes(data[pos:pos + 3], "big")
            pos += 9
        if given < pos and not self._give(data[given:pos], out):
            return out
        self._held = data[pos:]
        return out

    def _give(self, data: bytes, out: list[tuple[int, object]]) -> bool:
        """Feed h2 ``data`` and translate its events into ``out``; False
        when the connection is over (a connection error, or a flood)."""
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            out.append((0, Terminated(self._connection_error(exc), self._h2.highest_inbound_stream_id,
                                      str(exc))))
            return False
        # h2 opened every stream of ``data`` before these events are seen:
        # count them back one by one, so that the streams refused past the
        # limit are the last ones opened, not the first. (h2 counts by
        # walking all its streams: skipped when there are too few to matter.)
        crowded = len(self._h2.streams) > self.max_concurrent_streams
        opening = self._h2.open_inbound_streams - sum(
            1 for e in events if type(e) is h2.events.RequestReceived) if crowded else 0
        for event in events:
            kind = type(event)
            if kind in _CONTROL and not self._control.take(self._clock()):
                out.append(self._calm("SETTINGS, PING or PRIORITY flood"))
                return False
            if kind is h2.events.RequestReceived:
                last = self._last_served
                opening += 1
                if (last is not None and event.stream_id > last
                        or crowded and opening > self.max_concurrent_streams):
                    opening -= 1
                    # Opened after our GOAWAY, or past the streams allowed at
                    # once: never served, so safe for the client to retry.
                    self.reset(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                self._opened += 1
                why = _malformed(event.headers, request=True, protocol=self.extended_connect)
                if why is None:
                    why = self._gate.opened(event)
                if why is not None:
                    self.reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    out.append((event.stream_id, Refused(0, ProtocolError(why))))
                    continue
                out.append((event.stream_id, self._request(event)))
                if event.stream_ended is not None and not isinstance(out[-1][1], Refused):
                    out.append((event.stream_id, End(None)))
            elif kind is h2.events.StreamReset:
                out.append((event.stream_id, StreamReset(int(event.error_code))))
                self._gate.forget(event.stream_id)
                if event.remote_reset:
                    self._resets += 1
                    if self._resets > _RESETS_ALLOWED and 2 * self._resets > self._opened:
                        # Rapid reset (CVE-2023-44487): each stream opened and
                        # reset costs an exchange, and a client may open
                        # without end if it resets as fast.
                        out.append(self._calm("rapid reset"))
                        return False
            elif kind is h2.events.TrailersReceived and event.stream_id in self._gate.bad_trailers:
                self._gate.bad_trailers.discard(event.stream_id)
                self._stream_error(event.stream_id, out)
            elif kind is h2.events.ConnectionTerminated:
                out.append((0, Terminated(int(event.error_code), event.last_stream_id or 0,
                                          (event.additional_data or b"").decode("latin-1"))))
            else:
                self._shared(event, out)
        return True

    def _stream_error(self, stream_id: int, out: list[tuple[int, object]]) -> None:
        """Reset ``stream_id`` with PROTOCOL_ERROR (a malformed request, RFC
        9113 8.1.1), and tell its exchange."""
        code = h2.errors.ErrorCodes.PROTOCOL_ERROR
        self.reset(stream_id, code)
        out.append((stream_id, StreamReset(int(code))))

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        self._gate.forget(stream_id)
        super().reset(stream_id, code)

    def _open(self, stream_id: int) -> bool:
        """Whether ``stream_id`` is a stream h2 knows and has not closed."""
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _request(self, event: h2.events.RequestReceived):
        method = target = authority = scheme = protocol = None
        fields: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        host = None
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
                else:  # :protocol, on a CONNECT (``_malformed`` saw to it)
                    protocol = value
            elif name == b"cookie":
                cookies.append(value)
            elif name == b"host":
                host = value
            else:
                fields.append((name, value))
        websocket = False
        try:
            if method == b"CONNECT":
                if protocol is None:
                    raise ProtocolError("CONNECT is not supported", 501)
                if protocol.lower() != b"websocket":
                    raise ProtocolError(f"extended CONNECT for {protocol.decode('latin-1')!r} "
                                        "is not supported", 501)
                websocket = True
            authority = authority if authority is not None else host
            if not authority:
                raise ProtocolError("a request needs :authority or Host")
            check_host(authority)
            fields.insert(0, (b"host", authority))
            if cookies:
                fields.append((b"cookie", b"; ".join(cookies)))
            if len(fields) > self.max_header_count:
                raise ProtocolError("too many header fields", 431)
            length = None
            for n, v in fields:
                if n == b"content-length":
                    length = content_length(v)
            target = request_target(target, fields)
        except ProtocolError as exc:
            if method is not None:
                exc.method = method.decode("latin-1")
                exc.target = None if target is None else target.decode("latin-1")
            return Refused(exc.status, exc)
        if websocket:
            key = base64.b64encode(os.urandom(16))  # RFC 6455 4.1: a fresh nonce per handshake
            fields = _websocket_fields(fields, key)
            method = b"GET"
        request = Request(
            method=method.decode("ascii"),
            target=target.decode("latin-1"),
            headers=Headers._trusted(fields),
            http_version="2",
            scheme=(scheme or b"https").decode("ascii"),
        )
        if websocket:
            # The stream's DATA are the tunnel's, never a body: the
            # exchange sends the handshake alone and waits for its 101.
            return WebSocketHead(RequestHead(request), key)
        ended = event.stream_ended is not None
        return RequestHead(request, has_body=not ended and length != 0, content_length=length)

    def _calm(self, why: str) -> tuple[int, Terminated]:
        """Drop the connection of a client abusing it (GOAWAY ENHANCE_YOUR_CALM)."""
        code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        try:
            self._h2.close_connection(code, additional_data=why.encode())
        except h2.exceptions.ProtocolError:
            pass
        return (0, Terminated(int(code), self._h2.highest_inbound_stream_id, why))

    # -- output -----------------------------------------------------------

    def respond(self, stream_id: int, response: Response, *, end: bool = False) -> None:
        """Send a response head (informational or final)."""
        fields = [(b":status", b"%d" % response.status)]
        fields.extend(f for f in response.headers.raw() if f[0] not in _NOT_SENT and f[0][:1] != b":")
        self._h2.send_headers(stream_id, fields, end_stream=end)

    def open_tunnel(self, stream_id: int, response: Response, key: bytes) -> bool:
        """Answer a WebSocket stream with the upstream's 101 ``response``: when
        its Sec-WebSocket-Accept answers ``key`` (RFC 6455 4.2.2), send the
        client ``:status 200`` (RFC 8441 5) with the 101's fields but those
        only a 101 has, and return True; else send nothing and return False."""
        if response.headers.get_raw(b"sec-websocket-accept") != websocket_accept(key):
            return False
        fields = [(b":status", b"200")]
        fields.extend(f for f in response.headers.raw()
                      if f[0] not in _NOT_SENT and f[0][:1] != b":" and f[0] != b"sec-websocket-accept")
        self._h2.send_headers(stream_id, fields)
        return True

    def goaway(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Tell the client no new stream will be served; those opened finish.

        h2's own ``close_connection`` would also stop every stream in flight
        (it refuses to send after it), so the frame is made here and queued
        after what h2 has pending; streams the client opens after it are
        refused (REFUSED_STREAM: safe to retry elsewhere).
        """
        if self._last_served is None:
            last = self._last_served = self._h2.highest_inbound_stream_id
            frame = GoAwayFrame(0)
            frame.last_stream_id = last
            frame.error_code = code
            self._out += self._h2.data_to_send() + frame.serialize()

    def close(self) -> None:
        """The final GOAWAY: nothing is in flight, the connection ends."""
        try:
            self._h2.close_connection(last_stream_id=self._h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass


_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_REQUIRED = (b":method", b":scheme", b":path")
_RESPONSE_PSEUDO = frozenset({b":status"})
# RFC 9113 8.2.1: a name has no byte in 0x00-0x20, 0x41-0x5a (upper case) or
# 0x7f-0xff, and no colon but a pseudo-header's first; a value no NUL, CR or
# LF, and no whitespace at either end.
_NAME_OK = re.compile(rb"[\x21-\x39\x3b-\x40\x5b-\x7e]+").fullmatch
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$").search


def _malformed(headers, *, request: bool, response: bool = False, protocol: bool = False) -> str | None:
    """Why a header block is malformed (RFC 9113 8.1.1, 8.2, 8.3), or None;
    a request's, a response's, or (neither) a trailer section's. ``protocol``:
    a request may be an extended CONNECT (RFC 8441 4, we offered it)."""
    seen: set[bytes] = set()
    regular = False
    pseudo = _PSEUDO if request else _RESPONSE_PSEUDO
    for name, value in headers:
        if name[:1] == b":":
            if not request and not response:
                return "a pseudo-header in trailers"
            if regular:
                return "a pseudo-header after a regular field"
            if name not in pseudo or name in seen:
                return f"unknown or repeated pseudo-header {name!r}"
            seen.add(name)
            body = name[1:]
        else:
            regular = True
            body = name
            if name in _CONNECTION_SPECIFIC:
                return f"connection-specific field {name!r}"
            if name == b"te" and value.lower() != b"trailers":
                return "TE other than trailers"
        if _NAME_OK(body) is None:
            return f"invalid field name {name!r}"
        if value and _BAD_VALUE(value) is not None:
            return f"invalid value for {name!r}"
    if request:
        method = next((v for n, v in headers if n == b":method"), None)
        if b":protocol" in seen:
            if not protocol:
                return ":protocol, though extended CONNECT was not offered"
            if method != b"CONNECT":
                return ":protocol outside a CONNECT"
        if (method != b"CONNECT" or b":protocol" in seen) and any(p not in seen for p in _REQUIRED):
            return "a missing pseudo-header"
        if next((v for n, v in headers if n == b":path"), b"x") == b"":
            return "an empty :path"
    elif response and b":status" not in seen:
        return "no :status"
    return None


# RFC 6455 1.3: what a server appends to the key before hashing it.
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The client's fields an HTTP/1.1 handshake carries otherwise (or never: a
# CONNECT has no body to frame; RFC 8441 4 leaves the key and accept out).
_HANDSHAKE_OWN = frozenset({b"sec-websocket-key", b"sec-websocket-accept", b"content-length"})


def websocket_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept that answers ``key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


def _websocket_fields(fields: list[tuple[bytes, bytes]], key: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of the HTTP/1.1 handshake (RFC 6455 4.1) an extended CONNECT
    becomes: the client's, with our ``key``; version 13 unless it named one."""
    out = [f for f in fields if f[0] not in _HANDSHAKE_OWN]
    out += [(b"connection", b"upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-key", key)]
    if not any(n == b"sec-websocket-version" for n, _ in out):
        out.append((b"sec-websocket-version", b"13"))
    return out


# What h2 turns into "Error decoding header block" (h2.connection._decode_headers).
_DECODING_ERRORS = (hpack.exceptions.HPACKError, IndexError, TypeError, UnicodeDecodeError)

_INBOUND_OPEN = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})

# Frames that cost work and answer nothing. h2 acknowledges each SETTINGS
# and PING itself; past a burst of 1,000 and 100 a second after it, the
# client is flooding (nginx and Envoy cap these too).
_CONTROL = frozenset({h2.events.PingReceived, h2.events.RemoteSettingsChanged, h2.events.PriorityUpdated})
_CONTROL_BURST = 1000
_CONTROL_RATE = 100.0
# Client resets tolerated before the rapid-reset rule (more resets than half
# the streams opened) applies: a client cancelling now and then is normal.
_RESETS_ALLOWED = 200


class _Bucket:
    """A token bucket: ``take`` is False once the burst is spent faster than the rate refills it."""

    __slots__ = ("tokens", "burst", "rate", "at")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self.tokens = float(burst)
        self.burst = burst
        self.rate = rate
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
