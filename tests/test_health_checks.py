"""Active health checks against real origins that fail and recover."""

from __future__ import annotations

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config
from .origin import Origin, Reply, echo

PLUGINS = ["router", "balancer"]
FAST = {"interval": 0.1, "jitter": 0.02, "timeout": 0.08, "healthy_threshold": 2, "unhealthy_threshold": 2}


async def _until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def _endpoint(proxy, origin):
    return next(e for e in proxy.app.clusters["backend"].endpoints if e.port == origin.port)


async def test_an_http_check_takes_a_failing_endpoint_out_and_brings_it_back(start_origin):
    sick = {"on": False}

    async def with_health(request, body):
        if request.target == b"/healthz":
            return Reply(503 if sick["on"] else 200, [], b"")
        return Reply(200, [], b"b")

    a = await start_origin()
    b = await start_origin(with_health)
    cluster = {"health_check": {"path": "/healthz", "statuses": ["200-299"], **FAST}}
    async with serve(config(a.address, b.address, cluster=cluster), plugins=PLUGINS) as proxy:
        b_endpoint = _endpoint(proxy, b)
        await _until(lambda: any(r.target == b"/healthz" for r, _ in b.requests))
        assert b_endpoint.healthy
        sick["on"] = True
        await _until(lambda: not b_endpoint.healthy)
        before = sum(r.target != b"/healthz" for r, _ in b.requests)
        async with httpx.AsyncClient() as client:
            for _ in range(20):
                assert (await client.get(proxy.url + "/x")).status_code == 200
            assert sum(r.target != b"/healthz" for r, _ in b.requests) == before  # none to b
            sick["on"] = False
            await _until(lambda: b_endpoint.healthy)
            for _ in range(20):
                await client.get(proxy.url + "/y")
    assert any(r.target == b"/y" for r, _ in b.requests)
    checks = [r for r, _ in b.requests if r.target == b"/healthz"]
    assert dict(checks[0].headers)[b"host"] == f"127.0.0.1:{b.port}".encode()


async def test_a_tcp_check_follows_an_endpoint_that_dies_and_comes_back(nursery):
    a = await nursery.start(Origin(echo).serve)
    scope = trio.CancelScope()

    async def run(origin, *, task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await origin.serve(task_status=task_status)

    b = Origin(echo)
    await nursery.start(run, b)
    cluster = {"health_check": {"kind": "tcp", **FAST}}
    async with serve(config(a.address, b.address, cluster=cluster), plugins=PLUGINS) as proxy:
        b_endpoint = _endpoint(proxy, b)
        scope.cancel()
        await _until(lambda: not b_endpoint.healthy)
        scope = trio.CancelScope()
        back = Origin(echo)
        back.port = b.port
        await nursery.start(run, back)
        await _until(lambda: b_endpoint.healthy)


@pytest.mark.parametrize("cluster, key", [
    ({"protocol": "h2c", "health_check": {"kind": "http"}}, "clusters.backend.health_check.kind"),
    ({"health_check": {"interval": 1, "timeout": 1}}, "clusters.backend.health_check.timeout"),
    ({"health_check": {"statuses": ["600-700"]}}, "clusters.backend.health_check.statuses"),
    ({"health_check": {"statuses": ["ok"]}}, "clusters.backend.health_check.statuses"),
    ({"health_check": {"path": "healthz"}}, "clusters.backend.health_check.path"),
    ({"health_check": {"healthy_threshold": 0}}, "clusters.backend.health_check.healthy_threshold"),
    ({"health_check": {"kind": "udp"}}, "clusters.backend.health_check.kind"),
])
async def test_health_check_settings_are_checked_by_key_path(cluster, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        async with serve(config("127.0.0.1:9", cluster=cluster), plugins=PLUGINS):
            pass
