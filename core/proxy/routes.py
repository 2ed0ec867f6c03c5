"""The route a request matched, as the core and every filter see it.

Matching is the router plugin's business; what it returns is this: where to
send the request and what the route says to the filters on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RetryPolicy", "Route"]

# What a retry policy's ``on`` may name, and the failures (access-log flags)
# or statuses each covers.
RETRY_ON = {
    "reset": ("UC",),  # the upstream closed or reset before a whole response head
    "timeout": ("UT",),  # no response head within the (per-try) timeout
    "protocol_error": ("UPE",),  # a malformed response
    "5xx": (),  # any 5xx response
    "gateway_error": (),  # 502, 503 or 504
    "retriable_status": (),  # a status listed in ``statuses``
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retries (``routes[i].retry``).

    ``attempts`` is the most tries in all (1: none). A try is repeated, on
    another endpoint when the cluster has one, when its failure or status is
    one ``on`` names, the method is idempotent (other methods are retried
    only when a connect failed, which the core always does), the body was
    small enough to keep (``max_body_bytes``: a larger one streams and is
    never replayed), no response byte went downstream, the route's timeout
    has time left, and the cluster's retry budget allows: retries in flight
    at most ``budget_percent`` of its requests in flight (but always
    ``min_retries``) and its ``max_retries`` breaker. Between tries: a
    random wait up to ``backoff`` × 2^(try - 1), at most ``max_backoff``.
    """

    attempts: int = 1
    on: frozenset[str] = frozenset({"reset", "gateway_error"})
    statuses: frozenset[int] = frozenset()
    per_try_timeout: float | None = None
    backoff: float = 0.025
    max_backoff: float = 0.25
    budget_percent: float = 20.0
    min_retries: int = 3
    max_body_bytes: int = 64 * 1024

    def on_failure(self, flag: str) -> bool:
        return any(flag in RETRY_ON[name] for name in self.on)

    def on_status(self, status: int) -> bool:
        on = self.on
        return (("5xx" in on and status >= 500)
                or ("gateway_error" in on and status in (502, 503, 504))
                or ("retriable_status" in on and status in self.statuses))


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """A matched route.

    ``filters`` holds per-route settings keyed by filter name; the core reads
    ``{"disabled": true}`` itself and skips that filter for the request.
    ``action`` is the router's own (forward, direct response, redirect);
    ``summary`` says in one line what the route matches and does (for
    ``sluice check``). ``upgrades`` are the protocols (``Upgrade`` tokens,
    lower-case, without version) a request on this route may switch to;
    anything else is forwarded as a plain request without its ``Upgrade``,
    and ``h2c`` never goes upstream, whatever this says (the exchange).
    """

    name: str
    cluster: str | None = None
    timeout: float | None = None
    filters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    action: Any = None
    summary: str = ""
    upgrades: frozenset[str] = frozenset({"websocket"})
    retry: RetryPolicy | None = None
    mirror: Any = None  # a ``sluice.proxy.mirror.Mirror``: a shadow cluster's copy
    host_to_endpoint: bool = False  # Host becomes the chosen endpoint's address

    def filter_settings(self, filter_name: str) -> Mapping[str, Any]:
        """Per-route settings for one filter (empty when none)."""
        return self.filters.get(filter_name, {})

    @property
    def disabled_filters(self) -> frozenset[str]:
        return frozenset(n for n, s in self.filters.items() if s.get("disabled"))
