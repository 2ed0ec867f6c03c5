"""The core's side of service discovery (sluice.upstream.discovery): a tiny
in-test source plugin reports snapshots, and a real proxy with real origins
and clients follows them: endpoints join and drain, health checks and
balancers follow, a reload keeps an unchanged cluster's source running."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from sluice import ConfigError, hookimpl
from sluice.control.admin import Admin
from sluice.control.config import parse
from sluice.control.reload import reload
from sluice.plugins.balancer import Ewma
from sluice.plugins.hashing import Maglev, RingHash
from sluice.testing import serve
from sluice.upstream.cluster import SUCCESS, Attempt, Endpoint
from sluice.upstream.discovery import DiscoveryConfig, DiscoverySource, EndpointSpec

from .origin import Reply

PLUGINS = ["router", "balancer"]


class Manual(DiscoverySource):
    """A source the test drives: each instance waits for snapshots pushed to it."""

    name = "manual"
    running: dict[str, Manual] = {}  # cluster -> its running source

    class Config(DiscoveryConfig):
        label: str = ""
        crash: bool = False  # run() raises at once (a source's bug)
        address: str = ""  # a first snapshot of this endpoint alone, sent by the source itself
        delay: float = 0.0  # after this many seconds

    def __init__(self, config, cluster):
        super().__init__(config, cluster)
        self.runs = 0
        self.updates = None
        self.started = trio.Event()
        self.stopped = False

    async def run(self, updates):
        self.runs += 1
        self.updates = updates
        Manual.running[self.cluster] = self
        self.started.set()
        if self.config.crash:
            raise RuntimeError("boom")
        try:
            if self.config.address:
                await trio.sleep(self.config.delay)
                updates.update([EndpointSpec.of(self.config.address)])
            await trio.sleep_forever()
        finally:
            self.stopped = True


class _Plugin:
    @hookimpl
    def sluice_discovery(self):
        return [Manual]


EXTRA = {"manual": _Plugin()}


def named(name: str, delay: trio.Event | None = None):
    async def handler(request, body):
        if delay is not None and request.target == b"/slow":
            await delay.wait()
        return Reply(200, [(b"x-origin", name.encode())], name.encode())

    return handler


def cfg(cluster: dict | None = None, **discovery) -> dict:
    return {
        "listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}],
        "clusters": {"app": {"discovery": {"source": "manual", "initial_timeout": 0.2, **discovery},
                             **(cluster or {})}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "app"}],
    }


def spec(origin, weight: int = 1) -> EndpointSpec:
    return EndpointSpec.of(origin.address, weight=weight)


def in_flight(nursery, client: httpx.AsyncClient, path: str) -> list[httpx.Response]:
    """Send a request in the background; its response lands in the list returned."""
    out: list[httpx.Response] = []

    async def send():
        out.append(await client.get(path))

    nursery.start_soon(send)
    return out


async def until(predicate, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (cheap, in-process state) until true, or fail at the deadline."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.fixture(autouse=True)
def _forget_sources():
    Manual.running.clear()
    yield
    Manual.running.clear()


# -- config ------------------------------------------------------------------------------------


def test_an_unknown_source_is_an_error_naming_it_and_listing_the_installed_ones():
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    with pytest.raises(ConfigError) as err:
        App(parse(cfg(source="consul")), Plugins(PLUGINS, EXTRA))
    assert "clusters.app.discovery.source: unknown discovery source 'consul'" in str(err.value)
    assert "manual" in str(err.value)


def test_the_sources_settings_are_checked_by_key_path():
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    with pytest.raises(ConfigError) as err:
        App(parse(cfg(lable="x")), Plugins(PLUGINS, EXTRA))
    assert "clusters.app.discovery.lable: unknown key" in str(err.value)


def test_a_cluster_has_endpoints_or_discovery_not_both_nor_neither():
    with pytest.raises(ConfigError, match="clusters.app: endpoints: a cluster with discovery"):
        parse(cfg({"endpoints": ["127.0.0.1:1"]}))
    with pytest.raises(ConfigError, match="clusters.app: endpoints: list at least one"):
        parse({"listeners": [{"address": "127.0.0.1:0"}], "clusters": {"app": {}}})


# -- snapshots through a running proxy ---------------------------------------------------------


async def test_no_endpoint_until_the_first_snapshot_then_traffic_follows_each_one(start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    with capture_logs() as logs:
        async with serve(cfg(), plugins=PLUGINS, extra=EXTRA) as proxy:
            assert any(e["event"] == "discovery not ready" for e in logs)  # served after initial_timeout
            status, ready = await Admin(proxy.app, None).ready(None)
            assert status == 503 and not ready["ready"] and ready["discovery_waiting"] == ["app"]
            _, plugins = await Admin(proxy.app, None).plugins(None)
            assert plugins["plugins"]["manual"]["discovery"] == ["manual"]
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                r = await client.get("/")
                assert r.status_code == 503 and r.text == "no healthy upstream\n"
                source = Manual.running["app"]
                source.updates.update([spec(a)])
                assert {(await client.get("/")).text for _ in range(4)} == {"a"}
                status, ready = await Admin(proxy.app, None).ready(None)
                assert status == 200 and ready["ready"] and ready["discovery_waiting"] == []
                cluster = proxy.app.clusters["app"]
                kept = cluster.endpoints[0]
                source.updates.update([spec(a), spec(b)])
                assert cluster.endpoints[0] is kept  # an endpoint that stays keeps its object
                assert {(await client.get("/")).text for _ in range(4)} == {"a", "b"}
                source.updates.update([spec(b)])
                assert {(await client.get("/")).text for _ in range(4)} == {"b"}
    changes = [e for e in logs if e["event"] == "endpoints changed"]
    assert [(c["added"], c["removed"], c["total"]) for c in changes] == [
        ([a.address], [], 1), ([b.address], [], 2), ([], [a.address], 1)]


async def test_startup_waits_for_the_first_snapshot(start_origin, nursery):
    """A source that answers within initial_timeout: the listeners accept only
    after its first snapshot, so the first request already has an endpoint."""
    a = await start_origin(named("a"))

    class Quick(Manual):
        async def run(self, updates):
            await trio.sleep(0.1)
            updates.update([spec(a)])
            await trio.sleep_forever()

    class _P:
        @hookimpl
        def sluice_discovery(self):
            return [Quick]

    with capture_logs() as logs:
        async with serve(cfg(initial_timeout=10), plugins=PLUGINS, extra={"manual": _P()}) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                assert (await client.get("/")).text == "a"
    assert not any(e["event"] == "discovery not ready" for e in logs)


async def test_a_departed_endpoint_drains_its_request_in_flight_finishes(start_origin, nursery):
    release = trio.Event()
    a = await start_origin(named("a", release))
    b = await start_origin(named("b"))
    async with serve(cfg(), plugins=PLUGINS, extra=EXTRA) as proxy:
        source = Manual.running["app"]
        source.updates.update([spec(a)])
        cluster = proxy.app.clusters["app"]
        gone = cluster.endpoints[0]
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert (await client.get("/")).text == "a"  # leaves an idle pooled connection to a
            assert proxy.app.pool._idle.get(id(gone))
            slow = in_flight(nursery, client, "/slow")
            await until(lambda: gone.active == 1)
            with capture_logs() as logs:
                source.updates.update([spec(b)])
                assert gone.draining and cluster.draining == [gone] and gone not in cluster.endpoints
                assert {(await client.get("/")).text for _ in range(4)} == {"b"}  # new ones go elsewhere
                assert cluster.draining == [gone]  # still, while its request runs
                admin = Admin(proxy.app, None)
                _, shown = await admin.clusters(None)
                assert [(e["address"], e["draining"]) for e in shown["clusters"]["app"]["endpoints"]] == [
                    (b.address, False), (a.address, True)]
                release.set()
                await until(lambda: slow)
                assert slow[0].status_code == 200 and slow[0].text == "a"
                await until(lambda: not cluster.draining)
            assert any(e["event"] == "endpoint drained" and e["endpoint"] == a.address for e in logs)
            # its idle connections are closed by the pool's reaper (retired)
            await until(lambda: not proxy.app.pool._idle.get(id(gone)), timeout=5)


async def test_an_endpoint_back_before_it_drained_is_taken_back_with_its_state(start_origin, nursery):
    release = trio.Event()
    a = await start_origin(named("a", release))
    b = await start_origin(named("b"))
    async with serve(cfg(), plugins=PLUGINS, extra=EXTRA) as proxy:
        source = Manual.running["app"]
        source.updates.update([spec(a), spec(b)])
        cluster = proxy.app.clusters["app"]
        first = cluster.endpoints[0]
        first.ejections = 2  # state of its own
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            slow = in_flight(nursery, client, "/slow")
            await until(lambda: first.active == 1)
            source.updates.update([spec(b)])
            assert cluster.draining == [first]
            source.updates.update([spec(a), spec(b)])
            assert cluster.endpoints[0] is first and not first.draining and first.ejections == 2
            assert cluster.draining == []
            release.set()
            await until(lambda: slow)
            assert slow[0].text == "a"


async def test_an_empty_snapshot_is_applied_only_when_authoritative(start_origin):
    a = await start_origin(named("a"))
    async with serve(cfg(), plugins=PLUGINS, extra=EXTRA) as proxy:
        source = Manual.running["app"]
        source.updates.update([spec(a)])
        cluster = proxy.app.clusters["app"]
        with capture_logs() as logs:
            source.updates.update([])
            assert len(cluster.endpoints) == 1
            assert [e["log_level"] for e in logs if e["event"] == "discovery failed"] == ["warning"]
            source.updates.update([], authoritative=True)
            assert cluster.endpoints == []
        changed = [e for e in logs if e["event"] == "endpoints changed"]
        assert changed[0]["log_level"] == "warning" and changed[0]["total"] == 0
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            r = await client.get("/")
            assert r.status_code == 503


async def test_a_source_that_raises_is_logged_and_run_again(start_origin):
    with capture_logs() as logs:
        async with serve(cfg(crash=True), plugins=PLUGINS, extra=EXTRA):
            await until(lambda: any(e["event"] == "discovery failed" for e in logs))
    failed = next(e for e in logs if e["event"] == "discovery failed")
    assert "RuntimeError('boom')" in failed["error"] and failed["cluster"] == "app"


async def test_health_checks_follow_the_endpoint_set(start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    check = {"health_check": {"path": "/health", "interval": 0.05, "jitter": 0, "timeout": 0.04}}
    async with serve(cfg(check), plugins=PLUGINS, extra=EXTRA):
        source = Manual.running["app"]
        source.updates.update([spec(a)])

        def probes(origin):
            return sum(1 for r, _ in origin.requests if r.target == b"/health")

        await until(lambda: probes(a) >= 2)
        assert probes(b) == 0
        source.updates.update([spec(b)])
        await until(lambda: probes(b) >= 2)
        settled = probes(a)
        await until(lambda: probes(b) >= 6)  # b probed a few more times; a no more
        assert probes(a) <= settled + 1  # (one probe may have been on its way)


async def test_a_reload_keeps_an_unchanged_clusters_source_running(start_origin):
    a = await start_origin(named("a"))
    data = cfg()
    async with serve(data, plugins=PLUGINS, extra=EXTRA) as proxy:
        app = proxy.app
        source = Manual.running["app"]
        source.updates.update([spec(a)])
        discovery = app.discoveries["app"]

        class Again:
            def __call__(self):
                return parse(data)

        app.reload_source = Again()
        assert await reload(app)
        assert app.discoveries["app"] is discovery and Manual.running["app"] is source and source.runs == 1
        assert len(app.clusters["app"].endpoints) == 1
        # the cluster changes, its discovery settings do not: the set found so far serves on
        # until the new source's first snapshot (no 503 in between)
        timeouts = cfg({"connect_timeout": 2})
        app.reload_source = lambda: parse(timeouts)
        assert await reload(app)
        assert [e.address for e in app.clusters["app"].endpoints] == [a.address]
        assert app.discoveries["app"] is not discovery and app.discoveries["app"].ready.is_set()
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert (await client.get("/")).text == "a"
        await until(lambda: Manual.running["app"] is not source)  # a changed cluster: a new source
        changed = cfg(label="other")  # another source's settings: nothing carried over
        app.reload_source = lambda: parse(changed)
        with capture_logs() as logs:
            assert await reload(app)  # its source sends nothing: swapped after initial_timeout
        assert app.clusters["app"].endpoints == []
        assert [e["cluster"] for e in logs if e["event"] == "discovery not ready"] == ["app"]
        status, ready = await Admin(app, None).ready(None)
        assert status == 503 and ready["discovery_waiting"] == ["app"]


async def test_a_reload_adding_a_discovered_cluster_waits_for_its_first_snapshot(start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    async with serve(cfg(), plugins=PLUGINS, extra=EXTRA) as proxy:
        app = proxy.app
        Manual.running["app"].updates.update([spec(a)])
        grown = cfg()
        grown["clusters"]["new"] = {"discovery": {"source": "manual", "address": b.address, "delay": 0.3,
                                                  "initial_timeout": 5}}
        grown["routes"].insert(0, {"match": {"prefix": "/new"}, "cluster": "new"})
        app.reload_source = lambda: parse(grown)
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            answers: list[int] = []
            done = trio.Event()

            async def meanwhile():  # requests all along the reload: never a 503 from "new"
                while not done.is_set():
                    answers.append((await client.get("/new")).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(meanwhile)
                start = trio.current_time()
                assert await reload(app)
                waited = trio.current_time() - start
                done.set()
            assert waited >= 0.3  # the swap waited for the first snapshot
            assert [e.address for e in app.clusters["new"].endpoints] == [b.address]
            assert (await client.get("/new")).text == "b"
        assert answers and set(answers) == {200}  # ("a" before the swap, "b" after)
        status, ready = await Admin(app, None).ready(None)
        assert status == 200 and ready["discovery_waiting"] == []
        assert Manual.running["new"].runs == 1  # the source started early is the one that runs on


async def test_a_reload_that_fails_after_starting_a_new_source_stops_it(start_origin):
    a = await start_origin(named("a"))
    async with serve(cfg(), plugins=PLUGINS, extra=EXTRA) as proxy:
        app = proxy.app
        Manual.running["app"].updates.update([spec(a)])
        bad = cfg()
        bad["clusters"]["new"] = {"discovery": {"source": "manual", "address": a.address, "initial_timeout": 5}}
        with socket.socket() as taken:  # a new listener's bind fails, after the source started
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            bad["listeners"].append({"address": "127.0.0.1:%d" % taken.getsockname()[1], "filters": ["router"]})
            app.reload_source = lambda: parse(bad)
            assert not await reload(app)
        assert "new" not in app.clusters and "new" not in app._sources
        source = Manual.running["new"]  # it ran (and sent its snapshot) before the bind failed
        await until(lambda: source.stopped)


# -- balancers following -------------------------------------------------------------------


def _endpoints(n: int) -> list[Endpoint]:
    return [Endpoint("127.0.0.1", 2000 + i) for i in range(n)]


def test_ring_hash_rebuilds_its_ring_over_the_new_endpoints():
    eps = _endpoints(3)
    policy = RingHash(eps, RingHash.Config())

    def owner(key: str) -> Endpoint:
        return policy.endpoints[policy._owners[policy.position(key)]]

    before = {f"k{i}": owner(f"k{i}") for i in range(500)}
    assert set(before.values()) == set(eps)
    policy.endpoints_changed([eps[0], eps[1]])
    after = {key: owner(key) for key in before}
    assert set(after.values()) == {eps[0], eps[1]}
    # only the keys of the endpoint gone move (consistent hashing)
    assert all(after[key] is e for key, e in before.items() if e is not eps[2])
    joined = Endpoint("127.0.0.1", 2999)
    policy.endpoints_changed([eps[0], eps[1], joined])
    assert {owner(key) for key in before} == {eps[0], eps[1], joined}


def test_ewma_keeps_what_it_learned_of_endpoints_that_stay():
    eps = _endpoints(3)
    policy = Ewma(eps, Ewma.Config())
    for e, latency in zip(eps, (0.1, 0.2, 0.3), strict=True):
        policy.feedback(Attempt(e, SUCCESS, 200, latency))
    kept = policy.cost(eps[0])
    policy.endpoints_changed([eps[0], Endpoint("127.0.0.1", 2999)])
    assert policy.cost(eps[0]) == pytest.approx(kept, rel=0.01)
    assert id(eps[1]) not in policy._cost and id(eps[2]) not in policy._cost
    assert set(policy.scores()) == {eps[0].address, "127.0.0.1:2999"}


async def test_the_cluster_policy_hears_the_change_and_weights_reach_it(start_origin):
    a = await start_origin(named("a"))
    b = await start_origin(named("b"))
    async with serve(cfg({"policy": "weighted_round_robin"}), plugins=PLUGINS, extra=EXTRA) as proxy:
        source = Manual.running["app"]
        source.updates.update([spec(a, weight=3), spec(b, weight=1)])
        balancer = proxy.app.clusters["app"].balancer
        assert [e.weight for e in balancer.endpoints] == [3, 1]
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            seen = [(await client.get("/")).text for _ in range(8)]
        assert seen.count("a") == 6 and seen.count("b") == 2


def test_maglev_rebuilds_its_table_over_the_new_endpoints():
    eps = _endpoints(3)
    policy = Maglev(eps, Maglev.Config(table_size=1009))
    assert {policy.endpoints[i] for i in policy._owners} == set(eps)
    policy.endpoints_changed([eps[0], eps[2]])
    assert {policy.endpoints[i] for i in policy._owners} == {eps[0], eps[2]}
    assert len(policy._owners) == 1009


class _Counted:
    """A hash policy that counts its builds (the thread's and the inline ones)."""

    builds = 0

    def _build(self, endpoints):
        type(self).builds += 1
        return super()._build(endpoints)


class _CountedMaglev(_Counted, Maglev):
    pass


class _CountedRing(_Counted, RingHash):
    pass


@pytest.mark.parametrize("policy_class", [_CountedMaglev, _CountedRing])
async def test_a_large_table_is_rebuilt_off_the_loop_and_picks_meanwhile_land_on_live_endpoints(policy_class):
    first = [Endpoint("10.0.0.1", 2000 + i) for i in range(1000)]
    policy = policy_class(first, policy_class.Config())
    policy_class.builds = 0
    second = first[:900] + [Endpoint("10.0.0.2", 2000 + i) for i in range(100)]
    policy.endpoints_changed(second)
    assert not policy._built.is_set()  # a thread builds (65537 slots, 160k points)
    ticks = 0
    done = trio.Event()

    async def tick():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        with trio.fail_after(10):
            while not policy_class.builds:  # the thread has begun `second`'s build
                await trio.sleep(0.001)
        # More changes while the build for `second` runs: that build is dropped, the
        # changes coalesce into one more build, of the last list.
        third = second[:800] + [Endpoint("10.0.0.3", 2000 + i) for i in range(150)]
        policy.endpoints_changed(third)
        final = third[50:] + [Endpoint("10.0.0.4", 2000 + i) for i in range(50)]
        policy.endpoints_changed(final)
        live = set(final)
        keys = [f"user-{i}" for i in range(300)]
        assert policy._table.endpoints != policy.endpoints  # an old table still serves (no swap without a checkpoint)
        for key in keys:  # and a pick skips what is no longer eligible
            assert policy.pick(SimpleNamespace(hash_key=key), final) in live
        with trio.fail_after(30):
            await policy.settled()
        done.set()
    assert ticks > 1  # the loop ran while the table was built
    assert policy_class.builds == 2  # `second`'s build dropped, one for `final`
    fresh = policy_class(final, policy_class.Config())
    assert policy._table.endpoints is policy.endpoints
    assert policy._owners == fresh._owners
    for key in keys:  # the final table is the one a new policy over the final set builds
        assert policy.pick(SimpleNamespace(hash_key=key), final) is fresh.pick(SimpleNamespace(hash_key=key), final)


@pytest.mark.parametrize("bad", [{"host": ""}, {"port": 0}, {"port": 70000}, {"weight": 0}, {"weight": 1001}])
def test_an_endpoint_spec_with_a_bad_value_is_refused_as_it_is_built(bad):
    with pytest.raises(ValueError):
        EndpointSpec(**{"host": "10.0.0.1", "port": 80, **bad})
    with pytest.raises(ValueError, match="not a host:port"):
        EndpointSpec.of("10.0.0.1")
