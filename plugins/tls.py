"""Plugin ``tls``: TLS termination on listeners and origination to upstreams.

Stdlib ``ssl`` over ``trio.SSLStream``, TLS 1.2 at the least.

Listener (``[listeners.tls]``): ``cert`` and ``key`` (PEM files),
``min_version``. The handshake must finish within the listener's
``header_read`` timeout. The peer identity in ``ctx.tls_peer`` carries the
negotiated version and cipher, and ``server_name``: the SNI the client sent,
lower-cased, or None (routes match it with ``sni``). Client certificates
come with mTLS later.

Cluster (``[clusters.NAME.tls]``): certificates are verified against the
system store or ``ca``, with hostname checking; ``server_name`` overrides the
SNI and verified name (default: the endpoint host). ``verify = false``
exists for test rigs and is loudly named.
"""

from __future__ import annotations

import ssl
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import trio
from pydantic import BaseModel, ConfigDict, FilePath

from sluice import ClientTransport, ServerTransport, Transport, hookimpl

__all__ = ["Tls"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerTls(_Model):
    cert: FilePath
    key: FilePath
    key_password: str | None = None  # for an encrypted key (never prompted for)
    min_version: Literal["1.2", "1.3"] = "1.2"


class ClusterTls(_Model):
    verify: bool = True
    ca: FilePath | None = None
    server_name: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


def _password(cfg: ListenerTls) -> str:
    # Without a callable, OpenSSL would prompt on the terminal and hang startup.
    if cfg.key_password is None:
        raise ValueError(f"{cfg.key} is encrypted: set key_password")
    return cfg.key_password


# The SNI callback runs inside do_handshake, in the task that called it: it
# hands the name to that task through this holder (ssl gives the server side
# no other way to read the name the client sent).
_SNI: ContextVar[list[str | None]] = ContextVar("sluice_tls_sni")


def _remember_sni(ssl_object, server_name: str | None, context) -> None:
    holder = _SNI.get(None)
    if holder is not None:
        holder.append(server_name)


class _Server(ServerTransport):
    def __init__(self, cfg: ListenerTls) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = _VERSIONS[cfg.min_version]
        ctx.load_cert_chain(Path(cfg.cert), Path(cfg.key), password=lambda: _password(cfg))
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = _remember_sni
        self.context = ctx

    def offer(self, protocols: list[str]) -> None:
        self.context.set_alpn_protocols(protocols)

    async def wrap_server(self, stream):
        tls = trio.SSLStream(stream, self.context, server_side=True, https_compatible=True)
        sni: list[str | None] = []
        token = _SNI.set(sni)
        try:
            await tls.do_handshake()
        finally:
            _SNI.reset(token)
        cipher = tls.cipher()
        name = sni[0].lower() if sni and sni[0] else None
        return tls, {"version": tls.version(), "cipher": cipher[0] if cipher else None, "server_name": name}


class _Client(ClientTransport):
    def __init__(self, cfg: ClusterTls) -> None:
        ctx = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca else None)
        ctx.minimum_version = _VERSIONS[cfg.min_version]
        if not cfg.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        self.context = ctx
        self.server_name = cfg.server_name

    def offer(self, protocols: list[str]) -> None:
        self.context.set_alpn_protocols(protocols)

    async def wrap_client(self, stream, server_name: str):
        tls = trio.SSLStream(stream, self.context, server_hostname=server_name, https_compatible=True)
        await tls.do_handshake()
        return tls


class Tls(Transport):
    """TLS 1.2+ termination (listeners) and verified origination (clusters)."""

    name = "tls"
    ServerConfig = ListenerTls
    ClientConfig = ClusterTls

    @classmethod
    def server(cls, config: ListenerTls) -> ServerTransport:
        return _Server(config)

    @classmethod
    def client(cls, config: ClusterTls) -> ClientTransport:
        return _Client(config)


@hookimpl
def sluice_transports():
    return [Tls]
