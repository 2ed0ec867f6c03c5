"""The balancer plugin's policies, as units and behind a running proxy."""

from __future__ import annotations

import random
from collections import Counter

import httpx
import pytest

from sluice import ConfigError, Endpoint
from sluice.plugins.balancer import LeastRequest, Random, RoundRobin, WeightedRoundRobin
from sluice.testing import serve

from .conftest import config


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint("127.0.0.1", 1000 + i, weight=w) for i, w in enumerate(weights)]


def picks(policy, n: int) -> list[int]:
    return [policy.pick(None).port - 1000 for _ in range(n)]


def test_round_robin_cycles_and_skips_unhealthy():
    eps = endpoints(1, 1, 1)
    rr = RoundRobin(eps)
    assert picks(rr, 6) == [0, 1, 2, 0, 1, 2]
    eps[1].healthy = False
    assert set(picks(rr, 6)) == {0, 2}
    for e in eps:
        e.healthy = False
    assert rr.pick(None) is None


def test_weighted_round_robin_is_smooth_and_proportional():
    wrr = WeightedRoundRobin(endpoints(5, 1, 1))
    assert picks(wrr, 7) == [0, 0, 1, 0, 2, 0, 0]  # interleaved, not a burst of five
    assert Counter(picks(wrr, 700)) == {0: 500, 1: 100, 2: 100}


def test_random_follows_weights():
    rnd = Random(endpoints(3, 1), rng=random.Random(7))
    counts = Counter(picks(rnd, 4000))
    assert 2800 < counts[0] < 3200


def test_least_request_prefers_the_idle_endpoint():
    eps = endpoints(1, 1, 1)
    eps[0].active, eps[1].active, eps[2].active = 10, 0, 10
    lr = LeastRequest(eps, rng=random.Random(1))
    counts = Counter(picks(lr, 300))
    # Endpoint 1 wins whenever it is one of the two sampled (2/3 of the time).
    assert counts[1] > 150
    assert counts[1] == max(counts.values())


async def test_a_cluster_uses_its_policy_across_endpoints(start_origin):
    origins = [await start_origin() for _ in range(3)]
    cfg = config(*(o.address for o in origins), cluster={"policy": "round_robin"})
    async with serve(cfg, plugins=["router", "balancer"]) as proxy:
        async with httpx.AsyncClient() as client:
            for _ in range(9):
                await client.get(proxy.url + "/")
    assert [len(o.requests) for o in origins] == [3, 3, 3]


async def test_a_policy_from_a_disabled_plugin_names_the_plugin():
    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", cluster={"policy": "least_request"}), plugins=["router"]):
            pass
    assert "clusters.backend.policy" in str(info.value)
    assert "plugin 'balancer', which is not enabled" in str(info.value)


async def test_an_unknown_policy_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", cluster={"policy": "fastest"}), plugins=["router", "balancer"]):
            pass
    assert "unknown policy 'fastest'" in str(info.value)
    assert "least_request" in str(info.value)
