"""The filter contract, end to end over real sockets.

Order of phases, reverse response order, local replies short-circuiting,
on_complete always running (normal end, local reply, upstream failure,
client abort, cancellation), per-request state, per-route opt-out, body
transformation, and filter bugs becoming 500 without a traceback.
"""

from __future__ import annotations

import httpx
import trio

from sluice import CONTINUE, Filter, LocalReply
from sluice.testing import serve

from .conftest import InProcess, config, raw_request
from .origin import Reply


def recording(name: str, log: list, *, reply_on: str | None = None, raise_on: str | None = None):
    """A filter class that records every phase it sees into ``log``."""

    class Recording(Filter):
        async def _phase(self, phase, ctx):
            log.append((name, phase))
            if phase == raise_on:
                raise RuntimeError(f"{name} blew up in {phase}")
            if phase == reply_on:
                return LocalReply(418, f"{name} says no\n", [("x-by", name)])
            return CONTINUE

        async def on_request_headers(self, ctx, request):
            return await self._phase("request_headers", ctx)

        async def on_request_body(self, ctx, chunk, end):
            return await self._phase("request_body", ctx)

        async def on_response_headers(self, ctx, response):
            return await self._phase("response_headers", ctx)

        async def on_response_body(self, ctx, chunk, end):
            return await self._phase("response_body", ctx)

        async def on_complete(self, ctx):
            log.append((name, "complete", ctx.response.status if ctx.response else None,
                        tuple(ctx.flags)))

    Recording.name = name
    return Recording


async def thinking_origin(start_origin):
    """An origin that takes 30 s to answer, and an event set once it has started."""
    upstream_waits = trio.Event()

    async def slow(request, body):
        upstream_waits.set()
        await trio.sleep(30)
        return Reply()

    return await start_origin(slow), upstream_waits


def phases(log, phase):
    return [entry[0] for entry in log if entry[1] == phase]


def completes(log):
    return [entry for entry in log if entry[1] == "complete"]


async def test_request_path_in_order_response_path_reversed(start_origin):
    origin = await start_origin()
    log: list = []
    plugin = InProcess(*(recording(n, log) for n in "abc"))
    async with serve(config(origin.address, filters=["a", "b", "c", "router"]),
                     plugins=["router", "balancer"], extra={"rec": plugin}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/x", content=b"hello")
    assert r.status_code == 200 and r.text == "hello"
    assert phases(log, "request_headers") == ["a", "b", "c"]
    assert phases(log, "request_body")[:3] == ["a", "b", "c"]
    assert phases(log, "response_headers") == ["c", "b", "a"]
    assert phases(log, "response_body")[:3] == ["c", "b", "a"]
    assert [c[0] for c in completes(log)] == ["a", "b", "c"]
    assert all(c[2] == 200 for c in completes(log))


async def test_local_reply_skips_upstream_and_later_filters(start_origin):
    origin = await start_origin()
    log: list = []
    filters = [recording("a", log), recording("b", log, reply_on="request_headers"), recording("c", log)]
    async with serve(config(origin.address, filters=["a", "b", "c", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(*filters)}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 418
    assert r.text == "b says no\n"
    assert r.headers["x-by"] == "b"
    assert origin.requests == []  # the upstream never saw it
    assert phases(log, "request_headers") == ["a", "b"]  # c never ran
    assert phases(log, "response_headers") == ["a"]  # only filters before b
    assert [c[0] for c in completes(log)] == ["a", "b", "c"]  # but everyone completes
    assert completes(log)[0][3] == ("LR",)


async def test_complete_runs_on_upstream_failure():
    log: list = []
    # Nothing listens on port 9 of loopback: connect fails -> 503 UF.
    async with serve(config("127.0.0.1:9", filters=["a", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(recording("a", log))}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 503
    assert completes(log) == [("a", "complete", 503, ("UF",))]
    assert phases(log, "response_headers") == ["a"]  # the error reply went through the chain


async def test_complete_runs_when_client_aborts(start_origin):
    origin, upstream_waits = await thinking_origin(start_origin)
    log: list = []
    done = trio.Event()

    class Done(Filter):
        name = "done"

        async def on_complete(self, ctx):
            log.append(("done", "complete", None, tuple(ctx.flags)))
            done.set()

    async with serve(config(origin.address, filters=["done", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(Done)}) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await upstream_waits.wait()
        await stream.aclose()  # the client gives up while the upstream thinks
        with trio.fail_after(5):
            await done.wait()
    assert log == [("done", "complete", None, ("DC",))]


async def test_complete_runs_when_cancelled_by_shutdown(start_origin):
    origin, upstream_waits = await thinking_origin(start_origin)
    seen: list = []

    class Done(Filter):
        name = "done"

        async def on_complete(self, ctx):
            seen.append(type(ctx.error).__name__)

    cfg = config(origin.address, filters=["done", "router"], server={"drain_timeout": 0.5})

    async def client(url):
        async with httpx.AsyncClient() as c:
            try:
                await c.get(url, timeout=10)
            except httpx.HTTPError:
                pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with serve(cfg, plugins=["router", "balancer"], extra={"rec": InProcess(Done)}) as proxy:
                nursery.start_soon(client, proxy.url + "/")
                await upstream_waits.wait()
            # leaving serve() drains for 0.5 s, then cancels the exchange
    assert seen == ["Cancelled"]


async def test_complete_that_suspends_is_shielded_and_its_errors_logged(start_origin):
    """An on_complete that awaits runs to its end even when shutdown cancels
    the connection while it waits; one that raises after a wait is logged,
    never the connection's end."""
    origin = await start_origin()
    seen: list = []

    class Slow(Filter):
        name = "slow"

        async def on_complete(self, ctx):
            await trio.sleep(0.6)  # shutdown cancels the connection meanwhile
            seen.append("slow finished")

    class Broken(Filter):
        name = "broken"

        async def on_complete(self, ctx):
            await trio.sleep(0)
            raise RuntimeError("a bug in a plugin")

    cfg = config(origin.address, filters=["slow", "broken", "router"], server={"drain_timeout": 0.2})
    with trio.fail_after(10):
        async with serve(cfg, plugins=["router", "balancer"],
                         extra={"rec": InProcess(Slow, Broken)}) as proxy:
            async with httpx.AsyncClient() as client:
                assert (await client.get(proxy.url + "/")).status_code == 200
    assert seen == ["slow finished"]


async def test_filter_exception_is_500_without_traceback(start_origin):
    origin = await start_origin()
    log: list = []
    filters = [recording("a", log), recording("b", log, raise_on="request_headers")]
    async with serve(config(origin.address, filters=["a", "b", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(*filters)}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
            again = await client.get(proxy.url + "/")  # the proxy lives on
    assert r.status_code == 500
    assert "Traceback" not in r.text and "blew up" not in r.text
    assert again.status_code == 500
    assert origin.requests == []
    assert [c[3] for c in completes(log)] == [("FE",), ("FE",)] * 2


async def test_a_bool_is_not_a_flow_result(start_origin):
    origin = await start_origin()

    class Sloppy(Filter):
        name = "sloppy"

        async def on_request_headers(self, ctx, request):
            return True

    async with serve(config(origin.address, filters=["sloppy", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(Sloppy)}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 500
    assert origin.requests == []


async def test_per_request_state_is_per_request(start_origin):
    async def slowish(request, body):
        await trio.sleep(0.05)
        return Reply(200, [], b"ok")

    origin = await start_origin(slowish)

    class Counter(Filter):
        name = "counter"

        def new_state(self):
            return {"chunks": 0}

        async def on_request_headers(self, ctx, request):
            ctx.state(self)["path"] = request.target
            return CONTINUE

        async def on_response_headers(self, ctx, response):
            response.headers.set("x-path", ctx.state(self)["path"])
            return CONTINUE

    async with serve(config(origin.address, filters=["counter", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(Counter)}) as proxy:
        results = {}

        async def get(path):
            async with httpx.AsyncClient() as client:
                results[path] = (await client.get(proxy.url + path)).headers["x-path"]

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(get, f"/p{i}")
    assert results == {f"/p{i}": f"/p{i}" for i in range(10)}


async def test_route_can_disable_a_filter(start_origin):
    origin = await start_origin()
    log: list = []
    routes = [
        {"match": {"prefix": "/open"}, "cluster": "backend", "filters": {"gate": {"disabled": True}}},
        {"match": {"prefix": "/"}, "cluster": "backend"},
    ]
    gate = recording("gate", log, reply_on="request_headers")
    async with serve(config(origin.address, filters=["gate", "router"], routes=routes),
                     plugins=["router", "balancer"], extra={"rec": InProcess(gate)}) as proxy:
        async with httpx.AsyncClient() as client:
            closed = await client.get(proxy.url + "/closed")
            opened = await client.get(proxy.url + "/open/x")
    assert closed.status_code == 418
    assert opened.status_code == 200
    assert phases(log, "request_headers") == ["gate"]  # only for /closed


async def test_body_phases_can_rewrite_chunks(start_origin):
    origin = await start_origin()

    class Upper(Filter):
        name = "upper"

        async def on_request_headers(self, ctx, request):
            request.headers.remove("content-length")  # sizes may change: go chunked
            return CONTINUE

        async def on_request_body(self, ctx, chunk, end):
            return chunk.upper()

        async def on_response_headers(self, ctx, response):
            response.headers.remove("content-length")
            return CONTINUE

        async def on_response_body(self, ctx, chunk, end):
            return chunk + b"!" if end else chunk

    async with serve(config(origin.address, filters=["upper", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(Upper)}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/", content=b"quiet please")
    assert origin.requests[0][1] == b"QUIET PLEASE"
    assert r.text == "QUIET PLEASE!"


async def test_request_trailers_reach_the_filter_and_the_upstream(start_origin):
    origin = await start_origin()
    seen = []

    class Trailers(Filter):
        name = "trailers"

        async def on_request_trailers(self, ctx, trailers):
            seen.append(trailers.get("x-checksum"))
            return CONTINUE

    async with serve(config(origin.address, filters=["trailers", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(Trailers)}) as proxy:
        response = await raw_request(
            proxy.address,
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n",
        )
    assert response.startswith(b"HTTP/1.1 200 ")
    assert seen == ["abc"]
    assert origin.requests[0][1] == b"hello"


async def test_a_filter_cannot_inject_header_lines(start_origin):
    origin = await start_origin()

    class Injector(Filter):
        name = "injector"

        async def on_response_headers(self, ctx, response):
            response.headers.set("x-evil", "1\r\nset-cookie: session=stolen")
            return CONTINUE

    class BadReply(Filter):
        name = "bad_reply"

        async def on_request_headers(self, ctx, request):
            if request.target == "/reply":
                return LocalReply(200, "x", [("x-evil", "a\nb")])
            return CONTINUE

    async with serve(config(origin.address, filters=["bad_reply", "injector", "router"]),
                     plugins=["router", "balancer"], extra={"rec": InProcess(Injector, BadReply)}) as proxy:
        async with httpx.AsyncClient() as client:
            forwarded = await client.get(proxy.url + "/")
            replied = await client.get(proxy.url + "/reply")
    for r in (forwarded, replied):
        assert r.status_code == 500
        assert "set-cookie" not in r.headers and "x-evil" not in r.headers


def test_never_suspends_tells_await_free_phases_apart():
    """The exchange runs await-free on_complete phases without a shielded
    scope; anything that might suspend must be recognised as such."""
    from sluice.proxy.chain import never_suspends

    async def plain(ctx):
        return None

    async def awaits(ctx):
        await trio.sleep(0)

    async def with_async_with(ctx):
        async with trio.open_nursery():
            pass

    async def async_for(ctx):
        return [x async for x in ctx]

    def returns_a_coroutine(ctx):  # a sync wrapper: its coroutine may suspend
        return awaits(ctx)

    class Phase:
        async def on_complete(self, ctx):
            return None

    assert never_suspends(plain) and never_suspends(Phase().on_complete)
    assert not any(never_suspends(f) for f in (awaits, with_async_with, async_for, returns_a_coroutine))
