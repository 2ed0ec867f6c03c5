"""Plugin ``config_zookeeper``: the config centre's ``zookeeper`` store (``sluice.control.config_store``).

::

    [config_store]
    store = "zookeeper"
    address = "127.0.0.1:2181"        # kazoo's hosts string (a chroot may follow)
    path = "/sluice/prod/config"      # the node holding the document
    cache = "/var/lib/sluice/config-cache.json"

Built on ``sluice.plugins.zookeeper`` (kazoo on its own threads, bridged to trio): the watch
is ``watch_data`` on the node, which the bridge re-reads after each change, a reconnect, or
the recovery from a session's expiry. The revision is the node's ``mzxid`` (the transaction
that last changed it). A suspended connection or an expired session is our ``Lost``; once
the session is back, the node is read again, which says the store is back.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from sluice import hookimpl
from sluice.control.config_store import ConfigStore, Document, Lost, StoreUnavailable, unwrap

from .zookeeper import NoNodeError, ZooKeeperUnavailable, open_zookeeper

__all__ = ["ZooKeeperConfigStore"]

_TROUBLE = {"suspended": "the connection to ZooKeeper was lost",
            "expired": "the ZooKeeper session expired; a new one is being made"}


class ZooKeeperConfigStore(ConfigStore):
    """The document in one ZooKeeper node, watched through the kazoo bridge."""

    name = "zookeeper"
    zk = None

    @property
    def where(self) -> str:
        return f"zookeeper at {self.settings.address}, node {self.settings.path}"

    def _open(self):
        t = self.settings.timeout
        return open_zookeeper(self.settings.address, session_timeout=max(t * 2, 4.0), op_timeout=t,
                              connect_timeout=t)

    async def read(self) -> Document:
        with _unavailable():
            async with self._open() as zk:
                return await _read(zk, self.settings.path)

    async def write(self, data: bytes) -> int:
        path = self.settings.path
        with _unavailable():
            async with self._open() as zk:
                try:
                    await zk.call("set", path, data)
                except NoNodeError:
                    await zk.call("create", path, data, makepath=True)
                return (await _read(zk, path)).revision

    async def watch(self, send: trio.MemorySendChannel) -> None:
        path = self.settings.path
        with _unavailable():
            async with self._open() as zk, trio.open_nursery() as nursery:
                self.zk = zk  # (while connected: a test forces its session's expiry through it)
                nursery.start_soon(self._session, zk, send)
                async with zk.watch_data(path) as values:
                    async for _ in values:
                        await send.send(await _read(zk, path))  # (with its mzxid)

    async def _session(self, zk, send) -> None:
        async for event in zk.session_events:
            if event.kind in _TROUBLE:
                await send.send(Lost(_TROUBLE[event.kind]))
            elif event.kind in ("reconnected", "recovered"):
                while True:  # the data watch re-reads only if the data changed: say we are back
                    try:
                        await send.send(await _read(zk, self.settings.path))
                        break
                    except ZooKeeperUnavailable:
                        await trio.sleep(0.2)


@contextmanager
def _unavailable() -> Iterator[None]:
    """ZooKeeper away (a lost connection, no answer in time) is StoreUnavailable, also when a
    nursery of the bridge wrapped it in a group."""
    try:
        yield
    except Exception as exc:
        if isinstance(unwrap(exc), ZooKeeperUnavailable):
            raise StoreUnavailable(str(unwrap(exc))) from None
        raise


async def _read(zk, path: str) -> Document:
    try:
        data, stat = await zk.call("get", path)
    except NoNodeError:
        parent = posixpath.dirname(path)
        stat = await zk.call("exists", parent) if parent != "/" else None
        return Document(stat.pzxid if stat is not None else 0, None)
    return Document(stat.mzxid, data)


@hookimpl
def sluice_config_stores():
    return [ZooKeeperConfigStore]
