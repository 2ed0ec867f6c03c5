"""HTTP/1.1 serialisation: heads, chunked framing, whole small responses. No I/O.

The one place sluice writes HTTP/1.1 bytes itself (the h11 codec lets h11
write). Field names arrive lower-case and values already checked (parsed
fields passed a parser; fields a filter added passed ``Headers``), so
serialising is joining: no per-field validation on the hot path.
``tests/test_protocol_wire.py`` feeds every shape written here to h11 and to
llhttp and checks both read back what was meant.
"""

from __future__ import annotations

__all__ = [
    "LAST_CHUNK",
    "chunk",
    "last_chunk",
    "reason_phrase",
    "request_head",
    "response_head",
    "simple_response",
]

_REASONS = {
    100: "Continue", 101: "Switching Protocols", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified",
    307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
_STATUS_LINES = {s: b"HTTP/1.1 %d %s\r\n" % (s, r.encode()) for s, r in _REASONS.items()}

LAST_CHUNK = b"0\r\n\r\n"


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "")


def _fields(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([n + b": " + v + b"\r\n" for n, v in fields])


def request_head(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A request line and fields; Host goes first, as RFC 9110 7.2 asks of clients."""
    if fields and fields[0][0] != b"host":
        host = [f for f in fields if f[0] == b"host"]
        if host:
            fields = host + [f for f in fields if f[0] != b"host"]
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _fields(fields))


def response_head(status: int, reason: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A status line and fields; ``reason`` empty means the standard phrase."""
    line = _STATUS_LINES.get(status) if not reason else None
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status).encode())
    return line + _fields(fields) + b"\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty: that would end it)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    """The end of a chunked body, with its trailer fields."""
    return b"0\r\n" + _fields(trailers) + b"\r\n" if trailers else LAST_CHUNK


def simple_response(
    status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] = (), close: bool = True
) -> bytes:
    """A complete response outside of any exchange.

    Used to answer a head that never became a request (a parser refused it),
    so the connection is closed afterwards by default.
    """
    fields = [*headers, (b"content-length", b"%d" % len(body))]
    if close:
        fields.append((b"connection", b"close"))
    return response_head(status, b"", fields) + body
