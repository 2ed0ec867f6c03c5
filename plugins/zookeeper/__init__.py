"""``sluice.plugins.zookeeper``: ZooKeeper for trio, through kazoo, bridged safely.

kazoo is the maintained Python ZooKeeper client, and it runs on threads of its own (its
gevent and eventlet handlers are no use to trio). ``bridge.py`` keeps those threads on
their side: calls go out through ``trio.to_thread`` with a timeout, and kazoo's callbacks
come back only through the trio token, as events on memory channels. What the registry and
the config centre need is here::

    async with open_zookeeper("127.0.0.1:2181", session_timeout=10) as zk:
        async with zk.register("/services/api/instance-", b'{"address": ...}') as me:
            ...                                   # me.path: the ephemeral sequential node
        async with zk.watch_children("/services/api") as snapshots:
            async for snapshot in snapshots:      # Snapshot(children={name: data})
                ...
        async with zk.watch_data("/sluice/config") as values:
            async for data in values:             # bytes, or None while the node is missing
                ...
        async for event in zk.session_events:     # connected, suspended, reconnected,
            ...                                   # expired, recovered

kazoo's own ``NoNodeError`` and ``NodeExistsError`` pass through; a lost connection, an
expired session or a timeout is ``ZooKeeperUnavailable``.
"""

from __future__ import annotations

from kazoo.exceptions import NodeExistsError, NoNodeError

from .bridge import (
    Registration,
    SessionEvent,
    Snapshot,
    ZooKeeper,
    ZooKeeperError,
    ZooKeeperUnavailable,
    open_zookeeper,
)

__all__ = [
    "NoNodeError", "NodeExistsError", "Registration", "SessionEvent", "Snapshot", "ZooKeeper", "ZooKeeperError",
    "ZooKeeperUnavailable", "open_zookeeper",
]
