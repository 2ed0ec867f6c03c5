"""Circuit breakers per cluster: overflow answers 503 at once (flag UO), never a queue."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config
from .origin import Reply
from .proc import free_port

PLUGINS = ["router", "balancer", "access_log"]


async def _slow(request, body):
    await trio.sleep(0.5)
    return Reply(200, [], b"slow")


async def _at_once(url: str, count: int) -> list[tuple[int, float]]:
    """``count`` requests at the same moment: (status, seconds) each."""
    results: list[tuple[int, float]] = []

    async def one(client: httpx.AsyncClient) -> None:
        start = trio.current_time()
        response = await client.get(url)
        results.append((response.status_code, trio.current_time() - start))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=count)) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one, client)
    return results


async def test_max_requests_overflow_is_an_immediate_503_flagged_uo(start_origin, tmp_path):
    origin = await start_origin(_slow)
    log = tmp_path / "access.jsonl"
    cfg = config(origin.address, filters=["access_log", "router"],
                 cluster={"circuit_breakers": {"max_requests": 2}},
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        with trio.fail_after(10):
            results = await _at_once(proxy.url + "/", 6)
        await trio.sleep(0.2)
    assert sorted(status for status, _ in results) == [200, 200, 503, 503, 503, 503]
    assert all(seconds < 0.3 for status, seconds in results if status == 503), results  # not queued
    assert len(origin.requests) == 2
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(line["flags"] or "" for line in lines) == ["", "", "UO", "UO", "UO", "UO"]


async def test_max_connections_without_pending_overflows_at_once(start_origin):
    origin = await start_origin(_slow)
    cluster = {"circuit_breakers": {"max_connections": 1, "max_pending": 0}}
    async with serve(config(origin.address, cluster=cluster), plugins=PLUGINS) as proxy:
        with trio.fail_after(10):
            results = await _at_once(proxy.url + "/", 3)
    assert sorted(status for status, _ in results) == [200, 503, 503]
    assert all(seconds < 0.3 for status, seconds in results if status == 503), results


async def test_max_connections_with_pending_waits_its_turn(start_origin):
    origin = await start_origin(_slow)
    cluster = {"circuit_breakers": {"max_connections": 1, "max_pending": 5}, "connect_timeout": 5}
    async with serve(config(origin.address, cluster=cluster), plugins=PLUGINS) as proxy:
        with trio.fail_after(10):
            results = await _at_once(proxy.url + "/", 3)
        assert proxy.app.clusters["backend"].breaker.connections <= 1
    assert [status for status, _ in results] == [200, 200, 200]
    assert max(seconds for _, seconds in results) >= 1.4  # one connection: one after the other


async def test_max_retries_bounds_failover(start_origin):
    live = await start_origin()
    dead = f"127.0.0.1:{free_port()}"
    cluster = {"policy": "round_robin", "circuit_breakers": {"max_retries": 0}}
    async with serve(config(dead, live.address, cluster=cluster), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            first = await client.get(proxy.url + "/")  # the dead one, and no failover allowed
    assert first.status_code == 503
    assert live.requests == []


@pytest.mark.parametrize("breakers, key", [
    ({"max_requests": 0}, "clusters.backend.circuit_breakers.max_requests"),
    ({"max_pending": -1}, "clusters.backend.circuit_breakers.max_pending"),
    ({"max_conns": 1}, "clusters.backend.circuit_breakers.max_conns"),
])
async def test_breaker_settings_are_checked_by_key_path(breakers, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        async with serve(config("127.0.0.1:9", cluster={"circuit_breakers": breakers}), plugins=PLUGINS):
            pass
