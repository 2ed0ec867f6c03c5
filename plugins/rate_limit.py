"""Token-bucket rate limits per client, header, route, JWT claim or API key; local or on Redis.

Limits hold for one instance (``mode = "local"``) or across a fleet (``mode = "global"``, the
``[shared]`` backend: Redis).

Why a built-in: a limit must be the same whatever ``--workers`` is and, for a fleet, whatever
instance a request lands on. Both are ``sluice.shared``'s ``SharedState``: ``local()`` is the
table every worker of the instance maps; ``global`` takes the backend the app opened from its
``[shared]`` table (``sluice.plugins.redis_state``: one Lua token bucket per key, atomic in
Redis, on Redis's clock). The filter only names buckets and answers.

Each request takes one token from the bucket of every limit whose key it has, in the order
written; the first empty bucket answers 429 (flag ``RL``) with ``Retry-After`` (whole seconds,
rounded up) and the ``RateLimit-Policy`` / ``RateLimit`` fields of
draft-ietf-httpapi-ratelimit-headers-10 (structured fields: ``"name";q=BURST;w=SECONDS`` and
``"name";r=0;t=SECONDS``; ``w`` is how long an empty bucket takes to fill). Tokens already
taken from earlier limits stay taken, as in Envoy. A limit whose key the request lacks (no
such header, no JWT or API key ran before) does not apply to it: a chain that must limit
anonymous callers too adds a ``client_ip`` limit (counted ``skipped``).

Global mode, the store unreachable: ``on_error = "open"`` admits (a limit is a protection, and
an outage of Redis should not become one of the API), ``"closed"`` answers 503 with
``Retry-After: 1`` (the store is what failed, not the client, so not 429). The backend bounds
each call by its ``timeout`` (250 ms by default: why in ``redis_state``) and then skips Redis during its backoff, so an
outage costs one request that timeout and the rest nothing. Each decision is counted
(``sluice_plugin_rate_limit_decisions_total{filter, outcome}``: allowed, limited, skipped,
error_open, error_closed), and an outage is logged once per worker: ``rate limit store lost``
then ``rate limit store back`` (with ``down_for``).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import structlog
from pydantic import AfterValidator, Field

from sluice import CONTINUE, Filter, FilterConfig, LocalReply, hookimpl, metrics
from sluice.errors import ConfigError
from sluice.shared import local

from .per_route import PerRoute

__all__ = ["RateLimit"]

log = structlog.get_logger("sluice.plugins.rate_limit")

# client_ip | route | api_key | header:NAME | jwt_claim:NAME
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
KeyPart = Annotated[str, Field(pattern=rf"^(client_ip|route|api_key|header:{_TOKEN}|jwt_claim:[^\s]+)$")]
_PER = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_LONG_KEY = 200  # a bucket key longer than this is hashed (a header value can be long)


class LimitSettings(FilterConfig):
    """One limit: ``rate`` tokens per ``per``, up to ``burst`` at once, per value of ``key``."""

    # quoted in the RateLimit fields, and part of its buckets' names: short, plain, no '"' nor '|'
    name: Annotated[str, Field(pattern=r"^[a-z*][a-z0-9_\-.*]{0,63}$")] = "default"
    key: KeyPart | Annotated[list[KeyPart], Field(min_length=1, max_length=4)] = "client_ip"
    rate: Annotated[float, Field(gt=0)]
    per: Literal["second", "minute", "hour"] = "second"
    burst: Annotated[float, Field(ge=1)] | None = None  # default: one period's tokens (rate, at least 1)

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)


def _distinct(limits: list[LimitSettings]) -> list[LimitSettings]:
    """Names tell limits apart in the RateLimit fields and in their buckets: one each."""
    names = [limit.name for limit in limits]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"two limits named {name!r} ([{names.index(name)}] and [{i}]): give each its own name")
    return limits


Limits = Annotated[list[LimitSettings], Field(min_length=1, max_length=16), AfterValidator(_distinct)]


class Settings(FilterConfig):
    limits: Limits
    mode: Literal["local", "global"] = "local"  # global: the [shared] backend (Redis)
    on_error: Literal["open", "closed"] = "open"  # global, store unreachable: admit, or 503
    headers: Literal["limited", "all", "none"] = "limited"  # which answers carry the RateLimit fields


class RouteSettings(FilterConfig):
    """A route's own limits (they replace the filter's, with buckets of the route's own)."""

    limits: Limits | None = None


@dataclass(frozen=True, slots=True)
class _Limit:
    """One limit as a request meets it: its buckets' prefix, tokens/s, burst, key parts, fields."""

    prefix: str
    name: str
    rate: float
    burst: float
    parts: tuple[str, ...]
    policy: str  # this limit's RateLimit-Policy list member


@dataclass(frozen=True, slots=True)
class _Set:
    limits: tuple[_Limit, ...]
    policy: str  # the RateLimit-Policy field: every limit of the set


def _limits(scope: str, settings: list[LimitSettings]) -> _Set:
    built = []
    for s in settings:
        rate = s.rate / _PER[s.per]
        burst = s.burst if s.burst is not None else max(1.0, s.rate)
        window = max(1, math.ceil(burst / rate))  # seconds an empty bucket takes to fill
        built.append(_Limit(f"rate_limit|{scope}|{s.name}|", s.name, rate, burst, s.parts,
                            f'"{s.name}";q={math.floor(burst)};w={window}'))
    return _Set(tuple(built), ", ".join(limit.policy for limit in built))


def _decisions() -> Any:
    return metrics.counter("rate_limit_decisions", "Requests decided by a rate_limit filter, by outcome "
                           "(allowed, limited, skipped: no key, error_open / error_closed: store unreachable)",
                           ("filter", "outcome"))


class RateLimit(Filter):
    """Answers 429 past a limit's rate per client, header, route, JWT claim or API key; local or on Redis."""

    name = "rate_limit"
    before = ("router",)  # refuse before the router spends anything on the request
    Config = Settings
    RouteConfig = RouteSettings

    def __init__(self, config: Settings, app: Any = None) -> None:
        super().__init__(config)
        self._app = app
        self._global = config.mode == "global"
        self._state = None if self._global else local()  # global: the app's backend, at open()
        self._default = _limits("*", config.limits)
        # a route's own limits: buckets named by the route (its key path holds its name)
        self._routes = PerRoute(self.name, self._default, self._route_limits)
        self._open_on_error = config.on_error == "open"
        self._down_since: float | None = None  # this worker's view of the store: lost since
        counter = _decisions()
        self._count = {o: counter.labels(self.name, o)
                       for o in ("allowed", "limited", "skipped", "error_open", "error_closed")}

    @classmethod
    def from_config(cls, config: Settings, app: Any) -> RateLimit:
        if config.mode == "global":
            shared = getattr(getattr(app, "config", None), "shared", None) or {}
            if shared.get("backend", "local") == "local":
                raise ConfigError(f"filters.{cls.name}.mode: global needs a [shared] table naming a backend "
                                  'the instances share (backend = "redis")')
        return cls(config, app)

    async def open(self, nursery: Any) -> None:
        if self._global:
            self._state = getattr(self._app, "shared", None)

    def _route_limits(self, own: dict[str, Any], where: str) -> _Set:
        limits = RouteSettings.model_validate(own).limits  # checked at load already: cannot fail here
        return _limits(where, limits) if limits else self._default

    def _set(self, ctx) -> _Set:
        """This request's route's limits: its own, or the filter's."""
        return self._routes.get(ctx)

    @staticmethod
    def _value(ctx, request, part: str) -> str | None:
        if part == "client_ip":
            return ctx.client_ip
        if part == "route":
            return ctx.route.name if ctx.route is not None else None
        if part == "api_key":
            return ctx.vars.get("auth.user") if ctx.vars.get("auth.method") == "api_key" else None
        kind, _, name = part.partition(":")
        if kind == "header":
            raw = request.headers.get_raw(name.lower().encode("latin-1"))
            return raw.decode("latin-1") if raw is not None else None
        claims = ctx.vars.get("jwt.claims")
        value = claims.get(name) if isinstance(claims, dict) else None
        return None if value is None or isinstance(value, dict | list) else str(value)

    def _key(self, ctx, request, limit: _Limit) -> str | None:
        values = []
        for part in limit.parts:
            value = self._value(ctx, request, part)
            if value is None:
                return None
            values.append(value)
        key = limit.prefix + "|".join(values)
        if len(key) > _LONG_KEY:
            key = limit.prefix + "#" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return key

    async def _take(self, key: str, limit: _Limit) -> tuple[bool, float] | None:
        """The bucket's answer, or None when the store could not give one."""
        state = self._state
        if state is None:
            return None
        try_take = getattr(state, "try_take", None)  # a backend that can say "unreachable" (redis_state)
        answer = await (try_take or state.take)(key, 1, limit.rate, limit.burst)
        if self._global:
            self._store(answer is not None)
        return answer

    def _store(self, up: bool) -> None:
        """Log the store's loss and return once per outage (per worker), not per request."""
        if up and self._down_since is not None:
            log.info("rate limit store back", filter=self.name, down_for=round(time.monotonic() - self._down_since, 3))
            self._down_since = None
        elif not up and self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("rate limit store lost", filter=self.name, on_error=self.config.on_error)

    async def on_request_headers(self, ctx, request):
        limits = self._set(ctx)
        applied = False
        for limit in limits.limits:
            key = self._key(ctx, request, limit)
            if key is None:
                continue
            applied = True
            answer = await self._take(key, limit)
            if answer is None:
                if self._open_on_error:
                    self._count["error_open"].inc()
                    return CONTINUE
                self._count["error_closed"].inc()
                return LocalReply(503, "rate limit unavailable\n", [("retry-after", "1")], flag="RL")
            allowed, retry_after = answer
            if not allowed:
                return self._limited(ctx, limits, limit, retry_after)
        self._count["allowed" if applied else "skipped"].inc()
        return CONTINUE

    def _limited(self, ctx, limits: _Set, limit: _Limit, retry_after: float) -> LocalReply:
        self._count["limited"].inc()
        wait = max(1, math.ceil(retry_after)) if math.isfinite(retry_after) else math.ceil(limit.burst / limit.rate)
        # The key's kind, not its value: a header or claim may be a credential.
        self.log(ctx).info("rate limited", limit=limit.name, key="+".join(limit.parts), client_ip=ctx.client_ip,
                           retry_after=wait)
        headers = [("retry-after", str(wait))]
        if self.config.headers != "none":
            headers += [("ratelimit-policy", limits.policy), ("ratelimit", f'"{limit.name}";r=0;t={wait}')]
        return LocalReply(429, "too many requests\n", headers, flag="RL")

    async def on_response_headers(self, ctx, response):
        if self.config.headers == "all" and response.status != 429:
            # The policy only: SharedState answers "allowed or when", not how many tokens are left.
            response.headers.set("ratelimit-policy", self._set(ctx).policy)
        return CONTINUE


@hookimpl
def sluice_filters():
    return [RateLimit]
