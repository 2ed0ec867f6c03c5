"""max_connection_age: a connection is retired after serving that long, HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config
from .test_h2_upstream import ScriptedH2

PLUGINS = ["router", "balancer"]


async def _spread(url: str, count: int, pause: float) -> list[int]:
    statuses = []
    async with httpx.AsyncClient() as client:
        for _ in range(count):
            statuses.append((await client.get(url)).status_code)
            await trio.sleep(pause)
    return statuses


async def test_an_http1_connection_is_retired_after_its_age(start_origin):
    young, aged = await start_origin(), await start_origin()
    async with serve(config(young.address), plugins=PLUGINS) as proxy:
        assert await _spread(proxy.url + "/", 8, 0.1) == [200] * 8
    async with serve(config(aged.address, cluster={"max_connection_age": 0.2}), plugins=PLUGINS) as proxy:
        assert await _spread(proxy.url + "/", 10, 0.1) == [200] * 10
    assert young.connections == 1
    assert 3 <= aged.connections <= 9, aged.connections  # about one per 0.3 s (more if slow)


async def test_an_http2_connection_takes_no_new_stream_after_its_age(nursery):
    def answer(conn, sid, headers, server):
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
        conn.send_data(sid, b"ok", end_stream=True)

    upstream = await nursery.start(ScriptedH2(answer).serve)
    cluster = {"protocol": "h2c", "max_connection_age": 0.25}
    async with serve(config(f"127.0.0.1:{upstream.port}", cluster=cluster), plugins=PLUGINS) as proxy:
        assert await _spread(proxy.url + "/", 8, 0.1) == [200] * 8
        with trio.fail_after(5):
            while sum(len(c) for c in proxy.app.pool._h2.values()) > 1:
                await trio.sleep(0.1)  # the retired ones are closed by the reaper
    assert 3 <= upstream.connections <= 8, upstream.connections


async def test_max_connection_age_is_checked_by_key_path():
    with pytest.raises(ConfigError, match=r"clusters\.backend\.max_connection_age"):
        async with serve(config("127.0.0.1:9", cluster={"max_connection_age": 0}), plugins=PLUGINS):
            pass
