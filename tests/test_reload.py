"""Hot reload in one process (sluice.control.reload): a real proxy, real
origins and real clients, with the config swapped under them."""

from __future__ import annotations

import socket

import httpx
import pytest
import trio

from sluice import Filter, hookimpl
from sluice.control.config import parse
from sluice.testing import serve

from .origin import Reply

PLUGINS = ["router", "balancer"]


def named(name: str):
    async def handler(request, body):
        return Reply(200, [(b"x-origin", name.encode())], name.encode())

    return handler


def base(a: str, b: str, *, to: str = "a", listeners: list[dict] | None = None, **route) -> dict:
    return {
        "listeners": listeners or [{"address": "127.0.0.1:0", "filters": ["router"]}],
        "clusters": {"a": {"endpoints": [a]}, "b": {"endpoints": [b]}},
        "routes": [{"match": {"prefix": "/"}, "cluster": to, **route}],
    }


class Source:
    """What ``app.reload_source`` reads: the config a test sets next."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def __call__(self):
        return parse(self.data)


async def reload(app, data: dict) -> bool:
    app.reload_source = Source(data)
    from sluice.control.reload import reload as run

    return await run(app)


async def test_a_reload_switches_routes_for_new_requests_and_keeps_unchanged_clusters(start_origin):
    a, b = await start_origin(named("a")), await start_origin(named("b"))
    async with serve(base(a.address, b.address), plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        app = proxy.app
        cluster_a = app.clusters["a"]
        assert (await client.get(proxy.url + "/x")).text == "a"
        assert await reload(app, base(a.address, b.address, to="b"))
        assert (await client.get(proxy.url + "/x")).text == "b"  # the same keep-alive connection
        assert app.clusters["a"] is cluster_a  # unchanged: its state and pool go on
        assert app.last_reload["ok"] and app.generation == 1
        changed = base(a.address, b.address, to="a")
        changed["clusters"]["a"]["connect_timeout"] = 2.0
        assert await reload(app, changed)
        assert app.clusters["a"] is not cluster_a and app.clusters["a"].connect_timeout == 2.0
        assert (await client.get(proxy.url + "/x")).text == "a"
    assert a.connections == 2  # the changed cluster's pooled connection was not reused


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"routes": [{"match": {"prefix": "/"}, "cluster": "nope"}]}, "routes[0].cluster: unknown cluster 'nope'"),
        ({"clusters": {"a": {"endpoints": ["not-an-address"]}}}, "clusters.a.endpoints[0]: not a host:port"),
        ({"listeners": [{"address": "127.0.0.1:0", "filters": ["router", "gzip"]}]},
         "listeners[0].filters[1]: unknown filter 'gzip'"),
    ],
)
async def test_a_broken_config_keeps_the_old_one_serving(start_origin, broken, message):
    a, b = await start_origin(named("a")), await start_origin(named("b"))
    async with serve(base(a.address, b.address), plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        app = proxy.app
        assert not await reload(app, {**base(a.address, b.address, to="b"), **broken})
        assert app.last_reload["ok"] is False and message in app.last_reload["error"]
        assert app.generation == 0
        assert (await client.get(proxy.url + "/x")).text == "a"


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(start_origin):
    release = trio.Event()

    async def slow(request, body):
        await release.wait()
        return Reply(200, [], b"slow a")

    a, b = await start_origin(slow), await start_origin(named("b"))
    old = base(a.address, b.address, response_headers={"set": {"x-config": "old"}})
    new = base(a.address, b.address, to="b", response_headers={"set": {"x-config": "new"}})
    async with serve(old, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        answers = {}

        async def first():
            answers["first"] = await client.get(proxy.url + "/slow")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            while not a.requests:
                await trio.sleep(0.01)
            assert await reload(proxy.app, new)
            answers["second"] = await client.get(proxy.url + "/fast")
            release.set()
    assert (answers["first"].text, answers["first"].headers["x-config"]) == ("slow a", "old")
    assert (answers["second"].text, answers["second"].headers["x-config"]) == ("b", "new")


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_listeners_are_added_and_removed_and_a_removed_one_drains(start_origin):
    release = trio.Event()

    async def slow(request, body):
        if request.target == b"/slow":
            await release.wait()
        return Reply(200, [], b"done")

    a = await start_origin(slow)
    one, two = _free_port(), _free_port()
    first = base(a.address, a.address, listeners=[{"name": "one", "address": f"127.0.0.1:{one}",
                                                   "filters": ["router"]}])
    second = base(a.address, a.address, listeners=[{"name": "two", "address": f"127.0.0.1:{two}",
                                                    "filters": ["router"]}])
    async with serve(first, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        app = proxy.app
        answers = {}

        async def in_flight():
            answers["slow"] = await client.get(f"http://127.0.0.1:{one}/slow")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            while not a.requests:
                await trio.sleep(0.01)
            assert await reload(app, second)
            assert [x.name for x in app.listeners] == ["two"]
            assert app.addresses == [f"http://127.0.0.1:{two}"]
            assert (await client.get(f"http://127.0.0.1:{two}/new")).text == "done"
            assert _refused(one)  # no longer accepting...
            release.set()  # ...but the request it had finishes
        assert answers["slow"].status_code == 200 and answers["slow"].text == "done"
        with trio.fail_after(5):
            while app._serving.keys() - set(app.listeners):
                await trio.sleep(0.02)  # the removed listener's task ended once drained


async def test_a_listener_kept_by_address_takes_its_new_settings_in_place(start_origin):
    a = await start_origin(named("a"))
    port = _free_port()
    cfg = base(a.address, a.address, listeners=[{"address": f"127.0.0.1:{port}", "filters": ["router"]}])
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        listener = proxy.app.listeners[0]
        tighter = base(a.address, a.address, listeners=[{
            "address": f"127.0.0.1:{port}", "filters": ["router"], "limits": {"max_header_bytes": 2048}}])
        assert await reload(proxy.app, tighter)
        assert proxy.app.listeners[0] is listener and listener.config.limits.max_header_bytes == 2048
        r = await client.get(proxy.url + "/", headers={"x-big": "x" * 4000})
        assert r.status_code == 431
        assert (await client.get(proxy.url + "/")).text == "a"


class _Counts(Filter):
    """Counts opens and closes, and requests seen, per instance."""

    name = "counts"
    opened: list = []
    closed: list = []

    async def open(self, nursery):
        _Counts.opened.append(self)

    async def close(self):
        _Counts.closed.append(self)

    async def on_request_headers(self, ctx, request):
        ctx.vars["counted_by"] = id(self)


class _Hooks:
    reloads: list = []

    @hookimpl
    def sluice_filters(self):
        return [_Counts]

    @hookimpl
    def sluice_reload(self, app):
        _Hooks.reloads.append(app.generation)


async def test_old_filters_close_once_their_requests_end_and_plugins_hear_the_reload(start_origin):
    _Counts.opened.clear()
    _Counts.closed.clear()
    _Hooks.reloads.clear()
    a = await start_origin(named("a"))
    cfg = base(a.address, a.address, listeners=[{"address": "127.0.0.1:0", "filters": ["counts", "router"]}])
    async with serve(cfg, plugins=PLUGINS, extra={"counts": _Hooks()}) as proxy, \
            httpx.AsyncClient() as client:
        assert (await client.get(proxy.url + "/")).status_code == 200
        first = _Counts.opened[0]
        assert await reload(proxy.app, cfg)
        assert len(_Counts.opened) == 2 and _Counts.opened[1] is not first
        with trio.fail_after(5):
            while first not in _Counts.closed:
                await trio.sleep(0.02)
        assert _Counts.opened[1] not in _Counts.closed
        assert _Hooks.reloads == [1]


async def test_reloads_in_a_loop_under_concurrent_load_lose_no_request(start_origin):
    a, b = await start_origin(named("a")), await start_origin(named("b"))
    configs = [base(a.address, b.address, to="a"), base(a.address, b.address, to="b")]
    failures: list = []
    seen = {"a": 0, "b": 0}
    async with serve(configs[0], plugins=PLUGINS) as proxy:
        app = proxy.app
        stop = trio.Event()

        async def client_loop():
            async with httpx.AsyncClient() as client:
                while not stop.is_set():
                    try:
                        r = await client.get(proxy.url + "/load")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    else:
                        seen[r.text] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client_loop)
            for i in range(25):
                await trio.sleep(0.02)
                assert await reload(app, configs[(i + 1) % 2])
            stop.set()
        assert app.generation == 25
    assert failures == []
    assert seen["a"] > 25 and seen["b"] > 25, seen
