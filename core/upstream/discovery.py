"""Service discovery: where a cluster's endpoints come from at runtime.

A cluster with a ``discovery`` table names a *source*, a plugin class
offered through the ``sluice_discovery`` hook::

    [clusters.app]
    discovery = { source = "dns", name = "app.service.internal", port = 8080 }

Without one the cluster is *static*: its ``endpoints`` list, as always,
and nothing here runs (no cost per request). ``initial_timeout`` (seconds,
default 5) is the core's own key in that table; the rest is the source's,
validated against its ``Config`` (errors by key path).

**The source contract.** A source class has a unique ``name`` and a
``Config`` (a pydantic model). The core builds one per cluster,
``Source(config, cluster_name)``, and runs ``await source.run(updates)`` as a
long-lived task in the worker's nursery (cancelled when the cluster goes,
at a reload that changes it, or at shutdown). The source calls

- ``updates.update(endpoints, authoritative=False)`` with the FULL set it
  knows now, a list of ``EndpointSpec`` (host, port, weight 1-1000, zone,
  metadata; a bad value raises ValueError as it is built, so a source can
  skip that entry and log it), every time it learns something: the core works out what
  joined and what left, so a source never has to get adds and removes
  right, and a new registry (Consul, etcd, ZooKeeper) is a small class
  that turns its answer into a list. An empty list is applied only when
  ``authoritative`` is true (the registry said there is nothing, e.g. DNS
  NXDOMAIN; logged at warning), else it is taken as a failure and the last
  set stays;
- ``updates.failed(reason)`` when it could not ask (a timeout, a refused
  connection, garbage): logged as ``discovery failed``; the last good set
  keeps serving, and the source retries on its own schedule.

``run`` raising is a bug or an unexpected failure: logged as ``discovery
failed`` and run again after a backoff (1 s doubling to 30 s).

**How a snapshot is applied**, at once (no checkpoint), so no request sees
half of it. Endpoints are the same when host, port and weight are (a weight
change is a new endpoint; balancers rely on a fixed weight):

- an endpoint that stays keeps its ``Endpoint`` object: its health,
  ejection, pooled connections and what the policy learned of it;
- a new one joins the list (and its active health checks start);
- one that left *drains*: it is out of ``cluster.endpoints`` (never picked
  again) and in ``cluster.draining`` until its requests in flight finish;
  then its idle pooled connections close and it is forgotten. One that
  comes back while draining is taken back, state and all;
- the policy hears ``Balancer.endpoints_changed(endpoints)`` (rebuild a
  table, drop state of endpoints gone); health checks follow the list.

Each change is logged as ``endpoints changed`` (added, removed, total).
Applying a snapshot runs on the event loop: a diff costs ~0.4 ms per 1000
endpoints when nothing changed, and a change under 1 ms more for every
built-in policy; ring_hash and maglev build a large ring or table in a
thread and swap it in when done, so the loop stalls at most a GIL switch
interval, ~5 ms, meanwhile (``benchmarks/discovery_cost.py``).
Until the first snapshot the cluster has no endpoint and answers 503 (flag
UH); a worker waits up to ``initial_timeout`` for every cluster's first
snapshot before its listeners accept, then serves anyway (``discovery not
ready`` is logged). The admin's ``GET /ready`` answers 503 until every
discovered cluster has had its first snapshot, past ``initial_timeout``
too, naming the clusters that wait (``discovery_waiting``).

**Reload.** An unchanged cluster is the same object and its source runs
on. A changed one gets a new source; when its ``discovery`` table is the
same, it starts from the endpoints found so far (new objects, as for any
changed cluster) and serves them until the new source's first snapshot,
rather than answering 503 meanwhile. A cluster with a new source (added,
or its ``discovery`` table changed) has it started before the swap, and the
reload waits for its first snapshot up to ``initial_timeout``, as startup
does (``sluice.control.reload``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import structlog
import trio
from pydantic import BaseModel, ConfigDict

from ..addresses import parse_hostport
from .cluster import Cluster, Endpoint

if TYPE_CHECKING:
    from ..edge.pool import Pool

__all__ = ["Discovery", "DiscoveryConfig", "DiscoverySource", "EndpointSpec", "Updates"]

log = structlog.get_logger("sluice.discovery")

_BACKOFF = (1.0, 30.0)  # a crashed source's restart delay: first, most
_DRAIN_POLL = 0.05  # seconds between looks at a draining endpoint's requests in flight


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint as a source reports it."""

    host: str
    port: int
    weight: int = 1
    zone: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked here, so that a source building one from a registry's entry can skip a
        # bad entry (and name it) rather than hand the balancers a weight of 0.
        if not self.host or not isinstance(self.host, str):
            raise ValueError(f"endpoint host {self.host!r}: not a host name or address")
        if not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise ValueError(f"endpoint port {self.port!r}: not a port (1-65535)")
        if not (isinstance(self.weight, int) and 1 <= self.weight <= 1000):
            raise ValueError(f"endpoint weight {self.weight!r}: weights are 1-1000, as a static endpoint's")

    @classmethod
    def of(cls, address: str, **kwargs: Any) -> EndpointSpec:
        """From ``"host:port"`` (``"[::1]:80"`` for IPv6); ValueError when it is not one."""
        host, port = parse_hostport(address, allow_zero=False)
        return cls(host, port, **kwargs)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.host, self.port, self.weight)


class DiscoveryConfig(BaseModel):
    """Base for a source's settings: an unknown key is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Updates(Protocol):
    """What a source reports to (the core's ``Discovery``)."""

    def update(self, endpoints: Sequence[EndpointSpec], *, authoritative: bool = False) -> None: ...

    def failed(self, reason: str) -> None: ...


class DiscoverySource:
    """Base of discovery sources (see the module's contract)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = DiscoveryConfig

    def __init__(self, config: BaseModel, cluster: str) -> None:
        self.config = config
        self.cluster = cluster

    async def run(self, updates: Updates) -> None:  # pragma: no cover
        """Report full snapshots to ``updates`` until cancelled."""
        raise NotImplementedError


def _key(endpoint: Endpoint) -> tuple[str, int, int]:
    return (endpoint.host, endpoint.port, endpoint.weight)


class Discovery:
    """Runs one cluster's source and applies what it reports."""

    def __init__(self, cluster: Cluster, source: DiscoverySource, pool: Pool | None,
                 initial_timeout: float) -> None:
        self.cluster = cluster
        self.source = source
        self.pool = pool
        self.initial_timeout = initial_timeout
        self.ready = trio.Event()  # set by the first snapshot applied
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Run the source (again after a backoff when it raises) until cancelled."""
        delay = _BACKOFF[0]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                try:
                    await self.source.run(self)
                    reason = "the source stopped"
                except Exception as exc:
                    reason = f"the source raised {exc!r}"
                self.failed(f"{reason}; restarting it in {delay}s")
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF[1])

    def failed(self, reason: str) -> None:
        log.warning("discovery failed", cluster=self.cluster.name, source=self.source.name,
                    error=reason, kept=len(self.cluster.endpoints))

    def update(self, endpoints: Sequence[EndpointSpec], *, authoritative: bool = False) -> None:
        """Apply a full snapshot (see the module's docstring)."""
        cluster = self.cluster
        if not endpoints and not authoritative:
            self.failed("an empty set that is not authoritative; the last set is kept")
            return
        current = {_key(e): e for e in cluster.endpoints}
        draining = {_key(e): e for e in cluster.draining}
        fresh: list[Endpoint] = []
        added: list[str] = []
        seen: set[tuple[str, int, int]] = set()
        for spec in endpoints:
            if spec.key in seen:
                continue
            seen.add(spec.key)
            endpoint = current.pop(spec.key, None)
            if endpoint is None:
                endpoint = draining.get(spec.key)
                if endpoint is not None:  # back before it drained: state and all
                    endpoint.draining = False
                    cluster.draining.remove(endpoint)
                else:
                    endpoint = Endpoint(spec.host, spec.port, weight=spec.weight, zone=spec.zone,
                                        metadata=dict(spec.metadata))
                added.append(endpoint.address)
            fresh.append(endpoint)
        removed = list(current.values())
        first = not self.ready.is_set()
        self.ready.set()
        if not added and not removed and not first:
            return
        for endpoint in removed:
            endpoint.draining = True
            cluster.draining.append(endpoint)
            if self._nursery is not None:
                self._nursery.start_soon(self._drain, endpoint)
        cluster.replace_endpoints(fresh)
        event = log.warning if not fresh else log.info
        event("endpoints changed", cluster=cluster.name, source=self.source.name, added=added,
              removed=[e.address for e in removed], total=len(fresh))

    async def _drain(self, endpoint: Endpoint) -> None:
        """Forget ``endpoint`` once its requests finish (unless it came back)."""
        while endpoint.draining and endpoint.active:
            await trio.sleep(_DRAIN_POLL)
        if not endpoint.draining:
            return
        if endpoint in self.cluster.draining:
            self.cluster.draining.remove(endpoint)
        if self.pool is not None:
            self.pool.retire([endpoint])
        log.info("endpoint drained", cluster=self.cluster.name, endpoint=endpoint.address)
