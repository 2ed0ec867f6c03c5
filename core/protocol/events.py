"""Protocol-agnostic events the sans-I/O adapters emit, and their error contract.

The HTTP/1.1 adapter (and the HTTP/2 one that follows) turns bytes into these
events and these intents back into bytes; the trio edge never sees h11 or h2.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..messages import Headers, Request, Response

__all__ = [
    "Body",
    "Closed",
    "End",
    "Informational",
    "LocalProtocolError",
    "NEED_DATA",
    "ProtocolError",
    "RequestHead",
    "ResponseHead",
]


class ProtocolError(Exception):
    """The peer broke the protocol.

    ``status`` is the answer a server should send before closing (400, 413,
    414, 431, 501, 505); on the upstream side every ProtocolError becomes a
    502. ``method`` and ``target`` are the request line's, when it was read
    before the error (for the access log); else None.
    """

    def __init__(self, message: str, status: int = 400, *, method: str | None = None,
                 target: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.method = method
        self.target = target


class LocalProtocolError(Exception):
    """We were asked to send what the message's framing forbids (a body
    longer or shorter than its Content-Length, a body where none may be):
    a bug in the exchange or a filter, never the peer's fault."""


@dataclass(slots=True)
class RequestHead:
    request: Request
    expect_continue: bool = False
    has_body: bool = False
    content_length: int | None = None


@dataclass(slots=True)
class ResponseHead:
    response: Response


@dataclass(slots=True)
class Informational:
    """A 1xx response (100 Continue, 103 Early Hints, ...)."""

    response: Response


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class End:
    """The message is complete; ``trailers`` is None when there were none."""

    trailers: Headers | None = None


@dataclass(slots=True)
class Closed:
    """The peer closed its side cleanly at a message boundary."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by ``next_event()`` when more bytes must be fed first."""
