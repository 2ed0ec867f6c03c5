"""sluice-zone-aware over real origins: two in the proxy's zone ("a"), one in
another ("b"), a fixed seed, and counts of what each origin received."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import sluice_zone_aware
import trio

from sluice import ConfigError, hookimpl
from sluice.testing import Origin
from sluice.upstream.discovery import DiscoverySource, EndpointSpec

EXTRA = {"zone_aware": sluice_zone_aware}


@pytest.fixture
async def origins(nursery):
    """a1 and a2 in zone a, b1 in zone b."""
    made = {name: Origin() for name in ("a1", "a2", "b1")}
    for origin in made.values():
        await nursery.start(origin.serve)
    yield made
    for origin in made.values():
        origin.close()


def cluster(origins: dict[str, Origin], **policy) -> dict:
    zones = {o.address: name[0] for name, o in origins.items()}
    return {"clusters": {"origin": {
        "endpoints": [o.address for o in origins.values()],
        "policy": {"name": "zone_aware", "zone": "a", "zones": zones, "seed": 1, **policy},
    }}}


def served(origins: dict[str, Origin]) -> Counter:
    return Counter({name: len(o.requests) for name, o in origins.items()})


async def send(proxy, n: int, path: str = "/") -> None:
    for _ in range(n):
        assert (await proxy.client.get(path)).status_code == 200


async def test_traffic_stays_in_the_zone_and_spreads_in_it(origins, sluice_proxy):
    proxy = await sluice_proxy(config=cluster(origins), extra=EXTRA)
    await send(proxy, 200)
    counts = served(origins)
    assert counts["b1"] == 0
    assert 70 <= counts["a1"] <= 130 and counts["a1"] + counts["a2"] == 200


async def test_too_few_local_endpoints_spill_over_every_zone(origins, sluice_proxy, capfd):
    # Two of two local endpoints needed: one down is too few.
    proxy = await sluice_proxy(config=cluster(origins, min_local_percent=100), extra=EXTRA)
    await send(proxy, 20)
    assert served(origins)["b1"] == 0
    origins["a2"].close()  # refused: the core fails over, then ejects it
    with trio.fail_after(10):
        while any(e.available(time.monotonic())
                  for e in proxy.app.clusters["origin"].endpoints if e.port == origins["a2"].port):
            await send(proxy, 1)
    before = served(origins)
    await send(proxy, 200)
    after = served(origins) - before
    assert after["a2"] == 0
    assert 70 <= after["b1"] <= 130 and after["a1"] + after["b1"] == 200  # by weight, over a1 and b1
    out = capfd.readouterr()
    assert "zone spill" in out.out + out.err


async def test_half_the_zone_is_enough_by_default(origins, sluice_proxy):
    proxy = await sluice_proxy(config=cluster(origins), extra=EXTRA)
    a2 = next(e for e in proxy.app.clusters["origin"].endpoints if e.port == origins["a2"].port)
    a2.healthy = False  # as an active health check would mark it
    await send(proxy, 50)
    assert served(origins) == Counter({"a1": 50, "a2": 0, "b1": 0})


async def test_weights_count_when_spilling(origins, sluice_proxy):
    config = cluster(origins, min_local_percent=100)
    endpoints = config["clusters"]["origin"]["endpoints"]
    config["clusters"]["origin"]["endpoints"] = [endpoints[0], endpoints[1], {"address": endpoints[2], "weight": 3}]
    proxy = await sluice_proxy(config=config, extra=EXTRA)
    a2 = next(e for e in proxy.app.clusters["origin"].endpoints if e.port == origins["a2"].port)
    a2.healthy = False
    await send(proxy, 200)
    counts = served(origins)
    assert 125 <= counts["b1"] <= 175 and counts["a1"] + counts["b1"] == 200  # 3:1


@pytest.mark.parametrize("policy, message", [
    ({"zone": "c"}, "no endpoint of this cluster is in zone 'c'"),
    ({"zones": {"10.9.9.9:1": "a"}}, "zones names 10.9.9.9:1, not endpoints of this cluster"),
    ({"min_local_percent": 120}, "clusters.origin.policy.min_local_percent"),
    ({"zonez": {}}, "clusters.origin.policy.zonez"),
])
async def test_bad_settings_name_the_cluster(origins, sluice_proxy, policy, message):
    config = cluster(origins)
    config["clusters"]["origin"]["policy"].update(policy)
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        await sluice_proxy(config=config, extra=EXTRA)
    assert "clusters.origin.policy" in str(raised.value)


# -- following discovery ------------------------------------------------------------------------


class Feed(DiscoverySource):
    """A discovery source the test feeds: each snapshot pushed to ``Feed.updates``."""

    name = "feed"
    updates = None
    ready = None

    async def run(self, updates):
        Feed.updates = updates
        Feed.ready.set()
        await trio.sleep_forever()


class FeedPlugin:
    @hookimpl
    def sluice_discovery(self):
        return [Feed]


async def test_the_zone_follows_discovery(origins, sluice_proxy):
    """A discovered cluster starts empty; each snapshot's endpoints carry their zone (as a
    registry entry's "zone" does), and the policy works its zone out again at each change."""
    Feed.ready = trio.Event()
    config = {"clusters": {"zoned": {"discovery": {"source": "feed", "initial_timeout": 0.1},
                                     "policy": {"name": "zone_aware", "zone": "a", "seed": 1}}},
              "routes": [{"match": {"prefix": "/"}, "cluster": "zoned"}]}
    proxy = await sluice_proxy(config=config, extra={**EXTRA, "feed": FeedPlugin()})
    with trio.fail_after(5):
        await Feed.ready.wait()

    def spec(name: str) -> EndpointSpec:
        return EndpointSpec.of(origins[name].address, zone=name[0])

    Feed.updates.update([spec("a1"), spec("b1")])  # one of zone a: all its traffic
    await send(proxy, 20)
    assert served(origins) == Counter({"a1": 20, "a2": 0, "b1": 0})
    Feed.updates.update([spec("a1"), spec("a2"), spec("b1")])  # a2 joins the zone: it shares
    before = served(origins)
    await send(proxy, 200)
    after = served(origins) - before
    assert after["b1"] == 0 and 70 <= after["a2"] <= 130
    Feed.updates.update([spec("b1")])  # the zone has no endpoint left: every request spills
    before = served(origins)
    await send(proxy, 10)
    assert served(origins) - before == Counter({"b1": 10})
    Feed.updates.update([spec("a2"), spec("b1")])  # and comes back to the zone when it returns
    before = served(origins)
    await send(proxy, 10)
    assert served(origins) - before == Counter({"a2": 10})
