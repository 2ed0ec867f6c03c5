"""The balancer plugin's policies, as units and behind a running proxy."""

from __future__ import annotations

import random
from collections import Counter

import httpx
import pytest

from sluice import Cluster, ConfigError, Endpoint
from sluice.plugins.balancer import LeastRequest, Random, RoundRobin, WeightedRoundRobin
from sluice.testing import serve

from .conftest import config


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint("127.0.0.1", 1000 + i, weight=w) for i, w in enumerate(weights)]


def picks(policy, n: int, eligible: list[Endpoint] | None = None) -> list[int]:
    eligible = policy.endpoints if eligible is None else eligible
    return [policy.pick(None, eligible).port - 1000 for _ in range(n)]


def cluster_of(policy, **settings) -> Cluster:
    return Cluster("c", policy.endpoints, policy, connect_timeout=1, response_timeout=1,
                   idle_timeout=1, max_idle=1, **settings)


def test_round_robin_cycles_through_what_is_eligible():
    eps = endpoints(1, 1, 1)
    rr = RoundRobin(eps)
    assert picks(rr, 6) == [0, 1, 2, 0, 1, 2]
    assert set(picks(rr, 6, [eps[0], eps[2]])) == {0, 2}


def test_the_cluster_leaves_out_unhealthy_endpoints_and_panics_when_too_few_are_left():
    eps = endpoints(1, 1, 1, 1)
    cluster = cluster_of(RoundRobin(eps))
    eps[1].healthy = False
    assert {cluster.pick(None).port - 1000 for _ in range(8)} == {0, 2, 3}
    eps[0].healthy = eps[2].healthy = False  # 1 of 4 left: under 50%, panic
    assert {cluster.pick(None).port - 1000 for _ in range(8)} == {0, 1, 2, 3}
    assert [e.port - 1000 for e in cluster.eligible(tried=[eps[3]])] == [0, 1, 2]
    strict = cluster_of(RoundRobin(eps), panic_threshold=0)
    assert {strict.pick(None).port - 1000 for _ in range(8)} == {3}
    eps[3].healthy = False
    assert strict.pick(None) is None


def test_weighted_round_robin_is_smooth_and_proportional():
    wrr = WeightedRoundRobin(endpoints(5, 1, 1))
    assert picks(wrr, 7) == [0, 0, 1, 0, 2, 0, 0]  # interleaved, not a burst of five
    assert Counter(picks(wrr, 700)) == {0: 500, 1: 100, 2: 100}


def test_weighted_round_robin_stays_proportional_among_what_is_left():
    eps = endpoints(5, 1, 2)
    wrr = WeightedRoundRobin(eps)
    picks(wrr, 3)
    counts = Counter(picks(wrr, 300, [eps[1], eps[2]]))
    assert abs(counts[1] - 100) <= 2 and abs(counts[2] - 200) <= 2, counts  # (state from before)


def test_weighted_round_robin_past_its_schedule_size_runs_the_algorithm_per_pick():
    big = WeightedRoundRobin.SCHEDULE_MAX  # total weight over the cap: no schedule is kept
    wrr = WeightedRoundRobin(endpoints(big, 1, 1))
    assert picks(wrr, 3) == [0, 0, 0]
    counts = Counter(picks(wrr, big + 2))
    assert counts == {0: big, 1: 1, 2: 1}, counts  # one whole cycle, exact


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
