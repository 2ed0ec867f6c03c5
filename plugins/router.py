"""Plugin ``router``: the terminal filter that picks a route and its cluster.

Routes are the config's top-level ``[[routes]]``, tried in order; the first
whose every condition holds wins, and no match answers 404 (flag NR)::

    [[routes]]
    name = "api"
    match = { host = "*.example.com", prefix = "/api/", methods = ["GET", "POST"],
              headers = { "x-env" = "prod" } }
    cluster = "api"                      # forward ...
    timeout = 10.0                       # ... with this response timeout
    filters = { api_key = { disabled = true } }   # per-route filter settings
    upgrades = ["websocket"]             # protocols a request may switch to

    [[routes]]
    match = { path = "/healthz" }
    direct_response = { status = 200, body = "ok\\n" }

    [[routes]]
    match = { regex = "^/old/(.*)" }
    redirect = { path = "/new/", status = 308 }

Host: exact (port ignored, case-insensitive), ``*.suffix`` for any
subdomain, or ``*``. Path: ``prefix``, exact ``path``, or ``regex`` (full
match of the path, without the query). Headers: a table of exact values, or a
list of ``{ name, exact | regex | present }``. Every route resolves once per
request; filters before the router read it as ``ctx.route``.

``upgrades`` (default ``["websocket"]``; ``[]`` for none) lists the
``Upgrade`` tokens (RFC 9110 7.8) a request on the route may switch to: such
a handshake is forwarded with its ``Upgrade`` and ``Connection: upgrade``,
and on the upstream's 101 the connection becomes a byte tunnel (timeouts
``tunnel_idle`` and ``tunnel_max`` of the listener). Any other token is
dropped and the request forwarded as plain HTTP, as nginx does: a client
offering an upgrade opportunistically (curl offers ``h2c``) still gets its
answer. ``h2c`` is refused here and never forwarded: an upstream that
switched to it would take the connection's later requests unseen by
sluice's rules (h2c smuggling).

Routes match the target after the core normalised it (``sluice.protocol.
targets``: dot-segments resolved, ``//`` merged, ``%61`` decoded; paths it
cannot give one meaning are 400 before any filter runs), and the upstream
receives exactly that target. ``prefix`` is a plain string prefix of it:
``prefix = "/admin"`` also covers ``/admin;x=1`` and ``/administrator``. To
guard a tree, guard ``/admin``, not ``/admin/``: the latter leaves ``/admin``
and ``/admin;x=1`` (which some servers read as ``/admin``) to the next route.
Matching is case-sensitive, as paths are (RFC 3986 6.2.2.1); in front of a
case-insensitive upstream, guard with a ``regex`` such as ``(?i)/admin.*``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, Route, hookimpl
from sluice.control.config import format_errors

__all__ = ["Router"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeaderMatch(_Model):
    name: str
    exact: str | None = None
    regex: str | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> HeaderMatch:
        given = [k for k in ("exact", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, regex, present")
        if self.regex is not None:
            re.compile(self.regex)
        return self


class Match(_Model):
    host: str | None = None
    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] | list[HeaderMatch] = []

    @model_validator(mode="after")
    def _one_path_rule(self) -> Match:
        if sum(x is not None for x in (self.prefix, self.path, self.regex)) > 1:
            raise ValueError("give at most one of prefix, path, regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"bad regex: {exc}") from None
        return self


class DirectResponse(_Model):
    status: Annotated[int, Field(ge=200, le=599)] = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


class Redirect(_Model):
    status: Literal[301, 302, 303, 307, 308] = 302
    location: str | None = None  # absolute; otherwise built from the parts below
    scheme: str | None = None
    host: str | None = None
    path: str | None = None
    keep_query: bool = True


class RouteConfig(_Model):
    name: str | None = None
    match: Match = Match()
    cluster: str | None = None
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None
    filters: dict[str, dict[str, Any]] = {}
    upgrades: list[Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]] = ["websocket"]

    @model_validator(mode="after")
    def _no_h2c(self) -> RouteConfig:
        if any(t.lower() == "h2c" for t in self.upgrades):
            raise ValueError("upgrades: h2c is never forwarded (h2c smuggling)")
        return self

    @model_validator(mode="after")
    def _one_action(self) -> RouteConfig:
        given = [k for k in ("cluster", "direct_response", "redirect") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one action: cluster, direct_response or redirect")
        return self


def _summary(rc: RouteConfig) -> str:
    """``host=*.a.test prefix=/api/ methods=GET -> cluster api``: one line for ``sluice check``."""
    m = rc.match
    conditions = [f"{k}={v}" for k, v in (("host", m.host), ("prefix", m.prefix), ("path", m.path),
                                          ("regex", m.regex)) if v is not None]
    if m.methods:
        conditions.append("methods=" + ",".join(x.upper() for x in m.methods))
    if m.headers:
        names = m.headers if isinstance(m.headers, dict) else [h.name for h in m.headers]
        conditions.append("headers=" + ",".join(names))
    if rc.cluster is not None:
        action = f"cluster {rc.cluster}" + (f" (timeout {rc.timeout:g}s)" if rc.timeout else "")
    elif rc.direct_response is not None:
        action = f"direct {rc.direct_response.status}"
    else:
        action = f"redirect {rc.redirect.status}"
    disabled = [n for n, s in rc.filters.items() if s.get("disabled")]
    if disabled:
        action += " without " + ",".join(disabled)
    return f"{' '.join(conditions) or 'everything'} -> {action}"


def _host_test(pattern: str):
    pattern = pattern.lower()
    if pattern == "*":
        return None
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return lambda host: host.endswith(suffix) and len(host) > len(suffix)
    return lambda host: host == pattern


def _compile(cfg: RouteConfig) -> list:
    """The route's conditions as (kind, test) pairs, cheapest first."""
    m = cfg.match
    tests: list = []
    if m.methods:
        methods = frozenset(x.upper() for x in m.methods)
        tests.append(lambda req: req.method in methods)
    if m.prefix is not None:
        prefix = m.prefix
        tests.append(lambda req: req.target.startswith(prefix))
    elif m.path is not None:
        path = m.path
        tests.append(lambda req: req.path == path)
    elif m.regex is not None:
        rx = re.compile(m.regex)
        tests.append(lambda req: rx.fullmatch(req.path) is not None)
    if m.host is not None and (host_test := _host_test(m.host)) is not None:
        tests.append(lambda req: host_test(req.host))
    headers = (
        [HeaderMatch(name=k, exact=v) for k, v in m.headers.items()]
        if isinstance(m.headers, dict)
        else m.headers
    )
    for h in headers:
        tests.append(_header_test(h))
    return tests


def _header_test(h: HeaderMatch):
    name = h.name.lower().encode("latin-1")
    if h.present is not None:
        want = h.present
        return lambda req: (req.headers.get_raw(name) is not None) == want
    if h.exact is not None:
        exact = h.exact.encode("latin-1")
        return lambda req: req.headers.get_raw(name) == exact
    rx = re.compile(h.regex.encode("latin-1"))
    return lambda req: (v := req.headers.get_raw(name)) is not None and rx.fullmatch(v) is not None


class Router(Filter):
    """Matches routes; forwards, answers directly, or redirects."""

    name = "router"

    class Config(FilterConfig):
        """No settings of its own: the routes are the config's top-level [[routes]]."""

    def __init__(self, config: FilterConfig, routes: list[tuple[list, Route]] = (), clusters=None):
        super().__init__(config)
        self._table = list(routes)
        self.routes = [route for _, route in self._table]
        self._clusters = clusters or {}

    @classmethod
    def from_config(cls, config: FilterConfig, app) -> Router:
        table = []
        for i, raw in enumerate(app.config.routes):
            where = f"routes[{i}]"
            try:
                rc = RouteConfig.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(format_errors(exc, where)) from None
            if rc.cluster is not None and rc.cluster not in app.clusters:
                known = ", ".join(sorted(app.clusters)) or "(none)"
                raise ConfigError(f"{where}.cluster: unknown cluster {rc.cluster!r}; defined: {known}")
            action = rc.direct_response or rc.redirect
            route = Route(
                name=rc.name or where,
                cluster=rc.cluster,
                timeout=rc.timeout,
                filters=rc.filters,
                action=action,
                summary=_summary(rc),
                upgrades=frozenset(t.lower() for t in rc.upgrades),
            )
            table.append((_compile(rc), route))
        return cls(config, table, app.clusters)

    def resolve_route(self, ctx) -> Route | None:
        request = ctx.request
        for tests, route in self._table:
            for test in tests:
                if not test(request):
                    break
            else:
                return route
        return None

    async def on_request_headers(self, ctx, request):
        route = ctx.route
        if route is None:
            return LocalReply(404, "no route\n", flag="NR")
        action = route.action
        if action is None:
            ctx.cluster = self._clusters[route.cluster]
            return CONTINUE
        if type(action) is DirectResponse:
            return LocalReply(action.status, action.body, [("content-type", action.content_type)])
        return LocalReply(action.status, "", [("location", _location(action, ctx, request))])


def _location(r: Redirect, ctx, request) -> str:
    if r.location is not None:
        return r.location
    path, sep, query = request.target.partition("?")
    target = (r.path or path) + (sep + query if r.keep_query and sep else "")
    host = r.host or request.headers.get("host") or ""
    return f"{r.scheme or ctx.scheme}://{host}{target}"


@hookimpl
def sluice_filters():
    return [Router]
