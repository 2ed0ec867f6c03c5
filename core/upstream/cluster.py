"""Clusters, endpoints, their health state, and the Balancer interface.

A cluster is a named set of endpoints with a balancing policy, timeouts and
an optional upstream transport (TLS). Policies come from plugins through the
``sluice_balancers`` hook; the core only calls ``pick``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..proxy.context import Context

__all__ = ["Balancer", "Cluster", "Endpoint"]


@dataclass(eq=False, slots=True)
class Endpoint:
    """One upstream address. ``active`` counts requests in flight to it."""

    host: str
    port: int
    weight: int = 1
    healthy: bool = True
    active: int = 0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, weight={self.weight})"


class Balancer:
    """Base of balancing policies: picks one endpoint per request.

    A policy is built once per cluster with its endpoints; ``pick`` runs on
    the hot path and must not block. It should skip unhealthy endpoints and
    return None when none is healthy (the client gets 503).
    """

    name: ClassVar[str] = ""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)

    def pick(self, ctx: Context) -> Endpoint | None:  # pragma: no cover - interface
        raise NotImplementedError

    def healthy(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.healthy]


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
    pools: dict[int, Any] = field(default_factory=dict)

    def pick(self, ctx: Context) -> Endpoint | None:
        return self.balancer.pick(ctx)
