"""Plugin ``discovery_zookeeper``: the ``zookeeper`` discovery source (a znode per instance).

::

    [clusters.app]
    discovery = { source = "zookeeper", hosts = "127.0.0.1:2181", path = "/services/app" }

Each instance registers an ephemeral sequential znode under ``path`` (``instance-0000000007``)
whose data is one endpoint as JSON, the same schema as the etcd source's
(``sluice.plugins.registry_entries``: ``{"address": "host:port", "weight": 1, "zone": "...",
"metadata": {...}}``, or ``host`` and ``port``). A crashed instance's session ends, and
ZooKeeper deletes its node, within its session timeout. A node whose data is not such an
entry is skipped and logged as ``discovery entry skipped`` naming its path; the others serve.

``hosts`` is kazoo's connection string (``"zk1:2181,zk2:2181"``, a chroot may follow);
``session_timeout`` (default 10 s) is this source's own session's; ``timeout`` (default 5 s)
bounds each call and the first connection.

The children are watched through the ZooKeeper bridge (``sluice.plugins.zookeeper``: kazoo
on its own threads, events back on trio), which re-reads them after every change, a
reconnect, or the recovery from a session expiry. No children, or no ``path`` at all, empties
the cluster (authoritative: ZooKeeper said there is nothing). A lost connection or an
expired session is reported as ``discovery failed`` and the last set keeps serving until
the bridge has reconnected and read the children again.
"""

from __future__ import annotations

import posixpath
from typing import Annotated

import trio
from pydantic import Field, field_validator

from sluice import hookimpl
from sluice.upstream.discovery import DiscoveryConfig, DiscoverySource

from .registry_entries import Entries
from .zookeeper import ZooKeeperUnavailable, open_zookeeper

__all__ = ["ZooKeeperSource"]

_RETRY = (0.5, 30.0)  # seconds between attempts to connect at all: first, most
_TROUBLE = {"suspended": "the connection to ZooKeeper was lost",
            "expired": "the ZooKeeper session expired; a new one is being made"}


class ZooKeeperSource(DiscoverySource):
    """Endpoints from the ephemeral znodes under a ZooKeeper path, one JSON entry each, watched."""

    name = "zookeeper"

    class Config(DiscoveryConfig):
        hosts: Annotated[str, Field(min_length=1)]
        path: Annotated[str, Field(min_length=2)]
        session_timeout: Annotated[float, Field(ge=0.4, le=300)] = 10.0
        timeout: Annotated[float, Field(gt=0, le=60)] = 5.0

        @field_validator("path")
        @classmethod
        def _path(cls, value: str) -> str:
            if not value.startswith("/") or value.endswith("/") or posixpath.normpath(value) != value:
                raise ValueError(f"{value!r}: an absolute znode path, such as '/services/app' (no trailing '/')")
            return value

    def __init__(self, config, cluster: str) -> None:
        super().__init__(config, cluster)
        self.entries = Entries(cluster, self.name)
        self.zk = None  # the bridge while connected (a test forces its session's expiry through it)

    async def run(self, updates) -> None:
        cfg = self.config
        delay = _RETRY[0]
        while True:
            try:
                async with open_zookeeper(cfg.hosts, session_timeout=cfg.session_timeout, op_timeout=cfg.timeout,
                                          connect_timeout=cfg.timeout) as zk:
                    self.zk, delay = zk, _RETRY[0]
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._session, zk, updates)
                        await self._children(zk, updates)
            except ZooKeeperUnavailable as exc:
                updates.failed(f"ZooKeeper at {cfg.hosts}: {exc}")
            finally:
                self.zk = None
            await trio.sleep(delay)
            delay = min(delay * 2, _RETRY[1])

    async def _session(self, zk, updates) -> None:
        """Say when the set may be going stale; the bridge reconnects and the watch re-reads."""
        async for event in zk.session_events:
            if event.kind in _TROUBLE:
                updates.failed(f"{_TROUBLE[event.kind]}; the last set is kept")

    async def _children(self, zk, updates) -> None:
        path = self.config.path
        async with zk.watch_children(path) as snapshots:
            async for snapshot in snapshots:
                names = sorted(snapshot.children)
                endpoints = self.entries.endpoints((f"{path}/{name}", snapshot.children[name]) for name in names)
                # Only no children says "no instances"; children that are all bad say nothing.
                updates.update(endpoints, authoritative=not names)


@hookimpl
def sluice_discovery():
    return [ZooKeeperSource]
