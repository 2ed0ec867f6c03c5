"""sluice-hello's balancing policy: send each request to the endpoint that
answered fastest lately, and now and then to another, to keep measuring it.

The README's "Write a balancing policy" walks through it.
"""

import random
from collections import deque

from pydantic import Field

from sluice import Balancer, BalancerConfig, hookimpl


class Fastest(Balancer):
    """The endpoint with the lowest mean latency lately; now and then another."""

    name = "fastest"  # what a cluster's `policy` names

    class Config(BalancerConfig):  # `policy = { name = "fastest", window = 20 }`, checked at startup
        window: int = Field(10, ge=1, le=1000)  # tries remembered per endpoint
        explore: float = Field(0.1, ge=0.0, le=1.0)  # share of picks made at random
        failure_cost: float = Field(1.0, gt=0)  # seconds a failed try counts as
        seed: int | None = None  # fixed for reproducible tests

    def __init__(self, endpoints, config=None):
        super().__init__(endpoints, config)
        self.random = random.Random(self.config.seed)
        self.latencies = {}  # address -> recent latencies, in seconds

    def pick(self, ctx, endpoints):
        # `endpoints` are the eligible ones (healthy, not ejected, not yet
        # tried by this request), never empty. Pick one, quickly, without I/O.
        if len(endpoints) == 1 or self.random.random() < self.config.explore:
            return self.random.choice(endpoints)
        return min(endpoints, key=self._mean)

    def feedback(self, attempt):
        # Called once per try, after the response head or the failure.
        cost = attempt.latency if attempt.outcome == "success" else self.config.failure_cost
        recent = self.latencies.setdefault(attempt.endpoint.address, deque(maxlen=self.config.window))
        recent.append(cost)

    def _mean(self, endpoint):
        recent = self.latencies.get(endpoint.address)
        return sum(recent) / len(recent) if recent else 0.0  # unmeasured: try it first


@hookimpl
def sluice_balancers():
    return [Fastest]
