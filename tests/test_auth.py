"""The auth plugin: api_key and basic, challenges, credential stripping, opt-out."""

from __future__ import annotations

import hashlib

import bcrypt
import httpx
import pytest

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config

PLUGINS = ["router", "balancer", "auth"]
KEY = "s3cret-key"


def api_key_config(address: str, **settings) -> dict:
    routes = [
        {"match": {"prefix": "/public"}, "cluster": "backend", "filters": {"api_key": {"disabled": True}}},
        {"match": {"prefix": "/"}, "cluster": "backend"},
    ]
    keys = {"ci": hashlib.sha256(KEY.encode()).hexdigest()}
    return config(address, filters=["api_key", "router"], routes=routes,
                  filter_settings={"api_key": {"keys": keys, **settings}})


async def test_api_key_admits_known_keys_and_strips_them(start_origin):
    origin = await start_origin()
    async with serve(api_key_config(origin.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            missing = await client.get(proxy.url + "/x")
            wrong = await client.get(proxy.url + "/x", headers={"x-api-key": "guess"})
            right = await client.get(proxy.url + "/x", headers={"x-api-key": KEY})
            public = await client.get(proxy.url + "/public/x")
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["www-authenticate"] == 'ApiKey header="x-api-key"'
    assert right.status_code == 200 and public.status_code == 200
    assert len(origin.requests) == 2
    forwarded = dict(origin.requests[0][0].headers)
    assert b"x-api-key" not in forwarded  # the secret does not travel upstream


async def test_api_key_may_be_forwarded_when_asked(start_origin):
    origin = await start_origin()
    async with serve(api_key_config(origin.address, forward_key=True), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/x", headers={"x-api-key": KEY})
    assert dict(origin.requests[0][0].headers)[b"x-api-key"] == KEY.encode()


async def test_api_keys_must_be_stored_hashed():
    cfg = config("127.0.0.1:9", filters=["api_key", "router"],
                 filter_settings={"api_key": {"keys": {"ci": "plaintext-key"}}})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert "filters.api_key.keys.ci" in str(info.value)


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pa55", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"# users\nalice:{hashed.replace('$2b$', '$2y$', 1)}\n")
    return path


async def test_basic_auth_with_bcrypt_htpasswd(start_origin, htpasswd):
    origin = await start_origin()
    cfg = config(origin.address, filters=["basic", "router"],
                 filter_settings={"basic": {"htpasswd": str(htpasswd), "realm": "staff"}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            none = await client.get(proxy.url + "/")
            bad = await client.get(proxy.url + "/", auth=("alice", "nope"))
            unknown = await client.get(proxy.url + "/", auth=("mallory", "pa55"))
            garbage = await client.get(proxy.url + "/", headers={"authorization": "Basic !!!"})
            good = await client.get(proxy.url + "/", auth=("alice", "pa55"))
            cached = await client.get(proxy.url + "/", auth=("alice", "pa55"))
    assert {none.status_code, bad.status_code, unknown.status_code, garbage.status_code} == {401}
    assert none.headers["www-authenticate"] == 'Basic realm="staff", charset="UTF-8"'
    assert good.status_code == cached.status_code == 200
    assert all(b"authorization" not in dict(r.headers) for r, _ in origin.requests)


async def test_basic_auth_refuses_weak_hashes(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("bob:$apr1$abc$0123456789abcdefghijkl\n")
    cfg = config("127.0.0.1:9", filters=["basic", "router"], filter_settings={"basic": {"htpasswd": str(path)}})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert "line 1: user 'bob' has a non-bcrypt hash" in str(info.value)


async def test_dot_segments_cannot_borrow_a_public_routes_exemption(start_origin):
    origin = await start_origin()
    async with serve(api_key_config(origin.address), plugins=PLUGINS) as proxy:
        from .conftest import raw_request

        for sneaky in (b"/public/../secret", b"/public/%2e%2e/secret", b"/public/./../secret"):
            raw = await raw_request(proxy.address, b"GET " + sneaky + b" HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 401 "), sneaky
        raw = await raw_request(proxy.address, b"GET /public/x/../y HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert [r.target for r, _ in origin.requests] == [b"/public/y"]  # the upstream sees what was routed


async def test_an_overlong_basic_password_is_a_401_not_a_500(start_origin, htpasswd):
    origin = await start_origin()
    cfg = config(origin.address, filters=["basic", "router"],
                 filter_settings={"basic": {"htpasswd": str(htpasswd)}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/", auth=("alice", "p" * 100))
    assert r.status_code == 401
