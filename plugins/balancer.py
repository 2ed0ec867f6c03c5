"""Plugin ``balancer``: the load-balancing policies clusters name in ``policy``.

=====================  ============================================================
policy                 picks
=====================  ============================================================
round_robin            healthy endpoints in turn, ignoring weights
weighted_round_robin   in proportion to weight, smoothly interleaved (no bursts:
                       weights 5,1,1 give a a b a c a a, not a a a a a b c)
random                 at random, in proportion to weight
least_request          the less busy of two random picks (power of two choices),
                       busy meaning requests in flight divided by weight
=====================  ============================================================

Each picks among the endpoints the core found eligible (available, not yet
tried by this request; see ``sluice.upstream.cluster``), so none of them
looks at health itself.
"""

from __future__ import annotations

import random

from sluice import Balancer, Endpoint, hookimpl

__all__ = ["LeastRequest", "Random", "RoundRobin", "WeightedRoundRobin"]


class RoundRobin(Balancer):
    """Each eligible endpoint in turn, ignoring weights."""

    name = "round_robin"

    def __init__(self, endpoints, config=None) -> None:
        super().__init__(endpoints, config)
        self._next = 0

    def pick(self, ctx, endpoints) -> Endpoint | None:
        endpoint = endpoints[self._next % len(endpoints)]
        self._next += 1
        return endpoint


class WeightedRoundRobin(Balancer):
    """Smooth weighted round robin (the nginx algorithm)."""

    name = "weighted_round_robin"

    def __init__(self, endpoints, config=None) -> None:
        super().__init__(endpoints, config)
        self._current = {id(e): 0 for e in self.endpoints}

    def pick(self, ctx, endpoints) -> Endpoint | None:
        current = self._current
        best = None
        total = 0
        for endpoint in endpoints:
            key = id(endpoint)
            current[key] = weight = current.get(key, 0) + endpoint.weight
            total += endpoint.weight
            if best is None or weight > current[id(best)]:
                best = endpoint
        current[id(best)] -= total
        return best


class Random(Balancer):
    """A random eligible endpoint, in proportion to weight."""

    name = "random"

    def __init__(self, endpoints, config=None, rng: random.Random | None = None) -> None:
        super().__init__(endpoints, config)
        self._rng = rng or random.Random()

    def pick(self, ctx, endpoints) -> Endpoint | None:
        if len(endpoints) == 1:
            return endpoints[0]
        return self._rng.choices(endpoints, weights=[e.weight for e in endpoints])[0]


class LeastRequest(Balancer):
    """Power of two choices over in-flight requests per unit of weight."""

    name = "least_request"

    def __init__(self, endpoints, config=None, rng: random.Random | None = None) -> None:
        super().__init__(endpoints, config)
        self._rng = rng or random.Random()

    def pick(self, ctx, endpoints) -> Endpoint | None:
        if len(endpoints) < 2:
            return endpoints[0]
        a, b = self._rng.sample(endpoints, 2)
        return a if a.active / a.weight <= b.active / b.weight else b


@hookimpl
def sluice_balancers():
    return [RoundRobin, WeightedRoundRobin, Random, LeastRequest]
