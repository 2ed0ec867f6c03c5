"""sluice-canary, tested with sluice's plugin author kit: two real origins, the
stable one (the ``origin`` fixture) and a canary, and which one got each request."""

from __future__ import annotations

import re

import pytest
import sluice_canary

from sluice import ConfigError, hookimpl
from sluice.testing import Origin, contract

EXTRA = {"canary": sluice_canary}
CHAIN = ["router", "canary"]  # after the router: it sets ctx.cluster, the canary replaces it


@pytest.fixture
async def canary_origin(nursery):
    canary = Origin()
    await nursery.start(canary.serve)
    yield canary
    canary.close()


def config(canary: Origin, **settings) -> dict:
    return {"clusters": {"canary": {"endpoints": [canary.address]}},
            "filters": {"canary": {"cluster": "canary", **settings}}}


def paths(origin: Origin) -> list[str]:
    return [r.path for r in origin.requests]


async def test_a_header_or_cookie_opts_in_and_out(origin, canary_origin, sluice_proxy):
    proxy = await sluice_proxy(filters=CHAIN, config=config(canary_origin, cookie="release", percent=100),
                               extra=EXTRA)
    get = proxy.client.get
    assert (await get("/header", headers={"x-canary": "always"})).status_code == 200
    assert (await get("/cookie", headers={"cookie": "a=1; release=always"})).status_code == 200
    assert (await get("/never", headers={"x-canary": "never"})).status_code == 200
    assert (await get("/cookie-never", headers={"cookie": "release=never"})).status_code == 200
    assert (await get("/bad-cookie", headers={"cookie": 'release="unterminated'})).status_code == 200
    assert paths(canary_origin) == ["/header", "/cookie", "/bad-cookie"]  # (a bad cookie: percent, 100)
    assert paths(origin) == ["/never", "/cookie-never"]


@pytest.mark.parametrize("sticky, carry", [
    ("header:x-user", lambda user: {"x-user": user}),
    ("cookie:session", lambda user: {"cookie": f"theme=dark; session={user}"}),
])
async def test_a_sticky_percentage(origin, canary_origin, sluice_proxy, sticky, carry):
    proxy = await sluice_proxy(filters=CHAIN, config=config(canary_origin, percent=25, sticky=sticky,
                                                            mark_response=True), extra=EXTRA)
    users = [f"user-{i}" for i in range(120)]
    marked = set()
    for user in users * 2:  # each user twice: the same side both times
        r = await proxy.client.get(f"/{user}", headers=carry(user))
        assert r.status_code == 200
        if r.headers.get("x-canary") == "canary":
            marked.add(user)
    expected = {u for u in users if sluice_canary.bucket(u) < 25}
    assert 0.15 * len(users) < len(expected) < 0.35 * len(users)  # the hash spreads keys evenly
    assert paths(canary_origin) == [f"/{u}" for u in users * 2 if u in expected]
    assert paths(origin) == [f"/{u}" for u in users * 2 if u not in expected]
    assert marked == expected


async def test_a_route_sets_its_own_percentage(origin, canary_origin, sluice_proxy):
    cfg = config(canary_origin, percent=0) | {"routes": [
        {"match": {"prefix": "/beta"}, "cluster": "origin", "filters": {"canary": {"percent": 100}}},
        {"match": {"prefix": "/off"}, "cluster": "origin", "filters": {"canary": {"disabled": True}}},
        {"match": {"prefix": "/"}, "cluster": "origin"},
    ]}
    proxy = await sluice_proxy(filters=CHAIN, config=cfg, extra=EXTRA)
    for path in ["/beta/1", "/other", "/beta/2"]:
        assert (await proxy.client.get(path)).status_code == 200
    assert (await proxy.client.get("/off", headers={"x-canary": "always"})).status_code == 200
    assert paths(canary_origin) == ["/beta/1", "/beta/2"]
    assert paths(origin) == ["/other", "/off"]


@pytest.mark.parametrize("settings, where", [
    ({"cluster": "nope"}, "filters.canary.cluster: unknown cluster 'nope'"),
    ({"cluster": "canary", "from_clusters": ["origin", "gone"]}, "filters.canary.from_clusters[1]"),
    ({"cluster": "canary", "percent": 101}, "filters.canary.percent"),
    ({"cluster": "canary", "sticky": "query:user"}, "filters.canary.sticky"),
    ({}, "filters.canary.cluster"),
])
async def test_bad_settings_are_named_by_key_path(canary_origin, sluice_proxy, settings, where):
    cfg = {"clusters": {"canary": {"endpoints": [canary_origin.address]}}, "filters": {"canary": settings}}
    with pytest.raises(ConfigError, match=re.escape(where)):
        await sluice_proxy(filters=CHAIN, config=cfg, extra=EXTRA)


class LateCanary(sluice_canary.Canary):
    """The canary's decision made in the wrong phase: after the endpoint was chosen."""

    async def on_request_headers(self, ctx, request):
        return None

    async def on_response_headers(self, ctx, response):
        return await super().on_request_headers(ctx, ctx.request)


class LatePlugin:
    @hookimpl
    def sluice_filters(self):
        return [LateCanary]


async def test_a_write_after_the_pick_is_the_cores_clear_error(origin, canary_origin, sluice_proxy, capfd):
    proxy = await sluice_proxy(filters=CHAIN, config=config(canary_origin), extra={"canary": LatePlugin()})
    r = await proxy.client.get("/late", headers={"x-canary": "always"})
    assert r.status_code == 500
    assert "Traceback" not in r.text
    out = capfd.readouterr()
    assert "ctx.cluster was written after the upstream endpoint was chosen" in out.out + out.err
    assert paths(origin) == ["/late"] and paths(canary_origin) == []


# The battery's clusters are "origin" and "refused" (a closed port, whose 503 it checks), and it
# knows no second origin to make a canary of: every request is opted in, towards "origin".
test_contract = contract.battery("canary", settings={"cluster": "origin", "from_clusters": ["origin"]},
                                 request_headers={"x-canary": "always"}, extra=EXTRA)
