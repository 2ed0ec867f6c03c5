"""The ZooKeeper bridge (``sluice.plugins.zookeeper``) against a real ZooKeeper.

Watches as snapshots, ephemeral sequential registrations, a session expiry recovered
(forced the way kazoo's own tests force it: a second client takes over the session and
closes it), and a reconnect after the server restarts (on a server of the test's own).
Stopping the server for longer than the session timeout would not force an expiry: a
restarted ZooKeeper gives the sessions it loads a fresh timeout, and the client's reconnect
keeps its session (tried: 3 s down with a 1 s session, then ``reconnected``).
"""

from __future__ import annotations

import time

import pytest
import trio
from kazoo.client import KazooClient

from sluice.plugins.zookeeper import Snapshot, ZooKeeperUnavailable, open_zookeeper

from .servers import free_port
from .servers.zookeeper import zookeeper_server_process

DEADLINE = 10  # seconds any single wait in these tests may take


async def receive(channel, timeout: float = DEADLINE):
    with trio.fail_after(timeout):
        return await channel.receive()


async def snapshot_where(snapshots, check, timeout: float = DEADLINE) -> Snapshot:
    """The first snapshot that passes ``check`` (snapshots in between are allowed)."""
    with trio.fail_after(timeout):
        while not check(snapshot := await snapshots.receive()):
            pass
        return snapshot


async def events_until(zk, kind: str, timeout: float = DEADLINE) -> list[str]:
    seen = []
    with trio.fail_after(timeout):
        while not seen or seen[-1] != kind:
            seen.append((await zk.session_events.receive()).kind)
    return seen


async def test_children_and_data_as_snapshots(zookeeper_server, zk_chroot):
    async with open_zookeeper(zookeeper_server.hosts) as zk:
        assert (await receive(zk.session_events)).kind == "connected"
        async with zk.watch_children(zk_chroot) as snapshots:
            assert await receive(snapshots) == Snapshot({}, exists=False)
            await zk.create(f"{zk_chroot}/a", b'{"address": "10.0.0.1:80"}')
            await snapshot_where(snapshots, lambda s: s.children == {"a": b'{"address": "10.0.0.1:80"}'})
            await zk.set(f"{zk_chroot}/a", b"changed")
            await snapshot_where(snapshots, lambda s: s.children == {"a": b"changed"})
            await zk.create(f"{zk_chroot}/b", b"2")
            await snapshot_where(snapshots, lambda s: s.children == {"a": b"changed", "b": b"2"})
            await zk.delete(f"{zk_chroot}/a")
            assert (await snapshot_where(snapshots, lambda s: "a" not in s.children)).children == {"b": b"2"}


async def test_a_node_s_data_as_values(zookeeper_server, zk_chroot):
    node = f"{zk_chroot}/config"
    async with open_zookeeper(zookeeper_server.hosts) as zk, zk.watch_data(node) as values:
        assert await receive(values) is None  # not there yet
        await zk.create(node, b"version: 1")
        assert await receive(values) == b"version: 1"
        await zk.set(node, b"version: 2")
        assert await receive(values) == b"version: 2"
        await zk.delete(node)
        assert await receive(values) is None


async def test_ephemeral_sequential_registrations(zookeeper_server, zk_chroot):
    async with open_zookeeper(zookeeper_server.hosts) as owner, open_zookeeper(zookeeper_server.hosts) as other:
        async with owner.register(f"{zk_chroot}/instance-", b"one") as first, \
                owner.register(f"{zk_chroot}/instance-", b"two") as second:
            assert first.path != second.path
            assert first.path.startswith(f"{zk_chroot}/instance-") and first.path[-10:].isdigit()
            _, stat = await other.call("get", second.path)
            assert stat.ephemeralOwner == owner.kazoo.client_id[0]
            assert sorted(await other.children(zk_chroot)) == sorted(
                p.rsplit("/", 1)[1] for p in (first.path, second.path))
        assert await other.children(zk_chroot) == []  # deleted when the blocks ended
        async with other.watch_children(zk_chroot) as snapshots:
            await snapshot_where(snapshots, lambda s: s.children == {})
            async with open_zookeeper(zookeeper_server.hosts) as short_lived:
                await short_lived.create(f"{zk_chroot}/ephemeral", b"x", ephemeral=True)
                await snapshot_where(snapshots, lambda s: "ephemeral" in s.children)
            # Its client closed, its session ended: the server removed the node.
            await snapshot_where(snapshots, lambda s: s.children == {})


def _expire(hosts: str, client_id) -> None:
    """Take the session over from another client and close it: ZooKeeper expires it."""
    thief = KazooClient(hosts=hosts, client_id=client_id)
    thief.start(5)
    thief.stop()
    thief.close()


async def test_session_expiry_is_recovered(zookeeper_server, zk_chroot):
    hosts = zookeeper_server.hosts
    async with open_zookeeper(hosts, session_timeout=4) as zk, open_zookeeper(hosts) as other:
        await receive(zk.session_events)  # connected
        async with zk.register(f"{zk_chroot}/instance-", b"me") as me, zk.watch_children(zk_chroot) as snapshots:
            before, old_session = me.path, zk.kazoo.client_id[0]
            await snapshot_where(snapshots, lambda s: list(s.children.values()) == [b"me"])
            expired_at = time.monotonic()
            await trio.to_thread.run_sync(_expire, hosts, zk.kazoo.client_id)
            kinds = await events_until(zk, "recovered")
            print(f"zookeeper session expiry recovered in {time.monotonic() - expired_at:.2f}s: {kinds}")
            assert "expired" in kinds and kinds[-2:] == ["connected", "recovered"]
            new_session = zk.kazoo.client_id[0]
            assert new_session != old_session
            # The registration is back, under a new sequence number, owned by the new session.
            assert me.path != before
            _, stat = await other.call("get", me.path)
            assert stat.ephemeralOwner == new_session
            assert await other.children(zk_chroot) == [me.path.rsplit("/", 1)[1]]
            # And the watch was re-armed on the new session: another client's change is seen.
            await other.create(f"{zk_chroot}/peer", b"p")
            await snapshot_where(snapshots, lambda s: s.children.get("peer") == b"p")


async def test_reconnect_after_the_server_restarts(tmp_path):
    server = zookeeper_server_process(tmp_path)
    await trio.to_thread.run_sync(server.start)
    try:
        async with open_zookeeper(server.hosts, session_timeout=10, op_timeout=1) as zk:
            await receive(zk.session_events)  # connected
            session = zk.kazoo.client_id[0]
            async with zk.register("/svc/instance-", b"me") as me, zk.watch_children("/svc") as snapshots:
                await snapshot_where(snapshots, lambda s: len(s.children) == 1)
                await trio.to_thread.run_sync(server.stop)
                assert (await receive(zk.session_events)).kind == "suspended"
                with pytest.raises(ZooKeeperUnavailable):
                    await zk.create("/svc/while-down", b"")
                await trio.to_thread.run_sync(server.start)  # same port, same data
                assert (await receive(zk.session_events)).kind == "reconnected"
                assert zk.kazoo.client_id[0] == session  # the session (and so the node) survived
                async with open_zookeeper(server.hosts) as other:
                    assert (await other.get(me.path)) == b"me"
                    await other.create("/svc/peer", b"p")
                    await snapshot_where(snapshots, lambda s: s.children.get("peer") == b"p")
                print(f"zookeeper restart: ready again in {server.started_in:.2f}s")
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_no_server_is_unavailable_within_the_timeout():
    began = time.monotonic()
    with pytest.raises(ZooKeeperUnavailable):
        async with open_zookeeper(f"127.0.0.1:{free_port()}", connect_timeout=1):
            pass
    assert time.monotonic() - began < 3
