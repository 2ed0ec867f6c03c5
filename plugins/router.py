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
with the number of routes.

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
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, Route, hookimpl
from sluice.control.config import format_errors

from .routing_match import (
    Listeners,
    RouteIndex,
    RouteMatch,
    client_ip,
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listify(value: Any) -> Any:
    """``x`` is short for ``[x]``."""
    return [value] if isinstance(value, (str, int, dict)) else value


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regex: {exc}") from None
    return pattern


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an address or CIDR block: {exc}") from None
    return value


def _matches(pattern: str, message: str) -> Callable[[str], str]:
    """A validator that says what a value should be, not which regex it failed."""
    rx = re.compile(pattern)

    def check(value: str) -> str:
        if not rx.fullmatch(value):
            raise ValueError(message)
        return value

    return check


_NAME = r"\*|(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?"


class HeaderMatch(_Model):
    """A condition on one header (or query parameter): ``exact``, ``regex``
    (a full match) or ``present`` (true: there; false: absent)."""

    name: str
    exact: str | None = None
    regex: Annotated[str, AfterValidator(_regex)] | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> HeaderMatch:
        given = [k for k in ("exact", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, regex, present")
        return self


class Match(_Model):
    host: str | None = None
    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] | list[HeaderMatch] = []
    query: Annotated[list[HeaderMatch], BeforeValidator(_listify)] = []
    source: Annotated[list[Annotated[str, AfterValidator(_network)]], BeforeValidator(_listify)] | None = None
    port: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], BeforeValidator(_listify)] | None = None
    sni: Annotated[str, AfterValidator(_matches(_NAME, "not a server name, *.suffix or *"))] | None = None

    @model_validator(mode="after")
    def _one_path_rule(self) -> Match:
        if sum(x is not None for x in (self.prefix, self.path, self.regex)) > 1:
            raise ValueError("give at most one of prefix, path, regex")
        if self.regex is not None:
            _regex(self.regex)
        return self


class DirectResponse(_Model):
    status: Annotated[int, Field(ge=200, le=599)] = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


class RegexRewrite(_Model):
    pattern: Annotated[str, AfterValidator(_regex)]
    substitution: str

    @model_validator(mode="after")
    def _groups_exist(self) -> RegexRewrite:
        rx = re.compile(self.pattern)
        for m in re.finditer(r"\\g<([^>]*)>|\\([0-9]+)", self.substitution):
            ref = m.group(1) if m.group(1) is not None else m.group(2)
            known = ref in rx.groupindex or (ref.isdigit() and int(ref) <= rx.groups)
            if not known:
                raise ValueError(f"substitution: no group {ref!r} in pattern")
        if re.search(r"[\x00-\x20\x7f#]", self.substitution):
            raise ValueError("substitution: no spaces, controls or '#' in a path")
        return self


_Path = Annotated[str, AfterValidator(_matches(r"/[^\x00-\x20\x7f#]*",
                                               "a path starts with '/' and has no spaces, controls or '#'"))]
_HostPort = Annotated[str, AfterValidator(_matches(r"[A-Za-z0-9_.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?",
                                                   "not a host or host:port"))]


class Redirect(_Model):
    status: Literal[301, 302, 303, 307, 308] = 302
    location: str | None = None  # absolute; otherwise built from the parts below
    scheme: Literal["http", "https"] | None = None
    host: _HostPort | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    path: _Path | None = None
    prefix_rewrite: _Path | None = None
    regex_rewrite: RegexRewrite | None = None
    keep_query: bool = True

    @model_validator(mode="after")
    def _coherent(self) -> Redirect:
        if self.location is not None and any(
            getattr(self, k) is not None
            for k in ("scheme", "host", "port", "path", "prefix_rewrite", "regex_rewrite")
        ):
            raise ValueError("location is the whole Location: give it alone, or build it from parts")
        if sum(x is not None for x in (self.path, self.prefix_rewrite, self.regex_rewrite)) > 1:
            raise ValueError("give at most one of path, prefix_rewrite, regex_rewrite")
        return self


class WeightedCluster(_Model):
    name: str
    weight: Annotated[int, Field(ge=0, le=1_000_000)]


class ClusterFromHost(_Model):
    """``Host: <service>[<suffix>][:port]`` -> cluster ``<service>``."""

    suffix: Annotated[str, AfterValidator(_matches(r"\.[A-Za-z0-9_.-]+", "a suffix starts with '.'"))] | None = None


_VARIABLES = ("client_ip", "request_id", "route")
_TEMPLATE = re.compile(r"\$\$|\$\{([^}]*)\}")
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# Fields the framing or the hop needs; a route may not add, set or remove them.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "upgrade", "te",
                      "trailer", "keep-alive", "proxy-connection"})


def _template(value: str) -> str:
    for m in _TEMPLATE.finditer(value):
        if m.group(1) is not None and m.group(1) not in _VARIABLES:
            raise ValueError(f"unknown variable ${{{m.group(1)}}}; known: "
                             + ", ".join(f"${{{v}}}" for v in _VARIABLES))
    if re.search(r"[\x00\r\n]", value) or value != value.strip(" \t"):
        raise ValueError("a header value has no CR, LF, NUL, or leading or trailing whitespace")
    return value


_HeaderName = Annotated[str, AfterValidator(_matches(_TOKEN, "not a header name (a token)"))]
_HeaderValue = Annotated[str, AfterValidator(_template)]


class HeaderOps(_Model):
    remove: list[_HeaderName] = []
    set: dict[_HeaderName, _HeaderValue] = {}
    add: dict[_HeaderName, _HeaderValue] = {}

    def touched(self) -> list[str]:
        return [n.lower() for n in (*self.remove, *self.set, *self.add)]


class RouteConfig(_Model):
    name: str | None = None
    match: Match = Match()
    cluster: str | None = None
    clusters: list[WeightedCluster] | None = None
    cluster_from_host: ClusterFromHost | None = None
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None
    prefix_rewrite: _Path | None = None
    regex_rewrite: RegexRewrite | None = None
    host_rewrite: _HostPort | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    filters: dict[str, dict[str, Any]] = {}
    upgrades: list[Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]] = ["websocket"]

    @model_validator(mode="after")
    def _no_h2c(self) -> RouteConfig:
        if any(t.lower() == "h2c" for t in self.upgrades):
            raise ValueError("upgrades: h2c is never forwarded (h2c smuggling)")
        return self

    @model_validator(mode="after")
    def _one_action(self) -> RouteConfig:
        given = [k for k in _ACTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one action: " + ", ".join(_ACTIONS[:-1]) + " or " + _ACTIONS[-1])
        if self.direct_response is not None or self.redirect is not None:
            extra = [k for k in _FORWARD_ONLY if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for a route that forwards")
        if self.prefix_rewrite is not None and self.regex_rewrite is not None:
            raise ValueError("give at most one of prefix_rewrite, regex_rewrite")
        return self


_ACTIONS = ("cluster", "clusters", "cluster_from_host", "direct_response", "redirect")
_FORWARD_ONLY = ("prefix_rewrite", "regex_rewrite", "host_rewrite", "request_headers", "response_headers")


def _check(rc: RouteConfig, where: str, clusters) -> None:
    """What the model alone cannot know: clusters that exist, a prefix to rewrite."""
    known = ", ".join(sorted(clusters)) or "(none)"
    if rc.cluster is not None and rc.cluster not in clusters:
        raise ConfigError(f"{where}.cluster: unknown cluster {rc.cluster!r}; defined: {known}")
    if rc.clusters is not None:
        if not rc.clusters:
            raise ConfigError(f"{where}.clusters: name at least one cluster")
        for j, wc in enumerate(rc.clusters):
            if wc.name not in clusters:
                raise ConfigError(f"{where}.clusters[{j}].name: unknown cluster {wc.name!r}; defined: {known}")
        if not any(wc.weight for wc in rc.clusters):
            raise ConfigError(f"{where}.clusters: every weight is 0; at least one must be positive")
    for key, rule in (("prefix_rewrite", rc.prefix_rewrite),
                      ("redirect.prefix_rewrite", rc.redirect and rc.redirect.prefix_rewrite)):
        if rule is not None and rc.match.prefix is None:
            raise ConfigError(f"{where}.{key}: needs match.prefix (the part it replaces)")
    for key, forbidden in (("request_headers", _FRAMING | {"host"}), ("response_headers", _FRAMING)):
        ops = getattr(rc, key)
        bad = [n for n in ops.touched() if n in forbidden] if ops is not None else []
        if bad:
            hint = " (use host_rewrite)" if "host" in bad else ""
            raise ConfigError(f"{where}.{key}: {bad[0]!r} is the proxy's to set{hint}")


# -- what a matched route does -----------------------------------------------


def _path_rewrite(rc_prefix: str | None, prefix_rewrite: str | None,
                  regex_rewrite: RegexRewrite | None, path: str | None = None) -> Callable[[str], str] | None:
    """A function from a target to the rewritten target (query kept), or None."""
    if prefix_rewrite is not None:
        cut = len(rc_prefix)
        return lambda target: prefix_rewrite + target[cut:]
    if regex_rewrite is not None:
        rx, sub = re.compile(regex_rewrite.pattern), regex_rewrite.substitution

        def regex(target: str) -> str:
            p, sep, q = target.partition("?")
            p = rx.sub(sub, p)
            return ("" if p.startswith("/") else "/") + p + sep + q

        return regex
    if path is not None:
        return lambda target: path + target[len(target.partition("?")[0]):]
    return None


class _Template:
    """A header value with ``${variable}`` parts, rendered per request."""

    __slots__ = ("parts", "literal")

    def __init__(self, value: str) -> None:
        parts: list[tuple[bool, str]] = []  # (is_variable, text)
        pos = 0
        for m in _TEMPLATE.finditer(value):
            parts.append((False, value[pos:m.start()]))
            parts.append((True, m.group(1)) if m.group(1) is not None else (False, "$"))
            pos = m.end()
        parts.append((False, value[pos:]))
        self.parts = [p for p in parts if p[0] or p[1]]
        self.literal = "".join(t for _, t in self.parts) if not any(v for v, _ in self.parts) else None

    def render(self, variables: Callable[[str], str]) -> str:
        if self.literal is not None:
            return self.literal
        return "".join(variables(t) if v else t for v, t in self.parts)


class _HeaderEdits:
    """One ``request_headers`` or ``response_headers`` table, compiled."""

    def __init__(self, ops: HeaderOps) -> None:
        self.remove = [n.lower() for n in ops.remove]
        self.set = [(n.lower(), _Template(v)) for n, v in ops.set.items()]
        self.add = [(n.lower(), _Template(v)) for n, v in ops.add.items()]

    def apply(self, headers, variables: Callable[[str], str]) -> None:
        if self.remove:
            headers.remove(*self.remove)
        for name, value in self.set:
            headers.set(name, value.render(variables))
        for name, value in self.add:
            headers.add(name, value.render(variables))


@dataclass(slots=True, eq=False)
class _Forward:
    """Forward: to one cluster, a weighted split, or the one the host names;
    with the route's rewrites."""

    cluster: str | None = None
    split: tuple[tuple[str, ...], tuple[int, ...], int] | None = None  # names, cumulative weights, total
    host_suffix: str | None = None  # cluster_from_host (None: the whole host)
    from_host: bool = False
    rewrite: Callable[[str], str] | None = None
    host_rewrite: bytes | None = None
    request_edits: _HeaderEdits | None = None
    response_edits: _HeaderEdits | None = None


@dataclass(slots=True, eq=False)
class _Redirect:
    config: Redirect
    rewrite: Callable[[str], str] | None


def _service(host: str, suffix: str | None) -> str:
    """The service a (lower-cased, port-less) host names."""
    if suffix is not None and host.endswith(suffix) and len(host) > len(suffix):
        return host[: -len(suffix)]
    return host


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
    rewrites = [k for k in _FORWARD_ONLY if getattr(rc, k) is not None]
    if rewrites:
        action += " rewriting " + ",".join(rewrites)
    disabled = [n for n, s in rc.filters.items() if s.get("disabled")]
    if disabled:
        action += " without " + ",".join(disabled)
    return f"{' '.join(conditions) or 'everything'} -> {action}"


def _compile_match(rc: RouteConfig, listeners: Listeners, clusters) -> RouteMatch:
    """The route's conditions: host and path for the index, the rest as tests, cheapest first."""
    m = rc.match
    tests: list = []
    if m.methods:
        tests.append(methods_test(m.methods))
    if m.regex is not None:
        tests.append(regex_test(m.regex))
    if m.port is not None:
        tests.append(port_test(m.port, listeners))
    if m.sni is not None:
        tests.append(sni_test(m.sni))
    headers = ([HeaderMatch(name=k, exact=v) for k, v in m.headers.items()]
               if isinstance(m.headers, dict) else m.headers)
    for h in headers:
        tests.append(header_test(h.name, h.exact, h.regex, h.present))
    for q in m.query:
        tests.append(query_test(q.name, q.exact, q.regex, q.present))
    if m.source is not None:
        tests.append(source_test([ipaddress.ip_network(s) for s in m.source], listeners))
    if rc.cluster_from_host is not None:
        suffix = rc.cluster_from_host.suffix
        suffix = suffix.lower() if suffix else None
        # By reference: clusters added later (a registry) route without a reload.
        tests.append(lambda req, ctx: _service(req.host, suffix) in clusters)
    return RouteMatch(
        host=None if m.host is None else host_pattern(m.host),
        prefix=m.prefix,
        path=m.path,
        tests=tuple(tests),
    )


def _action(rc: RouteConfig) -> Any:
    if rc.direct_response is not None:
        return rc.direct_response
    if rc.redirect is not None:
        r = rc.redirect
        return _Redirect(r, _path_rewrite(rc.match.prefix, r.prefix_rewrite, r.regex_rewrite, r.path))
    split = None
    if rc.clusters is not None:
        total, cumulative = 0, []
        for wc in rc.clusters:
            total += wc.weight
            cumulative.append(total)
        split = (tuple(wc.name for wc in rc.clusters), tuple(cumulative), total)
    cfh = rc.cluster_from_host
    return _Forward(
        cluster=rc.cluster,
        split=split,
        host_suffix=cfh.suffix.lower() if cfh is not None and cfh.suffix else None,
        from_host=cfh is not None,
        rewrite=_path_rewrite(rc.match.prefix, rc.prefix_rewrite, rc.regex_rewrite),
        host_rewrite=rc.host_rewrite.encode("ascii") if rc.host_rewrite else None,
        request_edits=_HeaderEdits(rc.request_headers) if rc.request_headers else None,
        response_edits=_HeaderEdits(rc.response_headers) if rc.response_headers else None,
    )


class Router(Filter):
    """Matches routes; forwards, answers directly, or redirects.

    ``random`` draws weighted splits; tests seed it for a fixed sequence.
    """

    name = "router"

    class Config(FilterConfig):
        """No settings of its own: the routes are the config's top-level [[routes]]."""

    def __init__(self, config: FilterConfig, routes: list[tuple[RouteMatch, Route]] = (), clusters=None,
                 listeners: Listeners | None = None):
        super().__init__(config)
        self.routes = [route for _, route in routes]
        self._index = RouteIndex([match for match, _ in routes])
        self._clusters = clusters if clusters is not None else {}
        self._listeners = listeners if listeners is not None else Listeners(())
        self.random = random.Random()

    @classmethod
    def from_config(cls, config: FilterConfig, app) -> Router:
        listeners = Listeners(app.config.listeners, lambda i: _bound_port(app, i))
        table = []
        edits_responses = False
        for i, raw in enumerate(app.config.routes):
            where = f"routes[{i}]"
            try:
                rc = RouteConfig.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(format_errors(exc, where)) from None
            _check(rc, where, app.clusters)
            route = Route(
                name=rc.name or where,
                cluster=rc.cluster,
                timeout=rc.timeout,
                filters=rc.filters,
                action=_action(rc),
                summary=_summary(rc),
                upgrades=frozenset(t.lower() for t in rc.upgrades),
            )
            edits_responses = edits_responses or rc.response_headers is not None
            table.append((_compile_match(rc, listeners, app.clusters), route))
        # A chain calls only the phases a filter's class overrides: without
        # response edits, the router costs nothing on the response path.
        kind = _EditingRouter if edits_responses else cls
        return kind(config, table, app.clusters, listeners)

    def resolve_route(self, ctx) -> Route | None:
        i = self._index.first(ctx.request, ctx)
        return None if i is None else self.routes[i]

    async def on_request_headers(self, ctx, request):
        route = ctx.route
        if route is None:
            return LocalReply(404, "no route\n", flag="NR")
        action = route.action
        if type(action) is _Forward:
            if action.cluster is not None:
                name = action.cluster
            elif action.split is not None:
                names, cumulative, total = action.split
                name = names[bisect.bisect_right(cumulative, self.random.random() * total)]
            else:
                name = _service(request.host, action.host_suffix)
            cluster = self._clusters.get(name)
            if cluster is None:  # a registry dropped it since the route matched
                return LocalReply(404, "no route\n", flag="NR")
            ctx.cluster = cluster
            if action.rewrite is not None:
                request.target = action.rewrite(request.target)
            if action.host_rewrite is not None:
                _set_host(request.headers, action.host_rewrite)
            if action.request_edits is not None:
                action.request_edits.apply(request.headers, self._variables(ctx, request, route))
            return CONTINUE
        if type(action) is DirectResponse:
            return LocalReply(action.status, action.body, [("content-type", action.content_type)])
        return LocalReply(action.config.status, "", [("location", _location(action, ctx, request))])

    def _variables(self, ctx, request, route) -> Callable[[str], str]:
        def value(name: str) -> str:
            if name == "client_ip":
                return client_ip(request, ctx, self._listeners)
            if name == "request_id":
                return ctx.request_id
            return route.name

        return value


class _EditingRouter(Router):
    """The router when some route edits response headers."""

    async def on_response_headers(self, ctx, response):
        route = ctx.matched_route
        action = route.action if route is not None else None
        if type(action) is _Forward and action.response_edits is not None:
            action.response_edits.apply(response.headers, self._variables(ctx, ctx.request, route))
        return CONTINUE


def _bound_port(app, i: int) -> int | None:
    """Listener ``i``'s bound port, once it listens (``App.addresses``)."""
    addresses = app.addresses
    return int(addresses[i].rsplit(":", 1)[1]) if i < len(addresses) else None


def _set_host(headers, host: bytes) -> None:
    fields = headers.raw()
    for i, (n, _) in enumerate(fields):
        if n == b"host":
            fields[i] = (b"host", host)
            fields[i + 1:] = [f for f in fields[i + 1:] if f[0] != b"host"]
            return
    fields.append((b"host", host))


def _split_port(hostport: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else None
    host, sep, port = hostport.rpartition(":")
    return (host, port) if sep else (hostport, None)


def _location(action: _Redirect, ctx, request) -> str:
    r = action.config
    if r.location is not None:
        return r.location
    target = request.target if action.rewrite is None else action.rewrite(request.target)
    if not r.keep_query:
        target = target.partition("?")[0]
    scheme = r.scheme or ctx.scheme
    if r.host is not None:
        host, port = _split_port(r.host)
    else:
        host, port = _split_port(request.headers.get("host") or "")
        if scheme != ctx.scheme:
            port = None  # the request's port belongs to the other scheme
    if r.port is not None:
        port = str(r.port)
    return f"{scheme}://{host}{':' + port if port else ''}{target}"


@hookimpl
def sluice_filters():
    return [Router]
