"""HTTP/1.1 codecs: one sans-I/O interface, two implementations, chosen by name.

========== ============================================ ==========================
name       parses with                                  writes with
========== ============================================ ==========================
h11        h11 (the reference; pure Python)             h11
httptools  llhttp, through httptools (C), for fields;   ``wire.py``
           sluice's own framing
auto       httptools when it imports, else h11
========== ============================================ ==========================

Both take the same accept/reject decisions (``heads.py`` holds the rules,
``tests/test_codec_differential.py`` holds the codecs to them) and produce
the same events (``events.py``). A codec is two classes with this interface,
each connection object carrying one HTTP/1.1 connection's protocol state:

``ServerConnection(max_head_bytes=, max_header_count=)``, the downstream side
    ``feed(data)`` bytes received (``b""``: the peer closed);
    ``next_event()`` -> RequestHead | Body | End | Closed | NEED_DATA, or
    raises ProtocolError (its ``status`` is the answer to send);
    ``has_buffered``; ``waiting_for_100_continue``; ``peer_http_version``;
    ``informational(response)``, ``respond(response)``, ``data(chunk)``,
    ``end(trailers)`` -> the bytes to write (LocalProtocolError when the
    framing forbids it); ``response_started``; ``reusable()``; ``next_cycle()``;
    ``upgrade``: the ``Upgrade`` value the last request proposes (None when
    it proposes none, by the table in ``heads.py``); ``switch(response)`` ->
    the 101's bytes, after which the connection is a tunnel and
    ``take_buffered()`` hands back the bytes already received past the
    request head (LocalProtocolError when no upgrade was proposed).

``ClientConnection(max_head_bytes=, max_header_count=)``, the upstream side
    ``request(request, chunked=)`` -> bytes, starting a cycle; ``data``,
    ``end`` as above; ``feed``; ``next_event()`` -> Informational |
    ResponseHead | Body | End | NEED_DATA; ``response_bytes_seen``;
    ``reusable()``; ``next_cycle()``. A 101 is an Informational accepted
    only when the request carried an ``Upgrade`` field (else ProtocolError);
    the connection is then a tunnel, and ``take_buffered()`` hands back the
    bytes that followed the 101's head.

``reusable()`` speaks of the protocol only: whether the bytes *handed out*
finished a message. Whether they reached the wire is the edge's to know.
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import Closed, ProtocolError
from .targets import normalize_path
from .wire import reason_phrase, simple_response

__all__ = ["CODECS", "Codec", "UpstreamSide", "normalize_path", "reason_phrase", "select",
           "simple_response"]

CODECS = ("auto", "h11", "httptools")


class UpstreamSide:
    """What both codecs' ClientConnection add to their peer class (mixed in
    before it): the signal for a safe retry, and the upstream's rules that
    bytes after a complete response, or a close before one, are broken."""

    response_bytes_seen = False  # any byte of a response arrived (request() resets it)
    _request_fields: list[tuple[bytes, bytes]] = []  # the fields of the request written last

    def _proposed(self) -> bool:
        """The request carried an ``Upgrade`` field, so a 101 may answer it
        (asked only of a 101: no per-request scan for the rare case)."""
        return any(n == b"upgrade" for n, _ in self._request_fields)

    def feed(self, data: bytes) -> None:
        if data:
            self.response_bytes_seen = True
        super().feed(data)

    def reusable(self) -> bool:
        return super().reusable() and not self._buf

    def _closed_at_boundary(self):
        if self._awaiting_response():
            raise ProtocolError("upstream closed the connection before responding")
        return Closed()

    def _awaiting_response(self) -> bool:  # pragma: no cover - per codec
        raise NotImplementedError


@dataclass(frozen=True)
class Codec:
    """An HTTP/1.1 codec: its name and its two connection classes."""

    name: str
    server: type
    client: type


def select(name: str = "auto") -> Codec:
    """The codec called ``name``; ``auto`` prefers httptools.

    ImportError when ``httptools`` is asked for by name and does not import.
    """
    if name not in CODECS:
        raise ValueError(f"unknown HTTP/1 codec {name!r}; choose one of {', '.join(CODECS)}")
    if name in ("auto", "httptools"):
        try:
            import httptools  # noqa: F401  (only its absence means h11)
        except ImportError:
            if name == "httptools":
                raise
        else:
            from . import httptools_codec as module

            return Codec("httptools", module.ServerConnection, module.ClientConnection)
    from . import h11_codec as module

    return Codec("h11", module.ServerConnection, module.ClientConnection)
