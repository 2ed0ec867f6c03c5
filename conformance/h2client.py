"""A raw HTTP/2 client (h2c, prior knowledge) for the conformance suites.

`H2Client` sends frames exactly as a test builds them, well-formed (hyperframe, hpack) or
hand-packed (`raw_frame`), and reads the proxy's frames strictly: a frame hyperframe cannot
parse, or a field block hpack cannot decode, fails the test. Every read is bounded by the
socket timeout, so no test can hang on a silent proxy.

The client keeps only the state a test would otherwise repeat: it answers the proxy's
SETTINGS and PING, returns the window the proxy's DATA used (unless `auto_window` is off),
tracks the windows the proxy grants, and collects each stream's answer in a `Stream`.
`fetch` is the well-behaved path: the `h2` library's own state machine, which also checks
everything the proxy sends against RFC 9113.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hpack
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

__all__ = [
    "PREFACE",
    "ErrorCodes",
    "H2Client",
    "SettingCodes",
    "Stream",
    "fetch",
    "raw_frame",
    "request_fields",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TIMEOUT = 5.0
DEFAULT_WINDOW = 65535  # RFC 9113 6.9.2
DEFAULT_MAX_FRAME = 16384  # RFC 9113 6.5.2


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    """A frame packed by hand (RFC 9113 4.1), for what hyperframe refuses to build;
    `length` overrides the length field."""
    size = len(payload) if length is None else length
    return struct.pack("!I", size)[1:] + struct.pack("!BBI", kind, flags, stream_id) + payload


def request_fields(
    path: str = "/app/", method: str = "GET", authority: str | None = "proxy.test",
    extra: tuple[tuple[str, str], ...] = (),
) -> list[tuple[str, str]]:
    """The pseudo-header fields of an ordinary request, then `extra`."""
    fields = [(":method", method), (":scheme", "http"), (":path", path)]
    if authority is not None:
        fields.append((":authority", authority))
    return fields + list(extra)


@dataclass
class Stream:
    """One stream's answer as received: its response fields, body, trailers, or its reset."""

    stream_id: int
    informational: list[list[tuple[str, str]]] = field(default_factory=list)
    headers: list[tuple[str, str]] | None = None
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False  # END_STREAM received

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def status(self) -> int | None:
        return int(dict(self.headers)[":status"]) if self.headers else None

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers or () if n == name), None)

    def __str__(self) -> str:
        if self.reset is not None and self.headers is None:
            return f"stream {self.stream_id}: RST_STREAM {_code(self.reset)}"
        text = f"stream {self.stream_id}: {self.headers} body {self.body[:200]!r}"
        if self.trailers is not None:
            text += f" trailers {self.trailers}"
        if self.reset is not None:
            text += f", then RST_STREAM {_code(self.reset)}"
        return text


class ConnectionEnded(AssertionError):
    """The proxy closed the connection (after a GOAWAY or not) while the test waited."""


class H2Client:
    """One h2c connection to `address`; use as a context manager.

    `settings` go in the client's first SETTINGS frame; with `preface` False nothing is
    sent on connect (the test sends its own bytes).
    """

    def __init__(
        self,
        address: tuple[str, int],
        settings: dict[int, int] | None = None,
        timeout: float = TIMEOUT,
        preface: bool = True,
        auto_window: bool = True,
    ):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.timeout = timeout
        self.auto_window = auto_window
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.received: list[Frame] = []  # every frame, for failure messages
        self.server_settings: dict[int, int] | None = None
        self.goaway: GoAwayFrame | None = None
        self.closed = False
        self.streams: dict[int, Stream] = {}
        self.next_stream_id = 1
        self.send_window = DEFAULT_WINDOW  # connection window the proxy granted us
        self._stream_windows: dict[int, int] = {}
        self._buffer = b""
        self.settings = settings or {}
        if preface:
            self.send(PREFACE + SettingsFrame(0, settings=self.settings).serialize())

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.sock.close()

    # -- sending -------------------------------------------------------------------------

    def send(self, *parts: bytes | Frame) -> None:
        data = b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts)
        self.sock.sendall(data)

    def new_stream_id(self) -> int:
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        return stream_id

    def encode(self, fields: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> bytes:
        """An HPACK field block, without Huffman coding (hpack's is slow on long values)."""
        return self.encoder.encode(fields, huffman=False)

    def headers(
        self,
        stream_id: int,
        fields,
        end_stream: bool = True,
        block: bytes | None = None,
    ) -> HeadersFrame:
        """A HEADERS frame with END_HEADERS; `block` replaces the encoded `fields`."""
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        return HeadersFrame(stream_id, data=self.encode(fields) if block is None else block, flags=flags)

    def request(
        self,
        path: str = "/app/",
        method: str = "GET",
        extra: tuple[tuple[str, str], ...] = (),
        body: bytes | None = None,
        trailers: list[tuple[str, str]] | None = None,
        end_stream: bool = True,
        fields: list[tuple[str, str]] | None = None,
    ) -> int:
        """Sends a request on a new stream (body split into frames, then trailers);
        returns its stream id. `fields` replaces the whole field section."""
        stream_id = self.new_stream_id()
        if fields is None:
            fields = request_fields(path, method, extra=extra)
        last_headers = end_stream and body is None and trailers is None
        frames: list[Frame] = [self.headers(stream_id, fields, end_stream=last_headers)]
        if body is not None:
            frames += self.data_frames(stream_id, body, end_stream=end_stream and trailers is None)
        if trailers is not None:
            frames.append(self.headers(stream_id, trailers, end_stream=True))
        self.streams[stream_id] = Stream(stream_id)
        self.send(*frames)
        return stream_id

    def data_frames(self, stream_id: int, data: bytes, end_stream: bool = True) -> list[DataFrame]:
        size = DEFAULT_MAX_FRAME
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        frames = [DataFrame(stream_id, data=c) for c in chunks]
        if end_stream:
            frames[-1].flags.add("END_STREAM")
        return frames

    def stream_window(self, stream_id: int) -> int:
        """What the proxy lets us send on `stream_id` now, as far as we have read."""
        initial = (self.server_settings or {}).get(SettingCodes.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        return initial + self._stream_windows.get(stream_id, 0)

    # -- receiving -----------------------------------------------------------------------

    def handshake(self) -> dict[int, int]:
        """Reads the proxy's first frame, which must be SETTINGS (RFC 9113 3.4); returns them."""
        frame = self.read_frame()
        assert frame is not None, "connection closed instead of the server preface"
        assert isinstance(frame, SettingsFrame) and "ACK" not in frame.flags, (
            f"server preface is not a SETTINGS frame: {frame}"
        )
        return self.server_settings

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """The next frame (a field block with its CONTINUATIONs as one HEADERS frame), after
        the client's own bookkeeping; None once the proxy closed the connection."""
        frame = self._read_one(timeout)
        if isinstance(frame, HeadersFrame) and "END_HEADERS" not in frame.flags:
            block = frame.data
            while True:
                more = self._read_one(timeout)
                assert isinstance(more, ContinuationFrame) and more.stream_id == frame.stream_id, (
                    f"field block interrupted by {more} (RFC 9113 6.10)"
                )
                block += more.data
                if "END_HEADERS" in more.flags:
                    break
            frame.data = block
            frame.flags.add("END_HEADERS")
        if frame is not None:
            self._handle(frame)
        return frame

    def _read_one(self, timeout: float | None) -> Frame | None:
        header = self._read_exact(9, timeout)
        if header is None:
            return None
        frame, length = Frame.parse_frame_header(memoryview(header))
        body = self._read_exact(length, timeout) if length else b""
        if body is None:
            raise AssertionError(f"connection closed inside a frame {frame}{self.describe()}")
        frame.parse_body(memoryview(body))
        self.received.append(frame)
        return frame

    def _read_exact(self, size: int, timeout: float | None) -> bytes | None:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while len(self._buffer) < size:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no frame from the proxy in time{self.describe()}") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                if self._buffer:
                    raise AssertionError(f"closed inside a frame header{self.describe()}")
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _handle(self, frame: Frame) -> None:
        stream = self.streams.setdefault(frame.stream_id, Stream(frame.stream_id)) if frame.stream_id else None
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.server_settings = {**(self.server_settings or {}), **frame.settings}
                self._send_quietly(SettingsFrame(0, flags=["ACK"]))
        elif isinstance(frame, PingFrame):
            if "ACK" not in frame.flags:
                self._send_quietly(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]))
        elif isinstance(frame, WindowUpdateFrame):
            if frame.stream_id:
                self._stream_windows[frame.stream_id] = (
                    self._stream_windows.get(frame.stream_id, 0) + frame.window_increment
                )
            else:
                self.send_window += frame.window_increment
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame
        elif isinstance(frame, RstStreamFrame):
            stream.reset = frame.error_code
        elif isinstance(frame, HeadersFrame):
            fields = [(n.decode(), v.decode()) for n, v in self.decoder.decode(frame.data, raw=True)]
            if stream.headers is None and any(n == ":status" and v.startswith("1") for n, v in fields):
                stream.informational.append(fields)
            elif stream.headers is None:
                stream.headers = fields
            else:
                stream.trailers = fields
            stream.ended = stream.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, DataFrame):
            stream.body += frame.data
            stream.ended = stream.ended or "END_STREAM" in frame.flags
            used = frame.flow_controlled_length
            if self.auto_window and used:
                updates = [WindowUpdateFrame(0, window_increment=used)]
                if not stream.ended:
                    updates.append(WindowUpdateFrame(frame.stream_id, window_increment=used))
                self._send_quietly(*updates)

    def _send_quietly(self, *frames: Frame) -> None:
        """Bookkeeping replies: a proxy that already closed its side is not a test failure here."""
        try:
            self.send(*frames)
        except OSError:
            pass

    # -- waiting for outcomes ------------------------------------------------------------

    def read_until(self, done, timeout: float | None = None) -> None:
        """Reads frames until `done()` holds; ConnectionEnded if the proxy closes first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gave up waiting after {timeout or self.timeout}s{self.describe()}")
            if self.read_frame(left) is None:
                raise ConnectionEnded(f"connection closed{self.describe()}")

    def response(self, stream_id: int, timeout: float | None = None) -> Stream:
        """Reads until `stream_id` has ended or been reset; returns it."""
        stream = self.streams.setdefault(stream_id, Stream(stream_id))
        self.read_until(lambda: stream.done, timeout)
        return stream

    def ping(self, payload: bytes = b"syncsync") -> None:
        """A PING round trip: everything the proxy sent before its ACK has then been read."""
        self.send(PingFrame(0, opaque_data=payload))
        self.read_until(
            lambda: any(
                isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == payload
                for f in self.received
            )
        )

    def connection_error(self, timeout: float | None = None) -> int:
        """Reads until the proxy closes; it must have sent GOAWAY first. Returns its code."""
        self.wait_closed(timeout)
        assert self.goaway is not None, f"closed without GOAWAY{self.describe()}"
        return self.goaway.error_code

    def wait_closed(self, timeout: float | None = None) -> None:
        """Reads (and handles) frames until the proxy closes the connection."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {timeout or self.timeout}s{self.describe()}")
            self.read_frame(left)

    def describe(self, last: int = 12) -> str:
        frames = [_frame_text(f) for f in self.received[-last:]]
        more = f" (last {last} of {len(self.received)})" if len(self.received) > last else ""
        closed = ", then closed" if self.closed else ""
        return f"\nreceived{more}: {frames}{closed}"


def _code(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


def _frame_text(frame: Frame) -> str:
    if isinstance(frame, GoAwayFrame):
        return f"GOAWAY({_code(frame.error_code)}, last={frame.last_stream_id}, {frame.additional_data[:80]!r})"
    if isinstance(frame, RstStreamFrame):
        return f"RST_STREAM({frame.stream_id}, {_code(frame.error_code)})"
    if isinstance(frame, DataFrame):
        return f"DATA({frame.stream_id}, {len(frame.data)}B, {sorted(frame.flags)})"
    return repr(frame)[:160]


def code_name(code: int | None) -> str:
    return "none" if code is None else _code(code)


# -- the well-behaved path ---------------------------------------------------------------


@dataclass
class Fetched:
    """One response as the h2 library received it."""

    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] | None
    reset: int | None

    @property
    def status(self) -> int:
        return int(dict(self.headers)[":status"])


def fetch(
    address: tuple[str, int],
    fields: list[tuple[str, str]],
    body: bytes | None = None,
    trailers: list[tuple[str, str]] | None = None,
    count: int = 1,
    timeout: float = TIMEOUT,
) -> list[Fetched]:
    """Sends the same request `count` times, concurrently on one connection, through the h2
    library, which raises on anything the proxy sends that RFC 9113 forbids (connection-
    specific fields, bad pseudo-headers, window overruns). Returns the responses in order."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    ids = []
    for _ in range(count):
        stream_id = conn.get_next_available_stream_id()
        ids.append(stream_id)
        conn.send_headers(stream_id, fields, end_stream=body is None and trailers is None)
        if body is not None:
            conn.send_data(stream_id, body, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(stream_id, trailers, end_stream=True)
    results = {i: Fetched([], b"", None, None) for i in ids}
    finished: set[int] = set()
    deadline = time.monotonic() + timeout
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(conn.data_to_send())
        while len(finished) < len(ids):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"h2 fetch: {len(finished)} of {count} answered: {results}") from None
            if not data:
                raise AssertionError(f"h2 fetch: closed with {len(finished)} of {count} answered: {results}")
            for event in conn.receive_data(data):
                result = results.get(getattr(event, "stream_id", None))
                if isinstance(event, h2.events.ResponseReceived):
                    result.headers = [(n.decode(), v.decode()) for n, v in event.headers]
                elif isinstance(event, h2.events.TrailersReceived):
                    result.trailers = [(n.decode(), v.decode()) for n, v in event.headers]
                elif isinstance(event, h2.events.DataReceived):
                    result.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    finished.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    result.reset = event.error_code
                    finished.add(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise AssertionError(f"h2 fetch: GOAWAY {event}; so far {results}")
            sock.sendall(conn.data_to_send())
    return [results[i] for i in ids]
