"""``EtcdClient``: etcd's v3 API through its JSON gateway, over httpx, on trio.

Every call is bounded by the client's ``timeout`` (a trio cancel scope around the whole
request, not only httpx's per-phase timeouts), and a transport failure or a timeout
becomes ``EtcdUnavailable``; an error etcd answers becomes ``EtcdRequestError`` (or
``EtcdCompacted`` for a revision compacted away).

An ``https://`` member is verified against ``ca`` (a PEM file; the system's CAs without
one), and ``cert`` and ``key`` (PEM files; ``key`` may be in ``cert``) are the client's
certificate for an etcd started with ``--client-cert-auth`` (mutual TLS).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
import trio

from .codec import KeyValue, b64, integer, key_value, prefix_end, revision_of
from .errors import EtcdRequestError, EtcdUnavailable, LeaseExpired, malformed, raise_for_error, transport_reason
from .mirror import mirror_prefix
from .watch import watch_prefix

__all__ = ["EtcdClient", "Lease", "TlsFileError", "tls_context", "tls_for", "tls_hint"]

log = structlog.get_logger("sluice.etcd")


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: attach it to keys with ``put(..., lease=lease.id)``."""

    id: int
    ttl: int


def _deleted(data: dict) -> int:
    return integer(data.get("deleted"))


def _raw(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


class TlsFileError(ValueError):
    """A TLS setting that does not load; ``key`` names it (``ca``, ``cert`` or ``key``), so that a
    caller can say where it is set (``filters.registration.ca``, ``--ca``, ``config_store.ca``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The client's TLS context: ``ca`` to verify the member (default: the system's CAs), and
    ``cert``/``key`` to show for mutual TLS. TlsFileError (a ValueError) naming the file that does not load."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError("ca", f"{ca}: not a readable PEM CA file ({exc})") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError("cert", f"{cert}{' / ' + key if key else ''}: not a readable PEM certificate and "
                                       f"its key ({exc})") from None
    elif key is not None:
        raise TlsFileError("key", "a key without its certificate (cert)")
    return context


def tls_for(url: str, ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context for a member at ``url`` with these settings: None for ``http://``, where
    any of them is a TlsFileError (they would be silently unused)."""
    if url.startswith("https://"):
        return tls_context(ca, cert, key)
    given = next((name for name, value in (("ca", ca), ("cert", cert), ("key", key)) if value is not None), None)
    if given is not None:
        raise TlsFileError(given, f"TLS settings need an https:// address (got {url})")
    return None


def tls_hint(error: BaseException, prefix: str) -> str:
    """``error``'s message, naming the setting to look at (``prefix`` + ``ca`` or ``cert``)
    when a TLS handshake with etcd is what failed."""
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"{text} (check {prefix}ca: etcd's certificate is not signed by that CA)"
    if "ALERT" in text and "CERTIFICATE" in text:  # etcd refused ours, or wanted one
        return f"{text} (check {prefix}cert: etcd did not accept the client certificate)"
    return text


class EtcdClient:
    """A client of one etcd endpoint (``url``: ``http://host:port`` or ``https://host:port``).

    Use it as ``async with EtcdClient(url) as etcd:``; it owns one httpx connection pool.
    ``tls``: the ``ssl.SSLContext`` for an ``https://`` member (``tls_context``); without it,
    one verifying against the system's CAs.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # httpx's own timeouts bound each phase; the cancel scope in _call bounds the whole.
        self._http = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout),
                                       verify=tls if tls is not None else True)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
            await self._http.aclose()

    # --- requests --------------------------------------------------------------

    async def _call(self, path: str, body: dict, parse: Callable[[dict], Any] = dict) -> Any:
        """POST ``body`` to ``path``; ``parse(answer)``, with a malformed answer an ``EtcdRequestError``."""
        try:
            with trio.fail_after(self.timeout):
                answer = await self._http.post(path, json=body)
        except trio.TooSlowError:
            raise EtcdUnavailable(f"{self.url}{path}: no answer within {self.timeout}s") from None
        except httpx.TransportError as error:
            raise EtcdUnavailable(f"{self.url}{path}: {transport_reason(error)}") from error
        try:
            data = answer.json()
        except ValueError:
            raise EtcdRequestError(f"{path}: not JSON: {answer.text[:200]!r}", status=answer.status_code) from None
        if answer.status_code != 200 or not isinstance(data, dict) or "error" in data:
            raise_for_error(answer.status_code, data if isinstance(data, dict) else {})
        with malformed(path):
            return parse(data)

    async def _first_of_stream(self, path: str, body: dict, parse: Callable[[dict], Any]) -> Any:
        """The first message of a streaming endpoint (then the stream is closed)."""
        try:
            with trio.fail_after(self.timeout):
                async with self._http.stream("POST", path, json=body) as answer:
                    async for line in answer.aiter_lines():
                        if line.strip():
                            data = json.loads(line)
                            break
                    else:
                        raise EtcdUnavailable(f"{self.url}{path}: the stream ended without an answer")
        except trio.TooSlowError:
            raise EtcdUnavailable(f"{self.url}{path}: no answer within {self.timeout}s") from None
        except httpx.TransportError as error:
            raise EtcdUnavailable(f"{self.url}{path}: {transport_reason(error)}") from error
        except ValueError:
            raise EtcdRequestError(f"{path}: not JSON") from None
        if not isinstance(data, dict) or "error" in data or answer.status_code != 200:
            raise_for_error(answer.status_code, data if isinstance(data, dict) else {})
        with malformed(path):
            return parse(data.get("result", data))

    # --- keys --------------------------------------------------------------------

    async def get_prefix(self, prefix: bytes | str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the store's revision they were read at."""
        raw = _raw(prefix)
        return await self._call("/v3/kv/range", {"key": b64(raw), "range_end": b64(prefix_end(raw))},
                                lambda data: (revision_of(data), [key_value(kv) for kv in data.get("kvs", ())]))

    async def count_prefix(self, prefix: bytes | str) -> tuple[int, int]:
        """(how many keys are under ``prefix``, the store's revision): a cheap read that goes
        through the cluster's quorum (a member cut off from it cannot answer)."""
        raw = _raw(prefix)
        body = {"key": b64(raw), "range_end": b64(prefix_end(raw)), "count_only": True}
        return await self._call("/v3/kv/range", body, lambda data: (integer(data.get("count")), revision_of(data)))

    async def get(self, key: bytes | str) -> KeyValue | None:
        return await self._call("/v3/kv/range", {"key": b64(key)},
                                lambda data: key_value(data["kvs"][0]) if data.get("kvs") else None)

    async def put(self, key: bytes | str, value: bytes | str, *, lease: int = 0) -> int:
        """Set ``key``; the store's revision after the write."""
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return await self._call("/v3/kv/put", body, revision_of)

    async def delete(self, key: bytes | str) -> int:
        """Delete ``key``; how many keys were deleted (0 or 1)."""
        return await self._call("/v3/kv/deleterange", {"key": b64(key)}, _deleted)

    async def delete_prefix(self, prefix: bytes | str) -> int:
        raw = _raw(prefix)
        body = {"key": b64(raw), "range_end": b64(prefix_end(raw))}
        return await self._call("/v3/kv/deleterange", body, _deleted)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Drop the history before ``revision`` (watches from before it must resync)."""
        await self._call("/v3/kv/compaction", {"revision": str(revision), "physical": physical})

    # --- leases ------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        return await self._call("/v3/lease/grant", {"TTL": str(ttl)},
                                lambda data: Lease(integer(data["ID"]), integer(data.get("TTL"))))

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Refresh the lease; its TTL again. ``LeaseExpired`` if it is gone."""
        # /v3/lease/keepalive is a bidirectional stream in gRPC; through the gateway one
        # request gets one answer on a stream that stays open, so read one and close it.
        ttl = await self._first_of_stream("/v3/lease/keepalive", {"ID": str(lease_id)},
                                          lambda data: integer(data.get("TTL")))
        if ttl <= 0:
            raise LeaseExpired(f"lease {lease_id:x} has expired")
        return ttl

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys now; a lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdRequestError as error:
            if error.code != 5:  # NotFound: it expired, which is what revoking wanted
                raise

    @asynccontextmanager
    async def lease(self, ttl: int) -> AsyncIterator[Lease]:
        """A lease kept alive while the block runs, and revoked when it ends.

        Keepalives go every third of the TTL; one that cannot reach etcd is retried until it
        can. If the lease has expired meanwhile (etcd was away longer than the TTL), the block
        is interrupted with ``LeaseExpired`` (in an ExceptionGroup, as a trio nursery raises
        it): its keys are gone and must be put again under a
        new lease. A process that dies stops the keepalives, and etcd deletes the keys within
        the TTL.
        """
        granted = await self.lease_grant(ttl)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_alive, granted)
                yield granted
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.lease_revoke(granted.id)
                except EtcdUnavailable:
                    log.warning("etcd.lease.revoke_failed", lease=f"{granted.id:x}")

    async def _keep_alive(self, lease: Lease) -> None:
        interval = max(lease.ttl / 3, 0.2)
        while True:
            await trio.sleep(interval)
            try:
                await self.lease_keepalive_once(lease.id)
            except EtcdUnavailable as error:
                log.warning("etcd.lease.keepalive_failed", lease=f"{lease.id:x}", error=str(error))
                interval = min(interval, 0.5)
            else:
                interval = max(lease.ttl / 3, 0.2)

    # --- watches -----------------------------------------------------------------

    def watch_prefix(self, prefix: bytes | str, *, start_revision: int | None = None,
                     idle_timeout: float = 60.0, max_backoff: float = 2.0, check_interval: float | None = None):
        """``async with etcd.watch_prefix(prefix) as updates: async for update in updates``.

        See ``sluice.plugins.etcd.watch``: updates are ``Events`` and, after a compaction,
        ``Resync``; a disconnect is survived by watching again from the next revision.
        ``check_interval``: seconds between checks that the member still answers (a hung
        one is then found within ``check_interval + timeout``; None: only ``idle_timeout``).
        """
        return watch_prefix(self, _raw(prefix), start_revision=start_revision,
                            idle_timeout=idle_timeout, max_backoff=max_backoff, check_interval=check_interval)

    def mirror_prefix(self, prefix: bytes | str, **options):
        """``async with etcd.mirror_prefix(prefix) as states: async for state in states``: the whole
        prefix after every change (``sluice.plugins.etcd.mirror``)."""
        return mirror_prefix(self, _raw(prefix), **options)


