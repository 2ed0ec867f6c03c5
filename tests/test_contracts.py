"""Filter ordering contracts: before/after/first/last validated per chain at build."""

from __future__ import annotations

import httpx
import pytest
from structlog.testing import capture_logs

from sluice import ConfigError, Filter
from sluice.control.app import App
from sluice.control.config import parse
from sluice.control.registry import Plugins
from sluice.testing import serve

from .conftest import InProcess, config


class Cache(Filter):
    name = "cache"
    before = ("router",)


class Audit(Filter):
    name = "audit"
    after = ("cache",)


class Tail(Filter):
    name = "tail"
    last = True


class Head(Filter):
    name = "head"
    first = True


class Loop(Filter):
    name = "loop"
    before = ("cache",)
    after = ("router",)


def build(*chain: str, extra: tuple[type[Filter], ...] = (Cache, Audit, Tail, Head)) -> App:
    plugins = Plugins(["router", "balancer"], extra={"mine": InProcess(*extra)})
    return App(parse(config("127.0.0.1:9", filters=list(chain))), plugins)


def error(*chain: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        build(*chain, **kw)
    return str(info.value)


def test_a_chain_that_keeps_every_declaration_builds():
    app = build("head", "cache", "audit", "router", "tail")
    assert app.listeners[0].chain.names() == ["head", "cache", "audit", "router", "tail"]


def test_a_name_absent_from_the_chain_constrains_nothing():
    assert build("router", "audit").listeners[0].chain.names() == ["router", "audit"]


def test_before_broken_is_named_by_key_path_and_attribute():
    assert error("router", "cache").splitlines() == [
        "listeners[0].filters: 'cache' must run before 'router' (cache.before)",
        "listeners[0].filters: the chain as written: router, cache",
    ]


def test_after_broken_is_named_by_key_path_and_attribute():
    assert error("audit", "cache", "router").splitlines()[0] == (
        "listeners[0].filters: 'audit' must run after 'cache' (audit.after)")


def test_first_and_last_are_checked_and_every_error_is_listed():
    message = error("tail", "router", "head")
    assert message.splitlines() == [
        "listeners[0].filters: 'tail' must be last (tail.last)",
        "listeners[0].filters: 'head' must be first (head.first)",
        "listeners[0].filters: the chain as written: tail, router, head",
    ]


def test_a_cycle_among_declarations_prints_the_cycle():
    message = error("cache", "loop", "router", extra=(Cache, Loop))
    assert message.startswith("listeners[0].filters: ordering cycle: ")
    cycle = message.split("ordering cycle: ")[1].split(" (")[0].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"'cache'", "'router'", "'loop'"}



# -- load-time errors name the plugin and its distribution --------------------


def load_error(plugin) -> str:
    with pytest.raises(ConfigError) as info:
        Plugins(["router"], extra={"mine": plugin})
    return str(info.value)


def test_a_filter_without_a_name_names_the_plugin():
    class Nameless(Filter):
        pass

    assert load_error(InProcess(Nameless)).startswith("plugin 'mine' ((in-process)): ")
    assert "has no name" in load_error(InProcess(Nameless))


def test_two_filters_of_one_plugin_with_one_name_is_an_error():
    class A(Filter):
        name = "twin"

    class B(Filter):
        name = "twin"

    assert load_error(InProcess(A, B)) == "plugin 'mine' ((in-process)): it offers two of sluice_filters() named 'twin'"


def test_a_config_that_is_not_a_model_is_an_error():
    class Odd(Filter):
        name = "odd"
        Config = dict

    assert load_error(InProcess(Odd)) == (
        "plugin 'mine' ((in-process)): filter 'odd': Config <class 'dict'> is not a pydantic model "
        "(subclass sluice.FilterConfig)")


def test_ordering_given_as_a_string_is_an_error():
    class Sloppy(Filter):
        name = "sloppy"
        before = "router"

    assert load_error(InProcess(Sloppy)) == (
        "plugin 'mine' ((in-process)): filter 'sloppy': before must be a tuple of filter names, not 'router'")


def test_a_hook_that_raises_at_load_names_the_plugin():
    from sluice import hookimpl

    class Broken:
        @hookimpl
        def sluice_filters(self):
            raise RuntimeError("boom")

    assert load_error(Broken()) == "plugin 'mine' ((in-process)): sluice_filters() failed: RuntimeError('boom')"


# -- per-route filter settings -------------------------------------------------


def route_error(filters: dict) -> str:
    cfg = config("127.0.0.1:9", routes=[{"match": {"prefix": "/"}, "cluster": "backend", "filters": filters}])
    with pytest.raises(ConfigError) as info:
        App(parse(cfg), Plugins(["router", "balancer", "auth"]))
    return str(info.value)


def test_a_misspelt_filter_at_route_level_is_an_error_by_key_path():
    assert route_error({"api_kye": {"disabled": True}}).startswith(
        "routes[0].filters.api_kye: unknown filter 'api_kye'; available: ")


def test_an_unknown_per_route_key_is_an_error_by_key_path():
    assert "routes[0].filters.api_key.disabld" in route_error({"api_key": {"disabld": True}})


def test_disabled_must_be_a_bool():
    assert route_error({"api_key": {"disabled": "yes"}}) == (
        "routes[0].filters.api_key.disabled: expected true or false, got 'yes'")


def test_disabled_on_a_known_filter_builds():
    cfg = config("127.0.0.1:9", routes=[{"match": {"prefix": "/"}, "cluster": "backend",
                                         "filters": {"api_key": {"disabled": True}}}])
    app = App(parse(cfg), Plugins(["router", "balancer", "auth"]))
    assert app.listeners[0].chain.names() == ["router"]


# -- the logging helper ---------------------------------------------------------


async def test_a_filter_logs_with_the_request_id_and_its_name(start_origin):
    class Talker(Filter):
        name = "talker"

        async def on_request_headers(self, ctx, request):
            self.log(ctx).info("talked", path=request.target)

    origin = await start_origin()
    async with serve(config(origin.address, filters=["talker", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Talker)}) as proxy:
        with capture_logs() as logs:
            async with httpx.AsyncClient() as client:
                r = await client.get(proxy.url + "/x")
    talked = [e for e in logs if e["event"] == "talked"]
    assert len(talked) == 1 and talked[0]["filter"] == "talker" and talked[0]["path"] == "/x"
    assert talked[0]["request_id"] and talked[0]["request_id"] == r.headers.get("x-request-id", talked[0]["request_id"])


async def test_ctx_timings_mark_connect_first_upstream_byte_and_last_byte(start_origin):
    seen = {}

    class Watcher(Filter):
        name = "watcher"

        async def on_complete(self, ctx):
            seen.update(ctx.timings)

    origin = await start_origin()
    async with serve(config(origin.address, filters=["watcher", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Watcher)}) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/")).status_code == 200
    assert list(seen) == ["upstream_connected", "upstream_headers", "upstream_done"]
    assert 0 <= seen["upstream_connected"] <= seen["upstream_headers"] <= seen["upstream_done"]
