"""What the HTTP/2 protocol objects (``h2_codec``, ``h2_client``) hand the edge,
besides the HTTP/1.1 codecs' events: no I/O, no h2 state."""

from __future__ import annotations

from dataclasses import dataclass

from .events import ProtocolError, RequestHead

__all__ = ["PREFACE", "Data", "Refused", "StreamReset", "Terminated", "WebSocketHead", "WindowOpen"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

@dataclass(slots=True)
class Data:
    """Request body bytes, with the flow-controlled size to acknowledge once
    the exchange took them (padding included, RFC 9113 6.9.1)."""

    data: bytes
    size: int


@dataclass(slots=True)
class WebSocketHead:
    """An extended CONNECT for a WebSocket (RFC 8441), as the HTTP/1.1
    handshake it becomes: ``head`` is its GET with ``Upgrade: websocket``,
    ``key`` the Sec-WebSocket-Key in it, which the upstream's 101 must answer
    (``open_tunnel``)."""

    head: RequestHead
    key: bytes


@dataclass(slots=True)
class StreamReset:
    """The client reset the stream (or h2 did, for a stream error)."""

    code: int


@dataclass(slots=True)
class WindowOpen:
    """The peer opened a flow-control window (stream 0: the connection's,
    or every stream's, after a SETTINGS change): sends waiting may go on."""


@dataclass(slots=True)
class Refused:
    """A request sluice answers itself, never forwards: ``status`` and why
    (status 0: a malformed one, already reset with PROTOCOL_ERROR)."""

    status: int
    error: ProtocolError


@dataclass(slots=True)
class Terminated:
    """The connection is over: the client sent GOAWAY, or broke the protocol
    (then ``pending()`` holds our GOAWAY)."""

    error_code: int
    last_stream_id: int
    reason: str = ""
