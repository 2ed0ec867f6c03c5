"""sluice-zone-aware: a balancing policy that keeps traffic in the proxy's own zone.

Cross-zone traffic costs money and latency, so while enough of the local
zone's endpoints are available every request stays there; when too few are
(below ``min_local_percent`` of the zone's endpoints), requests spread over
every available endpoint, by weight, until the zone recovers. The core has
already removed the unhealthy, the ejected and the endpoints this request
tried, so "available" is simply the list ``pick`` is given.

    [clusters.api]
    endpoints = ["10.0.1.5:8000", "10.0.1.6:8000", "10.0.2.5:8000"]
    policy = { name = "zone_aware", zone = "eu-1a",
               zones = { "10.0.1.5:8000" = "eu-1a", "10.0.1.6:8000" = "eu-1a", "10.0.2.5:8000" = "eu-1b" } }

An endpoint not listed in ``zones`` counts as another zone's. Going into
and out of spill mode is logged (``zone spill`` / ``zone recovered``), once
per change, not per request.
"""

from __future__ import annotations

import random
from bisect import bisect
from itertools import accumulate

import structlog
from pydantic import Field

from sluice import Balancer, BalancerConfig, hookimpl

__all__ = ["ZoneAware"]

_log = structlog.get_logger("sluice.balancer")


class ZoneAware(Balancer):
    """Picks in the proxy's zone while enough of it is available; spills over every zone when not."""

    name = "zone_aware"

    class Config(BalancerConfig):
        zone: str = Field(min_length=1)  # the proxy's own zone
        zones: dict[str, str]  # endpoint address ("host:port", as configured) -> its zone
        min_local_percent: float = Field(50.0, ge=0, le=100)  # of the zone's endpoints, to stay local
        seed: int | None = None  # fixed for reproducible tests

    def __init__(self, endpoints, config=None):
        super().__init__(endpoints, config)
        addresses = {e.address for e in self.endpoints}
        unknown = sorted(set(self.config.zones) - addresses)
        if unknown:
            raise ValueError(f"zones names {', '.join(unknown)}, not endpoints of this cluster "
                             f"({', '.join(sorted(addresses))})")
        self.local = frozenset(a for a in addresses if self.config.zones.get(a) == self.config.zone)
        if not self.local:
            raise ValueError(f"no endpoint of this cluster is in zone {self.config.zone!r}")
        self.needed = len(self.local) * self.config.min_local_percent / 100
        self.random = random.Random(self.config.seed)
        self.spilling = False
        # Every endpoint available is the usual case: its choice is made once.
        self._all_local = [e for e in self.endpoints if e.address in self.local]
        self._all_local_totals = list(accumulate(e.weight for e in self._all_local))
        self._local_ids = frozenset(map(id, self._all_local))  # (``address`` formats a string each time)

    def pick(self, ctx, endpoints):
        if len(endpoints) == len(self.endpoints):  # all available (a subset as long is the whole)
            candidates, totals, spill = self._all_local, self._all_local_totals, False
            available = len(candidates)
        else:
            ids = self._local_ids
            local = [e for e in endpoints if id(e) in ids]
            available = len(local)
            spill = not local or available < self.needed
            candidates = endpoints if spill else local
            totals = list(accumulate(e.weight for e in candidates))
        if spill is not self.spilling:
            self.spilling = spill
            _log.warning("zone spill" if spill else "zone recovered", policy=self.name, zone=self.config.zone,
                         local_available=available, local_endpoints=len(self.local))
        if len(candidates) == 1:
            return candidates[0]
        return candidates[bisect(totals, self.random.random() * totals[-1])]


@hookimpl
def sluice_balancers():
    return [ZoneAware]
