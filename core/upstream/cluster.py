"""Clusters, endpoints, their health state, and the Balancer contract.

A cluster is a named set of endpoints with a balancing policy, timeouts, an
optional upstream transport (TLS) and the state that keeps traffic away from
failing endpoints. Policies come from plugins through the
``sluice_balancers`` hook.

**The balancer contract.** Per request the core works out which endpoints
are *eligible*, then asks the cluster's policy to choose among them:

1. An endpoint is *available* when it is ``healthy`` (active checks may
   clear that) and not ejected by passive outlier detection.
2. The eligible endpoints are the available ones, less those this request
   already tried (a retry goes elsewhere when it can). When fewer than
   ``panic_threshold`` percent of the cluster is available, the cluster is
   *in panic* and every endpoint not yet tried is eligible: better to try
   an endpoint marked bad than to answer 503 for all (Envoy's panic mode).
3. ``Balancer.pick(ctx, endpoints)`` gets that list, never empty, in the
   cluster's order, and returns one of them. It must not block, and should
   not keep the list: it changes per request.
4. ``Balancer.feedback(attempt)`` hears how each try went (``Attempt``:
   outcome, status, latency), so that a policy can learn (EWMA); the core
   calls it once per try, after the response head or the failure.

A policy class has a ``name`` (what ``policy`` names), an optional
``Config`` (a pydantic model: ``policy = { name = "ewma", decay = 10 }``
is validated against it, errors by key path), and is built once per
cluster as ``Policy(endpoints, config)``.

**Passive outlier detection.** Each try's outcome counts against its
endpoint: ``consecutive_connect_failures`` failed connects in a row (a
refused or timed-out connect, a failed TLS handshake) or
``consecutive_5xx`` 5xx answers or resets in a row eject it for
``base_ejection`` seconds times the number of times it has been ejected (at
most ``max_ejection``; the count starts again once an endpoint has stayed
in for ``max_ejection`` seconds), while at most ``max_ejection_percent`` of the
cluster is ejected at once (one endpoint always may be). A success resets
the counts. Ejections and returns are logged as events.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
import trio
from pydantic import BaseModel, ConfigDict

from ..metrics import upstream_try

if TYPE_CHECKING:
    from ..proxy.context import Context

__all__ = ["Attempt", "Balancer", "BalancerConfig", "Breaker", "Cluster", "Endpoint", "Outlier"]

log = structlog.get_logger("sluice.upstream")

# Attempt outcomes: what a try at an endpoint came to.
SUCCESS = "success"  # a response head (any status below 500, or a 5xx told apart below)
CONNECT_FAILURE = "connect_failure"  # refused, unreachable, timed out, TLS or h2 handshake failed
RESET = "reset"  # the connection or stream broke before a whole response head
TIMEOUT = "timeout"  # no response head in time
HTTP_5XX = "http_5xx"  # a 5xx response head
PROTOCOL_ERROR = "protocol_error"  # a malformed response


@dataclass(eq=False, slots=True)
class Endpoint:
    """One upstream address and its state.

    ``active``: requests in flight to it. ``healthy``: what active health
    checks say (True until one says otherwise). ``ejected_until``: when a
    passive ejection ends (``time.monotonic()``; 0 when not ejected).
    """

    host: str
    port: int
    weight: int = 1
    healthy: bool = True
    active: int = 0
    ejected_until: float = 0.0
    ejections: int = 0  # times ejected so far (the next ejection lasts longer)
    returned_at: float = 0.0  # when its last ejection ended
    connect_failures: int = 0  # in a row
    server_errors: int = 0  # 5xx answers and resets in a row
    zone: str | None = None  # where it runs, as discovery reported it
    metadata: dict[str, Any] | None = None  # and what else it said of it
    draining: bool = False  # discovery dropped it: never picked, forgotten once idle

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, weight={self.weight})"


@dataclass(slots=True)
class Attempt:
    """How one try at an endpoint went, as its balancer hears it."""

    endpoint: Endpoint
    outcome: str  # SUCCESS, CONNECT_FAILURE, RESET, TIMEOUT, HTTP_5XX or PROTOCOL_ERROR
    status: int | None  # the response status, when there was one
    latency: float  # seconds from the pick to the response head (or the failure)


class BalancerConfig(BaseModel):
    """Base for a policy's settings: an unknown key is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoSettings(BalancerConfig):
    """no settings"""  # (what ``sluice plugins`` prints for a policy without any)


class Balancer:
    """Base of balancing policies (see the module's contract)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = NoSettings

    def __init__(self, endpoints: Sequence[Endpoint], config: BaseModel | None = None) -> None:
        self.endpoints = list(endpoints)
        self.config = config if config is not None else self.Config()

    def pick(self, ctx: Context | None, endpoints: Sequence[Endpoint]) -> Endpoint | None:  # pragma: no cover
        """One of ``endpoints`` (the eligible ones, never empty)."""
        raise NotImplementedError

    def feedback(self, attempt: Attempt) -> None:
        """How a try at one of this cluster's endpoints went (default: ignored)."""

    def endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None:
        """Discovery changed the cluster's endpoints (``sluice.upstream.discovery``):
        the new list, in which an endpoint that stayed is the same object as
        before (state kept by identity stays valid). Rebuild what is derived
        from the list and drop what belongs to endpoints gone; call this one
        too. Never called for a static cluster."""
        self.endpoints = list(endpoints)

    def scores(self) -> dict[str, float]:
        """What the policy holds of each endpoint, by address (an EWMA's seconds), for the
        ``sluice_upstream_endpoint_ewma_seconds`` gauge; sampled once a second (default: none)."""
        return {}


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive outlier detection settings (``clusters.<name>.outlier``)."""

    consecutive_connect_failures: int = 1  # 0: off
    consecutive_5xx: int = 5  # 0: off
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 50


class Breaker:
    """A cluster's circuit breakers (``clusters.<name>.circuit_breakers``):
    at most ``max_requests`` requests in flight, ``max_connections``
    connections open (a request needing another waits for one to close,
    ``max_pending`` of them at most, for ``connect_timeout`` at most), and
    ``max_retries`` retries in flight (failovers and replays). Past a limit
    the request is answered 503 at once, flag UO; a retry past its limit is
    not made. None: no limit."""

    def __init__(self, *, max_requests: int | None = None, max_connections: int | None = None,
                 max_pending: int | None = None, max_retries: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_retries = max_retries
        self.requests = 0
        self.connections = 0
        self.pending = 0
        self.retries = 0
        self._freed = trio.Event()

    def request_allowed(self) -> bool:
        return self.max_requests is None or self.requests < self.max_requests

    def retry_allowed(self) -> bool:
        return self.max_retries is None or self.retries < self.max_retries

    async def connection_slot(self, timeout: float, make_room: Callable[[], Awaitable[bool]]) -> None:
        """Count a connection about to open, waiting while the cluster has
        ``max_connections`` (``make_room()`` may close an idle one: True when
        it did). Raises ``Overflow`` when the wait is not allowed or too long."""
        limit = self.max_connections
        if limit is not None:
            deadline = trio.current_time() + timeout
            while self.connections >= limit:
                if await make_room():
                    continue
                if self.max_pending is not None and self.pending >= self.max_pending:
                    raise Overflow("max_pending")
                self.pending += 1
                try:
                    with trio.move_on_at(deadline) as waited:
                        await self._freed.wait()
                finally:
                    self.pending -= 1
                if waited.cancelled_caught:
                    raise Overflow("max_connections")
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1
        self._wake()

    def connection_idle(self) -> None:
        """A connection went back to the pool: a request waiting for room
        may close it (``make_room``) and open its own."""
        if self.pending:
            self._wake()

    def _wake(self) -> None:
        self._freed.set()
        self._freed = trio.Event()


class PolicyError(Exception):
    """A balancing policy raised in ``pick`` (the client gets 500, flag FE)."""


class Overflow(Exception):
    """A circuit breaker's limit (its name) was reached."""


@dataclass(eq=False)
class Cluster:
    """A named group of endpoints behind one policy."""

    name: str
    endpoints: list[Endpoint]
    balancer: Balancer
    connect_timeout: float
    response_timeout: float
    idle_timeout: float
    max_idle: int
    transport: Any = None  # a client transport (TLS) or None for plain TCP
    tls_server_name: str | None = None
    protocol: str = "h1"  # "h1", "h2" (TLS, ALPN) or "h2c"
    outlier: Outlier = field(default_factory=Outlier)
    panic_threshold: int = 50  # percent available below which every endpoint is eligible
    connect_tries: int = 5  # endpoints one request may try to connect to
    max_connection_age: float | None = None  # seconds; then a connection is retired
    breaker: Breaker = field(default_factory=Breaker)
    request_edits: Any = None  # HeaderEdits for requests to it (sluice.proxy.header_edits), or None
    response_edits: Any = None  # and for its answers
    pools: dict[int, Any] = field(default_factory=dict)
    draining: list[Endpoint] = field(default_factory=list)  # left by discovery, requests in flight

    def __post_init__(self) -> None:
        # Whether the policy listens to feedback: an Attempt is built only then.
        self._listening = type(self.balancer).feedback is not Balancer.feedback
        self._changed = trio.Event()

    def replace_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Swap in a new endpoint set at once (discovery; no checkpoint): the
        policy hears of it, and whoever waits in ``wait_changed`` wakes."""
        self.endpoints = endpoints
        try:
            self.balancer.endpoints_changed(endpoints)
        except Exception as exc:  # a policy's bug: picks still get only current endpoints
            log.error("balancing policy failed to follow an endpoint change", cluster=self.name,
                      policy=self.balancer.name, exc_info=exc)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until ``replace_endpoints`` next runs."""
        await self._changed.wait()

    def eligible(self, tried: Sequence[Endpoint] = (), now: float | None = None) -> list[Endpoint]:
        """The endpoints a pick may choose from (see the module's contract)."""
        if now is None:
            now = time.monotonic()
        endpoints = self.endpoints
        available = [e for e in endpoints if e.healthy and now >= e.ejected_until]  # (available(), inline)
        if len(available) != len(endpoints) and len(available) * 100 < self.panic_threshold * len(endpoints):
            available = endpoints  # panic: anything rather than nothing
        if tried:
            return [e for e in available if e not in tried]
        return available

    def pick(self, ctx: Context | None, tried: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The policy's choice among the eligible endpoints; None when there are none."""
        eligible = self.eligible(tried)
        if not eligible:
            return None
        balancer = self.balancer
        try:
            return balancer.pick(ctx, eligible)
        except Exception as exc:  # a policy's bug: a 500 for this request, naming it
            raise PolicyError(f"balancing policy {balancer.name!r} ({type(balancer).__module__}) of "
                              f"cluster {self.name!r} failed: {exc!r}") from exc

    def report(self, endpoint: Endpoint, outcome: str, status: int | None, latency: float) -> None:
        """Count a try's outcome for outlier detection, then tell the policy
        (an ``Attempt``, built only for a policy that listens)."""
        upstream_try(self, endpoint, outcome, latency)
        if outcome == SUCCESS:
            if endpoint.connect_failures or endpoint.server_errors:
                endpoint.connect_failures = endpoint.server_errors = 0
            if self._listening:
                self.balancer.feedback(Attempt(endpoint, outcome, status, latency))
            return
        rules = self.outlier
        if outcome == CONNECT_FAILURE:
            endpoint.connect_failures += 1
            if rules.consecutive_connect_failures and endpoint.connect_failures >= rules.consecutive_connect_failures:
                self._eject(endpoint, "connect failures", endpoint.connect_failures)
        elif outcome == HTTP_5XX or outcome == RESET:
            endpoint.connect_failures = 0
            endpoint.server_errors += 1
            if rules.consecutive_5xx and endpoint.server_errors >= rules.consecutive_5xx:
                self._eject(endpoint, "5xx or resets", endpoint.server_errors)
        if self._listening:
            self.balancer.feedback(Attempt(endpoint, outcome, status, latency))

    def _eject(self, endpoint: Endpoint, why: str, count: int) -> None:
        now = time.monotonic()
        if not endpoint.available(now):
            return  # ejected already (or down by the active checks)
        ejected = sum(1 for e in self.endpoints if e.ejected_until > now)
        if ejected and (ejected + 1) * 100 > self.outlier.max_ejection_percent * len(self.endpoints):
            log.info("endpoint not ejected: too many are already", cluster=self.name,
                     endpoint=endpoint.address, reason=why, ejected=ejected)
            return
        if endpoint.ejections and now - endpoint.returned_at > self.outlier.max_ejection:
            endpoint.ejections = 0  # well for a whole max_ejection since: a first offence again
        endpoint.ejections += 1
        duration = min(self.outlier.base_ejection * endpoint.ejections, self.outlier.max_ejection)
        endpoint.ejected_until = now + duration
        endpoint.connect_failures = endpoint.server_errors = 0
        log.warning("endpoint ejected", cluster=self.name, endpoint=endpoint.address, reason=why,
                    in_a_row=count, seconds=duration, ejections=endpoint.ejections)

    def returned(self, now: float | None = None) -> list[Endpoint]:
        """Endpoints whose ejection ran out since last asked, logged once each."""
        if now is None:
            now = time.monotonic()
        back = [e for e in self.endpoints if e.ejected_until and now >= e.ejected_until]
        for endpoint in back:
            endpoint.ejected_until = 0.0
            endpoint.returned_at = now
            log.info("endpoint returned", cluster=self.name, endpoint=endpoint.address,
                     ejections=endpoint.ejections)
        return back
