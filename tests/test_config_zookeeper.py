"""The config centre on a real ZooKeeper: a document pushed with ``sluice config push`` reaches
three ``sluice run`` instances (one with two workers) within 1 s, and the store's watch
survives a forced session expiry (reported as lost, then back, then following changes)."""

from __future__ import annotations

import statistics
import time

import trio
from kazoo.client import KazooClient

from sluice.control.config import ConfigStoreConfig
from sluice.control.config_store import Document, Lost
from sluice.plugins.config_zookeeper import ZooKeeperConfigStore

from .proc import Running, ThreadOrigin, free_port, poll, sluice
from .test_config_store import CONVERGE, bootstrap, converge, document, settled
from .test_zookeeper_client import _expire


def zk_table(hosts: str, path: str) -> str:
    return (f'[config_store]\nstore = "zookeeper"\naddress = "{hosts}"\npath = "{path}"\ntimeout = 2\n'
            "backoff_initial = 0.1\nbackoff_max = 0.5\n")


def test_a_pushed_route_converges_on_three_instances_within_a_second(zookeeper_server, zk_chroot, tmp_path):
    a, b = ThreadOrigin(body=b"A"), ThreadOrigin(body=b"B")
    table = zk_table(zookeeper_server.hosts, f"{zk_chroot}/config")
    boot = bootstrap(tmp_path, table, name="boot")
    docs = {}
    for name, origin in (("a", a), ("b", b)):
        docs[name] = tmp_path / f"{name}.toml"
        docs[name].write_text(document(origin.address))
    r = sluice("config", "push", str(docs["a"]), "-c", boot)
    assert r.returncode == 0, r.stderr
    procs = [Running("-c", bootstrap(tmp_path, table, name=f"i{i}"), *(["--workers", "2"] if i == 0 else []))
             for i in range(3)]
    writer = None
    try:
        urls = [p.url + "/" for p in procs]
        for url in urls:
            assert settled(url, b"A")
        r = sluice("config", "push", str(docs["b"]), "-c", boot)  # the command, once
        assert r.returncode == 0, r.stderr
        converge(urls, b"B", time.monotonic())
        # Timed: from a raw set on a connected client (no process start in the figure).
        writer = KazooClient(hosts=zookeeper_server.hosts)
        writer.start(5)
        figures = []
        for n in range(4):
            name, expected = ("a", b"A") if n % 2 == 0 else ("b", b"B")
            started = time.monotonic()
            writer.set(f"{zk_chroot}/config", docs[name].read_bytes())
            times = converge(urls, expected, started)
            figures.append(max(times))
            print(f"zookeeper push {n + 1}: " + ", ".join(f"{t * 1000:.0f} ms" for t in times))
        print(f"zookeeper convergence: median {statistics.median(figures) * 1000:.0f} ms, "
              f"max {max(figures) * 1000:.0f} ms")
        assert max(figures) <= CONVERGE
    finally:
        if writer is not None:
            writer.stop()
            writer.close()
        for p in procs:
            p.stop()
        a.close()
        b.close()


async def test_the_watch_survives_a_session_expiry(zookeeper_server, zk_chroot):
    hosts = zookeeper_server.hosts
    settings = ConfigStoreConfig(store="zookeeper", address=hosts, path=f"{zk_chroot}/config", timeout=2)
    store = ZooKeeperConfigStore(settings)
    first = await store.write(b"[clusters]\n")
    send, receive = trio.open_memory_channel(10)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.watch, send)
            doc = await receive.receive()
            assert doc == Document(first, b"[clusters]\n")
            expired = time.monotonic()
            await trio.to_thread.run_sync(_expire, hosts, store.zk.kazoo.client_id)
            seen = []
            while not (seen and isinstance(seen[-1], Document)):
                seen.append(await receive.receive())
            print(f"session expiry: {seen} within {time.monotonic() - expired:.2f}s")
            assert isinstance(seen[0], Lost)  # (suspended first, then expired)
            assert any(isinstance(x, Lost) and "expired" in x.reason for x in seen)
            assert seen[-1].data == b"[clusters]\n"  # back, the same document
            second = await store.write(b"routes = []\n")
            while (doc := await receive.receive()) != Document(second, b"routes = []\n"):
                assert isinstance(doc, Document)
            nursery.cancel_scope.cancel()


def test_zookeeper_down_keeps_the_last_config_and_its_return_is_followed(tmp_path):
    """A ZooKeeper of the test's own, stopped mid-run and started again on the same port and data."""
    from .servers.zookeeper import zookeeper_server_process
    from .test_config_store import admin_json

    a, b = ThreadOrigin(body=b"A"), ThreadOrigin(body=b"B")
    server = zookeeper_server_process(tmp_path / "zk").start()
    path = "/sluice/config"
    admin = free_port()
    table = zk_table(server.hosts, path) + f'cache = "{tmp_path / "cache.json"}"\n'
    boot = bootstrap(tmp_path, table, admin=admin)
    writer = proxy = None
    try:
        writer = KazooClient(hosts=server.hosts)
        writer.start(5)
        writer.create(path, document(a.address).encode(), makepath=True)
        proxy = Running("-c", boot)
        url = proxy.url + "/"
        assert settled(url, b"A")
        writer.stop()
        writer.close()
        writer = None
        server.stop()
        proxy.wait_for_output("config store lost")
        assert settled(url, b"A", 8)  # the last good config serves on
        poll(lambda: admin_json(admin, "/config")["config_store"]["stale_seconds"] > 0.5, 10, "stale", proxy)
        server.start()
        proxy.wait_for_output("config store back", timeout=15)
        writer = KazooClient(hosts=server.hosts)
        writer.start(5)
        writer.set(path, document(b.address).encode())
        poll(lambda: settled(url, b"B"), 10, "B after ZooKeeper's return", proxy)
    finally:
        if writer is not None:
            writer.stop()
            writer.close()
        if proxy is not None:
            proxy.stop()
        server.stop()
        a.close()
        b.close()
