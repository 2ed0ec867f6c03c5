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

An endpoint's zone is the one ``zones`` gives its address, else the one
its discovery entry gave (``Endpoint.zone``: ``{"address": ..., "zone":
"eu-1a"}`` in etcd or ZooKeeper), else none: another zone's. Going into
and out of spill mode is logged (``zone spill`` / ``zone recovered``), once
per change, not per request.

With discovery (``discovery = { source = "etcd", ... }``) the cluster
starts empty and its endpoints change at runtime: the policy hears each
change (``endpoints_changed``) and works out its zone's endpoints again,
so joined endpoints of the zone take traffic, and a zone left with none
spills at once. The startup checks (every address in ``zones`` is an
endpoint, the zone has one) are for static clusters only: a discovered
set may not hold the zone yet.

    [clusters.api]
    discovery = { source = "etcd", endpoints = ["127.0.0.1:2379"], prefix = "/services/api/" }
    policy = { name = "zone_aware", zone = "eu-1a" }
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
        zones: dict[str, str] = {}  # endpoint address ("host:port") -> its zone, over what discovery says
        min_local_percent: float = Field(50.0, ge=0, le=100)  # of the zone's endpoints, to stay local
        seed: int | None = None  # fixed for reproducible tests

    def __init__(self, endpoints, config=None):
        super().__init__(endpoints, config)
        if self.endpoints:  # a static cluster (a discovered one starts empty): its config is checked
            addresses = {e.address for e in self.endpoints}
            unknown = sorted(set(self.config.zones) - addresses)
            if unknown:
                raise ValueError(f"zones names {', '.join(unknown)}, not endpoints of this cluster "
                                 f"({', '.join(sorted(addresses))})")
            if not any(self._zone(e) == self.config.zone for e in self.endpoints):
                raise ValueError(f"no endpoint of this cluster is in zone {self.config.zone!r}")
        self.random = random.Random(self.config.seed)
        self.spilling = False
        self._derive()

    def endpoints_changed(self, endpoints):
        """Discovery changed the endpoints: the zone's own are worked out again."""
        super().endpoints_changed(endpoints)
        self._derive()

    def _zone(self, endpoint):
        return self.config.zones.get(endpoint.address, endpoint.zone)

    def _derive(self):
        """What follows from the endpoint list: the zone's endpoints, and the choice
        among them when every endpoint is available (the usual case, made once)."""
        self._all_local = [e for e in self.endpoints if self._zone(e) == self.config.zone]
        self.local = frozenset(e.address for e in self._all_local)
        self.needed = len(self._all_local) * self.config.min_local_percent / 100
        self._all_local_totals = list(accumulate(e.weight for e in self._all_local))
        self._local_ids = frozenset(map(id, self._all_local))  # (``address`` formats a string each time)

    def pick(self, ctx, endpoints):
        if len(endpoints) == len(self.endpoints) and self._all_local:  # all available, the zone has some
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
