"""Where a provider's verification keys come from: a secret, a JWKS file, or a JWKS fetched through a cluster.

Every source answers ``keys_for(parsed)`` (the keys that may verify this
token) without I/O; only a remote JWKS ever waits, in ``refetch``, and
only for a fetch that is already running or that the rate limit allows.

- ``Secret``: one HMAC key, the provider's ``secret`` setting (a
  ``sluice.secrets.Secret``: inline, from a file or an environment variable), the
  only way an HS algorithm gets a key (a JWKS's symmetric keys are
  dropped), so a provider's public RSA key can never serve as an HMAC
  secret: HS/RS confusion has no key to work with.
- ``JwksFile``: read at load (a bad file is a config error), then watched
  by its stat (``sluice.filestamp``) every ``file_poll`` seconds; a file that
  becomes bad keeps the last good set and is logged once until fixed.
- ``RemoteJwks``: fetched through the provider's cluster at open, then
  every ``cache_ttl``; an unknown ``kid`` fetches again at once, at most
  once per ``refetch_interval`` (the scheduled fetches do not count, so a
  key published just after one is still picked up by the first token that
  uses it), and every request that meets the unknown kid meanwhile waits
  for that one fetch. A failed fetch keeps the last
  good set (stale while error), is retried with a backoff (1 s doubling up
  to ``cache_ttl``, at most 60 s), logged once per outage (``jwks fetch
  failed``, then ``jwks fetch recovered`` with ``down_for``) and counted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
import trio
from joserfc import jwk

from sluice.filestamp import FileStamp
from sluice.messages import Headers, Request

from ..cluster_call import CallError, call
from .tokens import Parsed, key_fits

__all__ = ["JwksFile", "RemoteJwks", "Secret", "load_jwks"]

log = structlog.get_logger("sluice.jwt")

MAX_JWKS_BYTES = 1 << 20


class KeyIndex:
    """A key set as looked up per token: by kid, else every key fitting the algorithm."""

    def __init__(self, keys: list[Any]) -> None:
        self.keys = keys
        self.by_kid = {k.kid: k for k in keys if k.kid}

    def candidates(self, parsed: Parsed) -> list[Any] | None:
        """Keys that may verify ``parsed``; None when its kid is not in the set."""
        if parsed.kid is not None:
            key = self.by_kid.get(parsed.kid)
            if key is None:
                return None
            return [key] if key_fits(key, parsed.alg) else []
        return [k for k in self.keys if key_fits(k, parsed.alg)]


def load_jwks(data: bytes | str) -> tuple[KeyIndex, list[str]]:
    """A JWKS document's usable public keys, and what was skipped (for the log).

    ValueError when the document is not a JWKS or holds no usable key.
    Symmetric (``oct``) keys are always skipped: HMAC keys come from a
    provider's secret only. Keys whose ``use`` is not ``sig`` are skipped.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS: no "keys" list')
    keys, skipped = [], []
    for i, entry in enumerate(doc["keys"]):
        if not isinstance(entry, dict):
            skipped.append(f"keys[{i}]: not an object")
            continue
        if entry.get("kty") == "oct":
            skipped.append(f"keys[{i}]: symmetric key ignored (HMAC keys come from a secret)")
            continue
        if entry.get("use", "sig") != "sig":
            skipped.append(f"keys[{i}]: use is {entry.get('use')!r}")
            continue
        public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
        try:
            keys.append(jwk.import_key(public))
        except Exception as exc:  # noqa: BLE001 - a key joserfc cannot import is skipped, whatever the reason
            skipped.append(f"keys[{i}]: {type(exc).__name__}: {exc}")
    if not keys:
        raise ValueError("no usable signing key" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return KeyIndex(keys), skipped


class Secret:
    """An HMAC secret (HS256/384/512): the provider's ``secret``, already read by its settings."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:  # RFC 7518 3.2: a key as long as the hash (HS256: 256 bits) or longer
            raise ValueError(f"the secret is {len(secret)} bytes: at least 32 are needed")
        self.index = KeyIndex([jwk.OctKey.import_key(secret)])

    def keys_for(self, parsed: Parsed) -> list[Any] | None:
        return self.index.candidates(parsed)

    async def refetch(self) -> bool:
        return False

    async def run(self) -> None:
        return


class JwksFile:
    """A local JWKS file, reloaded when it changes."""

    def __init__(self, provider: str, path: str, poll: float) -> None:
        self.provider = provider
        self.path = Path(path)
        self.poll = poll
        self.stamp = FileStamp([self.path])
        self.index, skipped = load_jwks(self.path.read_bytes())
        self.broken = False
        if skipped:
            log.warning("jwks keys skipped", provider=provider, skipped=skipped)

    def keys_for(self, parsed: Parsed) -> list[Any] | None:
        return self.index.candidates(parsed)

    async def refetch(self) -> bool:
        return False

    async def run(self) -> None:
        while True:
            await trio.sleep(self.poll)
            if not self.stamp.changed():
                continue
            try:
                index, skipped = load_jwks(await trio.Path(self.path).read_bytes())
            except (OSError, ValueError) as exc:
                if not self.broken:
                    log.error("jwks file invalid", provider=self.provider, path=str(self.path), error=str(exc),
                              keeping=len(self.index.keys))
                self.broken = True
                continue
            self.index, self.broken = index, False
            log.info("jwks file reloaded", provider=self.provider, path=str(self.path), keys=len(index.keys),
                     skipped=skipped or None)


class RemoteJwks:
    """A JWKS fetched through a cluster: cached, refreshed, refetched on an unknown kid."""

    def __init__(self, provider: str, app: Any, cluster: str, uri: str, *, cache_ttl: float,
                 refetch_interval: float, timeout: float, fetches: Any) -> None:
        self.provider = provider
        self.app = app
        self.cluster = cluster
        parts = urlsplit(uri)
        self.host = parts.netloc
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.cache_ttl = cache_ttl
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self.index: KeyIndex | None = None
        self.last_attempt = float("-inf")  # monotonic time the last fetch started
        self.last_refetch = float("-inf")  # and the last one a request asked for
        self.down_since: float | None = None
        self._done: trio.Event | None = None  # set when the fetch in flight ends
        self._nursery: Any = None
        self._ok = fetches.labels(provider, "ok")
        self._failed = fetches.labels(provider, "failed")
        self._limited = fetches.labels(provider, "rate_limited")

    def keys_for(self, parsed: Parsed) -> list[Any] | None:
        if self.index is None:
            return None
        return self.index.candidates(parsed)

    @property
    def available(self) -> bool:
        return self.index is not None

    async def refetch(self) -> bool:
        """Fetch again for a request (unknown kid, or no set yet), waiting at most ``timeout``.

        Joins the fetch in flight, else starts one if the last one a request
        started began ``refetch_interval`` ago or more; False when rate limited (or not
        running), True once a fetch ended (whatever it found)."""
        done = self._done
        if done is None:
            now = time.monotonic()
            if self._nursery is None or now - self.last_refetch < self.refetch_interval:
                self._limited.inc()
                return False
            self.last_refetch = now
            done = self._start()
        with trio.move_on_after(self.timeout + 0.5):
            await done.wait()
        return True

    def _start(self) -> trio.Event:
        self._done = done = trio.Event()
        self.last_attempt = time.monotonic()
        self._nursery.start_soon(self._fetch, done)
        return done

    async def _get(self) -> bytes:
        """The JWKS document, fetched through the provider's cluster, as Envoy's
        ``remote_jwks.http_uri.cluster``: the key server gets what every upstream gets (the
        cluster's endpoints, balancing, TLS and client certificate, timeouts, breaker, pool)."""
        cluster = self.app.clusters.get(self.cluster)
        if cluster is None:
            raise CallError(f"cluster {self.cluster!r} is gone")
        request = Request("GET", self.target, Headers([("host", self.host), ("accept", "application/json"),
                                                       ("user-agent", "sluice-jwt")]))
        answer = await call(self.app.pool, cluster, request, b"", timeout=self.timeout, max_bytes=MAX_JWKS_BYTES)
        if answer.status != 200:
            raise CallError(f"the key server answered {answer.status}")
        return answer.body

    async def _fetch(self, done: trio.Event) -> None:
        try:
            index, skipped = load_jwks(await self._get())
        except Exception as exc:  # noqa: BLE001 - CallError, a bad JWKS, a balancing policy's bug: an outage
            self._failed.inc()
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.error("jwks fetch failed", provider=self.provider, cluster=self.cluster, target=self.target,
                          error=str(exc) if isinstance(exc, (CallError, ValueError)) else repr(exc),
                          keeping=len(self.index.keys) if self.index else 0)
            return
        finally:
            self._done = None
            done.set()
        self._ok.inc()
        if self.down_since is not None:
            log.info("jwks fetch recovered", provider=self.provider, cluster=self.cluster,
                     down_for=round(time.monotonic() - self.down_since, 3))
            self.down_since = None
        old = set(self.index.by_kid) if self.index else set()
        if set(index.by_kid) != old or self.index is None:
            log.info("jwks fetched", provider=self.provider, keys=len(index.keys), kids=sorted(index.by_kid),
                     skipped=skipped or None)
        self.index = index

    async def run(self) -> None:
        """Fetch now, then every cache_ttl; after a failure, retry with a backoff."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            backoff = 1.0
            while True:
                done = self._done or self._start()
                await done.wait()
                if self.down_since is None:
                    backoff = 1.0
                    wait = self.cache_ttl
                else:
                    wait = backoff
                    backoff = min(backoff * 2, self.cache_ttl, 60.0)
                await trio.sleep(max(0.0, self.last_attempt + wait - time.monotonic()))
