"""sluice-canary: send chosen requests to a canary cluster, through the selection API.

A request goes to the canary cluster when it asks to (a header or a cookie
with the configured value), else with probability ``percent``/100, decided by
a hash of a sticky key (the client's address, a header or a cookie), so one
client stays on one side while the percentage holds still. A request that
opts out (the header or cookie with ``never_value``) never goes.

The filter runs after the router (``after = ("router",)``: the router sets
``ctx.cluster`` from the route) and replaces ``ctx.cluster`` in
``on_request_headers``, before the core picks the endpoint; a write after
the pick would raise the core's RuntimeError, never be ignored. Only
requests routed to ``from_clusters`` (default: any) are considered; a
route may set its own ``percent`` or turn the filter off (``disabled``).
"""

from __future__ import annotations

import hashlib
from http.cookies import CookieError, SimpleCookie
from typing import Annotated

from pydantic import Field

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, hookimpl

__all__ = ["Canary"]

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
Percent = Annotated[float, Field(ge=0, le=100)]


def cookie(request, name: str) -> str | None:
    """The value of cookie ``name`` in the request, or None (a malformed Cookie header: None)."""
    for header in request.headers.get_all("cookie"):
        jar = SimpleCookie()
        try:
            jar.load(header)
        except CookieError:
            continue
        if name in jar:
            return jar[name].value
    return None


def bucket(key: str) -> float:
    """Where ``key`` falls in [0, 100): the same on every worker and every restart."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100


class Canary(Filter):
    """Routes opted-in requests, and a sticky percentage of the rest, to a canary cluster."""

    name = "canary"
    after = ("router",)  # the router sets ctx.cluster; this replaces it

    class Config(FilterConfig):
        cluster: str  # the canary cluster (a name under [clusters])
        from_clusters: list[str] = []  # only requests routed to these (empty: any)
        header: Annotated[str, Field(pattern=f"^{_TOKEN}$")] | None = "x-canary"
        cookie: Annotated[str, Field(pattern=f"^{_TOKEN}$")] | None = None
        value: str = "always"  # the header's or cookie's value that opts in
        never_value: str = "never"  # and the one that opts out
        percent: Percent = 0.0  # of the other requests
        sticky: Annotated[str, Field(pattern=f"^(client_ip|header:{_TOKEN}|cookie:{_TOKEN})$")] = "client_ip"
        mark_response: bool = False  # add x-canary: CLUSTER to canary responses

    class RouteConfig(FilterConfig):
        percent: Percent | None = None

    @classmethod
    def from_config(cls, config: Config, app) -> Canary:
        for where, name in [("cluster", config.cluster),
                            *((f"from_clusters[{i}]", n) for i, n in enumerate(config.from_clusters))]:
            if name not in app.clusters:
                raise ConfigError(f"filters.canary.{where}: unknown cluster {name!r} "
                                  f"(clusters: {', '.join(sorted(app.clusters))})")
        instance = cls(config)
        instance.canary = app.clusters[config.cluster]
        return instance

    def _asked(self, request) -> str | None:
        """The opt-in or opt-out value the request carries, if any."""
        if self.config.header is not None:
            value = request.headers.get(self.config.header)
            if value is not None:
                return value
        if self.config.cookie is not None:
            return cookie(request, self.config.cookie)
        return None

    def _sticky(self, ctx, request) -> str:
        kind, _, name = self.config.sticky.partition(":")
        value = None
        if kind == "header":
            value = request.headers.get(name)
        elif kind == "cookie":
            value = cookie(request, name)
        return value if value is not None else ctx.client_ip  # no key: the client's address

    def _percent(self, ctx) -> float:
        route = ctx.route
        own = route.filter_settings(self.name).get("percent") if route is not None else None
        return self.config.percent if own is None else own

    async def on_request_headers(self, ctx, request):
        current = ctx.cluster
        if current is None or current is self.canary:  # no route, or routed there already
            return CONTINUE
        if self.config.from_clusters and current.name not in self.config.from_clusters:
            return CONTINUE
        asked = self._asked(request)
        if asked == self.config.never_value:
            return CONTINUE
        if asked == self.config.value:
            reason = "asked"
        else:
            percent = self._percent(ctx)
            if not percent or bucket(self._sticky(ctx, request)) >= percent:
                return CONTINUE
            reason = "percent"
        ctx.cluster = self.canary
        ctx.vars["canary"] = self.canary.name
        self.log(ctx).debug("canary", cluster=self.canary.name, instead_of=current.name, reason=reason)
        return CONTINUE

    async def on_response_headers(self, ctx, response):
        if self.config.mark_response and "canary" in ctx.vars:
            response.headers.set("x-canary", ctx.vars["canary"])
        return CONTINUE


@hookimpl
def sluice_filters():
    return [Canary]
