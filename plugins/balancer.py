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
ewma                   the cheaper of two random picks, cost being peak-EWMA
                       response time x (requests in flight + 1) / weight
ring_hash              by a key (header, cookie, source IP, path) on a ketama
                       ring (``sluice.plugins.hashing``)
maglev                 by a key, through a Maglev lookup table (same module)
=====================  ============================================================

Each picks among the endpoints the core found eligible (available, not yet
tried by this request; see ``sluice.upstream.cluster``), so none of them
looks at health itself.
"""

from __future__ import annotations

import itertools
import math
import random
import time

from pydantic import Field

from sluice import Balancer, BalancerConfig, Endpoint, hookimpl

from .hashing import Maglev, RingHash

__all__ = ["Ewma", "LeastRequest", "Maglev", "Random", "RingHash", "RoundRobin", "WeightedRoundRobin"]

# Outcomes that say the endpoint failed the request (a protocol error is the
# answer's fault as much as the endpoint's, and says nothing of its speed).
_FAILURES = frozenset({"connect_failure", "reset", "timeout", "http_5xx"})


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


class _PerSet:
    """What a policy derives from one eligible set, kept while the set stays
    the same: the set is nearly always the whole cluster, and comparing a
    list of the same objects costs a C loop, where deriving costs a Python
    loop per pick. An endpoint's weight is fixed for its life (a cluster
    that changes a weight makes a new Endpoint)."""

    __slots__ = ("endpoints", "value")

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] | None = None
        self.value = None

    def same(self, endpoints) -> bool:
        return endpoints == self.endpoints  # identity per element (eq=False): no __eq__ calls

    def keep(self, endpoints, value):
        self.endpoints = list(endpoints)
        self.value = value
        return value


def _smooth(endpoints, current: dict[int, int]) -> Endpoint:
    """One step of nginx's smooth weighted round robin over ``current``."""
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


class WeightedRoundRobin(Balancer):
    """Smooth weighted round robin (the nginx algorithm)."""

    name = "weighted_round_robin"

    # Up to this total weight, one cycle of picks is worked out once per
    # eligible set and then followed (a pick costs an index); above it,
    # each pick runs a step of the algorithm.
    SCHEDULE_MAX = 4096

    def __init__(self, endpoints, config=None) -> None:
        super().__init__(endpoints, config)
        self._current: dict[int, int] = {}
        self._schedule = _PerSet()
        self._at = 0

    def endpoints_changed(self, endpoints) -> None:
        super().endpoints_changed(endpoints)
        self._current = {}  # (the schedule follows by itself: the eligible set changed)

    def pick(self, ctx, endpoints) -> Endpoint | None:
        cached = self._schedule
        if not cached.same(endpoints):
            total = sum(e.weight for e in endpoints)
            schedule = None
            if total <= self.SCHEDULE_MAX:
                current: dict[int, int] = {}
                schedule = [_smooth(endpoints, current) for _ in range(total)]
            cached.keep(endpoints, schedule)
            self._at = 0
        schedule = cached.value
        if schedule is None:
            return _smooth(endpoints, self._current)
        at = self._at
        self._at = at + 1 if at + 1 < len(schedule) else 0
        return schedule[at]


class Random(Balancer):
    """A random eligible endpoint, in proportion to weight."""

    name = "random"

    def __init__(self, endpoints, config=None, rng: random.Random | None = None) -> None:
        super().__init__(endpoints, config)
        self._rng = rng or random.Random()
        self._cumulative = _PerSet()

    def pick(self, ctx, endpoints) -> Endpoint | None:
        if len(endpoints) == 1:
            return endpoints[0]
        cached = self._cumulative
        cumulative = cached.value if cached.same(endpoints) else cached.keep(
            endpoints, list(itertools.accumulate(e.weight for e in endpoints)))
        return self._rng.choices(endpoints, cum_weights=cumulative)[0]


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


class Ewma(Balancer):
    """Peak-EWMA: the cheaper of two random picks, as Finagle and Linkerd balance.

    Each endpoint has a cost, its response time smoothed so: a latency above
    the cost replaces it at once (the *peak*: a slowdown shows at once), one
    below pulls it down with weight ``1 - exp(-elapsed / decay)``, and with
    no news the cost decays towards zero the same way, so a slow endpoint is
    tried again now and then and a recovered one wins its traffic back. A
    failed try (connect failure, reset, timeout, 5xx) counts as a latency of
    ``penalty`` seconds. An endpoint not heard from yet costs the mean of
    those that have been (neutral: neither favoured nor shunned). A pick
    samples two eligible endpoints and takes the lower
    ``cost * (in flight + 1) / weight``.

    ``policy = { name = "ewma", decay = 10.0, penalty = 1.0 }``
    """

    name = "ewma"

    class Config(BalancerConfig):
        decay: float = Field(10.0, gt=0, le=3600)  # seconds: the time constant (Linkerd's default)
        penalty: float = Field(1.0, gt=0, le=3600)  # seconds: the latency a failed try counts as

    def __init__(self, endpoints, config=None, rng: random.Random | None = None, clock=time.monotonic) -> None:
        super().__init__(endpoints, config)
        self._rng = rng or random.Random()
        self._clock = clock
        self._cost: dict[int, float] = {}  # id(endpoint) -> seconds, as of _stamp
        self._stamp: dict[int, float] = {}

    def cost(self, endpoint: Endpoint, now: float | None = None) -> float:
        """The endpoint's smoothed response time (seconds), decayed to ``now``."""
        if now is None:
            now = self._clock()
        key = id(endpoint)
        if key not in self._cost:  # the mean of the others, each decayed alike
            known = self._cost
            return sum(self._decayed(k, now) for k in known) / len(known) if known else 0.0
        return self._decayed(key, now)

    def _decayed(self, key: int, now: float) -> float:
        cost, elapsed = self._cost[key], now - self._stamp[key]
        return cost * math.exp(-elapsed / self.config.decay) if elapsed > 0 else cost

    def _load(self, endpoint: Endpoint, now: float) -> float:
        return self.cost(endpoint, now) * (endpoint.active + 1) / endpoint.weight

    def pick(self, ctx, endpoints) -> Endpoint | None:
        if len(endpoints) < 2:
            return endpoints[0]
        n = len(endpoints)
        i, j = self._rng.randrange(n), self._rng.randrange(n - 1)  # two distinct: cheaper than sample()
        a, b = endpoints[i], endpoints[j + (j >= i)]
        now = self._clock()
        return a if self._load(a, now) <= self._load(b, now) else b

    def feedback(self, attempt) -> None:
        latency = attempt.latency
        if attempt.outcome in _FAILURES:
            latency = max(latency, self.config.penalty)
        key = id(attempt.endpoint)
        now = self._clock()
        if key in self._cost:
            # Below the (decayed) cost: the time-weighted mean of the stored cost
            # and this latency, stored * w + latency * (1 - w), w = exp(-elapsed / decay),
            # where stored * w is that decayed cost. Above it: the peak, at once.
            decayed = self.cost(attempt.endpoint, now)
            if latency < decayed:
                latency = decayed + latency * (1 - math.exp(-max(0.0, now - self._stamp[key]) / self.config.decay))
        self._cost[key] = latency
        self._stamp[key] = now

    def endpoints_changed(self, endpoints) -> None:
        """Costs of endpoints that stayed are kept (by identity); those of endpoints gone are dropped."""
        super().endpoints_changed(endpoints)
        staying = {id(e) for e in self.endpoints}
        for key in [k for k in self._cost if k not in staying]:
            del self._cost[key], self._stamp[key]

    def scores(self) -> dict[str, float]:
        """Each endpoint's cost (seconds) decayed to now, by address (the metrics' gauge)."""
        now = self._clock()
        return {e.address: self.cost(e, now) for e in self.endpoints}


@hookimpl
def sluice_balancers():
    return [RoundRobin, WeightedRoundRobin, Random, LeastRequest, Ewma, RingHash, Maglev]
