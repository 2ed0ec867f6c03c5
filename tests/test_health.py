"""Keeping traffic away from failing endpoints: passive outlier ejection, panic
mode, connect failures tried on another endpoint, and the balancer contract
(settings, feedback), as units and with real origins that die and come back.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import trio
from pydantic import BaseModel, ConfigDict

from sluice import Balancer, Cluster, ConfigError, Endpoint, hookimpl
from sluice.plugins.balancer import RoundRobin
from sluice.testing import serve
from sluice.upstream.cluster import CONNECT_FAILURE, HTTP_5XX, SUCCESS, Outlier

from .conftest import config
from .origin import Origin, Reply, echo
from .proc import Running, free_port

PLUGINS = ["router", "balancer", "access_log"]


def _cluster(n: int, **outlier) -> Cluster:
    eps = [Endpoint("127.0.0.1", 1000 + i) for i in range(n)]
    return Cluster("c", eps, RoundRobin(eps), connect_timeout=1, response_timeout=1, idle_timeout=1,
                   max_idle=1, outlier=Outlier(**outlier))


# -- outlier detection, as a unit ------------------------------------------------------------


def test_a_connect_failure_ejects_for_longer_each_time_up_to_the_cap():
    cluster = _cluster(2, base_ejection=10, max_ejection=25)
    ep = cluster.endpoints[0]
    durations = []
    for _ in range(4):
        before = time.monotonic()
        cluster.report(ep, CONNECT_FAILURE, None, 0.01)
        durations.append(round(ep.ejected_until - before))
        assert not ep.available(time.monotonic())
        assert cluster.eligible() == [cluster.endpoints[1]]
        ep.ejected_until = before  # as if the ejection ran out
        assert cluster.returned() == [ep] and ep.ejected_until == 0.0
    assert durations == [10, 20, 25, 25]


def test_5xx_eject_only_when_consecutive():
    cluster = _cluster(2, consecutive_5xx=3)
    ep = cluster.endpoints[0]
    for outcome in (HTTP_5XX, HTTP_5XX, SUCCESS, HTTP_5XX, HTTP_5XX):
        cluster.report(ep, outcome, 503 if outcome == HTTP_5XX else 200, 0.01)
    assert ep.available(time.monotonic())
    cluster.report(ep, HTTP_5XX, 503, 0.01)
    assert not ep.available(time.monotonic())


def test_no_more_than_max_ejection_percent_is_ejected_but_always_one():
    cluster = _cluster(4, max_ejection_percent=50)
    for ep in cluster.endpoints:
        cluster.report(ep, CONNECT_FAILURE, None, 0.01)
    now = time.monotonic()
    assert sum(not ep.available(now) for ep in cluster.endpoints) == 2
    lone = _cluster(2, max_ejection_percent=0)
    lone.report(lone.endpoints[0], CONNECT_FAILURE, None, 0.01)
    assert not lone.endpoints[0].available(time.monotonic())  # one always may be


def test_a_rule_set_to_zero_is_off():
    cluster = _cluster(2, consecutive_connect_failures=0)
    for _ in range(10):
        cluster.report(cluster.endpoints[0], CONNECT_FAILURE, None, 0.01)
    assert cluster.endpoints[0].available(time.monotonic())


# -- with real origins -------------------------------------------------------------------------


async def _burst(client: httpx.AsyncClient, url: str, count: int, concurrency: int = 20) -> list[int]:
    statuses: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            statuses.append((await client.get(url)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, count // concurrency)
    return statuses


async def test_two_upstreams_one_dead_lose_no_request(start_origin, tmp_path):
    """The out-of-the-box promise (nginx's proxy_next_upstream + max_fails):
    1,000 requests, 20 at a time, with one of two endpoints never listening:
    every one answered 200 by the live one, the dead one ejected at once."""
    live = await start_origin()
    dead = f"127.0.0.1:{free_port()}"
    log = tmp_path / "access.jsonl"
    cfg = config(dead, live.address, filters=["access_log", "router"],
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:
            with trio.fail_after(60):
                statuses = await _burst(client, proxy.url + "/", 1000)
        dead_ep = proxy.app.clusters["backend"].endpoints[0]
        assert not dead_ep.available(time.monotonic())
        assert dead_ep.ejections == 1  # ejected once, and not picked again while ejected
    assert statuses == [200] * 1000
    assert len(live.requests) == 1000
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    retried = [line for line in lines if "tried" in line]
    assert retried and all(line["tried"] == [dead] and line["status"] == 200 for line in retried)


async def test_an_endpoint_killed_between_bursts_is_avoided_and_returns_after_recovery(nursery):
    a = await nursery.start(Origin(echo).serve)
    b_origin = Origin(echo)
    b_scope = trio.CancelScope()

    async def run_b(origin: Origin, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with b_scope:
            await origin.serve(task_status=task_status)

    await nursery.start(run_b, b_origin)
    port = b_origin.port
    cluster = {"outlier": {"base_ejection": 0.3}}
    async with serve(config(a.address, f"127.0.0.1:{port}", cluster=cluster), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            url = proxy.url + "/"
            with trio.fail_after(60):
                assert await _burst(client, url, 200) == [200] * 200
                assert b_origin.requests  # both served
                b_scope.cancel()  # b dies, its pooled connections with it
                await trio.sleep(0.1)
                assert await _burst(client, url, 400) == [200] * 400
                # b comes back on the same port; after the ejection it is used again
                b_scope = trio.CancelScope()
                back = Origin(echo)
                back.port = port
                await nursery.start(run_b, back)
                await trio.sleep(0.5)
                assert await _burst(client, url, 200) == [200] * 200
    assert back.requests, "the recovered endpoint got no traffic"


async def test_when_every_endpoint_is_down_the_client_gets_503_fast():
    cfg = config(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                responses = [await client.get(proxy.url + "/") for _ in range(5)]
    assert [r.status_code for r in responses] == [503] * 5


# -- the balancer contract: settings and feedback ---------------------------------------------


class Recording(Balancer):
    """Picks the first eligible endpoint, and keeps every Attempt it hears of."""

    name = "recording"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: str = "none"
        factor: float = 1.0

    heard: list = []

    def pick(self, ctx, endpoints):
        return endpoints[0]

    def feedback(self, attempt) -> None:
        Recording.heard.append((self.config.label, attempt))


class Policies:
    @hookimpl
    def sluice_balancers(self):
        return [Recording]


async def test_a_policy_gets_its_settings_and_hears_every_attempt(start_origin):
    async def status(request, body):
        return Reply(503 if request.target == b"/bad" else 200, [], b"x")

    origin = await start_origin(status)
    dead = f"127.0.0.1:{free_port()}"
    Recording.heard = []
    cfg = config(dead, origin.address, cluster={"policy": {"name": "recording", "label": "mine"}})
    async with serve(cfg, plugins=PLUGINS, extra={"recording": Policies()}) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/ok")).status_code == 200
            assert (await client.get(proxy.url + "/bad")).status_code == 503
    heard = [(label, a.endpoint.port, a.outcome, a.status) for label, a in Recording.heard]
    live = origin.port
    assert heard == [("mine", int(dead.split(":")[1]), CONNECT_FAILURE, None), ("mine", live, SUCCESS, 200),
                     ("mine", live, HTTP_5XX, 503)]
    assert all(a.latency > 0 for _, a in Recording.heard)


@pytest.mark.parametrize("policy, key", [
    ({"name": "recording", "colour": "red"}, "clusters.backend.policy.colour"),
    ({"name": "recording", "factor": "fast"}, "clusters.backend.policy.factor"),
    ({"label": "x"}, "clusters.backend.policy.name"),
])
async def test_policy_settings_are_checked_by_key_path(policy, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        async with serve(config("127.0.0.1:9", cluster={"policy": policy}), plugins=PLUGINS,
                         extra={"recording": Policies()}):
            pass


@pytest.mark.parametrize("cluster, key", [
    ({"outlier": {"base_ejection": -1}}, "clusters.backend.outlier.base_ejection"),
    ({"outlier": {"max_ejection_percent": 101}}, "clusters.backend.outlier.max_ejection_percent"),
    ({"outlier": {"consecutive_5xx": -1}}, "clusters.backend.outlier.consecutive_5xx"),
    ({"panic_threshold": 150}, "clusters.backend.panic_threshold"),
    ({"outlier": {"eject": True}}, "clusters.backend.outlier.eject"),
])
async def test_health_settings_are_checked_by_key_path(cluster, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        async with serve(config("127.0.0.1:9", cluster=cluster), plugins=PLUGINS):
            pass


def test_the_one_line_proxy_with_one_of_two_upstreams_dead_answers_every_request():
    """What a new user tries first: ``sluice run`` with two ``--upstream``s,
    one of them dead; 100 requests, every one a 200 from the live one."""
    live_port, dead_port, port = free_port(), free_port(), free_port()
    with Running("--listen", f"127.0.0.1:{live_port}") as origin:  # the demo as the live upstream
        with Running("--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{dead_port}",
                     "--upstream", origin.url):
            with httpx.Client() as client:
                statuses = [client.get(f"http://127.0.0.1:{port}/n/{i}").status_code for i in range(100)]
    assert statuses == [200] * 100


async def test_connect_tries_1_turns_failover_off(start_origin):
    live = await start_origin()
    dead = f"127.0.0.1:{free_port()}"
    cfg = config(dead, live.address, cluster={"connect_tries": 1, "policy": "round_robin"})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            first = await client.get(proxy.url + "/")  # round robin: the dead one first
    assert first.status_code == 503
    assert live.requests == []


class Broken(Balancer):
    """Raises on its first pick, then picks the first endpoint."""

    name = "broken"
    calls = 0

    def pick(self, ctx, endpoints):
        Broken.calls += 1
        if Broken.calls == 1:
            raise ValueError("boom")
        return endpoints[0]


class BrokenPolicies:
    @hookimpl
    def sluice_balancers(self):
        return [Broken]


async def test_a_policy_that_raises_costs_one_request_a_500_and_is_named(start_origin, capfd):
    origin = await start_origin()
    Broken.calls = 0
    cfg = config(origin.address, cluster={"policy": "broken"})
    async with serve(cfg, plugins=PLUGINS, extra={"broken": BrokenPolicies()}) as proxy:
        async with httpx.AsyncClient() as client:
            first = await client.get(proxy.url + "/1")
            second = await client.get(proxy.url + "/2")
    assert (first.status_code, second.status_code) == (500, 200)
    assert "Traceback" not in first.text
    logged = capfd.readouterr()
    assert "balancing policy 'broken' (tests.test_health) of cluster 'backend' failed" in logged.out + logged.err


def test_the_ejection_count_starts_again_after_a_long_good_spell():
    cluster = _cluster(2, base_ejection=10, max_ejection=25)
    ep = cluster.endpoints[0]
    cluster.report(ep, CONNECT_FAILURE, None, 0.01)
    ep.ejected_until = time.monotonic() - 1
    cluster.returned()
    cluster.report(ep, CONNECT_FAILURE, None, 0.01)
    assert ep.ejections == 2  # back a moment ago: the second ejection is longer
    ep.ejected_until = time.monotonic() - 1
    cluster.returned()
    ep.returned_at -= 30  # in for longer than max_ejection
    before = time.monotonic()
    cluster.report(ep, CONNECT_FAILURE, None, 0.01)
    assert ep.ejections == 1 and round(ep.ejected_until - before) == 10
