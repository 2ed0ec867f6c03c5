"""Plugin ``discovery_etcd``: the ``etcd`` discovery source (etcd v3, a key per endpoint).

::

    [clusters.app]
    discovery = { source = "etcd", endpoints = ["127.0.0.1:2379"], prefix = "/services/app/" }

Every key under ``prefix`` holds one endpoint as JSON (``sluice.plugins.registry_entries``:
``{"address": "host:port", "weight": 1, "zone": "...", "metadata": {...}}``, or ``host`` and
``port``); an instance registers with a key under a lease, so a crashed one is gone within
the lease's TTL. A key whose value is not such an entry is skipped and logged as ``discovery
entry skipped`` naming the key; the others serve.

``endpoints`` lists etcd members (``"host:port"`` or ``"http://host:port"``; ``address`` is
the one-member spelling). ``timeout`` (seconds, default 5) bounds each request to etcd and
how long the first read may take before it is reported as ``discovery failed``.

The prefix is mirrored by ``EtcdClient.mirror_prefix``: read once, then watched from the
revision after, so every change is a new full set. An empty prefix empties the cluster
(authoritative: etcd said the service has no instances). When etcd cannot be reached the
watch is stale: that is reported as ``discovery failed`` and the last set keeps serving;
the client watches again from the last revision it saw, so nothing written meanwhile is
missed, and a compaction meanwhile forces a full read. With several members, a stale one is
left for the next (a fresh full read there).
"""

from __future__ import annotations

from typing import Annotated

import trio
from pydantic import AfterValidator, Field, field_validator, model_validator

from sluice import hookimpl
from sluice.addresses import parse_hostport
from sluice.upstream.discovery import DiscoveryConfig, DiscoverySource

from .etcd import EtcdClient
from .registry_entries import Entries

__all__ = ["EtcdSource"]


def _url(member: str) -> str:
    """``http://host:port`` from ``host:port`` or itself; ValueError otherwise."""
    address = member.removeprefix("http://").rstrip("/")
    if member.startswith("https://"):
        raise ValueError(f"{member!r}: TLS to etcd is not supported; use http://")
    try:
        parse_hostport(address, allow_zero=False)
    except ValueError as exc:
        raise ValueError(f"{member!r}: {exc} (an etcd member is 'host:port' or 'http://host:port')") from None
    return f"http://{address}"


_Member = Annotated[str, AfterValidator(_url)]


class EtcdSource(DiscoverySource):
    """Endpoints from an etcd v3 key prefix, one JSON entry per key, watched."""

    name = "etcd"

    class Config(DiscoveryConfig):
        prefix: Annotated[str, Field(min_length=2)]
        endpoints: Annotated[list[_Member], Field(min_length=1)] | None = None  # etcd members
        address: _Member | None = None  # one member: the same as endpoints = [address]
        timeout: Annotated[float, Field(gt=0, le=60)] = 5.0

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
            return self

    def __init__(self, config, cluster: str) -> None:
        super().__init__(config, cluster)
        self.members = config.endpoints or [config.address]
        self.entries = Entries(cluster, self.name)

    async def run(self, updates) -> None:
        member = 0
        while True:
            await self._follow(self.members[member], updates)
            member = (member + 1) % len(self.members)

    async def _follow(self, url: str, updates) -> None:
        """Report the prefix's sets from one member; return when it goes stale and others exist."""
        cfg = self.config
        leave = len(self.members) > 1
        async with EtcdClient(url, timeout=cfg.timeout) as etcd, etcd.mirror_prefix(cfg.prefix) as states:
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
                if state.stale is not None:
                    updates.failed(f"etcd at {url}: {state.stale}; the watch resumes from revision "
                                   f"{state.revision + 1} when it is back")
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
