"""A listener's certificates: one SSL context per pair, chosen by SNI, and
swapped for new ones when their files change.

**Selection.** Each pair serves its ``server_names`` (default: the DNS SANs of
its certificate): an exact name first, then a wildcard ``*.example.com`` for
one label under it; no match (or no SNI) gets the default pair, the first. The
``sni_callback`` switches ``ssl_object.context`` to the chosen pair's context:
every context has the same versions, ciphers, ALPN and client CA, so only the
certificate changes.

**Rotation.** ``refresh()`` compares the files' stat (``sluice.filestamp``) with
the last one, at most once a second, and rebuilds every context when one
changed. It is called at each handshake and by the metrics sampler (every
second), so new handshakes get a new pair within about a second with no task
or watcher thread of its own to start and stop. A stat of a few files a
second costs nothing, and sees every way a file is replaced: a write in
place, a rename over it, a symlink swapped (Kubernetes' secret volumes),
where inotify through watchfiles would need a task per listener per worker
and a watch on each directory to follow renames. Connections already open
keep the context they were made with. A pair that does not load (a key that does not match, garbage, a file
half written) leaves the old contexts serving and logs ``tls certificate
reload failed`` naming the file; the next change is tried again.
"""

from __future__ import annotations

import ssl
from contextvars import ContextVar
from pathlib import Path

import structlog
from cryptography import x509

from sluice.filestamp import FileStamp

from .identity import names, not_after
from .settings import VERSIONS, Certificate, ListenerTls

__all__ = ["CertStore", "LoadError", "SNI"]

log = structlog.get_logger("sluice.tls")

CHECK_INTERVAL = 1.0  # seconds between looks at the files

# The SNI callback runs inside do_handshake, in the task that called it: it
# hands the name to that task through this holder (ssl gives the server side
# no other way to read the name the client sent).
SNI: ContextVar[list[str | None]] = ContextVar("sluice_tls_sni")


class LoadError(ValueError):
    """A file that did not load, named (``file``)."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason


def _password(pair: Certificate):
    def password() -> str:
        # Without a callable, OpenSSL would prompt on the terminal and hang startup.
        if pair.key_password is None:
            raise ValueError(f"{pair.key} is encrypted: set key_password")
        return pair.key_password
    return password


class _Loaded:
    """One build of every context, swapped whole."""

    def __init__(self, contexts: list[ssl.SSLContext], exact: dict, wildcard: dict,
                 expiry: dict[str, float], by: dict[int, str | None]) -> None:
        self.default = contexts[0]
        self.exact = exact
        self.wildcard = wildcard
        self.expiry = expiry
        self.by = by  # id(context) -> its certificate's URI SAN (a SPIFFE ID first): XFCC's By

    def by_of(self, context: ssl.SSLContext) -> str | None:
        """XFCC's By for a connection made on ``context`` (the pair SNI chose)."""
        return self.by.get(id(context))


class CertStore:
    def __init__(self, cfg: ListenerTls) -> None:
        self.cfg = cfg
        self.protocols = ["http/1.1"]
        self._files = [p for pair in cfg.pairs() for p in (pair.cert, pair.key)]
        if cfg.client_ca is not None:
            self._files.append(cfg.client_ca)
        self._stamp = FileStamp(self._files, every=CHECK_INTERVAL)
        self.loaded = self._build()  # a failure here is a config error (the caller's)

    # -- building --

    def _context(self, pair: Certificate) -> ssl.SSLContext:
        cfg = self.cfg
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = VERSIONS[cfg.min_version]
        if cfg.max_version is not None:
            ctx.maximum_version = VERSIONS[cfg.max_version]
        if cfg.ciphers is not None:
            ctx.set_ciphers(cfg.ciphers)
        try:  # the certificate itself parsed already (_build): what fails here is the key
            ctx.load_cert_chain(Path(pair.cert), Path(pair.key), password=_password(pair))
        except (OSError, ValueError) as exc:
            raise LoadError(pair.key, getattr(exc, "reason", None) or str(exc)) from None
        if cfg.client_auth != "none":
            try:
                ctx.load_verify_locations(cafile=str(cfg.client_ca))
            except (OSError, ValueError) as exc:
                raise LoadError(cfg.client_ca, getattr(exc, "reason", None) or str(exc)) from None
            ctx.verify_mode = ssl.CERT_REQUIRED if cfg.client_auth == "require" else ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(self.protocols)
        ctx.sni_callback = self._select
        return ctx

    def _build(self) -> _Loaded:
        contexts, exact, wildcard, expiry = [], {}, {}, {}
        by: dict[int, str | None] = {}
        for pair in self.cfg.pairs():
            try:
                cert = x509.load_pem_x509_certificate(Path(pair.cert).read_bytes())
            except (OSError, ValueError) as exc:
                raise LoadError(pair.cert, str(exc)) from None
            ctx = self._context(pair)
            dns, uris = names(cert)
            by[id(ctx)] = next((u for u in uris if u.startswith("spiffe://")), uris[0] if uris else None)
            for name in pair.server_names if pair.server_names is not None else [d.lower() for d in dns]:
                table, key = (wildcard, name[2:]) if name.startswith("*.") else (exact, name)
                table.setdefault(key, ctx)  # the first pair listed wins a name two claim
            expiry[str(pair.cert)] = not_after(cert)
            contexts.append(ctx)
        return _Loaded(contexts, exact, wildcard, expiry, by)

    def offer(self, protocols: list[str]) -> None:
        self.protocols = list(protocols)
        self.loaded = self._build()

    # -- serving --

    def _select(self, ssl_object, server_name: str | None, context) -> None:
        holder = SNI.get(None)
        if holder is not None:
            holder.append(server_name)
        if not server_name:
            return
        loaded = self.loaded
        name = server_name.lower().rstrip(".")
        chosen = loaded.exact.get(name)
        if chosen is None and "." in name:
            chosen = loaded.wildcard.get(name.split(".", 1)[1])
        if chosen is not None and chosen is not ssl_object.context:
            ssl_object.context = chosen

    def refresh(self) -> None:
        """Load the files again if they changed (at most once per CHECK_INTERVAL)."""
        if not self._stamp.changed():
            return
        try:
            self.loaded = self._build()
        except LoadError as exc:
            log.error("tls certificate reload failed", file=exc.file, error=exc.reason)
            return
        log.info("tls certificates reloaded", files=[str(f) for f in self._files])
