"""sluice-token-bucket: a local rate limiter on the workers' shared token buckets.

Each request takes one token from a bucket named by its key (the client's
address, a header, or the route) in ``sluice.shared.local()``, the table
every ``--workers`` process maps: the limit is the instance's, not each
worker's. A request that finds its bucket empty gets 429 with
``Retry-After`` (whole seconds, rounded up) and is never forwarded.

Responses carry ``RateLimit-Policy`` and ``RateLimit-Limit`` (the burst);
a 429 also carries ``RateLimit-Remaining: 0`` and ``RateLimit-Reset``
(draft-ietf-httpapi-ratelimit-headers). The shared table answers "allowed
or not, and when", not how many tokens are left, so an allowed response
does not claim a ``RateLimit-Remaining`` it does not know.

A route overrides ``rate``, ``burst`` or ``key`` with
``filters = { token_bucket = { rate = 1.0 } }`` (or opts out with
``disabled = true``); a route with its own settings has buckets of its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from sluice import CONTINUE, Filter, FilterConfig, LocalReply, hookimpl
from sluice.shared import local

__all__ = ["TokenBucket"]

# "client_ip" | "route" | "header:NAME"
_KEY = r"^(client_ip|route|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$"
Key = Annotated[str, Field(pattern=_KEY)]
Rate = Annotated[float, Field(gt=0)]
Burst = Annotated[float, Field(ge=1)]


@dataclass(frozen=True, slots=True)
class _Limit:
    """One limit as a request meets it: its buckets' key prefix, rate, burst, key and headers."""

    prefix: str
    rate: float
    burst: float
    key: str
    headers: list[tuple[str, str]]


class TokenBucket(Filter):
    """Answers 429 past ``rate`` requests per second (``burst`` at once) per key, across every worker."""

    name = "token_bucket"
    before = ("router",)  # refuse before the router spends anything on the request

    class Config(FilterConfig):
        rate: Rate = 10.0  # tokens added per second
        burst: Burst = 20.0  # bucket size: requests allowed at once after a quiet spell
        key: Key = "client_ip"  # what a bucket is per: client_ip, route, or header:NAME
        # A request without the key's header: limited by its client address instead
        # (the default), or refused outright with 400.
        missing_header: Annotated[str, Field(pattern=r"^(client_ip|reject)$")] = "client_ip"
        headers: bool = True  # send the RateLimit-* headers
        worker_header: bool = False  # debug: x-sluice-worker: the serving process's pid

    class RouteConfig(FilterConfig):
        rate: Rate | None = None
        burst: Burst | None = None
        key: Key | None = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._state = local()
        self._default = self._limit("*", config.rate, config.burst, config.key)
        self._routes: dict[int, _Limit] = {}  # id(route) -> its limit, built on first use

    def _limit(self, scope: str, rate: float, burst: float, key: str) -> _Limit:
        headers = []
        if self.config.headers:
            window = max(1, round(burst / rate))
            headers += [("ratelimit-limit", f"{burst:g}"), ("ratelimit-policy", f"{burst:g};w={window}")]
        return _Limit(f"token_bucket|{scope}|", rate, burst, key, headers)

    def _route_limit(self, ctx) -> _Limit:
        """This request's route's limit: its own settings, or the filter's."""
        route = ctx.route
        if route is None:
            return self._default
        found = self._routes.get(id(route))
        if found is None:
            data = {k: v for k, v in route.filter_settings(self.name).items() if k != "disabled"}
            own = self.RouteConfig.model_validate(data)  # checked at load already: cannot fail here
            c = self.config
            found = self._limit(f"route={route.name}", own.rate or c.rate, own.burst or c.burst,
                                own.key or c.key) if data else self._default
            if len(self._routes) > 4096:  # routes of replaced configs: forget them
                self._routes.clear()
            self._routes[id(route)] = found
        return found

    def _key(self, ctx, request, key: str) -> str | None:
        if key == "client_ip":
            return f"ip={ctx.client_ip}"
        if key == "route":
            return f"route={ctx.route.name if ctx.route is not None else '-'}"
        value = request.headers.get_raw(key[7:].lower().encode("latin-1"))
        if value is None:
            return None if self.config.missing_header == "reject" else f"ip={ctx.client_ip}"
        return f"{key}={value.decode('latin-1')}"

    async def on_request_headers(self, ctx, request):
        limit = self._route_limit(ctx)
        value = self._key(ctx, request, limit.key)
        if value is None:
            self.log(ctx).info("rate limit key missing", key=limit.key)
            return LocalReply(400, f"missing {limit.key[7:]} header\n")
        allowed, retry_after = await self._state.take(limit.prefix + value, 1, limit.rate, limit.burst)
        if allowed:
            return CONTINUE
        wait = math.ceil(retry_after)
        # The key's kind, not its value: a header key may be a credential (x-api-key).
        self.log(ctx).info("rate limited", key=limit.key, client_ip=ctx.client_ip, rate=limit.rate,
                           burst=limit.burst, retry_after=wait)
        headers = [("retry-after", str(wait)), *limit.headers, *self._worker()]
        if self.config.headers:
            headers += [("ratelimit-remaining", "0"), ("ratelimit-reset", str(wait))]
        return LocalReply(429, "too many requests\n", headers, flag="TB")

    async def on_response_headers(self, ctx, response):
        for name, value in self._route_limit(ctx).headers:  # (the route is resolved: a dict look-up)
            response.headers.set(name, value)
        for name, value in self._worker():
            response.headers.set(name, value)
        return CONTINUE

    def _worker(self) -> list[tuple[str, str]]:
        """The debug header naming this process (asked for when it answers: the filter is built before fork)."""
        return [("x-sluice-worker", str(os.getpid()))] if self.config.worker_header else []


@hookimpl
def sluice_filters():
    return [TokenBucket]
