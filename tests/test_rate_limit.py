"""The built-in rate_limit filter (issue 11, item 4), one process: keys, routes, answers, settings.

The buckets live in ``sluice.shared.local()``, one table per process that outlives a test, so
each test names its limits uniquely (``fresh()``): no test starts with another's tokens spent.
The fleet (workers, instances on Redis, Redis killed) is ``test_rate_limit_fleet.py``.
"""

# ruff: noqa: F811 (the fixtures imported below are test parameters by the same names)

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from sluice import ConfigError
from sluice.plugins.rate_limit import RateLimit
from sluice.plugins.redis_state import open_redis
from sluice.shared import register_backend
from sluice.testing import build_filter, contract, run_filter

from .servers.redis import redis_prefix, redis_server, start_redis  # noqa: F401 (fixtures)

CHAIN = ["rate_limit", "router"]


def fresh() -> str:
    return "t" + uuid.uuid4().hex[:12]


class WithIdentity(RateLimit):
    """rate_limit after a filter that set who the caller is (as api_key or jwt would)."""

    identity: dict = {}

    async def on_request_headers(self, ctx, request):
        ctx.vars.update(self.identity)
        return await super().on_request_headers(ctx, request)


async def statuses(limiter, n: int, headers=(), target="/") -> list[int]:
    out = []
    for _ in range(n):
        run = await run_filter(limiter, request=("GET", target, [("host", "a"), *headers]))
        out.append(run.local_reply.status if run.local_reply else 200)
    return out


async def test_a_burst_passes_then_429_with_retry_after_and_the_draft_fields():
    name = fresh()
    limiter = build_filter(RateLimit, {"limits": [{"name": name, "rate": 30, "per": "minute", "burst": 2}]})
    runs = [await run_filter(limiter, request=("GET", "/", [("host", "a")])) for _ in range(3)]
    assert [r.local_reply is None for r in runs] == [True, True, False]
    refused = runs[2]
    assert refused.local_reply.status == 429 and refused.ctx.flags == ["RL"]
    headers = dict(refused.local_reply.headers)
    assert headers["retry-after"] == "2"  # one token at 0.5/s: 2 s, an integer
    # draft-ietf-httpapi-ratelimit-headers-10: q = the burst, w = seconds to fill it; r = 0 left, t = reset
    assert headers["ratelimit-policy"] == f'"{name}";q=2;w=4'
    assert headers["ratelimit"] == f'"{name}";r=0;t=2'
    assert "ratelimit-policy" not in runs[0].response.headers  # headers = "limited": on 429s only
    assert any(e.get("event") == "rate limited" and e.get("limit") == name and e.get("key") == "client_ip"
               for e in refused.log)


async def test_retry_after_rounds_up_and_is_at_least_one_second():
    limiter = build_filter(RateLimit, {"limits": [{"name": fresh(), "rate": 0.4, "burst": 1}]})
    first, second = [await run_filter(limiter) for _ in range(2)]
    assert first.local_reply is None
    assert dict(second.local_reply.headers)["retry-after"] == "3"  # 2.5 s: 3
    fast = build_filter(RateLimit, {"limits": [{"name": fresh(), "rate": 100, "burst": 1}]})
    await run_filter(fast)
    assert dict((await run_filter(fast)).local_reply.headers)["retry-after"] == "1"  # 10 ms: 1, never 0


async def test_headers_all_puts_the_policy_on_allowed_answers():
    name = fresh()
    limiter = build_filter(RateLimit, {"headers": "all", "limits": [
        {"name": name, "rate": 10, "burst": 20}, {"name": "b", "key": "route", "rate": 1, "per": "hour"}]})
    run = await run_filter(limiter)
    assert run.response.headers.get("ratelimit-policy") == f'"{name}";q=20;w=2, "b";q=1;w=3600'
    none = build_filter(RateLimit, {"headers": "none", "limits": [{"name": fresh(), "rate": 1, "burst": 1}]})
    await run_filter(none)
    refused = await run_filter(none)
    assert {k for k, _ in refused.local_reply.headers} == {"retry-after"}


async def test_a_header_key_gives_each_value_its_bucket_and_a_request_without_it_is_not_limited():
    limiter = build_filter(RateLimit, {"limits": [{"name": fresh(), "key": "header:x-user", "rate": 1, "burst": 1}]})
    ann, bob = [("x-user", fresh())], [("x-user", fresh())]
    assert await statuses(limiter, 2, ann) == [200, 429]
    assert await statuses(limiter, 1, bob) == [200]
    assert await statuses(limiter, 3) == [200, 200, 200]  # no x-user: the limit does not apply


async def test_a_long_header_value_is_hashed_into_its_bucket_name_and_still_counted_apart():
    limiter = build_filter(RateLimit, {"limits": [{"name": fresh(), "key": "header:x-token", "rate": 1, "burst": 1}]})
    long_a, long_b = "a" * 8000 + "\xff", "a" * 8000 + "b"
    assert await statuses(limiter, 2, [("x-token", long_a)]) == [200, 429]
    assert await statuses(limiter, 2, [("x-token", long_b)]) == [200, 429]  # differs in its last byte


async def test_a_combined_key_counts_per_pair():
    limiter = build_filter(RateLimit, {"limits": [
        {"name": fresh(), "key": ["client_ip", "header:x-tenant"], "rate": 1, "burst": 1}]})
    assert await statuses(limiter, 2, [("x-tenant", "a")]) == [200, 429]
    assert await statuses(limiter, 2, [("x-tenant", "b")]) == [200, 429]


async def test_an_api_key_name_is_a_key_only_when_api_key_passed_the_caller():
    settings = {"limits": [{"name": fresh(), "key": "api_key", "rate": 1, "burst": 1}]}
    limiter = build_filter(WithIdentity, settings)
    limiter.identity = {"auth.user": "mobile", "auth.method": "api_key"}
    assert await statuses(limiter, 2) == [200, 429]
    basic = build_filter(WithIdentity, settings)
    basic.identity = {"auth.user": "mobile", "auth.method": "basic"}  # a basic-auth user is not an API key
    assert await statuses(basic, 3) == [200, 200, 200]


async def test_a_jwt_claim_is_a_key_and_no_claims_skips_the_limit():
    settings = {"limits": [{"name": fresh(), "key": "jwt_claim:tenant", "rate": 1, "burst": 1}]}
    acme = build_filter(WithIdentity, settings)
    acme.identity = {"jwt.claims": {"sub": "u1", "tenant": "acme"}}
    assert await statuses(acme, 2) == [200, 429]
    other = build_filter(WithIdentity, settings)
    other.identity = {"jwt.claims": {"sub": "u2", "tenant": "globex"}}
    assert await statuses(other, 1) == [200]
    anonymous = build_filter(RateLimit, settings)  # no jwt ran: skipped, and counted so
    runs = [await run_filter(anonymous) for _ in range(3)]
    assert all(r.local_reply is None for r in runs)


async def test_a_route_overrides_the_limits_with_buckets_of_its_own_and_route_is_a_key(sluice_proxy):
    name = fresh()
    proxy = await sluice_proxy(filters=CHAIN, config={
        "routes": [
            {"name": "login", "match": {"prefix": "/login"}, "cluster": "origin",
             "filters": {"rate_limit": {"limits": [{"name": name, "rate": 1, "per": "minute", "burst": 1}]}}},
            {"name": "open", "match": {"prefix": "/open"}, "cluster": "origin",
             "filters": {"rate_limit": {"disabled": True}}},
            {"name": "rest", "match": {"prefix": "/"}, "cluster": "origin"},
        ],
        "filters": {"rate_limit": {"limits": [{"name": name, "key": "route", "rate": 1, "burst": 3}]}}})
    got = [(await proxy.client.get(path)).status_code for path in ["/login"] * 2 + ["/a", "/b", "/c", "/d"]]
    assert got == [200, 429, 200, 200, 200, 429]  # login: its own bucket of 1; the rest: one per route, 3
    answer = await proxy.client.get("/login")
    assert answer.headers["ratelimit-policy"] == f'"{name}";q=1;w=60'
    assert [(await proxy.client.get("/open")).status_code for _ in range(5)] == [200] * 5


async def test_global_mode_takes_from_the_apps_shared_backend(sluice_proxy, redis_server, redis_prefix):
    """[shared] is opened by the app for the worker's life; the buckets are in Redis."""
    import coredis

    name = fresh()
    proxy = await sluice_proxy(filters=CHAIN, config={
        "shared": {"backend": "redis", "address": redis_server.address, "prefix": redis_prefix},
        "filters": {"rate_limit": {"mode": "global", "limits": [{"name": name, "rate": 1, "per": "minute",
                                                                  "burst": 2}]}}})
    assert [(await proxy.client.get("/")).status_code for _ in range(3)] == [200, 200, 429]
    host, port = redis_server.address.split(":")
    async with coredis.Redis(host, int(port)) as redis:
        keys = await redis.keys(f"{redis_prefix}*")
    assert [k.decode() if isinstance(k, bytes) else k for k in keys] == [
        f"{redis_prefix}b:rate_limit|*|{name}|127.0.0.1"]


async def test_a_reload_keeps_the_open_backend_and_new_limits_take_from_it(origin, redis_server, redis_prefix):
    """The reloaded filter is opened on the running app's [shared] backend (no second pool); a
    change to [shared] itself is refused a hot swap: it needs a restart, and says so."""
    from structlog.testing import capture_logs

    from sluice.control.config import parse
    from sluice.control.reload import reload
    from sluice.testing import serve

    name = fresh()  # the limit after the reload

    def config(name: str, burst: int, prefix: str) -> dict:
        return {"listeners": [{"address": "127.0.0.1:0", "filters": CHAIN}],
                "clusters": {"origin": {"endpoints": [origin.address]}},
                "routes": [{"match": {"prefix": "/"}, "cluster": "origin"}],
                "shared": {"backend": "redis", "address": redis_server.address, "prefix": prefix, "timeout": 1.0},
                "filters": {"rate_limit": {"mode": "global", "limits": [
                    {"name": name, "rate": 1, "per": "minute", "burst": burst}]}}}

    async with serve(config(fresh(), 1, redis_prefix)) as proxy:
        import httpx

        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert [(await client.get("/")).status_code for _ in range(2)] == [200, 429]
            backend = proxy.app.shared
            with capture_logs() as logs:
                proxy.app.reload_source = lambda: parse(config(name, 2, redis_prefix + "other:"))
                assert await reload(proxy.app)
            assert proxy.app.shared is backend
            assert any(e["event"] == "reload: [shared] needs a restart and keeps its old value" for e in logs)
            # the new filter's limit, on the kept backend (the old prefix): a burst of 2, then 429
            assert [(await client.get("/")).status_code for _ in range(3)] == [200, 200, 429]
        import coredis

        host, port = redis_server.address.split(":")
        async with coredis.Redis(host, int(port)) as redis:
            assert await redis.exists([f"{redis_prefix}b:rate_limit|*|{name}|127.0.0.1"]) == 1


@pytest.mark.parametrize(("on_error", "status"), [("open", None), ("closed", 503)])
async def test_a_store_that_refuses_connections_is_on_error_with_its_flag_and_log(on_error, status):
    """A real RedisState on a loopback port nobody listens on: every take is 'unreachable'."""
    from sluice.shared import open_backend

    from .servers import free_port

    shared = {"backend": "redis", "address": f"127.0.0.1:{free_port()}", "timeout": 1.0}
    app = {"listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}], "shared": shared,
           "clusters": {"origin": {"endpoints": ["127.0.0.1:9"]}},
           "routes": [{"match": {"prefix": "/"}, "cluster": "origin"}]}
    limiter = build_filter(RateLimit, {"mode": "global", "on_error": on_error,
                                       "limits": [{"name": fresh(), "rate": 1, "burst": 1}]}, app=app)
    async with open_backend(shared) as state:
        limiter._app.shared = state  # (what App.run does for a worker)
        runs = [await run_filter(limiter) for _ in range(3)]
    if status is None:
        assert all(r.local_reply is None for r in runs)  # admitted, past the burst of 1
    else:
        assert [r.local_reply.status for r in runs] == [503] * 3
        assert runs[0].ctx.flags == ["RL"] and dict(runs[0].local_reply.headers)["retry-after"] == "1"
    lost = [e for r in runs for e in r.log if e["event"] == "rate limit store lost"]
    assert len(lost) == 1 and lost[0]["on_error"] == on_error  # once, not per request


@pytest.mark.parametrize(("settings", "where"), [
    ({}, "filters.rate_limit.limits: required key is missing"),
    ({"limits": []}, "filters.rate_limit.limits"),
    ({"limits": [{"rate": 0}]}, "filters.rate_limit.limits[0].rate"),
    ({"limits": [{"rate": 1, "key": "cookie:s"}]}, "filters.rate_limit.limits[0].key"),
    ({"limits": [{"rate": 1, "per": "day"}]}, "filters.rate_limit.limits[0].per"),
    ({"limits": [{"rate": 1, "brust": 3}]}, "filters.rate_limit.limits[0].brust: unknown key"),
    ({"limits": [{"rate": 1}, {"rate": 2}]}, "filters.rate_limit.limits: two limits named 'default'"),
    ({"limits": [{"rate": 1}], "mode": "fleet"}, "filters.rate_limit.mode"),
    ({"limits": [{"rate": 1}], "mode": "global"}, "filters.rate_limit.mode: global needs a [shared] table"),
])
async def test_bad_settings_name_their_key_path(sluice_proxy, settings, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        await sluice_proxy(filters=CHAIN, config={"filters": {"rate_limit": settings}})


async def test_bad_route_settings_and_a_bad_shared_table_name_their_key_path(sluice_proxy):
    route = {"match": {"prefix": "/"}, "cluster": "origin", "filters": {"rate_limit": {"limits": [{"rate": -1}]}}}
    with pytest.raises(ConfigError, match=re.escape("routes[0].filters.rate_limit.limits[0].rate")):
        await sluice_proxy(filters=CHAIN, config={"routes": [route],
                                                  "filters": {"rate_limit": {"limits": [{"rate": 1}]}}})
    for shared, where in [({"backend": "redis", "adress": "x"}, "shared.adress: unknown key"),
                          ({"backend": "redis", "timeout": 0}, "shared.timeout"),
                          ({"backend": "nosuch"}, "shared.backend: unknown backend 'nosuch'"),
                          ({"size": 3}, "shared.size: unknown key")]:
        with pytest.raises(ConfigError, match=re.escape(where)):
            await sluice_proxy(filters=CHAIN, config={"shared": shared,
                                                      "filters": {"rate_limit": {"limits": [{"rate": 1}]}}})


# The battery in local mode is test_contract_battery.py's, with every built-in's; on Redis, here.
_battery_redis = []


def _redis_for_the_battery(settings):
    """A ``[shared]`` backend on a real Redis started on first use (the battery's config is
    fixed at collection, before any fixture runs), stopped by PID at exit."""
    if not _battery_redis:
        folder = Path(tempfile.mkdtemp(prefix="sluice-rl-battery-"))
        server = start_redis(folder)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        atexit.register(server.stop)
        _battery_redis.append(server)
    return open_redis({"address": _battery_redis[0].address, "prefix": f"battery-{fresh()}:", "timeout": 1.0})


register_backend("redis_battery", _redis_for_the_battery)
test_contract_global = contract.battery(
    "rate_limit", settings={"mode": "global", "limits": [{"rate": 1e6, "burst": 1e6}]},
    config={"shared": {"backend": "redis_battery"}})
