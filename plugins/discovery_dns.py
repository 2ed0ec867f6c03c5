"""Plugin ``discovery_dns``: the ``dns`` discovery source (A/AAAA and SRV).

::

    [clusters.app]
    discovery = { source = "dns", name = "app.service.internal", port = 8080 }
    # or SRV: targets, ports and weights from the records
    discovery = { source = "dns", name = "_http._tcp.app.service.internal", type = "SRV" }

``type`` is ``"A"``, ``"AAAA"``, ``"A+AAAA"`` (the default: both, one
endpoint per address, with ``port``) or ``"SRV"``. For SRV only the records
of the lowest priority are used (RFC 2782: the others are fallbacks); each
target is resolved (A and AAAA) through the same resolver, and the record's
weight is the endpoint's (clamped to 1..1000: weight 0 means "rarely", not
"never").

The name is asked again when its records expire: after the smallest TTL of
the answers, clamped to [``min_ttl``, ``max_ttl``] (1 s and 300 s by
default), so a TTL of 0 does not make a busy loop and a day-long one does
not hide a change for a day. A failed lookup (timeout, SERVFAIL, refused,
garbage) is reported as ``discovery failed``, the last set keeps serving,
and the lookup is tried again after ``min_ttl``, doubling up to ``max_ttl``.
NXDOMAIN, or a name without records of the type asked, is authoritative:
the cluster is emptied (logged at warning).

``nameserver = "127.0.0.1:5353"`` sends the queries there instead of the
system's resolvers (``/etc/resolv.conf``): a sidecar's, or a test's.

The resolver is dnspython's async one (``dns.asyncresolver``): maintained,
it speaks SRV and reports TTLs (trio's own ``getaddrinfo`` does neither),
and it picks its I/O backend by sniffio, so it runs on trio natively, no
thread.
"""

from __future__ import annotations

from typing import Annotated, Literal

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.resolver
import trio
from pydantic import Field, field_validator, model_validator

from sluice import hookimpl
from sluice.addresses import parse_hostport
from sluice.upstream.discovery import DiscoveryConfig, DiscoverySource, EndpointSpec

__all__ = ["DnsSource"]

_ABSENT = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)  # authoritative: there is nothing


class _Empty(Exception):
    """The name (or every SRV target) has no records: authoritative."""


class DnsSource(DiscoverySource):
    """Endpoints from DNS, refreshed on the records' TTL."""

    name = "dns"

    class Config(DiscoveryConfig):
        name: Annotated[str, Field(min_length=1, max_length=253)]
        type: Literal["A", "AAAA", "A+AAAA", "SRV"] = "A+AAAA"
        port: Annotated[int, Field(ge=1, le=65535)] | None = None  # A/AAAA: required
        nameserver: str | None = None  # "ip:port" (port 53 if left out); None: the system's
        min_ttl: Annotated[float, Field(gt=0, le=86400)] = 1.0
        max_ttl: Annotated[float, Field(gt=0, le=86400)] = 300.0
        timeout: Annotated[float, Field(gt=0, le=60)] = 2.0  # seconds per lookup

        @field_validator("nameserver")
        @classmethod
        def _nameserver(cls, value: str | None) -> str | None:
            if value is None:
                return value
            host, port = (value, 53) if dns.inet.is_address(value) else parse_hostport(value, allow_zero=False)
            if not dns.inet.is_address(host):
                raise ValueError(f"{value!r}: the nameserver must be an IP address (and port)")
            return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

        @model_validator(mode="after")
        def _consistent(self):
            if self.type != "SRV" and self.port is None:
                raise ValueError(f"port: required for type {self.type!r} (SRV records carry their own)")
            if self.type == "SRV" and self.port is not None:
                raise ValueError("port: SRV records carry their own ports; remove it")
            if self.min_ttl > self.max_ttl:
                raise ValueError(f"min_ttl ({self.min_ttl}) is above max_ttl ({self.max_ttl})")
            return self

    def __init__(self, config, cluster: str) -> None:
        super().__init__(config, cluster)
        self.resolver = dns.asyncresolver.Resolver(configure=config.nameserver is None)
        if config.nameserver is not None:
            host, port = parse_hostport(config.nameserver)
            self.resolver.nameservers = [host]
            self.resolver.port = port
        self.resolver.cache = None  # the TTL schedule is ours; a cache would answer stale sets

    async def run(self, updates) -> None:
        retry = self.config.min_ttl
        while True:
            try:
                endpoints, ttl = await self.lookup()
            except _Empty:
                updates.update([], authoritative=True)
                ttl = self.config.min_ttl
            except (dns.exception.DNSException, OSError, ValueError) as exc:
                updates.failed(f"{self.config.type} lookup of {self.config.name!r} failed: "
                               f"{type(exc).__name__}: {exc}")
                await trio.sleep(retry)
                retry = min(retry * 2, self.config.max_ttl)
                continue
            else:
                updates.update(endpoints)
            retry = self.config.min_ttl
            await trio.sleep(min(max(ttl, self.config.min_ttl), self.config.max_ttl))

    async def lookup(self) -> tuple[list[EndpointSpec], float]:
        """The endpoints the name gives now, and how long that holds (the smallest TTL)."""
        cfg = self.config
        if cfg.type == "SRV":
            return await self._srv(cfg.name)
        hosts, ttl = await self._addresses(cfg.name, cfg.type)
        return [EndpointSpec(host, cfg.port) for host in hosts], ttl

    async def _addresses(self, name: str, kind: str) -> tuple[list[str], float]:
        hosts: list[str] = []
        ttls: list[float] = []
        for rdtype in ("A", "AAAA") if kind == "A+AAAA" else (kind,):
            try:
                answer = await self.resolver.resolve(name, rdtype, lifetime=self.config.timeout,
                                                     search=False)
            except _ABSENT as exc:
                if isinstance(exc, dns.resolver.NXDOMAIN):
                    raise _Empty(str(exc)) from None
                continue
            hosts += [record.address for record in answer]
            ttls.append(answer.rrset.ttl)
        if not hosts:
            raise _Empty(f"no {kind} records for {name!r}")
        return hosts, min(ttls)

    async def _srv(self, name: str) -> tuple[list[EndpointSpec], float]:
        try:
            answer = await self.resolver.resolve(name, "SRV", lifetime=self.config.timeout, search=False)
        except _ABSENT as exc:
            raise _Empty(str(exc)) from None
        records = [r for r in answer if str(r.target) != "."]  # "." : the service is not offered
        if not records:
            raise _Empty(f"{name!r}: the service is not offered")
        best = min(r.priority for r in records)
        ttl = float(answer.rrset.ttl)
        out: list[EndpointSpec] = []
        for record in records:
            if record.priority != best:
                continue
            target = str(record.target).rstrip(".")
            try:
                hosts, target_ttl = await self._addresses(target, "A+AAAA")
            except _Empty:
                continue  # this target has no address (yet); the others serve
            ttl = min(ttl, target_ttl)
            weight = min(max(record.weight, 1), 1000)
            out += [EndpointSpec(host, record.port, weight=weight, metadata={"target": target})
                    for host in hosts]
        if not out:
            raise _Empty(f"{name!r}: no SRV target has an address")
        return out, ttl


@hookimpl
def sluice_discovery():
    return [DnsSource]
