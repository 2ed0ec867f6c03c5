"""The ``dns`` discovery source (sluice.plugins.discovery_dns) against a real
DNS server on a free loopback UDP port: a small dnspython server in this
file, whose records, TTLs and failures each test sets (dnsmasq fixes a
record's TTL at start, and answers SRV without per-test control), and a
real proxy, origins and clients."""

from __future__ import annotations

import socket

import dns.asyncbackend
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import httpx
import pytest
import trio
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.control.config import parse
from sluice.plugins.discovery_dns import DnsSource
from sluice.testing import serve

from .origin import Origin
from .test_discovery import in_flight, named, until

PLUGINS = ["router", "balancer", "discovery_dns"]


class DnsServer:
    """Answers from ``records``: {(name, type): (ttl, [rdata text])}. A name
    with no record at all is NXDOMAIN; ``mode`` "servfail" or "garbage"
    answers every query so; ``stop()``/``start()`` take it down and back
    on the same port."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.mode = "ok"
        self.port = 0
        self.queries: list[tuple[float, str, str]] = []  # (trio time, name, type)
        self._scope: trio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, rdtype: str, values: list[str], ttl: int = 1) -> None:
        self.records[(name, rdtype)] = (ttl, values)

    async def start(self) -> None:
        await self.nursery.start(self._serve)

    def stop(self) -> None:
        self._scope.cancel()

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope, trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", self.port))
            self.port = sock.getsockname()[1]
            task_status.started()
            while True:
                data, peer = await sock.recvfrom(4096)
                reply = self._answer(data)
                if reply is not None:
                    await sock.sendto(reply, peer)

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((trio.current_time(), name, rdtype))
        if self.mode == "garbage":
            return data[:2] + b"\x81\x80garbage, not a DNS message"
        reply = dns.message.make_response(query)
        if self.mode == "servfail":
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif name not in {n for n, _ in self.records}:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, rdtype) in self.records:
            ttl, values = self.records[(name, rdtype)]
            reply.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, values))
        return reply.to_wire()


class HostOrigin(Origin):
    """An origin on a chosen loopback address and port (A records give one port for all)."""

    def __init__(self, handler, host: str, port: int) -> None:
        super().__init__(handler)
        self.host, self.port = host, port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)


@pytest.fixture
async def dns_server(nursery):
    server = DnsServer(nursery)
    await server.start()
    yield server
    server.stop()


def cfg(server: DnsServer, cluster: dict | None = None, **discovery) -> dict:
    settings = {"source": "dns", "name": "app.test", "nameserver": server.address, "min_ttl": 0.2,
                "timeout": 0.5, "initial_timeout": 3, **discovery}
    return {
        "listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}],
        "clusters": {"app": {"discovery": settings, **(cluster or {})}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "app"}],
    }


async def seen(client: httpx.AsyncClient, n: int = 6) -> set[str]:
    return {(await client.get("/")).text for _ in range(n)}


def addresses(proxy) -> set[str]:
    return {e.address for e in proxy.app.clusters["app"].endpoints}


# -- config ------------------------------------------------------------------------------------


def _build(data: dict):
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    return App(parse(data), Plugins(PLUGINS))


def test_settings_are_checked_by_key_path():
    server = DnsServer(None)  # (never started: building only)
    server.port = 5353
    with pytest.raises(ConfigError, match=r"clusters.app.discovery: port: required for type 'A\+AAAA'"):
        _build(cfg(server))
    with pytest.raises(ConfigError, match="clusters.app.discovery.nameserver: .*must be an IP address"):
        _build(cfg(server, port=80, nameserver="dns.example:53"))
    with pytest.raises(ConfigError, match="clusters.app.discovery: min_ttl .* is above max_ttl"):
        _build(cfg(server, port=80, min_ttl=10, max_ttl=5))
    with pytest.raises(ConfigError, match="clusters.app.discovery.type"):
        _build(cfg(server, port=80, type="MX"))
    _build(cfg(server, name="_http._tcp.app.test", type="SRV"))


async def test_the_resolver_runs_on_trio(dns_server):
    """dnspython picks its backend by sniffio: trio's, in the loop (no thread)."""
    assert dns.asyncbackend.get_default_backend().name() == "trio"
    dns_server.set("app.test", "A", ["127.0.0.1"], ttl=30)
    source = DnsSource(DnsSource.Config(name="app.test", port=80, nameserver=dns_server.address), "app")
    endpoints, ttl = await source.lookup()
    assert [(e.host, e.port) for e in endpoints] == [("127.0.0.1", 80)] and ttl == 30


# -- A/AAAA and SRV through a running proxy ------------------------------------------------------


async def test_endpoints_appear_and_one_leaving_drains_its_request_in_flight(dns_server, nursery):
    release = trio.Event()
    a = await nursery.start(Origin(named("a", release)).serve)
    b = await nursery.start(HostOrigin(named("b"), "127.0.0.2", a.port).serve)
    dns_server.set("app.test", "A", ["127.0.0.1"])
    async with serve(cfg(dns_server, port=a.port), plugins=PLUGINS) as proxy:
        cluster = proxy.app.clusters["app"]
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert await seen(client) == {"a"}  # startup waited for the first answer
            slow = in_flight(nursery, client, "/slow")
            gone = cluster.endpoints[0]
            await until(lambda: gone.active == 1)
            dns_server.set("app.test", "A", ["127.0.0.1", "127.0.0.2"])
            await until(lambda: addresses(proxy) == {a.address, b.address})
            assert gone in cluster.endpoints  # it stayed: the same endpoint (by identity)
            dns_server.set("app.test", "A", ["127.0.0.2"])
            await until(lambda: addresses(proxy) == {b.address})
            assert cluster.draining == [gone]
            assert await seen(client) == {"b"}  # new requests go elsewhere
            release.set()
            await until(lambda: slow)
            assert slow[0].status_code == 200 and slow[0].text == "a"  # the one in flight completed
            await until(lambda: not cluster.draining)


async def test_srv_targets_ports_and_weights_reach_the_balancer(dns_server, start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    dns_server.set("_http._tcp.app.test", "SRV", [f"10 3 {a.port} a.test.", f"10 1 {b.port} b.test.",
                                                   "20 1 1 fallback.test."])
    dns_server.set("a.test", "A", ["127.0.0.1"])
    dns_server.set("b.test", "A", ["127.0.0.1"])
    dns_server.set("fallback.test", "A", ["127.0.0.1"])
    data = cfg(dns_server, {"policy": "weighted_round_robin"}, name="_http._tcp.app.test", type="SRV")
    async with serve(data, plugins=PLUGINS) as proxy:
        balancer = proxy.app.clusters["app"].balancer
        assert sorted((e.port, e.weight) for e in balancer.endpoints) == sorted([(a.port, 3), (b.port, 1)])
        assert {e.metadata["target"] for e in balancer.endpoints} == {"a.test", "b.test"}
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            texts = [(await client.get("/")).text for _ in range(8)]
        assert texts.count("a") == 6 and texts.count("b") == 2


async def test_the_ttl_drives_the_refresh_within_its_floor_and_ceiling(dns_server, start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    dns_server.set("_http._tcp.app.test", "SRV", [f"10 1 {a.port} a.test."], ttl=1)
    dns_server.set("a.test", "A", ["127.0.0.1"], ttl=1)
    dns_server.set("b.test", "A", ["127.0.0.1"], ttl=1)
    data = cfg(dns_server, name="_http._tcp.app.test", type="SRV", min_ttl=0.5, max_ttl=300)
    async with serve(data, plugins=PLUGINS) as proxy:
        changed_at = trio.current_time()
        dns_server.set("_http._tcp.app.test", "SRV", [f"10 1 {b.port} b.test."], ttl=1)
        await until(lambda: addresses(proxy) == {b.address}, timeout=3)
        assert trio.current_time() - changed_at <= 1.8  # within ~TTL (1 s) and a lookup
        # a TTL of 0 is held to the floor (min_ttl): no busy loop of queries
        dns_server.set("_http._tcp.app.test", "SRV", [f"10 1 {b.port} b.test."], ttl=0)
        await trio.sleep(1.2)  # (the refresh rhythm is what is measured)
        start = len(dns_server.queries)
        await trio.sleep(1.0)
        srv = [q for q in dns_server.queries[start:] if q[2] == "SRV"]
        assert 1 <= len(srv) <= 3  # one per min_ttl (0.5 s)


async def test_a_server_down_keeps_the_last_set_serving_and_recovery_follows(dns_server, start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    dns_server.set("_http._tcp.app.test", "SRV", [f"10 1 {a.port} a.test."])
    dns_server.set("a.test", "A", ["127.0.0.1"])
    dns_server.set("b.test", "A", ["127.0.0.1"])
    data = cfg(dns_server, name="_http._tcp.app.test", type="SRV", timeout=0.2)
    with capture_logs() as logs:
        async with serve(data, plugins=PLUGINS) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                dns_server.stop()
                await until(lambda: any(e["event"] == "discovery failed" for e in logs))
                assert await seen(client) == {"a"}  # the last good set serves on
                failed = next(e for e in logs if e["event"] == "discovery failed")
                assert failed["cluster"] == "app" and failed["source"] == "dns" and failed["kept"] == 1
                dns_server.set("_http._tcp.app.test", "SRV", [f"10 1 {b.port} b.test."])
                await dns_server.start()  # back, on the same port, with a new answer
                await until(lambda: addresses(proxy) == {b.address}, timeout=8)
                assert await seen(client) == {"b"}


async def test_garbage_and_servfail_keep_the_set_and_nxdomain_empties_it(dns_server, start_origin):
    a = await start_origin(named("a"))
    dns_server.set("app.test", "A", ["127.0.0.1"])
    with capture_logs() as logs:
        async with serve(cfg(dns_server, port=a.port, timeout=0.2), plugins=PLUGINS) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                for mode in ("garbage", "servfail"):
                    dns_server.mode = mode
                    before = len([e for e in logs if e["event"] == "discovery failed"])
                    await until(lambda n=before: len([e for e in logs if e["event"] == "discovery failed"]) > n)
                    assert await seen(client) == {"a"}
                dns_server.mode = "ok"
                dns_server.records.clear()  # NXDOMAIN: authoritative, the cluster empties
                await until(lambda: not addresses(proxy))
                r = await client.get("/")
                assert r.status_code == 503
                dns_server.set("app.test", "A", ["127.0.0.1"])
                await until(lambda: addresses(proxy) == {a.address})
                assert await seen(client) == {"a"}
    failed = [e["error"] for e in logs if e["event"] == "discovery failed"]
    assert all("A+AAAA lookup of 'app.test' failed" in error for error in failed), failed
    assert any("SERVFAIL" in error for error in failed), failed
    emptied = [e for e in logs if e["event"] == "endpoints changed" and e["total"] == 0]
    assert emptied and emptied[0]["log_level"] == "warning"


async def test_a_and_aaaa_records_both_give_endpoints(dns_server, nursery):
    """The default type, A+AAAA: one endpoint per address of either family, with the port."""
    v4 = await nursery.start(Origin(named("v4")).serve)
    await nursery.start(HostOrigin(named("v6"), "::1", v4.port).serve)
    dns_server.set("app.test", "A", ["127.0.0.1"])
    dns_server.set("app.test", "AAAA", ["::1"])
    async with serve(cfg(dns_server, port=v4.port), plugins=PLUGINS) as proxy:
        assert addresses(proxy) == {f"127.0.0.1:{v4.port}", f"[::1]:{v4.port}"}
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert await seen(client) == {"v4", "v6"}


async def test_every_worker_of_a_sluice_process_follows_the_records(dns_server, nursery, tmp_path):
    """`sluice run -c FILE --workers 2`: each worker runs its own source; both follow a change."""
    from .proc import Running, free_port

    a = await nursery.start(Origin(named("a")).serve)
    await nursery.start(HostOrigin(named("b"), "127.0.0.2", a.port).serve)
    dns_server.set("app.test", "A", ["127.0.0.1"])
    port = free_port()
    path = tmp_path / "sluice.toml"
    path.write_text(f"""
[[listeners]]
address = "127.0.0.1:{port}"
filters = ["router"]

[clusters.app]
discovery = {{ source = "dns", name = "app.test", port = {a.port}, nameserver = "{dns_server.address}", min_ttl = 0.2 }}

[[routes]]
match = {{ prefix = "/" }}
cluster = "app"
""")
    # (started off the loop: the loop answers the workers' DNS queries meanwhile)
    proxy = await trio.to_thread.run_sync(lambda: Running("-c", str(path), "--workers", "2"))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers={"connection": "close"}) as client:
            assert await seen(client, 8) == {"a"}
            dns_server.set("app.test", "A", ["127.0.0.2"])
            with trio.fail_after(10):
                while await seen(client, 8) != {"b"}:
                    await trio.sleep(0.1)
        await trio.to_thread.run_sync(proxy.stop)
        changes = [line for line in proxy.stderr + proxy.stdout
                   if "endpoints changed" in line and f"127.0.0.1:{a.port}" in line and "removed" in line]
        assert len(changes) == 4, changes  # the first snapshot and the change, in each of 2 workers
    finally:
        await trio.to_thread.run_sync(proxy.stop)


def test_sluice_plugins_lists_the_source_and_its_settings():
    from .proc import sluice

    out = sluice("plugins").stdout
    assert "  discovery source dns: Endpoints from DNS, refreshed on the records' TTL." in out
    block = out.split("discovery source dns", 1)[1]
    assert "nameserver" in block and "min_ttl" in block and "max_ttl" in block


def test_the_source_of_a_plugin_not_enabled_is_named_with_its_plugin():
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    server = DnsServer(None)
    with pytest.raises(ConfigError, match="clusters.app.discovery.source: discovery source 'dns' is provided by "
                                          "plugin 'discovery_dns', which is not enabled"):
        App(parse(cfg(server, port=80)), Plugins(["router", "balancer"]))
