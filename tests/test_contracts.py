"""The explicit contracts a filter author relies on: ordering
(before/after/first/last validated per chain at build), load-time errors,
per-route settings, the logging helper, ``ctx.timings`` and the flags table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import httpx
import pytest
import trio
from structlog.testing import capture_logs

import sluice
from sluice import CONTINUE, ConfigError, Filter, LocalReply
from sluice.control.app import App
from sluice.control.config import parse
from sluice.control.registry import Plugins
from sluice.testing import Origin, Reply, serve

from .conftest import InProcess, config, raw_request


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


MARKS = ["accepted", "headers_read", "upstream_connected", "upstream_headers", "upstream_done"]


async def timings_of(start_origin, *paths: str, http2: bool = False, pause: float = 0.0) -> list[dict]:
    """``ctx.timings`` of each request, sent in turn on one client connection."""
    seen: list[dict] = []

    class Watcher(Filter):
        name = "watcher"

        async def on_complete(self, ctx):
            seen.append(dict(ctx.timings))

    origin = await start_origin()
    async with serve(config(origin.address, filters=["watcher", "router"], listener={"http2": http2}),
                     plugins=["router", "balancer"], extra={"mine": InProcess(Watcher)}) as proxy:
        async with httpx.AsyncClient(http1=not http2, http2=http2) as client:
            for i, path in enumerate(paths):
                if i:
                    await trio.sleep(pause)  # the connection's age, not a synchronisation
                r = await client.get(proxy.url + path)
                assert r.status_code == 200 and r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    return seen


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_ctx_timings_mark_accept_head_connect_first_upstream_byte_and_last_byte(start_origin, http2):
    [seen] = await timings_of(start_origin, "/", http2=http2)
    assert list(seen) == MARKS
    assert seen["accepted"] <= 0 <= seen["headers_read"]
    assert [seen[m] for m in MARKS] == sorted(seen[m] for m in MARKS)


async def test_accepted_is_the_connections_so_a_reused_one_shows_its_age(start_origin):
    first, second = await timings_of(start_origin, "/a", "/b", pause=0.05)
    assert first["headers_read"] - first["accepted"] < second["headers_read"] - second["accepted"]
    assert second["headers_read"] - second["accepted"] >= 0.05


async def test_a_local_reply_has_no_upstream_marks(start_origin):
    seen = {}

    class Refuser(Filter):
        name = "refuser"

        async def on_request_headers(self, ctx, request):
            return LocalReply(403, "no\n")

        async def on_complete(self, ctx):
            seen.update(ctx.timings)

    origin = await start_origin()
    async with serve(config(origin.address, filters=["refuser", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Refuser)}) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/")).status_code == 403
    assert list(seen) == ["accepted", "headers_read"]


# -- flags: one table, and nothing the code sets is missing from it --------------

_ROOT = Path(__file__).resolve().parents[1]
_CODE = re.compile(r"^[A-Z]{2,4}$")
_SETTERS = frozenset({"_refused", "_failed", "_stop_reading"})  # helpers whose flag arguments are set


def _flag_literals(tree: ast.AST) -> set[str]:
    """Every flag code a module sets: ``flag="XX"`` anywhere, and the string
    codes given to ``flags.append/extend`` or to the helpers that set them."""
    found: set[str] = set()

    def codes(node: ast.AST) -> set[str]:
        return {n.value for n in ast.walk(node)
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and _CODE.match(n.value)}

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "flag":
                found |= codes(kw.value)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value if isinstance(func, ast.Attribute) else None
        owner_name = getattr(owner, "attr", getattr(owner, "id", ""))
        if (name in ("append", "extend") and owner_name == "flags") or name in _SETTERS:
            for arg in node.args:
                found |= codes(arg)
    return found


def test_every_flag_the_code_sets_is_in_the_table():
    sources = [p for d in ("core", "plugins") for p in (_ROOT / d).rglob("*.py")
               if "examples" not in p.relative_to(_ROOT).parts]  # examples are third-party code
    found: dict[str, list[str]] = {}
    for path in sources:
        for code in _flag_literals(ast.parse(path.read_text(), str(path))):
            found.setdefault(code, []).append(str(path.relative_to(_ROOT)))
    # The scan itself must work: these are set in four different ways.
    assert {"NR", "UF", "UC", "DTLS", "DPE", "TI", "FE"} <= set(found)
    missing = {code: where for code, where in found.items() if code not in sluice.FLAGS}
    assert not missing, f"flags set in the code but not in sluice.FLAGS (core/proxy/flags.py): {missing}"


def test_the_scan_catches_a_flag_set_each_way():
    tree = ast.parse("LocalReply(403, flag='ZZ')\nctx.flags.append('YY')\n"
                     "self._refused(c, l, None, ('XX', 'WW'), None, None, 0)\nx.flags.extend(['VV'])\n")
    assert _flag_literals(tree) == {"ZZ", "YY", "XX", "WW", "VV"}


def test_every_flag_in_the_table_is_set_somewhere_or_documented_as_a_filters():
    """No stale entries: each code in the table is set by the code (LR is the
    LocalReply default, set through ``reply.flag``)."""
    text = "\n".join(p.read_text() for d in ("core", "plugins") for p in (_ROOT / d).rglob("*.py"))
    for code in sluice.FLAGS:
        assert f'"{code}"' in text.replace(f'Flag("{code}"', ""), code


def test_the_flags_table_is_exported_and_complete():
    assert all(isinstance(f, sluice.Flag) and f.code == code and f.meaning and f.set_by and f.status
               for code, f in sluice.FLAGS.items())
    assert sluice.LocalReply(403).flag in sluice.FLAGS


# -- the response phases and core-generated replies --------------------------------
#
# Each response phase runs at most once per exchange. A reply the core makes
# before the response phases ran (503 UF, 502 UC, 504 UT, 404 NR, 413 ...)
# runs through them once, flagged; one made after on_response_headers ran
# for the upstream's head (a buffered body that broke or overflowed) goes to
# the client without them; one made after bytes went out is a cut.


class Seer(Filter):
    """Records what each response phase and on_complete see (one per test)."""

    name = "seer"
    buffer = False

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[tuple] = []
        Seer.latest = self

    async def on_response_headers(self, ctx, response):
        self.seen.append(("headers", response.status, tuple(ctx.flags), type(ctx.error).__name__))
        if self.buffer:
            ctx.buffer_response_body()

    async def on_response_body(self, ctx, chunk, end):
        self.seen.append(("body", len(chunk), end))

    async def on_complete(self, ctx):
        self.seen.append(("complete", ctx.response.status if ctx.response else None, tuple(ctx.flags)))

    def phases(self, name):
        return [entry for entry in self.seen if entry[0] == name]


class BufferingSeer(Seer):
    buffer = True


def closed_port() -> str:
    """An address nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def through_seer(nursery, origin: Origin | None, path: str = "/", *, buffer: bool = False,
                       endpoint: str | None = None, listener: dict | None = None,
                       routes: list | None = None, **request):
    """One request through ["seer", "router"] in front of ``origin``; returns
    (the client's status, or the httpx error's class name) and the Seer."""
    if origin is not None:
        await nursery.start(origin.serve)
    cfg = config(endpoint or origin.address, filters=["seer", "router"], listener=listener, routes=routes,
                 cluster={"response_timeout": 0.3, "connect_timeout": 0.5, "connect_tries": 1})
    seer = BufferingSeer if buffer else Seer
    async with serve(cfg, plugins=["router", "balancer"], extra={"mine": InProcess(seer)}) as proxy:
        async with httpx.AsyncClient(timeout=5) as client:
            try:
                r = await client.request(request.pop("method", "GET"), proxy.url + path, **request)
                got = r.status_code
            except httpx.TransportError as exc:
                got = type(exc).__name__
    return got, Seer.latest


@pytest.mark.parametrize(("script", "status", "flag"), [
    (None, 503, "UF"),                       # connect refused
    (Reply(reset=True), 502, "UC"),          # reset before the head
    (Reply(hang=True), 504, "UT"),           # no head within response_timeout
])
async def test_a_core_reply_before_any_response_phase_runs_through_them_once(nursery, script, status, flag):
    origin = Origin(script) if script is not None else None
    got, seer = await through_seer(nursery, origin, endpoint=None if origin else closed_port())
    assert got == status
    assert seer.phases("headers") == [("headers", status, (flag,), "UpstreamError")]
    assert seer.phases("body") == [("body", len(f"{httpx.codes.get_reason_phrase(status).lower()}\n"), True)]
    assert seer.phases("complete") == [("complete", status, (flag,))]


async def test_no_route_and_a_body_over_the_limit_run_through_the_response_phases(nursery):
    origin = Origin()
    got, seer = await through_seer(nursery, origin, listener={"limits": {"max_body_bytes": 4}},
                                   method="POST", content=b"too long")
    assert got == 413 and seer.phases("headers") == [("headers", 413, ("LR",), "NoneType")]
    got, seer = await through_seer(nursery, None, "/elsewhere", endpoint=origin.address,
                                   routes=[{"match": {"prefix": "/api/"}, "cluster": "backend"}])
    assert got == 404 and seer.phases("headers") == [("headers", 404, ("NR",), "NoneType")]
    assert seer.phases("complete") == [("complete", 404, ("NR",))]


async def test_a_cut_mid_body_after_the_head_went_out_runs_no_phase_again(nursery):
    origin = Origin(Reply(body=b"x" * 100, close_after=10))
    got, seer = await through_seer(nursery, origin)
    assert got == "RemoteProtocolError"  # the client's connection was cut: no status could change
    assert seer.phases("headers") == [("headers", 200, (), "NoneType")]
    assert all(not end for _, _, end in seer.phases("body"))
    assert seer.phases("complete") == [("complete", 200, ("UC",))]


async def test_a_stall_mid_body_is_a_cut_flagged_ut(nursery):
    origin = Origin(Reply(body=[b"a", b"b"], chunked=True, chunk_delay=2.0))
    got, seer = await through_seer(nursery, origin)
    assert got == "RemoteProtocolError"
    assert len(seer.phases("headers")) == 1
    assert seer.phases("complete") == [("complete", 200, ("UT",))]


@pytest.mark.parametrize(("script", "listener", "flag"), [
    (Reply(body=b"x" * 100, close_after=10), None, "UC"),                     # broke mid-body
    (Reply(body=[b"a", b"b"], chunked=True, chunk_delay=2.0), None, "UT"),   # stalled mid-body
    (Reply(body=b"x" * 100), {"limits": {"max_buffered_body_bytes": 50}}, "UBL"),  # over the buffer
])
async def test_a_buffered_response_that_fails_after_its_head_is_not_run_through_the_head_phase_again(
        nursery, script, listener, flag):
    got, seer = await through_seer(nursery, Origin(script), buffer=True, listener=listener)
    assert got == (504 if flag == "UT" else 502)
    assert seer.phases("headers") == [("headers", 200, (), "NoneType")]  # the upstream's head, once
    assert seer.phases("body") == []  # the whole body never came
    assert seer.phases("complete") == [("complete", got, (flag,))]


async def test_a_reply_from_a_buffered_body_phase_skips_the_head_phases_that_saw_the_upstreams(nursery):
    class Refuse(Filter):
        name = "refuse"

        async def on_response_headers(self, ctx, response):
            ctx.buffer_response_body()

        async def on_response_body(self, ctx, chunk, end):
            return LocalReply(451, "withheld\n") if b"secret" in chunk else CONTINUE

    origin = Origin(Reply(body=b"a secret"))
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["seer", "refuse", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Seer, Refuse)}) as proxy:
        r = await proxy_get(proxy.url)
    assert r.status_code == 451 and r.text == "withheld\n"
    seer = Seer.latest
    assert seer.phases("headers") == [("headers", 200, (), "NoneType")]
    assert seer.phases("body") == []
    assert seer.phases("complete") == [("complete", 451, ("LR",))]


async def proxy_get(url: str, path: str = "/") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(url + path)


# -- body phases that change sizes: framing stays correct ---------------------------


class Stretch(Filter):
    """Doubles every body byte both ways and adds a tail on the last call;
    removes Content-Length in the head phases when ``drop`` (the documented way)."""

    name = "stretch"
    drop = True

    async def on_request_headers(self, ctx, request):
        if self.drop:
            request.headers.remove(b"content-length")

    async def on_request_body(self, ctx, chunk, end):
        return bytes(b for c in chunk for b in (c, c)) + (b"!" if end else b"")

    async def on_response_headers(self, ctx, response):
        if self.drop:
            response.headers.remove(b"content-length")

    async def on_response_body(self, ctx, chunk, end):
        return bytes(b for c in chunk for b in (c, c)) + (b"!" if end else b"")


class StaleStretch(Stretch):
    name = "stale"
    drop = False


class WholeStretch(Stretch):
    """The other documented way: ask for the whole body; the core frames it."""

    name = "whole"
    drop = False

    async def on_request_headers(self, ctx, request):
        ctx.buffer_request_body()

    async def on_response_headers(self, ctx, response):
        ctx.buffer_response_body()


async def stretched(nursery, name: str, http2: bool, method: str = "POST", content: bytes = b"abc"):
    origin = Origin(Reply(body=b"xyz"))
    await nursery.start(origin.serve)
    cfg = config(origin.address, filters=[name, "router"], listener={"http2": http2})
    async with serve(cfg, plugins=["router", "balancer"],
                     extra={"mine": InProcess(Stretch, StaleStretch, WholeStretch)}) as proxy:
        async with httpx.AsyncClient(http1=not http2, http2=http2, timeout=5) as client:
            with capture_logs() as logs:
                try:
                    r = await client.request(method, proxy.url + "/", content=content)
                except httpx.TransportError as exc:
                    r = exc
    return r, origin, logs


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_a_filter_that_removes_content_length_may_resize_both_ways(nursery, http2):
    r, origin, _ = await stretched(nursery, "stretch", http2)
    sent = origin.requests[0]
    assert sent.header("content-length") is None and sent.header("transfer-encoding") == "chunked"
    assert sent.body == b"aabbcc!"
    assert r.status_code == 200 and r.content == b"xxyyzz!"
    assert "content-length" not in r.headers
    assert r.headers.get("transfer-encoding") == (None if http2 else "chunked")


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_a_buffered_body_is_sent_with_its_exact_length(nursery, http2):
    r, origin, _ = await stretched(nursery, "whole", http2)
    sent = origin.requests[0]
    assert sent.header("content-length") == "7" and sent.body == b"aabbcc!"
    assert r.headers["content-length"] == "7" and r.content == b"xxyyzz!"


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_a_stale_request_content_length_is_a_500_never_a_wrong_body_upstream(nursery, http2):
    r, origin, logs = await stretched(nursery, "stale", http2)
    assert r.status_code == 500
    assert all(len(q.body) <= 3 for q in origin.requests)  # never more than the 3 bytes declared
    failed = [e for e in logs if e["event"] == "exchange failed"]
    assert "removes content-length in on_request_headers" in str(failed[0]["exc_info"])


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_a_stale_response_content_length_cuts_the_response_instead_of_misframing_it(nursery, http2):
    Seer.latest = None
    r, _, logs = await stretched(nursery, "stale", http2, method="GET", content=b"")
    # h1: the head said 3 bytes, then the connection closed; h2: the stream was reset.
    # Either way the client never reads a body that disagrees with its Content-Length.
    assert isinstance(r, httpx.RemoteProtocolError)
    failed = [e for e in logs if e["event"] == "exchange failed"]
    assert "removes content-length in on_response_headers" in str(failed[0]["exc_info"])


async def test_a_head_response_keeps_its_length_through_a_body_phase(nursery):
    r, _, logs = await stretched(nursery, "stale", False, method="HEAD", content=b"")
    assert r.status_code == 200 and r.headers["content-length"] == "3" and r.content == b""
    assert not [e for e in logs if e["event"] == "exchange failed"]


async def test_the_last_body_call_has_end_true_and_may_be_an_empty_chunk(nursery):
    calls: list[tuple[bytes, bool]] = []

    class Watch(Filter):
        name = "watch"

        async def on_response_body(self, ctx, chunk, end):
            calls.append((chunk, end))

    origin = Origin(Reply(body=[b"ab", b"cd"], chunked=True)).script("/empty", Reply(body=b""))
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["watch", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Watch)}) as proxy:
        assert (await proxy_get(proxy.url)).content == b"abcd"
        assert b"".join(c for c, _ in calls) == b"abcd"
        assert calls[-1] == (b"", True) and all(not end for _, end in calls[:-1])
        calls.clear()
        assert (await proxy_get(proxy.url, "/empty")).content == b""
        assert calls == [(b"", True)]  # an empty body: one call


async def test_a_resized_response_to_an_http10_client_is_delimited_by_the_close(nursery):
    origin = Origin(Reply(body=b"xyz"))
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["stretch", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Stretch)}) as proxy:
        got = await raw_request(proxy.address, b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower() and body == b"xxyyzz!"


# -- more rows of the table: the replies no response phase sees, and the rest ------


class Boom(Filter):
    name = "boom"

    async def on_request_headers(self, ctx, request):
        if request.path == "/boom":
            raise RuntimeError("a filter's bug")

    async def on_response_headers(self, ctx, response):
        if ctx.request.path == "/teapot":
            return LocalReply(418, "short and stout\n")


async def test_a_filter_that_raises_answers_500_through_no_response_phase(nursery):
    origin = Origin()
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["seer", "boom", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Seer, Boom)}) as proxy:
        r = await proxy_get(proxy.url, "/boom")
    assert r.status_code == 500 and "a filter's bug" not in r.text
    assert Seer.latest.phases("headers") == []
    assert Seer.latest.phases("complete") == [("complete", 500, ("FE",))]


async def test_a_reply_from_on_response_headers_runs_through_the_filters_before_it_only(nursery):
    origin = Origin()
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["seer", "boom", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Seer, Boom)}) as proxy:
        r = await proxy_get(proxy.url, "/teapot")
    assert r.status_code == 418
    # Response phases run in reverse: boom saw the upstream's 200 and answered;
    # seer, before it in the chain, sees only the reply, once.
    assert Seer.latest.phases("headers") == [("headers", 418, ("LR",), "NoneType")]


async def test_a_malformed_request_body_answers_400_through_no_response_phase(nursery):
    origin = Origin()
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["seer", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Seer)}) as proxy:
        got = await raw_request(proxy.address, b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n"
                                               b"\r\nzz\r\nab\r\n0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 ")
    assert Seer.latest.phases("headers") == []
    assert Seer.latest.phases("complete") == [("complete", 400, ("DPE",))]


async def test_a_full_circuit_breaker_answers_503_uo_through_the_response_phases(nursery):
    origin = Origin().script("/hang", Reply(hang=True))
    await nursery.start(origin.serve)
    cfg = config(origin.address, filters=["seer", "router"],
                 cluster={"response_timeout": 2.0, "circuit_breakers": {"max_requests": 1}})
    async with serve(cfg, plugins=["router", "balancer"], extra={"mine": InProcess(Seer)}) as proxy:
        async with httpx.AsyncClient(timeout=5) as client, trio.open_nursery() as inner:
            inner.start_soon(client.get, proxy.url + "/hang")
            with trio.fail_after(5):
                while not origin.requests:  # the first holds the cluster's one slot
                    await trio.sleep(0.01)
            r = await client.get(proxy.url + "/second")
            inner.cancel_scope.cancel()
    assert r.status_code == 503
    assert ("headers", 503, ("UO",), "NoneType") in Seer.latest.phases("headers")


def test_the_errors_a_filter_meets_are_exported_with_their_attributes():
    from sluice.errors import ClientGone, UpstreamError
    from sluice.protocol.events import ProtocolError

    assert (sluice.UpstreamError, sluice.ClientGone, sluice.ProtocolError) == (UpstreamError, ClientGone, ProtocolError)
    assert {"UpstreamError", "ClientGone", "ProtocolError", "FLAGS", "Flag"} <= set(sluice.__all__)
    exc = sluice.UpstreamError("refused", status=503, flag="UF")
    assert (exc.status, exc.flag) == (503, "UF") and exc.flag in sluice.FLAGS


async def test_a_stale_request_content_length_never_reaches_an_http2_upstream_misframed(nursery):
    """Through an h2c hop (a second sluice speaking HTTP/2 to the front one)."""
    origin = Origin()
    await nursery.start(origin.serve)
    async with serve(config(origin.address, listener={"http2": True}), plugins=["router", "balancer"]) as back:
        front_cfg = config(f"127.0.0.1:{back.address[1]}", filters=["stale", "router"], cluster={"protocol": "h2c"})
        async with serve(front_cfg, plugins=["router", "balancer"],
                         extra={"mine": InProcess(StaleStretch)}) as front:
            with capture_logs() as logs:
                async with httpx.AsyncClient(timeout=5) as client:
                    r = await client.post(front.url + "/", content=b"abc")
    assert r.status_code == 500
    assert all(len(q.body) <= 3 for q in origin.requests)
    assert any("removes content-length in on_request_headers" in str(e.get("exc_info")) for e in logs)


async def test_a_refused_head_is_seen_by_on_complete_only(nursery):
    origin = Origin()
    await nursery.start(origin.serve)
    async with serve(config(origin.address, filters=["seer", "router"]), plugins=["router", "balancer"],
                     extra={"mine": InProcess(Seer)}) as proxy:
        got = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\nno colon here\r\n\r\n")
        with trio.fail_after(5):  # the refusal's on_complete runs after the answer went out
            while not Seer.latest.seen:
                await trio.sleep(0.01)
    assert got.startswith(b"HTTP/1.1 400 ")
    assert Seer.latest.seen == [("complete", 400, ("DPE",))]
    assert origin.requests == []
