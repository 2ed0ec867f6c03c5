"""Plugin ``cors``: CORS answered at the edge, for browsers calling an API from another origin.

What the Fetch standard's CORS protocol asks of a server, done here so the
upstreams need not:

- **Preflight**: an ``OPTIONS`` request carrying ``Origin`` and
  ``Access-Control-Request-Method`` is answered locally (204, never sent
  upstream). For an allowed origin the answer carries
  ``Access-Control-Allow-Origin``, ``-Allow-Methods``, ``-Allow-Headers``,
  ``-Max-Age`` and, with ``allow_credentials``, ``-Allow-Credentials: true``;
  a disallowed origin gets the 204 with none of them, so the browser stops
  there. The methods and headers are the configured lists; the browser
  compares the request's against them.
- **Actual requests** (any other request with an ``Origin``): an allowed
  origin's response gains ``Access-Control-Allow-Origin`` (and
  ``-Allow-Credentials``, ``-Expose-Headers`` as configured); a disallowed
  one's gets no CORS header, so the browser withholds the response from the
  page. The request still reaches the upstream (CORS protects the reader,
  not the server) unless ``refuse_disallowed = true``: then 403.
  ``Access-Control-*`` headers the upstream set are removed: with this
  filter in the chain, the edge owns the policy.
- ``Vary: Origin`` is added to every response that depends on the origin
  (all but the ``*`` ones), so caches keep one answer per origin.

Origins: ``allow_origins`` holds exact origins (``https://app.example.com``,
compared as the browser serialises them: scheme, host, port unless
default), ``"*"`` (any: answered ``*``) and patterns ``scheme://*.domain``,
which match any subdomain of ``domain`` (one or more labels, never the
domain itself) and nothing else. A pattern is matched by string
comparison of the labels, never turned into a regex, so a dot or other
character in it means only itself. ``"*"`` with ``allow_credentials`` is
refused at load: the standard forbids ``*`` on a credentialed response,
and echoing every origin instead would hand any site the user's cookies.
``allow_headers = ["*"]`` is the literal wildcard without credentials and,
with them (where ``*`` means nothing), the request's own list echoed.

A route may bring its own settings (``filters = { cors = {...} }``): the
keys it gives replace the listener's, the result checked at load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, model_validator

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, hookimpl, metrics
from sluice.control.config import format_errors

from .per_route import PerRoute

__all__ = ["Cors"]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110's token: methods and header names
_HOST = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")  # what a subdomain in an origin may be (lowercase)


def _origin(text: str) -> str:
    if text == "*" or text == "null":
        return text
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest or text != text.lower():
        raise ValueError(f"{text!r} is not an origin (scheme://host[:port], lowercase, no path), "
                         "a pattern (https://*.example.com) or *")
    host = rest[2:] if rest.startswith("*.") else rest
    name, colon, port = host.rpartition(":")
    if not (colon and port.isdigit()):
        name = host
    if "*" in name or not (_HOST.match(name) or name.startswith("[")):
        raise ValueError(f"{text!r}: a pattern may only start with *. (https://*.example.com)")
    return text


def _token(text: str) -> str:
    if not _TOKEN.match(text):
        raise ValueError(f"{text!r} is not a method or header name")
    return text


Origin = Annotated[str, AfterValidator(_origin)]
Token = Annotated[str, AfterValidator(_token)]


class Settings(FilterConfig):
    allow_origins: Annotated[list[Origin], Field(min_length=1)]
    allow_methods: list[Token] = ["GET", "HEAD", "POST"]
    allow_headers: list[Token] = []
    expose_headers: list[Token] = []
    allow_credentials: bool = False
    max_age: Annotated[int, Field(ge=0)] = 600  # seconds a browser may cache a preflight (Chrome caps at 7200)
    refuse_disallowed: bool = False

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Settings:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError('allow_origins = ["*"] with allow_credentials = true: the Fetch standard '
                             "forbids a wildcard origin on a credentialed response; list the origins")
        return self


class RouteSettings(FilterConfig):
    allow_origins: list[Origin] | None = None
    allow_methods: list[Token] | None = None
    allow_headers: list[Token] | None = None
    expose_headers: list[Token] | None = None
    allow_credentials: bool | None = None
    max_age: Annotated[int, Field(ge=0)] | None = None
    refuse_disallowed: bool | None = None


class _Policy:
    """One compiled setting set: ``allowed(origin)`` is the Allow-Origin value, or None."""

    def __init__(self, s: Settings) -> None:
        self.any = "*" in s.allow_origins
        self.exact = frozenset(o for o in s.allow_origins if "*" not in o)
        # "https://*.example.com" -> ("https://", ".example.com"); the port, if any, is in the suffix
        self.patterns = tuple((o[:o.index("*")], o[o.index("*") + 1:]) for o in s.allow_origins if "://*." in o)
        self.credentials = s.allow_credentials
        self.refuse = s.refuse_disallowed
        creds = [("access-control-allow-credentials", "true")] if s.allow_credentials else []
        self.preflight = [
            ("access-control-allow-methods", ", ".join(s.allow_methods)),
            *([("access-control-allow-headers", ", ".join(s.allow_headers))]
              if s.allow_headers and (s.allow_headers != ["*"] or not s.allow_credentials) else []),
            ("access-control-max-age", str(s.max_age)),
            *creds,
        ]
        self.echo_headers = "*" in s.allow_headers and s.allow_credentials
        self.actual = creds + ([("access-control-expose-headers", ", ".join(s.expose_headers))]
                               if s.expose_headers else [])

    def allowed(self, origin: str) -> str | None:
        if origin in self.exact:
            return origin
        for prefix, suffix in self.patterns:
            if origin.startswith(prefix) and origin.endswith(suffix):
                sub = origin[len(prefix):len(origin) - len(suffix)]
                if sub and _HOST.match(sub):  # one or more labels: no ':', '/', '@' or empty label
                    return origin
        if self.any:
            return "*"
        return None


_VARY_PREFLIGHT = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class Cors(Filter):
    """Answers CORS preflights locally and adds Access-Control-* to allowed origins' responses."""

    name = "cors"
    # A preflight carries no credentials: answered after an auth filter, it would be a 401.
    before = ("api_key", "basic", "jwt", "ext_authz", "rbac", "router")
    Config = Settings
    RouteConfig = RouteSettings

    def __init__(self, config: Settings) -> None:
        super().__init__(config)
        base = config.model_dump()

        def build(own: Mapping[str, Any], where: str) -> _Policy:
            try:
                return _Policy(Settings.model_validate({**base, **own}))
            except ValidationError as exc:
                raise ConfigError(format_errors(exc, where)) from None

        self._policies = PerRoute(self.name, _Policy(config), build)
        counter = metrics.counter("cors_requests", "Requests with an Origin, by kind and whether it was allowed",
                                  labels=["kind", "origin"])
        self._count = {(k, o): counter.labels(k, o) for k in ("preflight", "actual") for o in ("allowed", "denied")}

    @classmethod
    def from_config(cls, config: Settings, app: Any) -> Cors:
        """Built, and every route's settings merged with these and checked, by the route's key path."""
        built = cls(config)
        built._policies.check(app)
        return built

    def new_state(self) -> list[tuple[str, str]]:
        return []  # the CORS headers this request's response gets

    async def on_request_headers(self, ctx, request):
        raw = request.headers.get_raw(b"origin")
        if raw is None:
            return CONTINUE
        origin = raw.decode("latin-1")
        policy = self._policies.get(ctx)
        allowed = policy.allowed(origin)
        if request.method == "OPTIONS" and request.headers.get("access-control-request-method") is not None:
            self._count["preflight", "allowed" if allowed else "denied"].inc()
            headers = [("vary", _VARY_PREFLIGHT)]
            if allowed is not None:
                headers.append(("access-control-allow-origin", allowed))
                headers.extend(policy.preflight)
                asked = request.headers.get("access-control-request-headers")
                if policy.echo_headers and asked:
                    headers.append(("access-control-allow-headers", asked))
            else:
                self.log(ctx).info("cors origin refused", origin=origin, preflight=True)
            return LocalReply(204, b"", headers)
        self._count["actual", "allowed" if allowed else "denied"].inc()
        if allowed is None:
            self.log(ctx).info("cors origin refused", origin=origin, preflight=False)
            if policy.refuse:
                return LocalReply(403, "origin not allowed\n", [("content-type", "text/plain; charset=utf-8"),
                                                                ("vary", "Origin")])
            ctx.state(self).append(("vary", "Origin"))
            return CONTINUE
        state = ctx.state(self)
        state.append(("access-control-allow-origin", allowed))
        if allowed != "*" or policy.exact or policy.patterns:
            state.append(("vary", "Origin"))
        state.extend(policy.actual)
        return CONTINUE

    async def on_response_headers(self, ctx, response):
        state = ctx.state(self)
        if not state:
            return CONTINUE
        headers = response.headers
        owned = [n for n, _ in headers.raw() if n.startswith(b"access-control-")]
        if owned:
            headers.remove(*owned)
        for name, value in state:
            if name != "vary" or not _varies_by_origin(headers):
                headers.add(name, value)
        return CONTINUE


def _varies_by_origin(headers: Any) -> bool:
    return any(b"origin" in (t.strip() for t in v.lower().split(b",")) for n, v in headers.raw() if n == b"vary")


@hookimpl
def sluice_filters():
    return [Cors]
