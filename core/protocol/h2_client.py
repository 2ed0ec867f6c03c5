"""The HTTP/2 client side, for upstreams: the h2 library behind sluice's events. No I/O.

What it shares with the server side (flow control, bodies, trailers, resets,
the header checks of RFC 9113 8.2) is ``h2_codec``'s; this module adds what
only a client does: opening streams within the peer's limit, translating an
HTTP/1.1-shaped request into pseudo-headers, and reading response heads.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ..messages import Headers, Request, Response
from .events import End, Informational, ResponseHead
from .h2_codec import _CONNECTION_SPECIFIC, StreamReset, Terminated, _malformed, _Peer

__all__ = ["H2Client"]


class H2Client(_Peer):
    """One HTTP/2 connection to an upstream: many requests, one stream each.

    ``request()`` opens a stream (the id is its handle) while ``can_open()``
    says the peer's MAX_CONCURRENT_STREAMS leaves room; ``feed()`` gives
    ``Informational``, ``ResponseHead``, ``Data``, ``End``, ``StreamReset``,
    ``WindowOpen`` and ``Terminated`` (a GOAWAY: streams up to its
    ``last_stream_id`` still finish, later ones were never processed and may
    be retried). A malformed response head is a stream error: the stream is
    reset and reported as ``StreamReset`` (the exchange answers 502), the
    connection's other streams go on.
    """

    def __init__(self, *, initial_window: int, max_header_list_size: int, max_header_count: int,
                 tls: bool = False) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_inbound_headers=False,  # _malformed: stream errors, not connection errors
            normalize_inbound_headers=True,
            validate_outbound_headers=True,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        codes = h2.settings.SettingCodes
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            codes.ENABLE_PUSH: 0,
            codes.INITIAL_WINDOW_SIZE: initial_window,
            codes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        })
        self._h2.initiate_connection()
        self._h2.decoder.max_header_list_size = max_header_list_size
        grow = min(initial_window * 100, 2**31 - 1) - 65535
        if grow > 0:
            self._h2.increment_flow_control_window(grow)
        self.max_header_count = max_header_count
        self.scheme = b"https" if tls else b"http"
        self.going_away: int | None = None  # the peer's GOAWAY last_stream_id, once received
        self.settled = False  # the peer's first SETTINGS arrived (its limits are known)
        self.local_resets: set[int] = set()  # streams we reset (a malformed response)
        self._held = b""  # the start of a frame header, or of a GOAWAY frame, not yet whole
        self._frame_left = 0  # payload bytes of the frame being passed to h2
        self._trailers_seen: set[int] = set()

    def can_open(self) -> bool:
        """Whether a new stream may open now (the peer's limit, no GOAWAY)."""
        h2c = self._h2
        return (self.going_away is None
                and h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams
                and h2c.state_machine.state is not h2.connection.ConnectionState.CLOSED)

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        if code == h2.errors.ErrorCodes.PROTOCOL_ERROR:
            self.local_resets.add(stream_id)  # our verdict on its response, not the peer's
        super().reset(stream_id, code)

    def close(self) -> None:
        """GOAWAY (NO_ERROR): we open no more streams; ``pending()`` has it."""
        try:
            self._h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass  # closed already

    @property
    def max_streams(self) -> int:
        """The peer's MAX_CONCURRENT_STREAMS (unbounded until it says)."""
        return self._h2.remote_settings.max_concurrent_streams

    @property
    def closed(self) -> bool:
        """No stream may open again: a GOAWAY either way, or a connection error."""
        return (self.going_away is not None
                or self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED)

    def request(self, request: Request, *, end: bool, authority: bytes = b"") -> int:
        """Open a stream with ``request``'s head; returns its id. HTTP/1.1's
        Host becomes ``:authority`` (``authority`` when there is none);
        connection-specific fields stay behind.

        TE is hop-by-hop: what the client sent said what *it* accepts on its
        hop, and was dropped there. On this hop sluice is the client, and it
        takes trailers, so every request says ``te: trailers`` (the one value
        HTTP/2 allows, RFC 9113 8.2.2); gRPC servers refuse a call without it.
        """
        fields = request.headers.raw()
        authority = next((v for n, v in fields if n == b"host"), authority)
        head = [(b":method", request.method.encode("ascii")), (b":scheme", self.scheme),
                (b":authority", authority), (b":path", request.target.encode("latin-1")),
                (b"te", b"trailers")]
        for name, value in fields:
            if name == b"host" or name == b"te" or name in _CONNECTION_SPECIFIC:
                continue
            head.append((name, value))
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, head, end_stream=end)
        return stream_id

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        """The events in ``data``; a connection error gives ``Terminated``
        last (with our GOAWAY in ``pending()``)."""
        out: list[tuple[int, object]] = []
        for part in self._split_goaways(data):
            if type(part) is Terminated:
                self.going_away = part.last_stream_id if self.going_away is None \
                    else min(self.going_away, part.last_stream_id)
                out.append((0, part))
                if part.error_code:
                    break
            elif part:
                try:
                    events = self._h2.receive_data(part)
                except h2.exceptions.ProtocolError as exc:
                    out.append((0, Terminated(self._connection_error(exc), 0, str(exc))))
                    break
                self._events(events, out)
        return out

    def _events(self, events: list, out: list[tuple[int, object]]) -> None:
        for event in events:
            kind = type(event)
            if kind is h2.events.ResponseReceived or kind is h2.events.InformationalResponseReceived:
                head = self._response(event)
                if head is None:
                    out.append((event.stream_id, StreamReset(int(h2.errors.ErrorCodes.PROTOCOL_ERROR))))
                    continue
                out.append((event.stream_id, head))
                if event.stream_ended is not None:
                    out.append((event.stream_id, End(None)))
            elif kind is h2.events.RemoteSettingsChanged:
                self.settled = True
                self._shared(event, out)
            elif kind is h2.events.ConnectionTerminated:  # (GOAWAYs h2 itself saw: see below)
                self.going_away = event.last_stream_id or 0
                out.append((0, Terminated(int(event.error_code), self.going_away,
                                          (event.additional_data or b"").decode("latin-1"))))
            else:
                self._shared(event, out)

    def _split_goaways(self, data: bytes) -> list[bytes | Terminated]:
        """``data`` cut around the well-formed GOAWAY frames in it, each
        replaced by its ``Terminated``.

        h2 closes its whole connection on a GOAWAY (python-hyper/h2#1181):
        every later frame is a protocol error to it, so the responses still
        due on streams up to the GOAWAY's last stream id (RFC 9113 6.8) could
        never arrive. So h2 never sees one: the frame headers are scanned
        (9 bytes per frame, payloads skipped) and GOAWAYs taken out here. A
        GOAWAY h2 must refuse (on a stream, too short, too long) goes to it.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        parts: list[bytes | Terminated] = []
        size = len(data)
        start = pos = 0
        while pos < size:
            left = self._frame_left
            if left:
                step = min(left, size - pos)
                pos += step
                self._frame_left = left - step
                continue
            if size - pos < 9:
                break
            length = int.from_bytes(data[pos:pos + 3], "big")
            if data[pos + 3] == 0x7 and 8 <= length <= self._h2.max_inbound_frame_size \
                    and not int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF:
                if size - pos < 9 + length:
                    break
                parts.append(data[start:pos])
                payload = data[pos + 9:pos + 9 + length]
                parts.append(Terminated(int.from_bytes(payload[4:8], "big"),
                                        int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                                        payload[8:].decode("latin-1")))
                pos = start = pos + 9 + length
                continue
            pos += 9
            self._frame_left = length
        parts.append(data[start:pos])
        self._held = data[pos:]
        return parts

    def _response(self, event) -> Informational | ResponseHead | None:
        """The response head, or None (the stream reset) when it is malformed."""
        status = None
        fields = []
        if _malformed(event.headers, request=False, response=True) is None:
            for name, value in event.headers:
                if name == b":status":
                    status = value
                else:
                    fields.append((name, value))
        if (status is None or len(status) != 3 or not status.isdigit() or status == b"101"
                or len(fields) > self.max_header_count):
            self.reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return None
        response = Response(int(status), Headers._trusted(fields), http_version="2")
        return Informational(response) if response.status < 200 else ResponseHead(response)
