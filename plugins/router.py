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

Conditions (``match``), all optional, all must hold:

- ``host``: exact (port ignored, case-insensitive), ``*.suffix`` for any
  subdomain, or ``*``.
- Path: ``prefix``, exact ``path``, or ``regex`` (full match of the path,
  without the query).
- ``methods``: a list.
- ``headers``: a table of exact values, or a list of
  ``{ name, exact | regex | present }`` (regex: a full match).
- ``query``: one ``{ name, exact | regex | present }`` or a list of them;
  the first value of the parameter, percent-decoded (``+`` is a space).
- ``source``: client addresses or CIDR blocks, e.g. ``["10.0.0.0/8",
  "127.0.0.1"]``. The client is the TCP peer; on a listener with
  ``trust_forwarded``, it is the last X-Forwarded-For entry the trusted
  peer appended (an entry that is not an address matches no ``source``).
- ``port``: the listener's port (or a list): the configured one, or the bound
  one for port 0.
- ``sni``: the server name the client sent in its TLS handshake, exact or
  ``*.suffix`` (a plain-HTTP request, or one without SNI, never matches).

Actions, exactly one:

- ``cluster = "api"``: forward to that cluster.
- ``clusters = [{ name = "v1", weight = 90 }, { name = "v2", weight = 10 }]``:
  forward each request to one of them, at random in proportion to the
  weights (a canary; a weight may be 0, not all of them).
- ``cluster_from_host = { suffix = ".svc.local" }``: service-name routing.
  ``Host: users``, ``users.svc.local`` or ``users.svc.local:8080`` go to
  the cluster ``users`` (the host lower-cased, port and suffix removed; no
  ``suffix``: the whole host). A host that names no cluster does not match
  the route, so the next route gets the request (and after the last one,
  404 NR): one rule serves every service the registry knows, and a catch-all
  below it answers the rest.
- ``direct_response = { status, body, content_type }``.
- ``redirect = { status, scheme, host, port, path | prefix_rewrite |
  regex_rewrite, keep_query }`` builds the Location from the request (a
  changed scheme drops the request's port unless ``port`` says one), or
  ``redirect = { location = "https://..." }`` gives it whole.

When forwarding, a route may also rewrite what goes upstream:

- ``prefix_rewrite = "/v2/"`` replaces the matched ``prefix``;
  ``regex_rewrite = { pattern, substitution }`` replaces every match of
  ``pattern`` in the path (``\\1``, ``\\g<name>`` for groups; not the query).
  Pair trailing slashes (``/api/`` to ``/v2/``) or the result may hold ``//``.
- ``host_rewrite_to_endpoint = true``: the Host sent upstream is the
  address of the endpoint chosen (for upstreams that check their own name).
- ``host_rewrite = "backend.internal"``: the Host sent upstream
  (X-Forwarded-Host keeps the client's).
- ``request_headers`` and ``response_headers``, each ``{ remove = [...],
  set = {...}, add = {...} }``, applied in that order; values may use
  ``${client_ip}``, ``${request_id}`` and ``${route}``; ``$$`` is a ``$``.
  Framing and hop-by-hop fields cannot be touched (nor Host: host_rewrite).
  Response edits apply to the upstream's answer and to sluice's own on the
  route (a 502, a 504), not to the router's replies (404, redirects).

Every route resolves once per request; filters before the router read it as
``ctx.route``. Rewrites and header changes happen in the router's own phase,
after that. Matching is compiled (``routing_match``): its cost hardly grows
with the number of routes. The keys and their checks are in
``routing_config``, what a route does in ``routing_actions``; this module
is the filter that joins them.

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

import bisect
import ipaddress
import random

from pydantic import ValidationError

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, Route, hookimpl
from sluice.control.config import format_errors
from sluice.proxy.forwarding import set_host
from sluice.proxy.mirror import Mirror

from .routing_actions import Forward, build_action, location, service_name
from .routing_config import FORWARD_ONLY, DirectResponse, HeaderMatch, RouteConfig, check_route
from .routing_match import (
    RouteIndex,
    RouteMatch,
    header_test,
    host_pattern,
    methods_test,
    port_test,
    query_test,
    regex_test,
    sni_test,
    source_test,
)

__all__ = ["Router"]


def _summary(rc: RouteConfig) -> str:
    """``host=*.a.test prefix=/api/ methods=GET -> cluster api``: one line for ``sluice check``."""
    m = rc.match
    conditions = [f"{k}={v}" for k, v in (("host", m.host), ("prefix", m.prefix), ("path", m.path),
                                          ("regex", m.regex), ("sni", m.sni)) if v is not None]
    if m.methods:
        conditions.append("methods=" + ",".join(x.upper() for x in m.methods))
    if m.headers:
        names = m.headers if isinstance(m.headers, dict) else [h.name for h in m.headers]
        conditions.append("headers=" + ",".join(names))
    if m.query:
        conditions.append("query=" + ",".join(q.name for q in m.query))
    if m.source is not None:
        conditions.append("source=" + ",".join(m.source))
    if m.port is not None:
        conditions.append("port=" + ",".join(map(str, m.port)))
    timeout = f" (timeout {rc.timeout:g}s)" if rc.timeout else ""
    if rc.cluster is not None:
        action = f"cluster {rc.cluster}{timeout}"
    elif rc.clusters is not None:
        action = "split " + ",".join(f"{c.name}:{c.weight}" for c in rc.clusters) + timeout
    elif rc.cluster_from_host is not None:
        action = "cluster named by host" + (f" (suffix {rc.cluster_from_host.suffix})"
                                            if rc.cluster_from_host.suffix else "") + timeout
    elif rc.direct_response is not None:
        action = f"direct {rc.direct_response.status}"
    else:
        action = f"redirect {rc.redirect.status}"
    rewrites = [k for k in FORWARD_ONLY if getattr(rc, k) is not None]
    if rewrites:
        action += " rewriting " + ",".join(rewrites)
    disabled = [n for n, s in rc.filters.items() if s.get("disabled")]
    if disabled:
        action += " without " + ",".join(disabled)
    return f"{' '.join(conditions) or 'everything'} -> {action}"


def _compile_match(rc: RouteConfig, clusters) -> RouteMatch:
    """The route's conditions: host and path for the index, the rest as tests, cheapest first."""
    m = rc.match
    tests: list = []
    if m.methods:
        tests.append(methods_test(m.methods))
    if m.regex is not None:
        tests.append(regex_test(m.regex))
    if m.port is not None:
        tests.append(port_test(m.port))
    if m.sni is not None:
        tests.append(sni_test(m.sni))
    headers = ([HeaderMatch(name=k, exact=v) for k, v in m.headers.items()]
               if isinstance(m.headers, dict) else m.headers)
    for h in headers:
        tests.append(header_test(h.name, h.exact, h.regex, h.present))
    for q in m.query:
        tests.append(query_test(q.name, q.exact, q.regex, q.present))
    if m.source is not None:
        tests.append(source_test([ipaddress.ip_network(s) for s in m.source]))
    if rc.cluster_from_host is not None:
        suffix = rc.cluster_from_host.suffix
        suffix = suffix.lower() if suffix else None
        # By reference: clusters added later (a registry) route without a reload.
        tests.append(lambda req, ctx: service_name(req.host, suffix) in clusters)
    return RouteMatch(
        host=None if m.host is None else host_pattern(m.host),
        prefix=m.prefix,
        path=m.path,
        tests=tuple(tests),
    )


class Router(Filter):
    """Matches routes; forwards, answers directly, or redirects.

    ``random`` draws weighted splits; tests seed it for a fixed sequence.
    """

    name = "router"

    class Config(FilterConfig):
        """No settings of its own: the routes are the config's top-level [[routes]]."""

    def __init__(self, config: FilterConfig, routes: list[tuple[RouteMatch, Route]] = (), clusters=None):
        super().__init__(config)
        self.routes = [route for _, route in routes]
        self._index = RouteIndex([match for match, _ in routes])
        self._clusters = clusters if clusters is not None else {}
        self.random = random.Random()

    @classmethod
    def from_config(cls, config: FilterConfig, app) -> Router:
        table = []
        edits_responses = False
        for i, raw in enumerate(app.config.routes):
            where = f"routes[{i}]"
            try:
                rc = RouteConfig.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(format_errors(exc, where)) from None
            check_route(rc, where, app.clusters)
            route = Route(
                name=rc.name or where,
                cluster=rc.cluster,
                timeout=rc.timeout,
                retry=None if rc.retry is None else rc.retry.policy(),
                mirror=None if rc.mirror is None else Mirror(app.clusters[rc.mirror.cluster],
                                                             rc.mirror.percent / 100),
                host_to_endpoint=rc.host_rewrite_to_endpoint,
                filters=rc.filters,
                action=build_action(rc),
                summary=_summary(rc),
                upgrades=frozenset(t.lower() for t in rc.upgrades),
            )
            edits_responses = edits_responses or rc.response_headers is not None
            table.append((_compile_match(rc, app.clusters), route))
        # A chain calls only the phases a filter's class overrides: without
        # response edits, the router costs nothing on the response path.
        kind = _EditingRouter if edits_responses else cls
        return kind(config, table, app.clusters)

    def resolve_route(self, ctx) -> Route | None:
        i = self._index.first(ctx.request, ctx)
        return None if i is None else self.routes[i]

    async def on_request_headers(self, ctx, request):
        route = ctx.route
        if route is None:
            return LocalReply(404, "no route\n", flag="NR")
        action = route.action
        if type(action) is Forward:
            if action.cluster is not None:
                name = action.cluster
            elif action.split is not None:
                names, cumulative, total = action.split
                name = names[bisect.bisect_right(cumulative, self.random.random() * total)]
            else:
                name = service_name(request.host, action.host_suffix)
            cluster = self._clusters.get(name)
            if cluster is None:  # a registry dropped it since the route matched
                return LocalReply(404, "no route\n", flag="NR")
            ctx.cluster = cluster
            if action.rewrite is not None:
                request.target = action.rewrite(request.target)
            if action.host_rewrite is not None:
                set_host(request.headers, action.host_rewrite)
            if action.request_edits is not None:
                action.request_edits.apply(request.headers, ctx)
            return CONTINUE
        if type(action) is DirectResponse:
            return LocalReply(action.status, action.body, [("content-type", action.content_type)])
        return LocalReply(action.config.status, "", [("location", location(action, ctx, request))])


class _EditingRouter(Router):
    """The router when some route edits response headers."""

    async def on_response_headers(self, ctx, response):
        route = ctx.matched_route
        action = route.action if route is not None else None
        if type(action) is Forward and action.response_edits is not None:
            action.response_edits.apply(response.headers, ctx)
        return CONTINUE


@hookimpl
def sluice_filters():
    return [Router]
