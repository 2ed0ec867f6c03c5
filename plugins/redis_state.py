"""``sluice.shared`` on Redis: token buckets and counters held across sluice instances.

Why: ``sluice.shared.local()`` is shared by the workers of one instance; a limit that must
hold across a fleet needs a store every instance reaches. This is the same ``SharedState``
protocol (``take``, ``hit``, ``incr``) on Redis, opened by ``sluice.shared.open_backend`` for
a ``[shared]`` table with ``backend = "redis"`` (entry point ``redis`` in group
``sluice.shared``): the config file's, which the app opens once per worker (``app.shared``).

The client is coredis (6.x). It is built on anyio, so it runs on trio as it is (checked:
connection pool, ``EVALSHA`` with its own ``NOSCRIPT`` fallback to ``SCRIPT LOAD``, and
cancellation by a trio cancel scope, after which a connection's answers stay matched to
their requests); redis-py's async client is asyncio only. Its cost is mostly its own: a
``take`` is 150-230 us on loopback where a bare RESP round trip on a trio socket is ~27 us
(``benchmarks/shared_cost.py --backend redis``; ``benchmarks/RESULTS.md``).

The algorithms run in Redis, one script and one round trip per call, so that every
instance sees one state whatever the interleaving:

- ``take``: the local backend's token bucket, kept in a hash (level, last refill) and
  refilled lazily from the server's ``TIME`` (one clock for the fleet); the key expires
  once it would be full again, so idle clients cost no memory;
- ``incr``: ``INCRBY``; with ``window``, a counter that expires ``window`` seconds after its
  first count (a fixed window starting at the first hit; the local one aligns to its clock).

Redis down. Every call is bounded by ``timeout`` (default 250 ms). A same-zone Redis answers
in well under 1 ms, but the timeout runs on the worker's loop, and it must cover that loop at
its peak: the client costs ~0.15 ms of CPU per call, so a loop with 10 takes in flight answers
them in 1-2 ms (p50) and 5-7 ms (p99), and a saturated one reads answers 100 ms and more
late, which counts as an outage. Measured (``tests/test_rate_limit_fleet.py``'s two instances
hammered on 2 cores, 130 requests due): a 10 ms timeout saw 21 such outages in 3 s and,
failing open, admitted 612; 100 ms, 3-4 outages and 236-299; 250 ms, none and 129-130. An
outage that is one fails fast anyway (a killed Redis refuses connections at once); the
timeout is what a request pays when Redis hangs, once per backoff. A failed call marks the backend down: it
is logged once as ``shared backend down`` and counted
(``sluice_plugin_shared_backend_outages_total``); until the backoff (``backoff_min``
doubling to ``backoff_max``, with jitter) ends, calls answer at once without Redis, as
``on_error`` says: ``open`` grants every take (and a count starts
again at ``n``), ``closed`` refuses every take (and a count is as high as it can be). Each
such answer is counted (``sluice_plugin_shared_backend_unavailable_total``). After the
backoff one call tries Redis (the others keep answering at once); its success logs ``shared
backend up`` with how long it was down.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
import coredis
import coredis.exceptions
import structlog
import trio
from coredis.retry import NoRetryPolicy
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from sluice import metrics
from sluice.addresses import parse_hostport
from sluice.control.config import HostPort, format_errors
from sluice.errors import ConfigError
from sluice.secrets import Secret

__all__ = ["RedisConfig", "RedisState", "open_redis"]

log = structlog.get_logger("sluice.shared")

# KEYS[1] the bucket; ARGV tokens, rate, burst. Returns {allowed, level after} (the level as
# a string: Redis truncates a Lua number to an integer).
_TAKE = """
local tokens, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'l', 't')
local level = burst
if s[1] then
  level = math.min(burst, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate)
end
local allowed = 0
if level >= tokens then
  level = level - tokens
  allowed = 1
end
redis.call('HSET', KEYS[1], 'l', string.format('%.17g', level), 't', string.format('%.17g', now))
if rate > 0 then
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - level) / rate * 1000) + 1000)
end
return {allowed, string.format('%.17g', level)}
"""

# KEYS[1] the counter; ARGV n, window in ms. A window starts at the key's first count.
_WINDOW = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"""

# What a lost, refused, closed or silent connection raises (coredis's own, and anyio's beneath it).
_FAILURES = (coredis.exceptions.RedisError, OSError, trio.TooSlowError, anyio.BrokenResourceError,
             anyio.ClosedResourceError, anyio.EndOfStream)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout * 1000:g} ms"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class RedisConfig(BaseModel):
    """The ``[shared]`` table's settings for ``backend = "redis"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: HostPort = "127.0.0.1:6379"
    db: Annotated[int, Field(ge=0)] = 0
    prefix: str = "sluice:"
    timeout: PositiveFloat = 0.250
    on_error: Literal["open", "closed"] = "open"
    backoff_min: PositiveFloat = 0.1
    backoff_max: PositiveFloat = 5.0
    max_connections: PositiveInt = 8
    # AUTH: the password from this environment variable, or `password` (a Secret: inline,
    # { env = "NAME" } or { file = "/run/secrets/redis" }), which wins when both are given.
    username: str | None = None
    password_env: Annotated[str, Field(min_length=1)] | None = None
    password: Secret | None = None

    @field_validator("password_env")
    @classmethod
    def _password_set(cls, name: str | None) -> str | None:
        if name is not None and name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return name


class RedisState:
    """``SharedState`` on Redis; use inside ``async with`` (it holds coredis's connection pool)."""

    def __init__(self, config: RedisConfig | None = None) -> None:
        self.config = config = config or RedisConfig()
        host, port = parse_hostport(config.address)
        self._client = coredis.Redis(
            host, port, config.db, stream_timeout=config.timeout, connect_timeout=config.timeout,
            max_connections=config.max_connections, retry_policy=NoRetryPolicy(), client_name="sluice",
            username=config.username,
            password=config.password or (os.environ[config.password_env] if config.password_env else None),
        )
        self._take = self._client.register_script(_TAKE)
        self._window = self._client.register_script(_WINDOW)
        self._prefix = config.prefix
        self._open = config.on_error == "open"
        self._down_since: float | None = None  # monotonic time of the outage's first failure
        self._retry_at = 0.0  # while down: when one call may try Redis again
        self._backoff = config.backoff_min
        self._probing = False
        self._outages = metrics.counter("shared_backend_outages", "Times the shared state's backend went down",
                                        ("backend",)).labels("redis")
        self._unavailable = metrics.counter(
            "shared_backend_unavailable", "Shared-state calls answered by on_error while the backend was down",
            ("backend", "on_error")).labels("redis", config.on_error)

    async def __aenter__(self) -> RedisState:
        await self._client.__aenter__()
        await self._warm()
        return self

    async def _warm(self, within: float = 1.0) -> None:
        """Connect and load the scripts now, with a startup's patience: else the first call
        pays a connect, a NOSCRIPT and a SCRIPT LOAD within ``timeout``, which a busy
        machine misses, and a worker's first requests would meet an outage that is not one.
        Redis away at start: nothing here; the first call finds it so, and logs it."""
        with trio.move_on_after(max(within, self.config.timeout)):
            try:
                for script in (_TAKE, _WINDOW):
                    await self._client.script_load(script)
            except _FAILURES:
                pass

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.__aexit__(*exc)

    @property
    def down(self) -> bool:
        return self._down_since is not None

    async def _call(self, request: Callable[[], Awaitable[Any]]) -> Any:
        """``request()``'s answer, or None when Redis is down or fails within ``timeout``."""
        probe = self._down_since is not None
        if probe and (self._probing or time.monotonic() < self._retry_at):
            self._unavailable.inc()
            # a checkpoint all the same: a task taking in a loop would otherwise starve the probe
            await trio.lowlevel.checkpoint()
            return None
        self._probing = probe
        try:
            with trio.fail_after(self.config.timeout):
                answer = await request()
        except _FAILURES as exc:
            self._failed(exc, probe)
            self._unavailable.inc()
            return None
        finally:
            self._probing = False
        if self._down_since is not None:
            log.info("shared backend up", backend="redis", address=self.config.address,
                     down_for=round(time.monotonic() - self._down_since, 3))
            self._down_since, self._backoff = None, self.config.backoff_min
        return answer

    def _failed(self, exc: BaseException, probe: bool) -> None:
        """Start an outage, or after a failed probe wait twice as long; calls in flight when it
        began add nothing."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._outages.inc()
            log.warning("shared backend down", backend="redis", address=self.config.address,
                        on_error=self.config.on_error, error=_describe(exc, self.config.timeout))
        elif probe:
            self._backoff = min(self._backoff * 2, self.config.backoff_max)
        else:
            return
        self._retry_at = now + self._backoff * random.uniform(0.8, 1.2)

    async def try_take(self, key: str, tokens: float, rate: float, burst: float) -> tuple[bool, float] | None:
        """``take``'s answer from Redis, or None when Redis could not give one (down, or failed
        within ``timeout``): for a caller with an ``on_error`` of its own (the rate_limit filter)."""
        answer = await self._call(lambda: self._take([self._prefix + "b:" + key], [tokens, rate, burst]))
        if answer is None:
            return None
        if answer[0]:
            return True, 0.0
        level = float(answer[1])
        return False, (tokens - level) / rate if rate > 0 and tokens <= burst else math.inf

    async def take(self, key: str, tokens: float, rate: float, burst: float) -> tuple[bool, float]:
        """Take ``tokens`` from key's bucket if it holds them; else (False, seconds until it will)."""
        answer = await self.try_take(key, tokens, rate, burst)
        if answer is None:
            if self._open:
                return True, 0.0
            return False, max(self._retry_at - time.monotonic(), self.config.backoff_min)
        return answer

    async def hit(self, key: str, rate: float, burst: float, cost: float = 1) -> bool:
        return (await self.take(key, cost, rate, burst))[0]

    async def incr(self, key: str, n: int = 1, window: float | None = None) -> int:
        """Add n to key's counter and return it; with ``window``, a counter per window of seconds."""
        if window:
            ms = max(1, math.ceil(window * 1000))
            answer = await self._call(lambda: self._window([self._prefix + "w:" + key], [n, ms]))
        else:
            answer = await self._call(lambda: self._client.incrby(self._prefix + "c:" + key, n))
        if answer is None:
            return n if self._open else sys.maxsize
        return int(answer)


def open_redis(settings: Mapping[str, Any]) -> AbstractAsyncContextManager[RedisState]:
    """The ``sluice.shared`` backend factory: validates ``[shared]``'s settings (key paths
    ``shared.*``) when called, so an app's build (and ``sluice check``) refuses a bad table;
    the client is made when the context is entered, in the worker that uses it."""
    try:
        config = RedisConfig.model_validate(dict(settings))
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, prefix="shared")) from None
    return _opened(config)


@asynccontextmanager
async def _opened(config: RedisConfig) -> AsyncIterator[RedisState]:
    async with RedisState(config) as state:
        yield state
