"""The plugin author kit: an in-process plugin given to ``serve``/``Plugins``
as ``extra`` may share its name with an installed plugin (the plugin under
test is usually installed in its own dev venv) and then replaces it."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from sluice import ConfigError, Filter, FilterConfig, LocalReply
from sluice.control.registry import Plugins
from sluice.plugins import router as installed_router
from sluice.plugins.auth import ApiKey
from sluice.plugins.router import Router
from sluice.testing import Origin, Reply, build_filter, run_filter, serve

from .conftest import InProcess, config, raw_request, read_until_closed


def test_extra_replaces_installed_plugin_of_same_name():
    # "router" is installed through an entry point; the test's own object
    # takes its place instead of failing with "already registered".
    mine = InProcess()
    plugins = Plugins(["router", "balancer"], extra={"router": mine})
    assert plugins.loaded["router"].module is mine
    assert plugins.loaded["router"].dist == "(in-process)"
    assert plugins.pm.get_plugin("router") is mine


async def test_serve_with_installed_plugin_given_as_extra(origin):
    cfg = config(origin.address)
    async with serve(cfg, plugins=["router", "balancer"], extra={"router": installed_router}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/hello")
    assert r.status_code == 200


# -- Origin: the scriptable upstream, checked with real clients -------------------------

async def started(nursery, origin: Origin | None = None) -> Origin:
    return await nursery.start((origin or Origin()).serve)


def head_and_body(raw: bytes) -> tuple[str, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode("latin-1").lower(), body


async def test_origin_echoes_body_or_target_and_records_requests(nursery):
    origin = await started(nursery)
    async with httpx.AsyncClient(base_url=origin.url) as client:
        posted = await client.post("/echo?x=1", content=b"payload", headers={"X-Api-Key": "k"})
        got = await client.get("/target?q=2")
    assert (posted.status_code, posted.content) == (200, b"payload")
    assert posted.headers["content-length"] == "7"
    assert got.content == b"/target?q=2"
    first, second = origin.requests
    assert (first.method, first.target, first.path, first.body) == ("POST", "/echo?x=1", "/echo", b"payload")
    assert first.header("X-API-KEY") == "k" and ("x-api-key", "k") in first.headers
    assert first.header("absent") is None
    assert (second.method, second.path, second.body) == ("GET", "/target", b"")
    assert first.complete and second.complete
    assert origin.connections == 1  # keep-alive: both on one connection


async def test_origin_status_headers_fixed_and_listed_bodies(nursery):
    origin = await started(nursery)
    origin.script("/made", Reply(status=201, headers=[("x-made", "yes"), (b"x-raw", b"1")], body=b"new"))
    origin.script("/parts", Reply(body=[b"ab", b"", b"cd"]))
    async with httpx.AsyncClient(base_url=origin.url) as client:
        made = await client.get("/made")
        parts = await client.get("/parts")
    assert (made.status_code, made.content, made.headers["x-made"], made.headers["x-raw"]) == (201, b"new", "yes", "1")
    assert (parts.content, parts.headers["content-length"]) == (b"abcd", "4")


async def test_origin_chunked_body_and_trailers_on_the_wire(nursery):
    origin = await started(nursery)
    origin.script("/chunked", Reply(body=[b"ab", b"cd"], chunked=True))
    origin.script("/trailers", Reply(body=b"xy", trailers=[("x-sum", "42")]))
    raw = await raw_request(("127.0.0.1", origin.port), b"GET /chunked HTTP/1.1\r\nhost: o\r\nconnection: close\r\n\r\n")
    head, body = head_and_body(raw)
    assert "transfer-encoding: chunked" in head and "content-length" not in head
    assert body == b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
    raw = await raw_request(("127.0.0.1", origin.port), b"GET /trailers HTTP/1.1\r\nhost: o\r\nconnection: close\r\n\r\n")
    head, body = head_and_body(raw)
    assert "transfer-encoding: chunked" in head  # trailers imply chunked
    assert body == b"2\r\nxy\r\n0\r\nx-sum: 42\r\n\r\n"


async def test_origin_records_a_chunked_request_body_and_its_trailers(nursery):
    origin = await started(nursery)
    request = (b"POST /up HTTP/1.1\r\nhost: o\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-checksum: 7\r\n\r\n")
    raw = await raw_request(("127.0.0.1", origin.port), request)
    assert head_and_body(raw)[1] == b"abcde"
    (recorded,) = origin.requests
    assert (recorded.body, recorded.trailers) == (b"abcde", [("x-checksum", "7")])
    assert recorded.header("transfer-encoding") == "chunked"


async def test_origin_delay_and_chunk_delay(nursery):
    origin = await started(nursery)
    origin.script("/late", Reply(delay=0.3, body=b"late"))
    origin.script("/drip", Reply(body=[b"a", b"b", b"c"], chunk_delay=0.15))
    async with httpx.AsyncClient(base_url=origin.url) as client:
        start = trio.current_time()
        late = await client.get("/late")
        late_took = trio.current_time() - start
        arrivals = []
        async with client.stream("GET", "/drip") as drip:
            async for chunk in drip.aiter_raw():
                arrivals.append((trio.current_time(), chunk))
    assert late.content == b"late" and late_took >= 0.3
    assert b"".join(c for _, c in arrivals) == b"abc"
    assert len(arrivals) == 3 and arrivals[-1][0] - arrivals[0][0] >= 0.3  # two gaps of 0.15


async def test_origin_early_reply_answers_before_the_body_then_closes(nursery):
    origin = await started(nursery)
    origin.script("/upload", Reply(status=413, body=b"too big", early=True))
    stream = await trio.open_tcp_stream("127.0.0.1", origin.port)
    async with stream:
        # Only the head: the body never comes, and the answer must not wait for it.
        await stream.send_all(b"POST /upload HTTP/1.1\r\nhost: o\r\ncontent-length: 1000\r\n\r\n")
        raw = await read_until_closed(stream, timeout=5)
    head, body = head_and_body(raw)
    assert head.startswith("http/1.1 413") and "connection: close" in head and body == b"too big"
    assert origin.requests[0].body == b"" and not origin.requests[0].complete


async def test_origin_early_reply_survives_body_bytes_it_never_reads(nursery):
    # Closing with unread bytes would make the kernel reset the connection
    # (and often destroy the answer): the origin lingers instead.
    origin = await started(nursery)
    origin.script("/upload", Reply(status=413, body=b"too big", early=True))
    stream = await trio.open_tcp_stream("127.0.0.1", origin.port)
    async with stream:
        await stream.send_all(b"POST /upload HTTP/1.1\r\nhost: o\r\ncontent-length: 300000\r\n\r\n")
        await wait_all_tasks_blocked()  # the answer is sent before the body comes
        await stream.send_all(b"x" * 100_000)
        raw = await read_until_closed(stream, timeout=5)
    assert head_and_body(raw)[1] == b"too big" and raw.lower().startswith(b"http/1.1 413")


async def test_origin_records_a_request_cut_mid_body_as_incomplete(nursery):
    origin = await started(nursery)
    await raw_request(("127.0.0.1", origin.port), b"POST /cut HTTP/1.1\r\nhost: o\r\ncontent-length: 10\r\n\r\nabc",
                      timeout=0.2)  # gives up and closes with 7 bytes unsent
    with trio.fail_after(5):
        while not origin.requests or origin.requests[0].body != b"abc":
            await trio.sleep(0.01)
    assert origin.requests[0].path == "/cut" and not origin.requests[0].complete


async def test_origin_close_after_cuts_the_body_and_closes(nursery):
    origin = await started(nursery)
    origin.script("/cut", Reply(body=b"x" * 100, close_after=10))
    origin.script("/cut-chunked", Reply(body=[b"x" * 8, b"y" * 8], chunked=True, close_after=12))
    raw = await raw_request(("127.0.0.1", origin.port), b"GET /cut HTTP/1.1\r\nhost: o\r\n\r\n")
    head, body = head_and_body(raw)
    assert "content-length: 100" in head and body == b"x" * 10
    raw = await raw_request(("127.0.0.1", origin.port), b"GET /cut-chunked HTTP/1.1\r\nhost: o\r\n\r\n")
    assert head_and_body(raw)[1] == b"8\r\nxxxxxxxx\r\n4\r\nyyyy\r\n"  # no last chunk
    async with httpx.AsyncClient(base_url=origin.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/cut")


async def test_origin_reset_sends_rst_after_reading_the_request(nursery):
    origin = await started(nursery)
    origin.script("/reset", Reply(reset=True))
    stream = await trio.open_tcp_stream("127.0.0.1", origin.port)
    async with stream:
        await stream.send_all(b"POST /reset HTTP/1.1\r\nhost: o\r\ncontent-length: 2\r\n\r\nhi")
        with pytest.raises(trio.BrokenResourceError) as caught:  # ECONNRESET, not a clean EOF
            with trio.fail_after(5):
                await stream.receive_some(65536)
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert origin.requests[0].body == b"hi"


async def test_origin_hang_reads_the_request_and_never_answers(nursery):
    origin = await started(nursery)
    origin.script("/hang", Reply(hang=True))
    stream = await trio.open_tcp_stream("127.0.0.1", origin.port)
    async with stream:
        await stream.send_all(b"GET /hang HTTP/1.1\r\nhost: o\r\n\r\n")
        with trio.move_on_after(0.3) as waited:
            await stream.receive_some(65536)
    assert waited.cancelled_caught
    assert [r.path for r in origin.requests] == ["/hang"]


async def test_origin_close_says_so_and_closes(nursery):
    origin = await started(nursery)
    origin.script("/bye", Reply(body=b"bye", close=True))
    stream = await trio.open_tcp_stream("127.0.0.1", origin.port)
    async with stream:
        await stream.send_all(b"GET /bye HTTP/1.1\r\nhost: o\r\n\r\n")
        raw = await read_until_closed(stream, timeout=5)  # returns only because the origin closed
    head, body = head_and_body(raw)
    assert "connection: close" in head and body == b"bye"
    async with httpx.AsyncClient(base_url=origin.url) as client:
        await client.get("/bye")
        await client.get("/bye")
    assert origin.connections == 3


async def test_origin_script_matching_prefixes_and_functions(nursery):
    origin = await started(nursery)
    origin.script("/api/*", Reply(body=b"api"))
    origin.script("/api/v2/*", Reply(body=b"v2"))
    origin.script("/api/exact", Reply(body=b"exact"))
    origin.script("/who", lambda request: Reply(body=request.header("x-user").encode()))

    async def later(request):
        return Reply(status=202, body=request.body[::-1])

    origin.script("/reverse", later)
    async with httpx.AsyncClient(base_url=origin.url) as client:
        got = [(await client.get(p)).content for p in ("/api/x?q=1", "/api/v2/y", "/api/exact?z", "/other")]
        who = await client.get("/who", headers={"x-user": "ann"})
        reverse = await client.post("/reverse", content=b"abc")
    assert got == [b"api", b"v2", b"exact", b"/other"]
    assert who.content == b"ann" and (reverse.status_code, reverse.content) == (202, b"cba")


async def test_origin_survives_garbage_and_answers_head(nursery):
    origin = await started(nursery)
    assert await raw_request(("127.0.0.1", origin.port), b"\x00garbage\r\n\r\n", timeout=5) == b""
    async with httpx.AsyncClient(base_url=origin.url) as client:
        head = await client.head("/x")
        after = await client.get("/after")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "2"
    assert after.content == b"/after"


async def test_origin_close_stops_serving(nursery):
    origin = await started(nursery)
    origin.close()
    with trio.fail_after(5):
        while True:  # the listener goes away once the cancel lands
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", origin.port)
            except OSError:
                break
            await stream.aclose()
            await trio.sleep(0.01)


# -- run_filter: one filter through its phases, no sockets -------------------------------

KEY = "s3cret"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


class Upper(Filter):
    """Upper-cases bodies both ways, changing nothing else; counts chunks in its state."""

    name = "upper"

    class Config(FilterConfig):
        tag: str = "up"
        limit: int = 3

    def new_state(self):
        return {"chunks": 0}

    async def on_request_headers(self, ctx, request):
        if request.path == "/buffer":
            ctx.buffer_request_body()
        request.headers.set("x-tag", self.config.tag)

    async def on_request_body(self, ctx, chunk, end):
        ctx.state(self)["chunks"] += 1
        if ctx.state(self)["chunks"] > self.config.limit:
            return LocalReply(413, "too many chunks\n")
        return chunk.upper() + (b"!" if end else b"")

    async def on_request_trailers(self, ctx, trailers):
        if trailers.get("x-bad"):
            return LocalReply(400, "bad trailer\n")

    async def on_response_headers(self, ctx, response):
        response.headers.remove("content-length")  # the size changes below
        self.log(ctx).info("upper.response", status=response.status)

    async def on_response_body(self, ctx, chunk, end):
        return chunk.upper()

    async def on_complete(self, ctx):
        ctx.vars["upper.chunks"] = ctx.state(self)["chunks"]


async def test_run_filter_api_key_denies_then_admits():
    denied = await run_filter(ApiKey, settings={"keys": {"ci": DIGEST}}, request=("GET", "/x", [("host", "a")]))
    assert denied.local_reply is not None and denied.local_reply.status == 401
    assert denied.response.status == 401 and denied.response_body == b"missing or invalid API key\n"
    assert denied.response.headers.get("www-authenticate") == 'ApiKey header="x-api-key"'
    assert denied.response.headers.get("content-length") == str(len(denied.response_body))
    assert denied.ctx.flags == ["LR"] and denied.completed == 0  # api_key has no on_complete

    admitted = await run_filter(ApiKey, {"keys": {"ci": DIGEST}}, request=("GET", "/x", {"x-api-key": KEY}),
                                response=(200, [("content-type", "text/plain")]), response_body=[b"hello"])
    assert admitted.local_reply is None and admitted.ctx.vars["auth.user"] == "ci"
    assert admitted.ctx.vars["auth.method"] == "api_key"
    assert "x-api-key" not in admitted.request.headers  # removed before the upstream
    assert admitted.request.headers.get("x-request-id")  # the proxy's forwarding rules ran first
    assert (admitted.response.status, admitted.response_body) == (200, b"hello")


async def test_run_filter_settings_errors_name_the_key_path():
    with pytest.raises(ConfigError) as caught:
        await run_filter(ApiKey, settings={"keys": {"ci": "not-a-digest"}, "hedaer": "x"})
    assert "filters.api_key.keys.ci" in str(caught.value) and "filters.api_key.hedaer" in str(caught.value)


async def test_run_filter_streams_bodies_through_the_phases():
    run = await run_filter(Upper, {"tag": "t"}, request=("POST", "/x", []), body=[b"ab", b"cd"],
                           trailers=[("x-sum", "1")], response=(200, [("content-length", "5")]),
                           response_body=[b"hel", b"lo"], response_trailers={"x-done": "yes"})
    assert run.request.headers.get("x-tag") == "t"
    assert run.request_body == b"ABCD!"  # each chunk, then end=True with an empty one
    assert run.request_trailers.get("x-sum") == "1"
    assert (run.response_body, run.response.headers.get("content-length")) == (b"HELLO", None)
    assert run.response_trailers.get("x-done") == "yes"
    assert run.completed == 1 and run.ctx.vars["upper.chunks"] == 3
    assert [e["event"] for e in run.log] == ["upper.response"]
    assert run.log[0]["filter"] == "upper" and run.log[0]["request_id"] == run.ctx.request_id


async def test_run_filter_buffered_body_is_one_call_with_its_length():
    run = await run_filter(Upper, request=("POST", "/buffer", [("content-length", "4")]), body=[b"ab", b"cd"])
    assert run.request_body == b"ABCD!" and run.ctx.vars["upper.chunks"] == 1
    assert run.request.headers.get("content-length") == "5"


class CountsBodies(Upper):
    """Upper, counting its response body calls; buffers the response on ``/buffer``."""

    name = "counts_bodies"

    async def on_request_headers(self, ctx, request):
        if request.path == "/buffer":
            ctx.buffer_response_body()

    async def on_response_body(self, ctx, chunk, end):
        ctx.vars["body calls"] = ctx.vars.get("body calls", 0) + 1
        return chunk.upper()


@pytest.mark.parametrize("path", ["/stream", "/buffer"])
@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("HEAD", 200), ("GET", 204), ("GET", 304)],
                         ids=["get-200", "head", "204", "304"])
async def test_run_filter_runs_no_body_phase_for_a_response_without_a_body(path, method, status):
    """As the proxy (c2a5020): a HEAD's response, a 204 and a 304 have no body, streamed or buffered."""
    run = await run_filter(CountsBodies, request=(method, path, []), response=(status, [("content-length", "5")]),
                           response_body=[b"hel", b"lo"])
    calls = run.ctx.vars.get("body calls", 0)
    if (method, status) == ("GET", 200):  # the control: each chunk then the end, or the whole body once
        assert (calls, run.response_body) == (1 if path == "/buffer" else 3, b"HELLO")
    else:
        assert (calls, run.response_body) == (0, b"")
    assert run.completed == 1


async def test_run_filter_a_buffered_response_goes_without_its_trailers_as_in_the_proxy():
    """A whole body goes with its Content-Length, which trailers cannot follow; streamed, they pass."""
    trailers = {"x-done": "yes"}
    whole = await run_filter(CountsBodies, request=("GET", "/buffer", []), response_body=[b"h", b"i"],
                             response_trailers=trailers)
    assert (whole.response_body, whole.response.headers.get("content-length")) == (b"HI", "2")
    assert whole.response_trailers is None
    streamed = await run_filter(CountsBodies, request=("GET", "/stream", []), response_body=[b"h", b"i"],
                                response_trailers=trailers)
    assert streamed.response_trailers.get("x-done") == "yes"


async def test_run_filter_local_replies_from_body_and_trailers():
    too_many = await run_filter(Upper, {"limit": 1}, request=("POST", "/x", []), body=[b"a", b"b"])
    assert too_many.local_reply.status == 413 and too_many.response.status == 413
    # From a body phase the reply runs back through the response phases (as in the proxy).
    assert too_many.response_body == b"TOO MANY CHUNKS\n" and too_many.completed == 1
    bad = await run_filter(Upper, request=("POST", "/x", []), body=[b"a"], trailers={"x-bad": "1"})
    assert (bad.response.status, bad.response_body) == (400, b"bad trailer\n")  # no response phase of its own


async def test_run_filter_a_raising_phase_is_a_500_and_on_complete_still_runs():
    class Broken(Upper):
        name = "broken"

        async def on_request_headers(self, ctx, request):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await run_filter(Broken)
    run = await run_filter(Broken, raises=False)
    assert isinstance(run.error, RuntimeError) and run.ctx.flags == ["FE"]
    assert run.response.status == 500 and run.completed == 1
    assert any(e["event"] == "exchange failed" for e in run.log)


async def test_run_filter_on_one_instance_keeps_no_state_between_exchanges():
    upper = build_filter(Upper, {"limit": 2})
    first = await run_filter(upper, request=("POST", "/x", []), body=[b"a"])
    second = await run_filter(upper, request=("POST", "/x", []), body=[b"b"])
    assert first.ctx.vars["upper.chunks"] == second.ctx.vars["upper.chunks"] == 2
    with pytest.raises(TypeError):
        await run_filter(upper, {"limit": 1})


async def test_run_filter_builds_an_app_for_a_filter_that_needs_one():
    cfg = {"listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}],
           "clusters": {"api": {"endpoints": ["127.0.0.1:9"]}},
           "routes": [{"match": {"prefix": "/api"}, "cluster": "api"}]}
    routed = await run_filter(Router, app=cfg, request=("GET", "/api/x", [("host", "a")]))
    assert routed.local_reply is None
    assert routed.ctx.cluster.name == "api" and routed.ctx.route.name == "routes[0]"
    missed = await run_filter(Router, app=cfg, request=("GET", "/else", [("host", "a")]))
    assert missed.response.status == 404 and missed.ctx.flags == ["NR"]


async def test_run_filter_opens_and_closes_a_filter_with_background_work():
    class Ticker(Filter):
        name = "ticker"

        async def open(self, nursery):
            self.events = ["open"]
            self.started = trio.Event()
            nursery.start_soon(self._tick)

        async def _tick(self):
            self.started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.events.append("background cancelled")

        async def on_request_headers(self, ctx, request):
            await self.started.wait()  # the background task runs during the exchange
            self.events.append("request")

        async def close(self):
            self.events.append("close")

    ticker = build_filter(Ticker)
    await run_filter(ticker)
    assert ticker.events == ["open", "request", "close", "background cancelled"]


async def test_origin_streams_an_async_body_as_the_test_lets_it(nursery):
    origin = await started(nursery)
    go_on = trio.Event()

    async def parts():
        yield b"first"
        await go_on.wait()
        yield b"second"

    origin.script("/gated", lambda request: Reply(body=parts()))
    origin.script("/sized", lambda request: Reply(headers=[("content-length", "11")], body=parts()))
    async with httpx.AsyncClient(base_url=origin.url) as client:
        async with client.stream("GET", "/gated") as gated:
            assert gated.headers["transfer-encoding"] == "chunked"
            chunks = gated.aiter_raw()
            assert await chunks.__anext__() == b"first"
            assert not go_on.is_set()  # the rest waits for the test
            go_on.set()
            assert b"".join([c async for c in chunks]) == b"second"
        sized = await client.get("/sized")  # a content-length given frames a streamed body
    assert sized.content == b"firstsecond" and "transfer-encoding" not in sized.headers
