"""The Transport interface: how bytes are protected on a listener or a cluster.

Transports come from plugins (``sluice_transports``). A listener with a
``tls`` table wraps every accepted stream with ``server(settings)``; a
cluster with a ``tls`` table wraps every upstream connection with
``client(settings)``. Settings are validated by the transport's models.
"""

from __future__ import annotations

from typing import Any, ClassVar

import trio
from pydantic import BaseModel

__all__ = ["ClientTransport", "ServerTransport", "Transport"]


class ServerTransport:
    """Wraps accepted connections (e.g. TLS termination).

    A transport that negotiates the application protocol (TLS ALPN) offers
    what ``offer`` was given, and its wrapped stream tells the outcome by
    ``selected_alpn_protocol()`` (as ``trio.SSLStream`` does); a listener
    with HTTP/2 enabled offers ``["h2", "http/1.1"]`` and serves HTTP/2 when
    ``h2`` was selected.
    """

    def offer(self, protocols: list[str]) -> None:
        """The protocols to offer by ALPN, in order of preference (the
        default ignores them: such a transport carries HTTP/1.1 only)."""

    # What becomes of an incoming x-forwarded-client-cert (sluice.proxy.forwarding): Envoy's
    # modes; "sanitize" strips it, as on a listener without a transport.
    forward_client_cert: str = "sanitize"

    async def wrap_server(self, stream: trio.abc.Stream) -> tuple[trio.abc.Stream, dict[str, Any] | None]:
        """Return the protected stream and the peer's identity (or None)."""
        raise NotImplementedError

    def client_cert(self, peer: dict[str, Any] | None) -> bytes | None:
        """This connection's x-forwarded-client-cert element (None: no client certificate)."""
        return None

    def refusal(self, exc: BaseException) -> str | None:
        """Why a handshake failed, when the listener should warn of it (the peer's
        certificate was refused), else None (garbage and resets are routine)."""
        return None

    def expiry(self) -> dict[str, float]:
        """The certificates served, each with when it expires (Unix time): a gauge."""
        return {}


class ClientTransport:
    """Wraps upstream connections (e.g. TLS origination).

    A cluster with ``protocol = "h2"`` offers ``["h2"]`` by ``offer``, and
    its wrapped streams must say what was selected by
    ``selected_alpn_protocol()``; anything but ``h2`` fails the connect.
    """

    def offer(self, protocols: list[str]) -> None:
        """The protocols to offer by ALPN, in order of preference (the
        default ignores them: such a transport carries HTTP/1.1 only)."""

    async def wrap_client(self, stream: trio.abc.Stream, server_name: str) -> trio.abc.Stream:
        raise NotImplementedError


class Transport:
    """Base of transport plugins: validated settings in, wrappers out."""

    name: ClassVar[str] = ""
    ServerConfig: ClassVar[type[BaseModel]]
    ClientConfig: ClassVar[type[BaseModel]]

    @classmethod
    def server(cls, config: BaseModel) -> ServerTransport:
        raise NotImplementedError

    @classmethod
    def client(cls, config: BaseModel) -> ClientTransport:
        raise NotImplementedError
