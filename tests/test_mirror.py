"""Request mirroring to a shadow cluster: a copy, fire and forget, never in the way."""

from __future__ import annotations

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config
from .origin import Reply
from .proc import free_port

PLUGINS = ["router", "balancer"]


def _config(main: str, shadow: str, **mirror) -> dict:
    cfg = config(main, routes=[{"match": {"prefix": "/"}, "cluster": "backend",
                                "mirror": {"cluster": "shadow", **mirror}}])
    cfg["clusters"]["shadow"] = {"endpoints": [shadow]}
    return cfg


async def _until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_the_shadow_gets_a_copy_and_the_client_the_main_answer(start_origin):
    async def shadow_says(request, body):
        return Reply(500, [], b"shadow")

    main, shadow = await start_origin(), await start_origin(shadow_says)
    async with serve(_config(main.address, shadow.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            got = await client.get(proxy.url + "/look")
            posted = await client.post(proxy.url + "/make", content=b"payload")
        await _until(lambda: len(shadow.requests) == 2)
    assert (got.status_code, got.text, posted.text) == (200, "/look", "payload")
    (get, _), (post, body) = shadow.requests
    assert get.target == b"/look" and post.target == b"/make" and body == b"payload"
    assert dict(get.headers)[b"host"] == f"127.0.0.1:{proxy.address[1]}-shadow".encode()


async def test_a_slow_or_dead_shadow_never_delays_or_fails_the_main_request(start_origin):
    async def slow(request, body):
        await trio.sleep(3)
        return Reply(200, [], b"late")

    main, shadow = await start_origin(), await start_origin(slow)
    for shadow_address in (shadow.address, f"127.0.0.1:{free_port()}"):
        async with serve(_config(main.address, shadow_address), plugins=PLUGINS) as proxy:
            async with httpx.AsyncClient() as client:
                with trio.fail_after(2):
                    answers = [(await client.get(proxy.url + f"/r{i}")).status_code for i in range(10)]
        assert answers == [200] * 10
    assert len(main.requests) == 20


async def test_a_share_of_requests_is_mirrored(start_origin):
    main, shadow = await start_origin(), await start_origin()
    async with serve(_config(main.address, shadow.address, percent=50), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for i in range(200):
                await client.get(proxy.url + f"/s{i}")
        await trio.sleep(0.3)
    assert 60 < len(shadow.requests) < 140, len(shadow.requests)  # 100 expected; 5.6 sd either way
    assert len(main.requests) == 200


@pytest.mark.parametrize("mirror, key", [
    ({"cluster": "nowhere"}, r"routes\[0\]\.mirror\.cluster"),
    ({"cluster": "shadow", "percent": 0}, r"routes\[0\]\.mirror\.percent"),
])
async def test_mirror_settings_are_checked_by_key_path(mirror, key):
    cfg = config("127.0.0.1:9", routes=[{"match": {"prefix": "/"}, "cluster": "backend", "mirror": mirror}])
    cfg["clusters"]["shadow"] = {"endpoints": ["127.0.0.1:9"]}
    with pytest.raises(ConfigError, match=key):
        async with serve(cfg, plugins=PLUGINS):
            pass

