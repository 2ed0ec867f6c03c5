"""Minimal HTTP/1.1 wire reading shared by the recording upstream and the raw client.

This is deliberately not an HTTP library: it reads exactly the bytes a peer sent and
parses only as much as a test needs, strictly (CRLF line endings, hex chunk sizes), so
that anything a proxy gets wrong shows up as a `WireError` with the bytes attached
instead of being silently repaired.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

CRLF = b"\r\n"
_MAX_HEAD = 1 << 20
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?")


class WireError(Exception):
    """The peer sent something this strict reader cannot parse."""


class PeerClosed(WireError):
    """The peer closed (or reset) the connection before a complete message arrived."""


class HeaderAccess:
    """Case-insensitive look-ups over an ordered `headers` list of (name, value) strings."""

    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        return bool(self.get_all(name))

    def joined(self, name: str) -> str:
        """All field lines of `name` combined into one list value, as RFC 9110 5.3 allows."""
        return ", ".join(self.get_all(name))

    def tokens(self, name: str) -> list[str]:
        """The comma-separated elements of `name`, lower-cased (for Connection, TE, ...)."""
        return [t.strip().lower() for t in self.joined(name).split(",") if t.strip()]


@dataclass
class Head(HeaderAccess):
    """A parsed message head: the start line and the field lines in wire order and case."""

    start_line: str
    headers: list[tuple[str, str]]
    raw: bytes


@dataclass
class Body:
    """A decoded message body and how it was framed on the wire."""

    data: bytes = b""
    framing: str = "none"  # "none" | "length" | "chunked" | "close"
    trailers: list[tuple[str, str]] = field(default_factory=list)


class BufferedSocket:
    """A blocking socket with a read buffer; every byte received is also passed to `on_data`."""

    def __init__(self, sock: socket.socket, on_data=None):
        self.sock = sock
        self.buffer = b""
        self._on_data = on_data

    def _fill(self) -> bool:
        """Receives more bytes; False at end of stream (a reset counts as the end)."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            data = b""
        if data and self._on_data is not None:
            self._on_data(data)
        self.buffer += data
        return bool(data)

    def read_until(self, delimiter: bytes, limit: int = _MAX_HEAD) -> bytes:
        """Returns the bytes up to and including `delimiter`."""
        while (end := self.buffer.find(delimiter)) < 0:
            if len(self.buffer) > limit:
                raise WireError(f"no {delimiter!r} within {limit} bytes: {self.buffer[:200]!r}")
            if not self._fill():
                raise PeerClosed(f"closed before {delimiter!r}; had {self.buffer!r}")
        end += len(delimiter)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise PeerClosed(f"closed after {len(self.buffer)} of {n} body bytes")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _parse_field(line: bytes) -> tuple[str, str]:
    name, colon, value = line.partition(b":")
    if not colon or not name or name != name.strip() or b"\r" in line or b"\n" in line:
        raise WireError(f"malformed field line {line!r}")
    return name.decode("latin-1"), value.strip(b" \t").decode("latin-1")


def read_head(stream: BufferedSocket) -> Head:
    """Reads one message head, which must use CRLF line endings and no obs-fold."""
    raw = stream.read_until(CRLF + CRLF)
    lines = raw[:-4].split(CRLF)
    try:
        headers = [_parse_field(line) for line in lines[1:]]
    except WireError as exc:
        raise WireError(f"{exc} in head {raw!r}") from None
    return Head(lines[0].decode("latin-1"), headers, raw)


def _content_length(head: Head) -> int | None:
    values = head.get_all("content-length")
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].isdigit():
        raise WireError(f"bad Content-Length {values!r} in {head.raw!r}")
    return int(values[0])


def is_chunked(head: Head) -> bool:
    codings = head.tokens("transfer-encoding")
    return bool(codings) and codings[-1] == "chunked"


def read_chunked(stream: BufferedSocket) -> Body:
    """Reads a chunked body (RFC 9112 7.1) strictly, including trailer fields."""
    data = b""
    while True:
        line = stream.read_until(CRLF)[:-2]
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise WireError(f"bad chunk-size line {line!r}")
        size = int(match.group(1), 16)
        if size == 0:
            break
        data += stream.read_exact(size)
        if stream.read_exact(2) != CRLF:
            raise WireError("chunk data not followed by CRLF")
    trailers = []
    while line := stream.read_until(CRLF)[:-2]:
        trailers.append(_parse_field(line))
    return Body(data, "chunked", trailers)


def read_request_body(stream: BufferedSocket, head: Head) -> Body:
    """Reads a request body framed as RFC 9112 6.3 says; no framing means no body."""
    if head.has("transfer-encoding"):
        if not is_chunked(head):
            raise WireError(f"request with unknown transfer coding: {head.raw!r}")
        return read_chunked(stream)
    length = _content_length(head)
    if length is None:
        return Body()
    return Body(stream.read_exact(length), "length")


def read_response_body(stream: BufferedSocket, head: Head, status: int, method: str) -> Body:
    """Reads a response body framed as RFC 9112 6.3 says (HEAD, 1xx, 204, 304 have none)."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return Body()
    if head.has("transfer-encoding") and is_chunked(head):
        return read_chunked(stream)
    length = _content_length(head)
    if length is not None and not head.has("transfer-encoding"):
        return Body(stream.read_exact(length), "length")
    return Body(stream.read_to_eof(), "close")
