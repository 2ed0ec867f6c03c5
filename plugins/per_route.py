"""A filter's settings compiled per route, once, on first use.

Why: a filter with per-route settings (``filters = { NAME = {...} }`` in a
``[[routes]]``) should not compile them on every request, and a reload
makes new route objects while the filter may live on; so the compiled form
is kept by the route's identity, bounded, and forgotten wholesale when
routes of replaced configs pile up. ``ip_filter`` and ``cors`` use it
(``rbac`` and ``rate_limit`` hold the same few lines of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["PerRoute"]

T = TypeVar("T")


class PerRoute(Generic[T]):
    """``get(ctx)``: the listener's compiled settings, or the route's own when it gives some."""

    __slots__ = ("name", "default", "build", "_routes")

    def __init__(self, name: str, default: T, build: Callable[[Mapping[str, Any]], T]) -> None:
        self.name = name  # the filter's name: the key in a route's `filters`
        self.default = default
        self.build = build  # the route's settings (without `disabled`, checked at load) -> compiled
        self._routes: dict[int, T] = {}

    def get(self, ctx: Any) -> T:
        route = ctx.route
        if route is None or self.name not in route.filters:
            return self.default
        found = self._routes.get(id(route))
        if found is None:
            own = {k: v for k, v in route.filter_settings(self.name).items() if k != "disabled"}
            found = self.build(own) if own else self.default
            if len(self._routes) > 4096:  # routes of replaced configs: forget them
                self._routes.clear()
            self._routes[id(route)] = found
        return found
