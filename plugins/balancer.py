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

Every policy skips unhealthy endpoints and returns None when none is
healthy, which the core answers with 503.
"""

from __future__ import annotations

import random

from sluice import Balancer, Endpoint, hookimpl

__all__ = ["LeastRequest", "Random", "RoundRobin", "WeightedRoundRobin"]


class RoundRobin(Balancer):
    """Each healthy endpoint in turn, ignoring weights."""

    name = "round_robin"

    def __init__(self, endpoints) -> None:
        super().__init__(endpoints)
        self._next = 0

    def pick(self, ctx) -> Endpoint | None:
        endpoints = self.endpoints
        n = len(endpoints)
        for _ in range(n):
            endpoint = endpoints[self._next % n]
            self._next += 1
            if endpoint.healthy:
                return endpoint
        return None


class WeightedRoundRobin(Balancer):
    """Smooth weighted round robin (the nginx algorithm)."""

    name = "weighted_round_robin"

    def __init__(self, endpoints) -> None:
        super().__init__(endpoints)
        self._current = [0] * len(self.endpoints)

    def pick(self, ctx) -> Endpoint | None:
        current = self._current
        best = -1
        total = 0
        for i, endpoint in enumerate(self.endpoints):
            if not endpoint.healthy:
                continue
            current[i] += endpoint.weight
            total += endpoint.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.endpoints[best]


class Random(Balancer):
    """A random healthy endpoint, in proportion to weight."""

    name = "random"

    def __init__(self, endpoints, rng: random.Random | None = None) -> None:
        super().__init__(endpoints)
        self._rng = rng or random.Random()

    def pick(self, ctx) -> Endpoint | None:
        healthy = self.healthy()
        if not healthy:
            return None
        return self._rng.choices(healthy, weights=[e.weight for e in healthy])[0]


class LeastRequest(Balancer):
    """Power of two choices over in-flight requests per unit of weight."""

    name = "least_request"

    def __init__(self, endpoints, rng: random.Random | None = None) -> None:
        super().__init__(endpoints)
        self._rng = rng or random.Random()

    def pick(self, ctx) -> Endpoint | None:
        healthy = self.healthy()
        if len(healthy) < 2:
            return healthy[0] if healthy else None
        a, b = self._rng.sample(healthy, 2)
        return a if a.active / a.weight <= b.active / b.weight else b


@hookimpl
def sluice_balancers():
    return [RoundRobin, WeightedRoundRobin, Random, LeastRequest]
