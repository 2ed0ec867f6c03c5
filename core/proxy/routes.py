"""The route a request matched, as the core and every filter see it.

Matching is the router plugin's business; what it returns is this: where to
send the request and what the route says to the filters on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Route"]


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

    def filter_settings(self, filter_name: str) -> Mapping[str, Any]:
        """Per-route settings for one filter (empty when none)."""
        return self.filters.get(filter_name, {})

    @property
    def disabled_filters(self) -> frozenset[str]:
        return frozenset(n for n, s in self.filters.items() if s.get("disabled"))
