"""Plugin ``ext_authz``: each request is admitted or refused by an external HTTP service (Envoy's HTTP mode).

For every request, a check request goes to the configured ``cluster``
(through sluice's own upstream pool, ``cluster_call``): the same method, the
target behind ``path_prefix``, the original Host, ``x-request-id``, the
request headers in ``allowed_headers`` and, with ``with_request_body``, the
body up to ``max_request_bytes``. The service answers:

- **2xx**: the request goes on; the answer's headers named in
  ``allowed_upstream_headers`` are set on it (replacing the client's);
- **any other status below 500**: that answer goes to the client (status,
  body, and the headers in ``allowed_client_headers``; unset: all but the
  framing and hop-by-hop ones), flag ``UAEX``;
- **no answer** within ``timeout`` (connect failure, reset, garbage, a
  hang) **or a 5xx**: the service itself failed. ``failure_mode_allow``
  lets the request through (fail-open); otherwise it gets
  ``status_on_error`` (403, as Envoy) with flag ``UAEX`` (fail-closed).

Outcomes are counted (``sluice_plugin_ext_authz_checks_total{outcome}``:
``allowed``, ``denied``, ``failed_open``, ``failed_closed``), kept in
``ctx.vars["ext_authz.outcome"]``, and an outage is logged once
(``ext_authz unavailable``, then ``ext_authz recovered`` with ``down_for``)
rather than per request. A route turns the check off with
``filters = { ext_authz = { disabled = true } }``, or adds to its checks
``context = { key = "value" }`` (sent as ``x-ext-authz-context-key``).

A body is sent only when the request announces it with a Content-Length: the
core does not tell a filter, at the head, whether a body without one follows
(chunked, or HTTP/2), so such a request is checked at its head, without it.
A body over ``max_request_bytes`` gets 413, or with
``allow_partial_message`` its first ``max_request_bytes`` go with
``x-envoy-auth-partial-body: true``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import Field, field_validator

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, hookimpl, metrics
from sluice.messages import Headers, Request

from .cluster_call import CallError, call

__all__ = ["ExtAuthz"]

# What never goes back to the client from the service's answer: framing and hop-by-hop fields.
_NOT_RELAYED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade",
                          b"te", b"trailer", b"proxy-connection", b"host"})
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers.raw() if n == name]


class Settings(FilterConfig):
    cluster: str
    path_prefix: str = ""
    timeout: Annotated[float, Field(gt=0)] = 0.2  # seconds for the whole check, connecting included
    allowed_headers: list[str] = Field(default_factory=lambda: ["authorization", "cookie"])
    allowed_upstream_headers: list[str] = Field(default_factory=list)
    allowed_client_headers: list[str] | None = None  # None: every header but framing and hop-by-hop
    with_request_body: bool = False
    max_request_bytes: Annotated[int, Field(ge=0)] = 8192
    allow_partial_message: bool = False
    failure_mode_allow: bool = False
    status_on_error: Annotated[int, Field(ge=200, le=599)] = 403
    max_response_bytes: Annotated[int, Field(ge=0)] = 65536  # a denial's body; more is a failure

    @field_validator("allowed_headers", "allowed_upstream_headers")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.lower() for v in value]

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("must start with /")
        return value.rstrip("/")


class RouteSettings(FilterConfig):
    """What a route adds to its checks: ``context``, each key sent as an
    ``x-ext-authz-context-<key>`` header (Envoy's per-route context extensions, which its
    HTTP mode cannot send), so one service can tell routes or tenants apart."""

    context: dict[str, str] = Field(default_factory=dict)

    @field_validator("context")
    @classmethod
    def _as_headers(cls, value: dict[str, str]) -> dict[str, str]:
        Headers([(_CONTEXT + k, v) for k, v in value.items()])  # a bad name or value raises, naming it
        return value


_CONTEXT = "x-ext-authz-context-"


class ExtAuthz(Filter):
    """Asks an external HTTP service about each request; its 2xx admits, anything else is returned."""

    name = "ext_authz"
    Config = Settings
    RouteConfig = RouteSettings
    after = ("api_key", "basic", "jwt", "rbac")  # the cheap local refusals first

    def __init__(self, config: Settings, app: Any = None) -> None:
        super().__init__(config)
        self._app = app
        self._allowed = tuple(h.encode("latin-1") for h in config.allowed_headers)
        self._upstream = tuple(h.encode("latin-1") for h in config.allowed_upstream_headers)
        client = config.allowed_client_headers
        self._client = None if client is None else frozenset(h.lower().encode("latin-1") for h in client)
        checks = metrics.counter("ext_authz_checks", "ext_authz checks by outcome", labels=["outcome"])
        self._count = {o: checks.labels(o) for o in ("allowed", "denied", "failed_open", "failed_closed")}
        self._down_since: float | None = None
        self._contexts: dict[int, list[tuple[bytes, bytes]]] = {}

    @classmethod
    def from_config(cls, config: Settings, app: Any) -> ExtAuthz:
        if app is not None and config.cluster not in app.clusters:
            raise ConfigError(f"filters.ext_authz.cluster: no cluster {config.cluster!r} "
                              f"(clusters: {', '.join(sorted(app.clusters)) or 'none'})")
        return cls(config, app)

    # -- per request -------------------------------------------------------------

    async def on_request_headers(self, ctx, request):
        if self.config.with_request_body:
            length = request.headers.get_raw(b"content-length")
            if length is not None and length != b"0":
                if int(length) > self.config.max_request_bytes and not self.config.allow_partial_message:
                    self.log(ctx).info("ext_authz body too large", length=int(length))
                    return LocalReply(413, "request body too large for authorization\n", flag="UAEX")
                ctx.buffer_request_body()
                ctx.state(self).pending = True
                return CONTINUE
        return await self._check(ctx, request, b"", partial=False)

    def new_state(self) -> Any:
        return _Pending()

    async def on_request_body(self, ctx, chunk, end):
        state = ctx.state(self)
        if not state.pending or not end:
            return CONTINUE
        state.pending = False
        cap = self.config.max_request_bytes
        replied = await self._check(ctx, ctx.request, chunk[:cap], partial=len(chunk) > cap)
        return CONTINUE if replied is None else replied

    async def _check(self, ctx, request: Request, body: bytes, *, partial: bool) -> LocalReply | None:
        fields = [(b"host", request.headers.get_raw(b"host") or b""), (b"x-request-id", ctx.request_id.encode())]
        for name in self._allowed:
            fields.extend((name, v) for v in _values(request.headers, name))
        if body or request.method not in _BODYLESS:
            fields.append((b"content-length", str(len(body)).encode()))
        if partial:
            fields.append((b"x-envoy-auth-partial-body", b"true"))
        fields.extend(self._context(ctx))
        check = Request(request.method, self.config.path_prefix + request.target, Headers(fields))
        cluster = self._app.clusters.get(self.config.cluster) if self._app is not None else None
        try:
            if cluster is None:
                raise CallError(f"no cluster {self.config.cluster!r}")
            answer = await call(self._app.pool, cluster, check, body, timeout=self.config.timeout,
                                max_bytes=self.config.max_response_bytes)
            if answer.status >= 500:
                raise CallError(f"the service answered {answer.status}")
        except CallError as exc:
            return self._failed(ctx, str(exc))
        self._up(ctx)
        if 200 <= answer.status < 300:
            for name in self._upstream:
                values = _values(answer.headers, name)
                if values:
                    request.headers.remove(name)
                    request.headers.raw().extend((name, v) for v in values)
            return self._outcome(ctx, "allowed")
        self._outcome(ctx, "denied")
        self.log(ctx).info("ext_authz denied", status=answer.status)
        relayed = [(n, v) for n, v in answer.headers.raw()
                   if n not in _NOT_RELAYED and (self._client is None or n in self._client)]
        return LocalReply(answer.status, answer.body, relayed, flag="UAEX")

    def _context(self, ctx) -> list[tuple[bytes, bytes]]:
        """The route's context headers (checked at load), made once per route."""
        route = ctx.route
        if route is None or self.name not in route.filters:
            return []
        found = self._contexts.get(id(route))
        if found is None:
            context = route.filter_settings(self.name).get("context") or {}
            found = Headers([(_CONTEXT + k, v) for k, v in context.items()]).raw()
            if len(self._contexts) > 4096:  # routes of replaced configs
                self._contexts.clear()
            self._contexts[id(route)] = found
        return found

    def _outcome(self, ctx, outcome: str) -> None:
        self._count[outcome].inc()
        ctx.vars["ext_authz.outcome"] = outcome
        return None

    def _failed(self, ctx, reason: str) -> LocalReply | None:
        allow = self.config.failure_mode_allow
        if self._down_since is None:  # once per outage, not per request
            self._down_since = time.monotonic()
            self.log(ctx).warning("ext_authz unavailable", cluster=self.config.cluster, reason=reason,
                                  failure_mode_allow=allow)
        if allow:
            return self._outcome(ctx, "failed_open")
        self._outcome(ctx, "failed_closed")
        return LocalReply(self.config.status_on_error, "authorization unavailable\n", flag="UAEX")

    def _up(self, ctx) -> None:
        if self._down_since is not None:
            self.log(ctx).info("ext_authz recovered", cluster=self.config.cluster,
                               down_for=round(time.monotonic() - self._down_since, 3))
            self._down_since = None


class _Pending:
    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = False


@hookimpl
def sluice_filters():
    return [ExtAuthz]
