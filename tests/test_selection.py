"""How filters steer upstream selection (``ctx.cluster``, ``ctx.pin_endpoint``,
``ctx.hash_key``), and that a write made too late is an error, not a no-op."""

from __future__ import annotations

import httpx

from sluice import CONTINUE, Balancer, Filter, hookimpl
from sluice.testing import serve

from .conftest import InProcess, config

PLUGINS = ["router", "balancer"]


class Canary(Filter):
    """``x-canary: 1`` goes to the cluster "canary"; ``x-pin`` pins an endpoint;
    ``x-key`` sets the hash key; ``x-late`` writes the cluster too late."""

    name = "canary"

    @classmethod
    def from_config(cls, config, app):
        instance = cls(config)
        instance.clusters = app.clusters
        return instance

    async def on_request_headers(self, ctx, request):
        if request.headers.get("x-canary") == "1":
            ctx.cluster = self.clusters["canary"]
        if (pin := request.headers.get("x-pin")) is not None:
            ctx.pin_endpoint(pin)
        if (key := request.headers.get("x-key")) is not None:
            ctx.hash_key = key
        return CONTINUE

    async def on_response_headers(self, ctx, response):
        if ctx.request.headers.get("x-late") == "1":
            ctx.cluster = self.clusters["canary"]
        if ctx.request.headers.get("x-endpoint") == "1":
            ctx.endpoint = None
        return CONTINUE


def _config(main: list[str], canary: str, **cluster) -> dict:
    cfg = config(*main, filters=["router", "canary"], cluster=cluster)  # after the router: it sets ctx.cluster
    cfg["clusters"]["canary"] = {"endpoints": [canary]}
    return cfg


async def test_a_filter_may_choose_the_cluster(start_origin):
    main, canary = await start_origin(), await start_origin()
    async with serve(_config([main.address], canary.address), plugins=PLUGINS,
                     extra={"canary": InProcess(Canary)}) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/a", headers={"x-canary": "1"})).status_code == 200
            assert (await client.get(proxy.url + "/b")).status_code == 200
    assert [r.target for r, _ in canary.requests] == [b"/a"]
    assert [r.target for r, _ in main.requests] == [b"/b"]


async def test_a_pinned_endpoint_is_used_while_available(start_origin):
    a, b, canary = await start_origin(), await start_origin(), await start_origin()
    async with serve(_config([a.address, b.address], canary.address), plugins=PLUGINS,
                     extra={"canary": InProcess(Canary)}) as proxy:
        async with httpx.AsyncClient() as client:
            for _ in range(6):
                await client.get(proxy.url + "/pinned", headers={"x-pin": b.address})
            for endpoint in proxy.app.clusters["backend"].endpoints:
                if endpoint.port == b.port:
                    endpoint.healthy = False  # down: the policy picks as usual
            for _ in range(4):
                assert (await client.get(proxy.url + "/fallback", headers={"x-pin": b.address})).status_code == 200
            assert (await client.get(proxy.url + "/unknown", headers={"x-pin": "10.9.9.9:1"})).status_code == 200
    assert len(b.requests) == 6
    assert len(a.requests) == 5


class KeyedPolicy(Balancer):
    """Picks by ``ctx.hash_key`` (the endpoint index it names), else the first."""

    name = "keyed"
    keys: list = []

    def pick(self, ctx, endpoints):
        KeyedPolicy.keys.append(ctx.hash_key)
        return endpoints[int(ctx.hash_key) % len(endpoints)] if ctx.hash_key else endpoints[0]


class Policies:
    @hookimpl
    def sluice_balancers(self):
        return [KeyedPolicy]


async def test_a_hash_key_reaches_the_policy(start_origin):
    a, b, canary = await start_origin(), await start_origin(), await start_origin()
    KeyedPolicy.keys = []
    cfg = _config([a.address, b.address], canary.address, policy="keyed")
    async with serve(cfg, plugins=PLUGINS, extra={"canary": InProcess(Canary), "keyed": Policies()}) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/k1", headers={"x-key": "1"})
            await client.get(proxy.url + "/none")
    assert KeyedPolicy.keys == ["1", None]
    assert [r.target for r, _ in b.requests] == [b"/k1"]
    assert [r.target for r, _ in a.requests] == [b"/none"]


async def test_selection_written_too_late_is_a_clear_error(start_origin, capfd):
    main, canary = await start_origin(), await start_origin()
    async with serve(_config([main.address], canary.address), plugins=PLUGINS,
                     extra={"canary": InProcess(Canary)}) as proxy:
        async with httpx.AsyncClient() as client:
            late = await client.get(proxy.url + "/late", headers={"x-late": "1"})
            endpoint = await client.get(proxy.url + "/endpoint", headers={"x-endpoint": "1"})
    assert late.status_code == 500 and endpoint.status_code == 500
    logged = capfd.readouterr()
    text = logged.out + logged.err
    assert "ctx.cluster was written after the upstream endpoint was chosen" in text
    assert "ctx.endpoint is chosen by the core" in text
    assert canary.requests == []
