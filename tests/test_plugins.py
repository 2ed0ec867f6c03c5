"""The plugin registry and lifecycle: discovery, clashes, startup/shutdown hooks,
and the chain compiled so filters cost nothing in phases they leave alone."""

from __future__ import annotations

import httpx
import pytest
import trio

from sluice import Balancer, ConfigError, Filter, hookimpl
from sluice.control.registry import Plugins
from sluice.proxy.chain import Chain
from sluice.testing import serve

from .conftest import InProcess, config


def test_builtins_are_discovered_through_entry_points():
    plugins = Plugins()
    assert {"router", "balancer", "auth", "tls", "access_log"} <= set(plugins.loaded)
    assert all(plugins.loaded[n].dist == "sluice" for n in ("router", "balancer", "auth", "tls", "access_log"))
    assert plugins.filters["api_key"][1] == "auth"
    assert plugins.balancers["least_request"][1] == "balancer"
    assert plugins.transports["tls"][1] == "tls"


def test_two_plugins_offering_one_filter_name_is_an_error_naming_both():
    class Impostor(Filter):
        name = "router"

    with pytest.raises(ConfigError) as info:
        Plugins(["router"], extra={"copycat": InProcess(Impostor)})
    message = str(info.value)
    assert "filter 'router' is provided by both plugin 'router' (sluice)" in message
    assert "plugin 'copycat' ((in-process))" in message


def test_two_plugins_offering_one_policy_name_is_an_error():
    class Mine(Balancer):
        name = "round_robin"

    class Policies:
        @hookimpl
        def sluice_balancers(self):
            return [Mine]

    with pytest.raises(ConfigError) as info:
        Plugins(["balancer"], extra={"mine": Policies()})
    assert "policy 'round_robin' is provided by both plugin 'balancer'" in str(info.value)


async def test_startup_and_shutdown_hooks_run_in_the_trio_loop(start_origin):
    origin = await start_origin()
    events: list[str] = []

    class Lifecycle:
        @hookimpl
        def sluice_startup(self, app):
            async def begin():
                events.append("startup")
                app.nursery.start_soon(ticker)  # background work lives in the app's nursery

            async def ticker():
                try:
                    await trio.sleep_forever()
                finally:
                    events.append("ticker cancelled")

            return begin()  # an awaitable: awaited before the listeners accept

        @hookimpl
        def sluice_shutdown(self, app):
            events.append("shutdown")  # a plain return value is fine too

    async with serve(config(origin.address), plugins=["router", "balancer"], extra={"life": Lifecycle()}) as proxy:
        assert events == ["startup"]
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/")).status_code == 200
    assert events == ["startup", "shutdown", "ticker cancelled"]


def test_the_chain_keeps_only_overriding_phases():
    class HeadersOnly(Filter):
        name = "h"

        async def on_request_headers(self, ctx, request):
            return None

    class ResponseBody(Filter):
        name = "b"

        async def on_response_body(self, ctx, chunk, end):
            return None

    class LogOnly(Filter):
        name = "l"

        async def on_complete(self, ctx):
            return None

    h, b, log = HeadersOnly(HeadersOnly.Config()), ResponseBody(ResponseBody.Config()), LogOnly(LogOnly.Config())
    chain = Chain([h, b, log])
    assert [fn.__self__ for _, fn, _ in chain.request_headers] == [h]
    assert chain.request_body == [] and chain.response_headers == []
    # (position, phase, the key its time is kept under in ctx.filter_time)
    assert [(i, fn.__self__, key) for i, fn, key in chain.response_body] == [(1, b, ("b", "response_body"))]
    assert [fn.__self__ for fn in chain.complete] == [log]
    assert chain.without(frozenset({"h"})).request_headers == []


async def test_a_filter_that_fails_to_build_is_named():
    class Broken(Filter):
        name = "broken"

        def __init__(self, config):
            raise RuntimeError("cannot find my model file")

    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", filters=["broken", "router"]), plugins=["router", "balancer"],
                         extra={"shaky": InProcess(Broken)}):
            pass
    assert "filter 'broken' of plugin 'shaky' failed to build" in str(info.value)
    assert "cannot find my model file" in str(info.value)


async def test_a_filter_listed_twice_in_a_chain_is_an_error():
    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", filters=["router", "router"]), plugins=["router", "balancer"]):
            pass
    assert "listeners[0].filters[1]: 'router' is already in this chain" in str(info.value)
