"""Plugin ``tls``: TLS termination on listeners and origination to upstreams.

Stdlib ``ssl`` over ``trio.SSLStream``, TLS 1.2 at the least. Settings are in
``.settings``; the README's "Securing traffic" section has the examples.

Listener (``[listeners.tls]``): ``cert`` and ``key`` (PEM files), and/or
several ``[[listeners.tls.certificates]]`` chosen by SNI (``.certs``: wildcards,
a default, rotation without restart); ``min_version``, ``max_version``,
``ciphers``. ``client_auth = "request" | "require"`` asks for a client
certificate verified against ``client_ca`` (an untrusted one fails the
handshake, logged as ``tls handshake failed`` with the reason). The handshake
must finish within the listener's ``header_read`` timeout. ``ctx.tls_peer``
carries the negotiated ``version`` and ``cipher``, ``server_name`` (the SNI,
lower-cased, or None: routes match it with ``sni``), and the client's identity
(``.identity``): ``verified``, ``subject``, ``dns_sans``, ``uri_sans``,
``spiffe_id``, ``cert_sha256``. ``forward_client_cert`` says what becomes of
``x-forwarded-client-cert`` (Envoy's modes; sluice.proxy.forwarding applies it).

Cluster (``[clusters.NAME.tls]``): certificates are verified against the
system store or ``ca``, with hostname checking; ``server_name`` overrides the
SNI and verified name (default: the endpoint host). ``cert``/``key`` is the
client certificate shown to upstreams; ``verify_san``/``verify_spiffe_id`` pin
the names the upstream's certificate must carry (a mismatch fails the connect:
the core's 503 with flag UF, and ``tls peer not allowed`` names what was seen).
``verify = false`` exists for test rigs and is loudly named.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import structlog
import trio
from cryptography import x509

from sluice import ClientTransport, ServerTransport, Transport, hookimpl

from .certs import SNI, CertStore
from .identity import describe, names
from .settings import VERSIONS, ClusterTls, ListenerTls

__all__ = ["Tls"]

log = structlog.get_logger("sluice.tls")


class _Server(ServerTransport):
    def __init__(self, cfg: ListenerTls) -> None:
        self.certs = CertStore(cfg)
        self.forward_client_cert = cfg.forward_client_cert
        self._details = list(cfg.client_cert_details)
        self._asks = cfg.client_auth != "none"

    def offer(self, protocols: list[str]) -> None:
        self.certs.offer(protocols)

    async def wrap_server(self, stream):
        self.certs.refresh()
        tls = trio.SSLStream(stream, self.certs.loaded.default, server_side=True, https_compatible=True)
        sni: list[str | None] = []
        token = SNI.set(sni)
        try:
            await tls.do_handshake()
        finally:
            SNI.reset(token)
        peer = describe(tls.getpeercert(binary_form=True) if self._asks else None, self._details,
                        self.certs.loaded.by_of(tls.context))
        cipher = tls.cipher()
        peer.update(version=tls.version(), cipher=cipher[0] if cipher else None,
                    server_name=sni[0].lower() if sni and sni[0] else None)
        return tls, peer

    def client_cert(self, peer) -> bytes | None:
        return getattr(peer, "xfcc", None)

    def refusal(self, exc: BaseException) -> str | None:
        cause = exc.__cause__ if not isinstance(exc, ssl.SSLError) else exc
        if not isinstance(cause, ssl.SSLError):
            return None
        reason = getattr(cause, "verify_message", None) or cause.reason or ""
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE" in reason.upper():
            return f"{cause.reason}: {reason}" if reason != cause.reason else reason
        return None

    def expiry(self) -> dict[str, float]:
        self.certs.refresh()
        return dict(self.certs.loaded.expiry)


class PeerNotAllowed(Exception):
    """The upstream's verified certificate carries none of the pinned names."""


class _Client(ClientTransport):
    def __init__(self, cfg: ClusterTls) -> None:
        ctx = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca else None)
        ctx.minimum_version = VERSIONS[cfg.min_version]
        if cfg.max_version is not None:
            ctx.maximum_version = VERSIONS[cfg.max_version]
        if cfg.ciphers is not None:
            ctx.set_ciphers(cfg.ciphers)
        if not cfg.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert is not None:
            password = cfg.key_password

            def ask() -> str:  # never let OpenSSL prompt on the terminal
                if password is None:
                    raise ValueError(f"{cfg.key} is encrypted: set key_password")
                return password
            ctx.load_cert_chain(Path(cfg.cert), Path(cfg.key), password=ask)
        ctx.set_alpn_protocols(["http/1.1"])
        self.context = ctx
        self.server_name = cfg.server_name
        self._sans = frozenset(n.lower() for n in cfg.verify_san)
        self._spiffe = frozenset(cfg.verify_spiffe_id)

    def offer(self, protocols: list[str]) -> None:
        self.context.set_alpn_protocols(protocols)

    async def wrap_client(self, stream, server_name: str):
        tls = trio.SSLStream(stream, self.context, server_hostname=server_name, https_compatible=True)
        await tls.do_handshake()
        if self._sans or self._spiffe:
            self._pin(tls, server_name)
        return tls

    def _pin(self, tls: trio.SSLStream, server_name: str) -> None:
        dns, uris = names(x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)))
        if self._sans & {d.lower() for d in dns} or self._spiffe & set(uris):
            return
        log.warning("tls peer not allowed", server_name=server_name, dns_sans=dns, uri_sans=uris,
                    allowed_sans=sorted(self._sans), allowed_spiffe_ids=sorted(self._spiffe))
        raise PeerNotAllowed(f"the upstream's certificate names {dns + uris}, none of them pinned")


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
