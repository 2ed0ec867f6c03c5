"""The ``etcd`` discovery source (sluice.plugins.discovery_etcd) against a real etcd
(tests/servers/etcd.py), through a real proxy to real origins: registrations held under
leases by other processes, garbage in a key, and etcd stopped and started under a running
proxy (on a server of the test's own, so the session's etcd stays up for the others)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.control.config import parse
from sluice.plugins.etcd import EtcdClient
from sluice.plugins.etcd.client import tls_context
from sluice.plugins.registry_entries import endpoint_of
from sluice.testing import serve

from .servers import free_port
from .servers.etcd import etcd_server_process
from .test_discovery import named, until
from .test_discovery_dns import addresses, seen
from .test_etcd_client import etcd_tls, tls_files  # noqa: F401 (etcd_tls: a fixture)

PLUGINS = ["router", "balancer", "discovery_etcd"]
TTL = 2  # seconds: the holders' lease


def cfg(url: str, prefix: str, **discovery) -> dict:
    settings = {"source": "etcd", "address": url, "prefix": prefix, "timeout": 1, "initial_timeout": 5, **discovery}
    return {
        "listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}],
        "clusters": {"app": {"discovery": settings}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "app"}],
    }


def entry(origin, **fields) -> bytes:
    return json.dumps({"address": origin.address, **fields}).encode()


def skipped(logs) -> dict[str, str]:
    return {e["key"]: e["error"] for e in logs if e["event"] == "discovery entry skipped"}


# -- config ------------------------------------------------------------------------------------


def test_settings_are_checked_by_key_path():
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    def build(data):
        return App(parse(data), Plugins(PLUGINS))

    with pytest.raises(ConfigError, match=r"clusters.app.discovery.prefix: .*must end with '/'"):
        build(cfg("127.0.0.1:2379", "/services/app"))
    with pytest.raises(ConfigError, match=r"clusters.app.discovery.ca: .*'/nowhere/ca.pem': no such file"):
        build(cfg("https://127.0.0.1:2379", "/services/app/", ca="/nowhere/ca.pem"))
    with pytest.raises(ConfigError, match="clusters.app.discovery.check_interval"):
        build(cfg("127.0.0.1:2379", "/a/", check_interval=-1))
    with pytest.raises(ConfigError, match=r"clusters.app.discovery.endpoints\[0\]: 'etcd': not a host:port"):
        build(cfg(None, "/a/", address=None, endpoints=["etcd"]))
    with pytest.raises(ConfigError, match="clusters.app.discovery: give endpoints .* not both"):
        build(cfg("127.0.0.1:2379", "/a/", endpoints=["127.0.0.1:2379"]))
    with pytest.raises(ConfigError, match="clusters.app.discovery: give endpoints .* not neither"):
        build(cfg(None, "/a/", address=None))
    with pytest.raises(ConfigError, match="clusters.app.discovery.timeout"):
        build(cfg("127.0.0.1:2379", "/a/", timeout=0))
    app = build(cfg(None, "/a/", address=None,
                    endpoints=["127.0.0.1:2379", "http://10.0.0.2:2379/", "https://10.0.0.3:2379"]))
    assert app.discoveries["app"].source.members == ["http://127.0.0.1:2379", "http://10.0.0.2:2379",
                                                     "https://10.0.0.3:2379"]


def test_tls_files_that_do_not_load_are_named_at_the_key_path(tmp_path):
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    files = tls_files(tmp_path)
    data = cfg("https://127.0.0.1:2379", "/a/", ca=files["ca"], cert=files["ca"])  # a CA's cert, no key
    with pytest.raises(ConfigError, match=r"^clusters.app.discovery.cert: .*ca.pem: not a readable PEM certificate"):
        App(parse(data), Plugins(PLUGINS))
    (tmp_path / "garbage.pem").write_text("not PEM")
    data = cfg("https://127.0.0.1:2379", "/a/", ca=str(tmp_path / "garbage.pem"))
    with pytest.raises(ConfigError, match=r"^clusters.app.discovery.ca: .*garbage.pem: not a readable PEM CA file"):
        App(parse(data), Plugins(PLUGINS))
    data = cfg("https://127.0.0.1:2379", "/a/", key=files["client_key"])
    with pytest.raises(ConfigError, match=r"^clusters.app.discovery.key: a key without its certificate"):
        App(parse(data), Plugins(PLUGINS))
    data = cfg(None, "/a/", address=None, endpoints=["https://127.0.0.1:2379", "127.0.0.1:2380"], ca=files["ca"])
    with pytest.raises(ConfigError, match=r"^clusters.app.discovery.ca: TLS settings need an https:// address "
                                          r"\(got http://127.0.0.1:2380\)"):
        App(parse(data), Plugins(PLUGINS))


@pytest.mark.parametrize("data, error", [
    (b'{"address": "10.0.0.1:80", "weight": 1001}', "weight 1001"),
    (b'{"address": "10.0.0.1:80", "weight": true}', "weight True: not an integer"),
    (b'{"address": "10.0.0.1"}', "not a host:port"),
    (b'{"address": "10.0.0.1:80", "host": "10.0.0.1"}', "both address and host/port"),
    (b'{"host": "10.0.0.1"}', "no address (or host and port)"),
    (b'{"host": "10.0.0.1", "port": "80"}', "port '80': not a port"),
    (b'{"address": "10.0.0.1:80", "zone": 3}', "zone 3: not a string"),
    (b'{"address": "10.0.0.1:80", "metadata": []}', "metadata"),
    (b'"10.0.0.1:80"', "a JSON str, not an object"),
    (b"\xff", "not JSON"),
])
def test_a_bad_entry_says_what_is_wrong(data, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        endpoint_of(data)


def test_an_entry_by_address_or_host_and_port():
    spec = endpoint_of(b'{"address": "[::1]:8080", "weight": 3, "zone": "z", "metadata": {"v": 2}, "extra": 1}')
    assert (spec.host, spec.port, spec.weight, spec.zone, dict(spec.metadata)) == ("::1", 8080, 3, "z", {"v": 2})
    assert endpoint_of(b'{"host": "app.internal", "port": 80}').key == ("app.internal", 80, 1)


# -- registrations under leases ----------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, trio
    from sluice.plugins.etcd import EtcdClient

    async def main(url, key, value, ttl):
        async with EtcdClient(url) as etcd, etcd.lease(int(ttl)) as lease:
            await etcd.put(key, value.encode(), lease=lease.id)
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main, *sys.argv[1:])
""")


def hold(script: str, *args: str) -> subprocess.Popen:
    """A process running ``script`` (a registration holder), once it has printed "ready"."""
    holder = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = threading.Timer(20, holder.kill)  # one that never gets ready ends the wait, not the test run
    deadline.start()
    try:
        for line in holder.stdout:  # (structlog's lines may come first, on stdout)
            if line == "ready\n":
                return holder
        holder.wait(5)
        raise AssertionError(f"the holder exited (or was not ready within 20 s): {holder.stderr.read()}")
    except BaseException:
        stop([holder])
        raise
    finally:
        deadline.cancel()


def stop(holders: list[subprocess.Popen]) -> None:
    for holder in holders:
        holder.kill()
        holder.wait(5)
        holder.stdout.close()
        holder.stderr.close()


async def kill_one_of_three(start_origin, data: dict, plugins: list[str], holder, ttl: float, what: str) -> None:
    """Three origins registered by three holders (``holder(name, entry)``: its ``hold`` arguments);
    traffic reaches all three; one holder SIGKILLed, traffic leaves it within ``ttl`` (printed)."""
    origins = {name: await start_origin(named(name)) for name in "abc"}
    holders = []
    try:
        for name, origin in origins.items():
            holders.append(await trio.to_thread.run_sync(hold, *holder(name, entry(origin).decode())))
        async with serve(data, plugins=plugins) as proxy:
            assert addresses(proxy) == {o.address for o in origins.values()}  # startup waited for it
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                assert await seen(client, 9) == {"a", "b", "c"}
                os.kill(holders[1].pid, signal.SIGKILL)
                killed = trio.current_time()
                await until(lambda: origins["b"].address not in addresses(proxy), timeout=ttl + 2)
                print(f"{what}: traffic off a killed registration {trio.current_time() - killed:.2f}s after "
                      f"its holder was killed (TTL {ttl}s)")
                assert await seen(client, 9) == {"a", "c"}
    finally:
        stop(holders)


async def test_three_registrations_serve_and_a_killed_one_leaves_within_the_ttl(etcd_server, etcd_prefix,
                                                                                start_origin):
    def holder(name: str, value: str) -> tuple[str, ...]:
        return HOLDER, etcd_server.url, etcd_prefix + name, value, str(TTL)

    await kill_one_of_three(start_origin, cfg(etcd_server.url, etcd_prefix), PLUGINS, holder, TTL, "etcd lease")


async def test_a_bad_key_is_skipped_and_named_and_never_empties_the_cluster(etcd_server, etcd_prefix,
                                                                             start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    async with EtcdClient(etcd_server.url) as etcd:
        await etcd.put(etcd_prefix + "a", entry(a, weight=2, zone="z1", metadata={"v": "1"}))
        await etcd.put(etcd_prefix + "garbage", b"{not json")
        await etcd.put(etcd_prefix + "zero", entry(b, weight=0))
        await etcd.put(etcd_prefix + "b", json.dumps({"host": "127.0.0.1", "port": b.port}).encode())
        with capture_logs() as logs:
            async with serve(cfg(etcd_server.url, etcd_prefix), plugins=PLUGINS) as proxy:
                cluster = proxy.app.clusters["app"]
                assert {(e.address, e.weight) for e in cluster.endpoints} == {(a.address, 2), (b.address, 1)}
                first = next(e for e in cluster.endpoints if e.address == a.address)
                assert first.zone == "z1" and first.metadata == {"v": "1"}
                errors = skipped(logs)
                assert set(errors) == {etcd_prefix + "garbage", etcd_prefix + "zero"}
                assert "not JSON" in errors[etcd_prefix + "garbage"] and "weight 0" in errors[etcd_prefix + "zero"]
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    assert await seen(client, 6) == {"a", "b"}
                    # A change elsewhere does not log the same bad key again.
                    await etcd.delete(etcd_prefix + "b")
                    await until(lambda: addresses(proxy) == {a.address})
                    assert len([e for e in logs if e["event"] == "discovery entry skipped"]) == 2
                    # Every key bad: nothing is said of the service, the last set serves on.
                    await etcd.put(etcd_prefix + "a", b"[]")
                    await until(lambda: any(e["event"] == "discovery failed" for e in logs))
                    assert addresses(proxy) == {a.address} and await seen(client, 3) == {"a"}
                    assert "a JSON list, not an object" in skipped(logs)[etcd_prefix + "a"]
                    # An empty prefix is etcd saying there is no instance: the cluster empties.
                    await etcd.delete_prefix(etcd_prefix)
                    await until(lambda: not addresses(proxy))
                    assert (await client.get("/")).status_code == 503
                    await etcd.put(etcd_prefix + "b", entry(b))
                    await until(lambda: addresses(proxy) == {b.address})
                    assert await seen(client, 3) == {"b"}
    for event in logs:
        if event["event"] == "discovery entry skipped":
            assert event["cluster"] == "app" and event["source"] == "etcd" and event["log_level"] == "error"


async def test_etcd_stopped_mid_run_keeps_the_set_and_the_watch_resumes(tmp_path, start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    server = etcd_server_process(tmp_path)
    await trio.to_thread.run_sync(server.start)
    try:
        async with EtcdClient(server.url, timeout=2) as etcd:
            await etcd.put("/services/app/a", entry(a))
            with capture_logs() as logs:
                async with serve(cfg(server.url, "/services/app/"), plugins=PLUGINS) as proxy:
                    async with httpx.AsyncClient(base_url=proxy.url) as client:
                        assert await seen(client, 3) == {"a"}
                        await trio.to_thread.run_sync(server.stop)
                        stopped = trio.current_time()
                        await until(lambda: any(e["event"] == "discovery failed" for e in logs), timeout=10)
                        print(f"etcd: 'discovery failed' {trio.current_time() - stopped:.2f}s after etcd stopped")
                        failed = next(e for e in logs if e["event"] == "discovery failed")
                        assert failed["source"] == "etcd" and failed["kept"] == 1
                        assert await seen(client, 3) == {"a"}  # the last set serves on
                        await trio.to_thread.run_sync(server.start)  # same port, same data
                        started = trio.current_time()
                        await etcd.put("/services/app/b", entry(b))
                        await until(lambda: addresses(proxy) == {a.address, b.address}, timeout=10)
                        print(f"etcd: a change after etcd returned seen {trio.current_time() - started:.2f}s "
                              f"after it was ready")
                        assert await seen(client, 6) == {"a", "b"}
            assert not [e for e in logs if e["event"] == "endpoints changed" and e["total"] == 0]
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_a_compaction_while_etcd_was_away_forces_a_full_read(tmp_path, start_origin):
    """What changed while the watch was cut is compacted away: the source follows the full read."""
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    server = etcd_server_process(tmp_path)
    # The same store on another client port: changed and compacted where the proxy cannot see.
    hidden = etcd_server_process(tmp_path, peer=server.peer_port)
    await trio.to_thread.run_sync(server.start)
    try:
        async with EtcdClient(server.url, timeout=2) as etcd:
            await etcd.put("/services/app/a", entry(a))
        with capture_logs() as logs:
            async with serve(cfg(server.url, "/services/app/"), plugins=PLUGINS) as proxy:
                assert addresses(proxy) == {a.address}
                await trio.to_thread.run_sync(server.stop)
                await trio.to_thread.run_sync(hidden.start)
                async with EtcdClient(hidden.url, timeout=2) as writer:
                    await writer.delete("/services/app/a")
                    await writer.compact(await writer.put("/services/app/b", entry(b)))
                await trio.to_thread.run_sync(hidden.stop)
                await trio.to_thread.run_sync(server.start)
                await until(lambda: addresses(proxy) == {b.address}, timeout=10)
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    assert await seen(client, 3) == {"b"}
        assert any(e["event"] == "etcd.watch.resync" for e in logs)
        assert not [e for e in logs if e["event"] == "endpoints changed" and e["total"] == 0]
    finally:
        await trio.to_thread.run_sync(hidden.stop)
        await trio.to_thread.run_sync(server.stop)


async def test_a_member_that_does_not_answer_is_left_for_the_next(etcd_server, etcd_prefix, start_origin):
    a = await start_origin(named("a"))
    async with EtcdClient(etcd_server.url) as etcd:
        await etcd.put(etcd_prefix + "a", entry(a))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    data = cfg(None, etcd_prefix, address=None, endpoints=[dead, etcd_server.url], timeout=0.5)
    with capture_logs() as logs:
        async with serve(data, plugins=PLUGINS) as proxy:
            assert addresses(proxy) == {a.address}
    failed = [e["error"] for e in logs if e["event"] == "discovery failed"]
    assert failed == [f"etcd at http://{dead} did not answer within 0.5s"]


class Relay:
    """A TCP relay on loopback to a real etcd, standing in for a member that hangs: once
    ``frozen``, it passes no byte either way and serves no new connection, while keeping
    every socket open (as a stopped process or a member cut off from its cluster does)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.url = ""

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        while self.frozen:
            await trio.sleep(3600)
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream)
                nursery.start_soon(self._pipe, upstream, client)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                while self.frozen:
                    await trio.sleep(3600)
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_a_member_hung_mid_watch_is_left_and_the_next_resumes_from_the_last_revision(
        etcd_server, etcd_prefix, start_origin, nursery, monkeypatch):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    relay = Relay(int(etcd_server.url.rsplit(":", 1)[1]))
    await nursery.start(relay.run)
    reads = []  # full reads of the prefix, by member
    get_prefix = EtcdClient.get_prefix

    async def counted(self, prefix):
        reads.append(self.url)
        return await get_prefix(self, prefix)

    monkeypatch.setattr(EtcdClient, "get_prefix", counted)
    async with EtcdClient(etcd_server.url) as etcd:
        await etcd.put(etcd_prefix + "a", entry(a))
        data = cfg(None, etcd_prefix, address=None, endpoints=[relay.url, etcd_server.url], timeout=0.5,
                   check_interval=0.25)
        with capture_logs() as logs:
            async with serve(data, plugins=PLUGINS) as proxy:
                assert addresses(proxy) == {a.address}
                await etcd.put(etcd_prefix + "b", entry(b))
                await until(lambda: addresses(proxy) == {a.address, b.address})  # the watch is up
                relay.frozen = True  # the member being watched hangs
                hung = trio.current_time()
                await etcd.delete(etcd_prefix + "a")
                await until(lambda: addresses(proxy) == {b.address}, timeout=5)
                print(f"etcd: a change made while the watched member hung seen {trio.current_time() - hung:.2f}s "
                      f"later, through the next member (check 0.25s, timeout 0.5s)")
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    assert await seen(client, 3) == {"b"}
    failed = [e["error"] for e in logs if e["event"] == "discovery failed"]
    assert len(failed) == 1 and "stopped answering while watched" in failed[0] and "on the next member" in failed[0]
    assert reads == [relay.url]  # the next member took the watch on from the last revision: no second read
    assert not [e for e in logs if e["event"] == "endpoints changed" and e["total"] == 0]


async def test_a_cluster_discovered_over_mutual_tls(etcd_tls, start_origin):
    server, files = etcd_tls
    a = await start_origin(named("a"))
    mutual = tls_context(files["ca"], files["client_cert"], files["client_key"])
    async with EtcdClient(server.url, tls=mutual) as etcd:
        await etcd.put("/mtls/app/a", entry(a))
        tls = {"ca": files["ca"], "cert": files["client_cert"], "key": files["client_key"]}
        async with serve(cfg(server.url, "/mtls/app/", **tls), plugins=PLUGINS) as proxy:
            assert addresses(proxy) == {a.address}
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                assert await seen(client, 2) == {"a"}
        with capture_logs() as logs:  # without the client certificate, etcd refuses it
            async with serve(cfg(server.url, "/mtls/app/", ca=files["ca"]), plugins=PLUGINS) as proxy:
                assert addresses(proxy) == set()
        assert any(e["event"] == "discovery failed" for e in logs)


async def test_ready_waits_for_etcd_and_a_reload_adding_an_etcd_cluster_waits_for_its_first_read(
        etcd_server, etcd_prefix, start_origin):
    from sluice.control.admin import Admin
    from sluice.control.reload import reload

    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    async with EtcdClient(etcd_server.url) as etcd:
        await etcd.put(etcd_prefix + "a", entry(a))
        await etcd.put(etcd_prefix + "b/x", entry(b))
    nowhere = cfg(f"127.0.0.1:{free_port()}", etcd_prefix, initial_timeout=0.2)  # no etcd there
    async with serve(nowhere, plugins=PLUGINS) as proxy:
        status, ready = await Admin(proxy.app, None).ready(None)
        assert status == 503 and ready["discovery_waiting"] == ["app"]
        # The config now names a reachable etcd, and adds a cluster fed from it: the reload
        # returns with both served, never an empty cluster in between.
        fixed = cfg(etcd_server.url, etcd_prefix + "b/")
        fixed["clusters"]["more"] = {"discovery": cfg(etcd_server.url, etcd_prefix)["clusters"]["app"]["discovery"]}
        fixed["routes"].insert(0, {"match": {"prefix": "/more"}, "cluster": "more"})
        proxy.app.reload_source = lambda: parse(fixed)
        assert await reload(proxy.app)
        assert addresses(proxy) == {b.address}
        assert {e.address for e in proxy.app.clusters["more"].endpoints} == {a.address, b.address}
        status, ready = await Admin(proxy.app, None).ready(None)
        assert status == 200 and ready["discovery_waiting"] == []
