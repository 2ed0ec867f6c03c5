"""The ``ewma`` policy (peak-EWMA response time x requests in flight): its
arithmetic on a fake clock, and with real origins, one ten times slower
than the other, then recovered.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import httpx
import pytest
import trio

from sluice import ConfigError, Endpoint
from sluice.plugins.balancer import Ewma
from sluice.testing import serve
from sluice.upstream.cluster import CONNECT_FAILURE, HTTP_5XX, PROTOCOL_ERROR, SUCCESS, Attempt

from .conftest import config
from .origin import Reply

PLUGINS = ["router", "balancer"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ewma(*weights: int, decay: float = 10.0, penalty: float = 1.0, seed: int = 3):
    clock = Clock()
    eps = [Endpoint("127.0.0.1", 1000 + i, weight=w) for i, w in enumerate(weights)]
    return Ewma(eps, Ewma.Config(decay=decay, penalty=penalty), rng=random.Random(seed), clock=clock), clock


def hear(policy, i: int, latency: float, outcome: str = SUCCESS) -> None:
    policy.feedback(Attempt(policy.endpoints[i], outcome, 200 if outcome == SUCCESS else None, latency))


def test_a_slower_answer_is_the_cost_at_once_and_a_faster_one_pulls_it_down_with_time():
    policy, clock = ewma(1, 1, decay=10.0)
    ep = policy.endpoints[0]
    hear(policy, 0, 0.1)
    assert policy.cost(ep) == pytest.approx(0.1)
    hear(policy, 0, 0.5)  # the peak: no smoothing upwards
    assert policy.cost(ep) == pytest.approx(0.5)
    clock.now += 10.0  # one time constant with no news: down by e
    assert policy.cost(ep) == pytest.approx(0.5 / math.e)
    hear(policy, 0, 0.1)  # below: stored * w + latency * (1 - w), w = exp(-10 / 10)
    assert policy.cost(ep) == pytest.approx(0.5 / math.e + 0.1 * (1 - 1 / math.e))
    hear(policy, 0, 0.01)  # no time passed: w = 1, one sample moves nothing
    assert policy.cost(ep) == pytest.approx(0.5 / math.e + 0.1 * (1 - 1 / math.e))


def test_a_failure_counts_as_the_penalty_and_a_protocol_error_as_its_latency():
    policy, _ = ewma(1, 1, 1, penalty=2.0)
    hear(policy, 0, 0.01, CONNECT_FAILURE)
    hear(policy, 1, 0.01, HTTP_5XX)
    hear(policy, 2, 0.01, PROTOCOL_ERROR)
    assert [policy.cost(e) for e in policy.endpoints] == pytest.approx([2.0, 2.0, 0.01])


def test_an_endpoint_not_heard_from_costs_the_mean_of_the_others():
    policy, clock = ewma(1, 1, 1)
    assert policy.cost(policy.endpoints[2]) == 0.0
    hear(policy, 0, 0.1)
    hear(policy, 1, 0.3)
    assert policy.cost(policy.endpoints[2]) == pytest.approx(0.2)
    clock.now += 10.0  # the others' costs decay, and so does their mean
    assert policy.cost(policy.endpoints[2]) == pytest.approx(0.2 / math.e)


def test_an_endpoint_not_heard_from_gets_its_share_while_the_known_one_decays():
    # With one endpoint heard from long ago, the other (never tried) is as
    # cheap: neither favoured nor shunned, so it is tried.
    policy, clock = ewma(1, 1, seed=5)
    hear(policy, 0, 0.1)
    clock.now += 5.0
    picks = Counter(policy.pick(None, policy.endpoints).port - 1000 for _ in range(200))
    assert 70 <= picks[1] <= 130, picks


def test_the_pick_weighs_cost_by_requests_in_flight_and_weight():
    policy, _ = ewma(1, 1)
    fast, slow = policy.endpoints
    hear(policy, 0, 0.02)
    hear(policy, 1, 0.2)
    assert {policy.pick(None, policy.endpoints) for _ in range(20)} == {fast}
    fast.active = 10  # 0.02 x 11 > 0.2 x 1
    assert {policy.pick(None, policy.endpoints) for _ in range(20)} == {slow}
    heavy, _ = ewma(20, 1)
    hear(heavy, 0, 0.2)
    hear(heavy, 1, 0.02)
    assert {heavy.pick(None, heavy.endpoints) for _ in range(20)} == {heavy.endpoints[0]}  # 0.2/20 < 0.02


def test_power_of_two_choices_over_many_endpoints():
    """Costs 1..5 (x 10 ms): the cheapest wins every pair it is in (2/5 of them),
    the dearest none. 5,000 seeded picks; expected 2,000, 1,500, 1,000, 500, 0."""
    policy, _ = ewma(1, 1, 1, 1, 1)
    for i in range(5):
        hear(policy, i, 0.01 * (i + 1))
    counts = Counter(policy.pick(None, policy.endpoints).port - 1000 for _ in range(5000))
    for i, expected in enumerate((2000, 1500, 1000, 500, 0)):
        assert abs(counts[i] - expected) <= 150, counts  # sd <= 35: 4 sd either way


def test_a_lone_eligible_endpoint_is_picked():
    policy, _ = ewma(1, 1)
    assert policy.pick(None, policy.endpoints[1:]) is policy.endpoints[1]


@pytest.mark.parametrize("policy, key", [
    ({"name": "ewma", "decay": -1}, "clusters.backend.policy.decay"),
    ({"name": "ewma", "decay": 0}, "clusters.backend.policy.decay"),
    ({"name": "ewma", "penalty": "slow"}, "clusters.backend.policy.penalty"),
    ({"name": "ewma", "tau": 3}, "clusters.backend.policy.tau"),
])
async def test_settings_are_checked_by_key_path(policy, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        async with serve(config("127.0.0.1:9", cluster={"policy": policy}), plugins=PLUGINS):
            pass


# -- with real origins ----------------------------------------------------------------------------


async def test_most_traffic_goes_to_the_fast_origin_and_comes_back_when_the_slow_one_recovers(start_origin):
    delays = {"a": 0.02, "b": 0.2}

    def origin(name: str):
        async def handler(request, body):
            await trio.sleep(delays[name])
            return Reply(200, [], name.encode())
        return handler

    a, b = await start_origin(origin("a")), await start_origin(origin("b"))
    cfg = config(a.address, b.address, cluster={"policy": {"name": "ewma", "decay": 0.5}})

    async def burst(client: httpx.AsyncClient, url: str, count: int, concurrency: int = 4) -> Counter:
        served: Counter = Counter()

        async def worker() -> None:
            for _ in range(count // concurrency):
                served[(await client.get(url)).text] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return served

    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(60):
                await burst(client, proxy.url + "/", 20)  # both heard from
                first = await burst(client, proxy.url + "/", 200)
                delays.update(a=0.2, b=0.02)  # a slows down, b recovers
                await burst(client, proxy.url + "/", 40)  # the news travels
                second = await burst(client, proxy.url + "/", 200)
    assert first["a"] >= 160, first
    assert second["b"] >= 160, second
