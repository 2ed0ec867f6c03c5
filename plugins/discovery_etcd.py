"""Plugin ``discovery_etcd``: the ``etcd`` discovery source (etcd v3, a key per endpoint).

::

    [clusters.app]
    discovery = { source = "etcd", endpoints = ["127.0.0.1:2379"], prefix = "/services/app/" }

Every key under ``prefix`` holds one endpoint as JSON (``sluice.plugins.registry_entries``:
``{"address": "host:port", "weight": 1, "zone": "...", "metadata": {...}}``, or ``host`` and
``port``); an instance registers with a key under a lease, so a crashed one is gone within
the lease's TTL. A key whose value is not such an entry is skipped and logged as ``discovery
entry skipped`` naming the key; the others serve.

``endpoints`` lists etcd members (``"host:port"``, ``"http://host:port"`` or
``"https://host:port"``; ``address`` is the one-member spelling). ``timeout`` (seconds,
default 5) bounds each request to etcd and how long the first read may take before it is
reported as ``discovery failed``. ``check_interval`` (seconds, default 1; 0: off) is how
often the member being watched is asked a cheap question (``count_prefix``): one that does
not answer within ``timeout`` is hung (a stopped process, a member cut off from its
quorum), and is left within ``check_interval + timeout`` rather than the watch's 60 s idle
timeout. With ``https://`` members, ``ca`` (a PEM file; default: the system's CAs) verifies
them, and ``cert`` and ``key`` (PEM files) are the client certificate an etcd started with
``--client-cert-auth`` asks for. A file that does not load is refused naming its key
(``clusters.<name>.discovery.ca``), and so are TLS settings with an ``http://`` member
(they would be silently unused), as for ``registration`` and ``config_store``.

The prefix is mirrored by ``EtcdClient.mirror_prefix``: read once, then watched from the
revision after, so every change is a new full set. An empty prefix empties the cluster
(authoritative: etcd said the service has no instances). When etcd cannot be reached the
watch is stale: that is reported as ``discovery failed`` and the last set keeps serving;
the client watches again from the last revision it saw, so nothing written meanwhile is
missed, and a compaction meanwhile forces a full read. With several members, a stale or
hung one is left for the next, where the watch resumes from the last revision seen (no
full read, unless that revision was compacted meanwhile).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import trio
from pydantic import AfterValidator, Field, field_validator, model_validator

from sluice import ConfigError, hookimpl
from sluice.addresses import parse_hostport
from sluice.upstream.discovery import DiscoveryConfig, DiscoverySource

from .etcd import EtcdClient, PrefixState, TlsFileError, tls_for
from .registry_entries import Entries

__all__ = ["EtcdSource"]


def _url(member: str) -> str:
    """``http://host:port`` from ``host:port``, or the URL itself; ValueError otherwise."""
    scheme = "https" if member.startswith("https://") else "http"
    address = member.removeprefix(f"{scheme}://").rstrip("/")
    try:
        parse_hostport(address, allow_zero=False)
    except ValueError as exc:
        raise ValueError(f"{member!r}: {exc} (an etcd member is 'host:port', 'http://host:port' or "
                         "'https://host:port')") from None
    return f"{scheme}://{address}"


def _readable(path: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{path!r}: no such file")
    return path


_Member = Annotated[str, AfterValidator(_url)]
_File = Annotated[str, AfterValidator(_readable)]


class EtcdSource(DiscoverySource):
    """Endpoints from an etcd v3 key prefix, one JSON entry per key, watched."""

    name = "etcd"

    class Config(DiscoveryConfig):
        prefix: Annotated[str, Field(min_length=2)]
        endpoints: Annotated[list[_Member], Field(min_length=1)] | None = None  # etcd members
        address: _Member | None = None  # one member: the same as endpoints = [address]
        timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
        check_interval: Annotated[float, Field(ge=0, le=300)] = 1.0  # s between checks the member answers
        ca: _File | None = None  # PEM: the CA that signed the https:// members' certificates
        cert: _File | None = None  # PEM: the client certificate for etcd's --client-cert-auth
        key: _File | None = None  # PEM: its key (unless it is in cert)

        @field_validator("prefix")
        @classmethod
        def _prefix(cls, value: str) -> str:
            if not value.endswith("/"):
                raise ValueError(f"{value!r} must end with '/' (else it also holds the keys of "
                                 f"{value + '2'!r} and the like)")
            return value

        @model_validator(mode="after")
        def _one_of(self):
            if (self.endpoints is None) == (self.address is None):
                raise ValueError("give endpoints (a list of etcd members) or address (one), not "
                                 + ("both" if self.endpoints else "neither"))
            return self  # (ca, cert and key: at __init__, where the members' schemes are known)

    def __init__(self, config, cluster: str) -> None:
        super().__init__(config, cluster)
        self.members = config.endpoints or [config.address]
        self.entries = Entries(cluster, self.name)
        try:  # per member: an http:// one with TLS settings is refused rather than left without
            contexts = [tls_for(url, config.ca, config.cert, config.key) for url in self.members]
        except TlsFileError as exc:
            raise ConfigError(f"clusters.{cluster}.discovery.{exc.key}: {exc}") from None
        self.tls = next((context for context in contexts if context is not None), None)
        self._last: PrefixState | None = None  # the last state seen, where the next member resumes

    async def run(self, updates) -> None:
        member = 0
        while True:
            await self._follow(self.members[member], updates)
            member = (member + 1) % len(self.members)

    async def _follow(self, url: str, updates) -> None:
        """Report the prefix's sets from one member; return when it goes stale and others exist."""
        cfg = self.config
        leave = len(self.members) > 1
        async with (EtcdClient(url, timeout=cfg.timeout, tls=self.tls) as etcd,
                    etcd.mirror_prefix(cfg.prefix, start=self._last if leave else None,
                                       check_interval=cfg.check_interval or None) as states):
            answered = False
            while True:
                state = None
                with trio.move_on_after(cfg.timeout if not answered else float("inf")):
                    state = await states.receive()
                if state is None:  # the first read is retried by the mirror meanwhile
                    updates.failed(f"etcd at {url} did not answer within {cfg.timeout}s")
                    if leave:
                        return
                    continue
                answered = True
                if state.stale is None:
                    self._last = state
                else:
                    updates.failed(f"etcd at {url}: {state.stale}; the watch resumes from revision "
                                   f"{state.revision + 1} " + ("on the next member" if leave else "when it is back"))
                    if leave:
                        return
                    continue
                kvs = sorted(state.kvs.values(), key=lambda kv: kv.key)
                endpoints = self.entries.endpoints((kv.key.decode(errors="replace"), kv.value) for kv in kvs)
                # Only an empty prefix says "no instances"; keys that are all bad say nothing.
                updates.update(endpoints, authoritative=not kvs)


@hookimpl
def sluice_discovery():
    return [EtcdSource]
