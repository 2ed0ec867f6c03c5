"""Route retries: what is retried, where, and what never is; with real origins."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config
from .origin import Origin, Reply, echo

PLUGINS = ["router", "balancer", "access_log"]


def _route(**retry) -> list[dict]:
    return [{"match": {"prefix": "/"}, "cluster": "backend", "retry": retry}]


def _logged(cfg: dict, path) -> dict:
    cfg["listeners"][0]["filters"] = ["access_log", "router"]
    cfg["filters"] = {"access_log": {"path": str(path), "flush_interval": 0.05}}
    return cfg


async def _failing(request, body):
    return Reply(503, [], b"down")


async def test_a_gateway_error_is_retried_on_the_other_endpoint(start_origin, tmp_path):
    bad, good = await start_origin(_failing), await start_origin()
    log = tmp_path / "access.jsonl"
    cfg = _logged(config(bad.address, good.address, routes=_route(attempts=2),
                         cluster={"policy": "round_robin", "outlier": {"consecutive_5xx": 0}}), log)
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            statuses = [(await client.get(proxy.url + f"/r/{i}")).status_code for i in range(10)]
        await trio.sleep(0.2)
    assert statuses == [200] * 10
    # Round robin counts the retry's pick too, so each request tries bad first.
    assert len(good.requests) == 10 and len(bad.requests) == 10
    retried = [json.loads(line) for line in log.read_text().splitlines() if '"attempts"' in line]
    assert len(retried) == 10
    assert all(line["attempts"] == 2 and line["tried"] == [bad.address] and line["upstream"] == good.address
               for line in retried)


async def test_a_post_is_not_retried_but_a_put_is_with_its_body(start_origin):
    bad, good = await start_origin(_failing), await start_origin()
    cfg = config(bad.address, good.address, routes=_route(attempts=2),
                 cluster={"policy": "round_robin", "outlier": {"consecutive_5xx": 0}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            post = await client.post(proxy.url + "/p", content=b"once")  # round robin: bad first
            put = await client.put(proxy.url + "/q", content=b"twice")  # good: served at once
            put2 = await client.put(proxy.url + "/s", content=b"again")  # bad, then good
    assert post.status_code == 503
    assert put.status_code == 200 and put2.status_code == 200 and put2.text == "again"
    assert [body for _, body in bad.requests] == [b"once", b"again"]
    assert [body for _, body in good.requests] == [b"twice", b"again"]


async def test_a_body_too_large_to_keep_streams_and_is_not_retried(start_origin):
    bad, good = await start_origin(_failing), await start_origin()
    cfg = config(bad.address, good.address, routes=_route(attempts=2, max_body_bytes=10),
                 cluster={"policy": "round_robin"})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            response = await client.put(proxy.url + "/big", content=b"x" * 100)
    assert response.status_code == 503
    assert good.requests == []


async def test_a_reset_and_a_per_try_timeout_are_retried(nursery):
    async def close_at_once(stream):
        await stream.receive_some(65536)  # the request, then a close with no answer

    async def hang(stream):
        await stream.receive_some(65536)
        await trio.sleep(30)

    closer = await nursery.start(Origin(raw=close_at_once).serve)
    hanger = await nursery.start(Origin(raw=hang).serve)
    good = await nursery.start(Origin(echo).serve)
    for bad, retry in ((closer, {}), (hanger, {"on": ["timeout"], "per_try_timeout": 0.3})):
        cfg = config(bad.address, good.address, routes=_route(attempts=2, **retry),
                     cluster={"policy": "round_robin"})
        async with serve(cfg, plugins=PLUGINS) as proxy:
            async with httpx.AsyncClient() as client:
                with trio.fail_after(5):
                    response = await client.get(proxy.url + "/x")
        assert response.status_code == 200, retry
    assert len(good.requests) == 2


async def test_no_retry_past_the_budget(start_origin):
    bad, good = await start_origin(_failing), await start_origin()
    cfg = config(bad.address, good.address, routes=_route(attempts=2, budget_percent=1, min_retries=0),
                 cluster={"policy": "round_robin"})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            response = await client.get(proxy.url + "/x")
    assert response.status_code == 503
    assert good.requests == []


async def test_killing_one_of_two_endpoints_under_load_loses_no_request(nursery):
    """1,000 GETs, 20 at a time; one endpoint is killed half way, with
    requests in flight on it: retries (reset, gateway errors), connect
    failover and ejection answer every one of them 200. (Each origin writes
    an answer in one piece, as a real server writes a small one: a server
    killed in the middle of writing one is a loss no proxy can undo once
    the head has gone to the client.)"""
    async def one_write(stream):
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffered += data
            _, buffered = buffered.split(b"\r\n\r\n", 1)
            await trio.sleep(0.005)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    a = await nursery.start(Origin(raw=one_write).serve)
    scope = trio.CancelScope()

    async def run_b(*, task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await Origin(raw=one_write).serve(task_status=task_status)

    b = await nursery.start(run_b)
    cfg = config(a.address, b.address, routes=_route(attempts=3, on=["reset", "gateway_error", "timeout"]))
    statuses: list[int] = []
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client:

            async def worker() -> None:
                for _ in range(50):
                    statuses.append((await client.get(proxy.url + "/")).status_code)
                    if len(statuses) == 500:
                        scope.cancel()  # b dies mid-load

            with trio.fail_after(60):
                async with trio.open_nursery() as workers:
                    for _ in range(20):
                        workers.start_soon(worker)
    assert len(statuses) == 1000
    assert [s for s in statuses if s != 200] == []


@pytest.mark.parametrize("retry, key", [
    ({"attempts": 0}, "routes[0].retry.attempts"),
    ({"on": ["sometimes"]}, "routes[0].retry.on"),
    ({"statuses": [409]}, "routes[0].retry"),
    ({"on": ["retriable_status"]}, "routes[0].retry"),
    ({"budget_percent": 150}, "routes[0].retry.budget_percent"),
    ({"per_try_timeout": -1}, "routes[0].retry.per_try_timeout"),
])
async def test_retry_settings_are_checked_by_key_path(retry, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        async with serve(config("127.0.0.1:9", routes=_route(**retry)), plugins=PLUGINS):
            pass
