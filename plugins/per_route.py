"""A filter's settings compiled per route, once, on first use.

Why: a filter with per-route settings (``filters = { NAME = {...} }`` in a
``[[routes]]``) should not compile them on every request, and a reload
makes new route objects while the filter may live on; so the compiled form
is kept by the route's identity, bounded, and forgotten wholesale when
routes of replaced configs pile up. ``ip_filter``, ``cors``, ``rate_limit``
and ``rbac`` use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["PerRoute"]

T = TypeVar("T")


class PerRoute(Generic[T]):
    """``get(ctx)``: the listener's compiled settings, or the route's own when it gives some."""

    __slots__ = ("name", "default", "build", "_routes")

    def __init__(self, name: str, default: T, build: Callable[[Mapping[str, Any], str], T]) -> None:
        self.name = name  # the filter's name: the key in a route's `filters`
        self.default = default
        self.build = build  # (the route's settings without `disabled`, their key path) -> compiled
        self._routes: dict[int, T] = {}

    def check(self, app: Any) -> None:
        """Compile every route's own settings now, so what the route model alone cannot see
        (a clash with the listener's settings) fails at load, by the route's key path."""
        for i, route in enumerate(getattr(getattr(app, "config", None), "routes", None) or []):
            own = (route.get("filters") or {}).get(self.name) if isinstance(route, dict) else None
            if own and not own.get("disabled"):
                self.build({k: v for k, v in own.items() if k != "disabled"}, f"routes[{i}].filters.{self.name}")

    def get(self, ctx: Any) -> T:
        route = ctx.route
        if route is None or self.name not in route.filters:
            return self.default
        found = self._routes.get(id(route))
        if found is None:
            own = {k: v for k, v in route.filter_settings(self.name).items() if k != "disabled"}
            found = self.build(own, f"routes.{route.name or '?'}.filters.{self.name}") if own else self.default
            if len(self._routes) > 4096:  # routes of replaced configs: forget them
                self._routes.clear()
            self._routes[id(route)] = found
        return found
