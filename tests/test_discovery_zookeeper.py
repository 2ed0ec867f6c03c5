"""The ``zookeeper`` discovery source (sluice.plugins.discovery_zookeeper) against a real
ZooKeeper (tests/servers/zookeeper.py), through a real proxy to real origins: ephemeral
sequential registrations held by other processes, garbage in a node, and the source's own
session expired under a running proxy (forced as tests/test_zookeeper_client.py does: a
second client takes the session over and closes it)."""

from __future__ import annotations

import textwrap

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.control.config import parse
from sluice.plugins.zookeeper import open_zookeeper
from sluice.testing import serve

from .servers import free_port
from .servers.zookeeper import zookeeper_server_process
from .test_discovery import named, until
from .test_discovery_dns import addresses, seen
from .test_discovery_etcd import entry, kill_one_of_three
from .test_zookeeper_client import _expire

PLUGINS = ["router", "balancer", "discovery_zookeeper"]
SESSION = 2  # seconds: the holders' session timeout


def cfg(hosts: str, path: str, **discovery) -> dict:
    settings = {"source": "zookeeper", "hosts": hosts, "path": path, "timeout": 2, "initial_timeout": 5,
                **discovery}
    return {
        "listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}],
        "clusters": {"app": {"discovery": settings}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "app"}],
    }


def test_settings_are_checked_by_key_path():
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    def build(data):
        return App(parse(data), Plugins(PLUGINS))

    for bad in ("services/app", "/services/app/", "/services//app"):
        with pytest.raises(ConfigError, match="clusters.app.discovery.path: .*an absolute znode path"):
            build(cfg("127.0.0.1:2181", bad))
    with pytest.raises(ConfigError, match="clusters.app.discovery.hosts"):
        build(cfg("", "/services/app"))
    with pytest.raises(ConfigError, match="clusters.app.discovery.session_timeout"):
        build(cfg("127.0.0.1:2181", "/services/app", session_timeout=0.1))
    with pytest.raises(ConfigError, match="clusters.app.discovery.chroot"):
        build(cfg("127.0.0.1:2181", "/services/app", chroot="/x"))
    build(cfg("127.0.0.1:2181", "/services/app"))


HOLDER = textwrap.dedent("""
    import sys, trio
    from sluice.plugins.zookeeper import open_zookeeper

    async def main(hosts, prefix, data, session):
        async with open_zookeeper(hosts, session_timeout=float(session)) as zk:
            async with zk.register(prefix, data.encode()):
                print("ready", flush=True)
                await trio.sleep_forever()

    trio.run(main, *sys.argv[1:])
""")


async def test_three_registrations_serve_and_a_killed_one_leaves_within_the_session_timeout(
        zookeeper_server, zk_chroot, start_origin):
    def holder(name: str, value: str) -> tuple[str, ...]:
        return HOLDER, zookeeper_server.hosts, f"{zk_chroot}/instance-", value, str(SESSION)

    await kill_one_of_three(start_origin, cfg(zookeeper_server.hosts, zk_chroot), PLUGINS, holder, SESSION,
                            "zookeeper session")


async def test_a_bad_node_is_skipped_and_named_and_the_others_serve(zookeeper_server, zk_chroot, start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    async with open_zookeeper(zookeeper_server.hosts) as zk:
        await zk.create(f"{zk_chroot}/a", entry(a), makepath=True)
        await zk.create(f"{zk_chroot}/garbage", b"\xff not json")
        with capture_logs() as logs:
            async with serve(cfg(zookeeper_server.hosts, zk_chroot), plugins=PLUGINS) as proxy:
                assert addresses(proxy) == {a.address}
                errors = {e["key"]: e["error"] for e in logs if e["event"] == "discovery entry skipped"}
                assert list(errors) == [f"{zk_chroot}/garbage"] and "not JSON" in errors[f"{zk_chroot}/garbage"]
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    assert await seen(client, 3) == {"a"}
                    await zk.create(f"{zk_chroot}/b", entry(b))
                    await until(lambda: addresses(proxy) == {a.address, b.address})
                    assert await seen(client, 6) == {"a", "b"}
                    # No children is ZooKeeper saying there is no instance: the cluster empties.
                    for name in ("a", "b", "garbage"):
                        await zk.delete(f"{zk_chroot}/{name}")
                    await until(lambda: not addresses(proxy))
                    assert (await client.get("/")).status_code == 503


async def test_the_source_s_session_expiry_is_recovered_and_the_set_stays_right(zookeeper_server, zk_chroot,
                                                                                start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    hosts = zookeeper_server.hosts
    async with open_zookeeper(hosts) as zk:
        await zk.create(f"{zk_chroot}/a", entry(a), makepath=True)
        with capture_logs() as logs:
            async with serve(cfg(hosts, zk_chroot), plugins=PLUGINS) as proxy:
                source = proxy.app.discoveries["app"].source
                old = source.zk.kazoo.client_id
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    expired = trio.current_time()
                    await trio.to_thread.run_sync(_expire, hosts, old)
                    await until(lambda: any(e["event"] == "discovery failed" and "expired" in e["error"]
                                            for e in logs), timeout=10)
                    assert await seen(client, 3) == {"a"}  # the last set serves meanwhile
                    await until(lambda: source.zk is not None and source.zk.kazoo.client_id is not None
                                and source.zk.kazoo.client_id[0] != old[0], timeout=10)
                    # A change after the recovery is seen: the watch is armed on the new session.
                    await zk.create(f"{zk_chroot}/b", entry(b))
                    await until(lambda: addresses(proxy) == {a.address, b.address}, timeout=10)
                    print(f"zookeeper: session expiry recovered and a change seen "
                          f"{trio.current_time() - expired:.2f}s after the expiry was forced")
                    assert await seen(client, 6) == {"a", "b"}
        assert not [e for e in logs if e["event"] == "endpoints changed" and e["total"] == 0]


async def test_zookeeper_restarted_mid_run_keeps_the_set_and_the_watch_resumes(tmp_path, start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    server = zookeeper_server_process(tmp_path)
    await trio.to_thread.run_sync(server.start)
    try:
        async with open_zookeeper(server.hosts) as zk:
            await zk.create("/services/app/a", entry(a), makepath=True)
        with capture_logs() as logs:
            async with serve(cfg(server.hosts, "/services/app"), plugins=PLUGINS) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    assert await seen(client, 3) == {"a"}
                    await trio.to_thread.run_sync(server.stop)
                    await until(lambda: any(e["event"] == "discovery failed" and "connection to ZooKeeper was lost"
                                            in e["error"] for e in logs), timeout=10)
                    assert await seen(client, 3) == {"a"}  # the last set serves on
                    await trio.to_thread.run_sync(server.start)  # same port, same data
                    async with open_zookeeper(server.hosts) as zk:
                        await zk.create("/services/app/b", entry(b))
                    await until(lambda: addresses(proxy) == {a.address, b.address}, timeout=10)
                    assert await seen(client, 6) == {"a", "b"}
        assert not [e for e in logs if e["event"] == "endpoints changed" and e["total"] == 0]
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_no_zookeeper_at_start_is_reported_naming_the_hosts():
    hosts = f"127.0.0.1:{free_port()}"  # nothing listens there
    with capture_logs() as logs:
        async with serve(cfg(hosts, "/services/app", timeout=0.5, initial_timeout=1.5), plugins=PLUGINS) as proxy:
            assert not addresses(proxy)
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                assert (await client.get("/")).status_code == 503
    failed = [e["error"] for e in logs if e["event"] == "discovery failed"]
    assert failed and all(error.startswith(f"ZooKeeper at {hosts}: no connection") for error in failed), failed
