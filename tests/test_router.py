"""The router plugin: matching on host, path, method and headers; its actions."""

from __future__ import annotations

import httpx
import pytest

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config

PLUGINS = ["router", "balancer"]


def two_clusters(a: str, b: str, routes: list[dict]) -> dict:
    cfg = config(a, routes=routes)
    cfg["clusters"]["other"] = {"endpoints": [b]}
    return cfg


async def test_routes_match_in_order_on_every_condition(start_origin):
    main, other = await start_origin(), await start_origin()
    routes = [
        {"name": "health", "match": {"path": "/healthz"}, "direct_response": {"status": 200, "body": "fine\n"}},
        {"match": {"host": "*.api.test", "prefix": "/v1/"}, "cluster": "other"},
        {"match": {"regex": "^/items/[0-9]+$", "methods": ["delete"]}, "cluster": "other"},
        {"match": {"prefix": "/", "headers": {"x-canary": "1"}}, "cluster": "other"},
        {"match": {"prefix": "/", "headers": [{"name": "x-block", "present": True}]},
         "direct_response": {"status": 403, "body": "blocked\n"}},
        {"match": {"prefix": "/old/"}, "redirect": {"path": "/new/", "status": 308}},
        {"match": {"host": "exact.test"}, "cluster": "backend"},
    ]
    cases = [
        ("GET", "/healthz", {}, 200, None, "fine\n"),
        ("GET", "/v1/users", {"host": "eu.api.test"}, 200, "other", None),
        ("GET", "/v1/users", {"host": "api.test"}, 404, None, None),  # *.suffix needs a subdomain
        ("DELETE", "/items/42", {"host": "x"}, 200, "other", None),
        ("GET", "/items/42", {"host": "x"}, 404, None, None),
        ("DELETE", "/items/42/extra", {"host": "x"}, 404, None, None),  # regex is a full match
        ("GET", "/anything", {"x-canary": "1"}, 200, "other", None),
        ("GET", "/anything", {"x-block": ""}, 403, None, "blocked\n"),
        ("GET", "/x", {"host": "EXACT.test:8080"}, 200, "backend", None),
        ("GET", "/x", {"host": "other.test"}, 404, None, "no route\n"),
    ]
    async with serve(two_clusters(main.address, other.address, routes), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for method, path, headers, status, cluster, body in cases:
                before = (len(main.requests), len(other.requests))
                r = await client.request(method, proxy.url + path, headers=headers)
                assert r.status_code == status, (method, path, headers)
                after = (len(main.requests), len(other.requests))
                hit = {(1, 0): "backend", (0, 1): "other"}.get((after[0] - before[0], after[1] - before[1]))
                assert hit == cluster, (method, path, headers)
                if body is not None:
                    assert r.text == body


async def test_redirect_keeps_the_query_and_builds_the_location(start_origin):
    origin = await start_origin()
    routes = [
        {"match": {"prefix": "/old"}, "redirect": {"path": "/new", "status": 301}},
        {"match": {"prefix": "/away"}, "redirect": {"location": "https://example.test/"}},
    ]
    async with serve(config(origin.address, routes=routes), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            moved = await client.get(proxy.url + "/old?q=1", headers={"host": "site.test"})
            away = await client.get(proxy.url + "/away")
    assert moved.status_code == 301
    assert moved.headers["location"] == "http://site.test/new?q=1"
    assert away.status_code == 302 and away.headers["location"] == "https://example.test/"


async def test_route_timeout_overrides_the_cluster(start_origin):
    import trio

    from .origin import Reply

    async def slow(request, body):
        await trio.sleep(1)
        return Reply()

    origin = await start_origin(slow)
    routes = [{"match": {"prefix": "/"}, "cluster": "backend", "timeout": 0.2}]
    async with serve(config(origin.address, routes=routes), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 504


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"match": {"prefix": "/"}, "cluster": "nope"}, "routes[0].cluster: unknown cluster 'nope'"),
        ({"match": {"prefix": "/"}}, "routes[0]: give exactly one action"),
        ({"match": {"prefix": "/", "path": "/x"}, "cluster": "backend"}, "routes[0].match: give at most one of prefix, path, regex"),
        ({"match": {"regex": "("}, "cluster": "backend"}, "routes[0].match: bad regex"),
        ({"match": {"prefix": "/", "colour": "red"}, "cluster": "backend"}, "routes[0].match.colour: unknown key"),
        ({"match": {}, "redirect": {"status": 200}, }, "routes[0].redirect.status"),
    ],
)
async def test_bad_routes_are_config_errors_with_key_paths(route, message):
    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", routes=[route]), plugins=PLUGINS):
            pass
    assert message in str(info.value)
