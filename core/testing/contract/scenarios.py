"""The scenarios (``SCENARIOS``, in order): get, post, empty-body,
chunked-request-body, large-body (3 MiB streamed), request-trailers,
response-trailers, local-reply-before and local-reply-after (a probe
filter answers before or after the filter), upstream-refused (a closed
port), upstream-reset (RST), upstream-timeout (a route timeout of 0.3 s),
upstream-closed-mid-body, client-abort-request-body,
client-abort-response-body, cancellation (the proxy cancelled with three
exchanges in flight: waiting for the upstream, mid-upload, mid-download),
graceful-stop (the proxy stopped, and draining, with one in flight),
upstream-early-answer (the origin answers before reading the request
body), head, keep-alive (5 in turn on one connection) and concurrent (20
at once), each of the last two with its own id per request.

A scenario is an async function of the ``_Run``: it provokes what it is
named for through the run's clients and origin, and leaves the checks for
after the proxy stopped in ``run.later`` (``run.expect``,
``run.check_origin``, ...). The rules every scenario is held to are
``rules.verdict``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..origin import Reply
from .clients import _WAIT, _Answer, _head
from .instrument import _HARNESS
from .probes import _ASK, _After, _Before
from .rules import DESIGNED, ENDED, FRAMING, ISOLATED

if TYPE_CHECKING:
    from .run import _Run

_PREFIX = "/__contract/"  # the paths of the scenarios' requests

Scenario = Callable[["_Run"], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def _scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn
    return register


async def _until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return True
    return False


@_scenario("get")
async def _get(run: _Run) -> None:
    run.expect(await run.request("GET", _PREFIX + "get?q=1"), 200, "GET /__contract/get?q=1")


@_scenario("post")
async def _post(run: _Run) -> None:
    body = b"a request body, framed by its length\n" * 20
    answer = await run.request("POST", _PREFIX + "post", body)
    run.expect(answer, 200, "POST /__contract/post")
    run.check_echo(answer, body, "POST /__contract/post")
    run.check_origin(_PREFIX + "post")


@_scenario("empty-body")
async def _empty(run: _Run) -> None:
    run.expect(await run.request("POST", _PREFIX + "empty", b""), 200, "POST /__contract/empty")
    run.check_origin(_PREFIX + "empty")


@_scenario("chunked-request-body")
async def _chunked(run: _Run) -> None:
    chunks = [b"chunk %d of a chunked body\n" % i for i in range(8)]
    answer = await run.request("POST", _PREFIX + "chunked", chunks, chunked=True)
    run.expect(answer, 200, "POST /__contract/chunked")
    run.check_echo(answer, b"".join(chunks), "POST /__contract/chunked")
    run.check_origin(_PREFIX + "chunked")


@_scenario("large-body")
async def _large(run: _Run) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    chunks = [piece] * 48  # 3 MiB, written as it streams
    answer = await run.request("PUT", _PREFIX + "large", chunks)
    run.expect(answer, 200, "PUT /__contract/large")
    run.check_echo(answer, b"".join(chunks), "PUT /__contract/large (3 MiB)")
    run.check_origin(_PREFIX + "large")


@_scenario("request-trailers")
async def _request_trailers(run: _Run) -> None:
    answer = await run.request("POST", _PREFIX + "request-trailers", [b"with ", b"trailers\n"],
                               trailers=[("x-contract-trailer", "sent")])
    target = "POST /__contract/request-trailers"
    run.expect(answer, 200, target)
    run.check_origin(_PREFIX + "request-trailers")

    def check() -> None:
        got = [r.trailers for r in run.origin.requests if f"{r.method} {r.target}" == target]
        if got and ("x-contract-trailer", "sent") not in got[0] and run.plain(target, "on_request_trailers"):
            run.violate(FRAMING, f"{target}: the origin got trailers {got[0]}, not the client's")
    run.later.append(check)


@_scenario("response-trailers")
async def _response_trailers(run: _Run) -> None:
    run.origin.script(_PREFIX + "response-trailers",
                      Reply(body=[b"answered ", b"with trailers\n"], trailers=[("x-contract-trailer", "answered")]))
    answer = await run.request("GET", _PREFIX + "response-trailers", headers=[("te", "trailers")])
    target = "GET /__contract/response-trailers"
    run.expect(answer, 200, target)

    def check() -> None:
        if answer.complete and answer.status == 200 and ("x-contract-trailer", "answered") not in answer.trailers \
                and run.plain(target, "on_response_trailers"):
            run.violate(FRAMING, f"{target}: the client got trailers {answer.trailers}, not the origin's")
    run.later.append(check)


async def _local_reply(run: _Run, ask: str, probe: str) -> None:
    path = _PREFIX + ask
    await run.request("POST", path, b"never forwarded\n", headers=[(_ASK, ask)])

    def check() -> None:
        who = {e.answered for e in run.recorder.exchanges.values() if e.target == f"POST {path}"} - {""}
        if not who & {probe, run.cls.name}:
            run.violate(DESIGNED, f"POST {path}: meant to be answered by {probe}, "
                                  f"answered by {', '.join(sorted(who)) or 'no filter'}")
    run.later.append(check)
    if any(r.path == path for r in run.origin.requests):
        run.violate(DESIGNED, f"POST {path}: answered locally by a filter, it still reached the origin")


@_scenario("local-reply-before")
async def _reply_before(run: _Run) -> None:
    await _local_reply(run, "reply-before", _Before.name)


@_scenario("local-reply-after")
async def _reply_after(run: _Run) -> None:
    await _local_reply(run, "reply-after", _After.name)


@_scenario("upstream-refused")
async def _refused(run: _Run) -> None:
    run.expect(await run.request("GET", _PREFIX + "refused"), 503, "GET /__contract/refused")


@_scenario("upstream-reset")
async def _reset(run: _Run) -> None:
    run.origin.script(_PREFIX + "reset", Reply(reset=True))
    run.expect(await run.request("POST", _PREFIX + "reset", b"reset me\n"), 502, "POST /__contract/reset")


@_scenario("upstream-timeout")
async def _timeout(run: _Run) -> None:
    run.origin.script(_PREFIX + "timeout", Reply(hang=True))
    run.expect(await run.request("GET", _PREFIX + "timeout"), 504, "GET /__contract/timeout")


@_scenario("upstream-closed-mid-body")
async def _closed_mid_body(run: _Run) -> None:
    run.origin.script(_PREFIX + "cut", Reply(body=[b"z" * 8192] * 8, close_after=10_000))
    answer = await run.request("GET", _PREFIX + "cut", cut=True)
    run.expect(answer, 200, "GET /__contract/cut")

    def check() -> None:
        if answer.complete and not run.answered("GET /__contract/cut") and not run.buffered("GET /__contract/cut"):
            run.violate(DESIGNED, "GET /__contract/cut: the origin closed mid-body, yet the client got it whole")
    run.later.append(check)


@_scenario("client-abort-request-body")
async def _abort_upload(run: _Run) -> None:
    path = _PREFIX + "abort-upload"
    head = _head("POST", path, run.headers(("content-length", "1000000")))
    stream = await trio.open_tcp_stream(*run.address)
    async with stream:
        await stream.send_all(head + b"u" * 65536)
        # Until the origin sees body bytes (or a filter answered, or a second
        # passes: a filter holds them), then leave.
        await _until(lambda: any(r.path == path and r.body for r in run.origin.requests)
                     or run.answered(f"POST {path}"), 1.0)
    run.expect_ending(f"POST {path}", lambda e: "DC" in e.flags, "with flag DC (the client went away)")


@_scenario("client-abort-response-body")
async def _abort_download(run: _Run) -> None:
    path = _PREFIX + "abort-download"
    run.origin.script(path, Reply(body=[b"d" * 16384] * 64, chunk_delay=0.005))
    stream = await trio.open_tcp_stream(*run.address)
    async with stream:
        await stream.send_all(_head("GET", path, run.headers(("connection", "close"))))
        received = b""
        with trio.move_on_after(_WAIT) as waited:
            while b"\r\n\r\n" not in received or len(received) < 20_000:
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
        if waited.cancelled_caught:
            run.violate(ENDED, f"GET {path}: no response body within {_WAIT} s")
    run.expect_ending(f"GET {path}", lambda e: "DC" in e.flags, "with flag DC (the client went away)")


@_scenario("cancellation")
async def _cancellation(run: _Run) -> None:
    """Three exchanges in flight when the proxy is cancelled: one waiting for
    the upstream's answer, one mid-upload, one mid-download."""
    waiting, upload, download = (_PREFIX + p for p in ("in-flight", "in-flight-upload", "in-flight-download"))
    run.origin.script(waiting, Reply(hang=True))
    # 480 KiB over 1.2 s: still streaming when cancelled, and within a buffering filter's limit.
    run.origin.script(download, Reply(body=[b"d" * 8192] * 60, chunk_delay=0.02))
    received = bytearray()

    async def downloading() -> None:
        with trio.move_on_after(_WAIT):
            async with await trio.open_tcp_stream(*run.address) as stream:
                await stream.send_all(_head("GET", download, run.headers()))
                with contextlib.suppress(trio.BrokenResourceError):
                    while data := await stream.receive_some(65536):  # until the proxy goes away
                        received.extend(data)

    def reached(path: str, body: bool = False) -> bool:
        return any(r.path == path and (r.body or not body) for r in run.origin.requests)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run.request, "POST", waiting, b"in flight\n", cut=True), name=f"{_HARNESS}-client")
        nursery.start_soon(downloading, name=f"{_HARNESS}-client-download")
        async with await trio.open_tcp_stream(*run.address) as up:
            await up.send_all(_head("POST", upload, run.headers(("content-length", "1000000"))) + b"u" * 65536)
            if not await _until(lambda: (reached(waiting) or run.answered(f"POST {waiting}"))
                                and (reached(download) or run.answered(f"GET {download}"))):
                run.violate(ENDED, f"{waiting} and {download} did not both reach the origin within 2 s")
            # Until the upload's body reaches the origin and the download's the
            # client; a filter buffering either holds it in the proxy: in flight too.
            await _until(lambda: reached(upload, body=True) or run.answered(f"POST {upload}"), 0.5)
            await _until(lambda: len(received) > 20_000, 0.5)
            run.cancel_proxy()
            with trio.move_on_after(_WAIT), contextlib.suppress(trio.BrokenResourceError):
                await up.receive_some(65536)  # until the proxy going away closes it
    cancelled = "cancelled (ctx.error a trio.Cancelled)"
    for target in (f"POST {waiting}", f"POST {upload}", f"GET {download}"):
        run.expect_ending(target, lambda e: "Cancelled" in e.error, cancelled)


@_scenario("graceful-stop")
async def _graceful_stop(run: _Run) -> None:
    """The proxy told to stop while an exchange waits for a slow upstream: it drains, the client gets its answer."""
    path = _PREFIX + "draining"
    run.origin.script(path, Reply(delay=0.2))
    answers: list[_Answer] = []

    async def client() -> None:
        answers.append(await run.request("GET", path))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, name=f"{_HARNESS}-client")
        if await _until(lambda: any(r.path == path for r in run.origin.requests) or run.answered(f"GET {path}")):
            run.stop_proxy()
        else:
            run.violate(ENDED, f"GET {path} never reached the origin")
    if answers:
        run.expect(answers[0], 200, f"GET {path}")


@_scenario("upstream-early-answer")
async def _early(run: _Run) -> None:
    path = _PREFIX + "early"
    run.origin.script(path, Reply(early=True, body=b"answered before the body\n"))
    body = b"e" * 16384  # under the core's drain limit: the connection may even stay open
    run.expect(await run.request("POST", path, body), 200, f"POST {path}")


@_scenario("head")
async def _head_request(run: _Run) -> None:
    run.origin.script(_PREFIX + "head", Reply(body=b"a body a HEAD does not get\n"))
    run.expect(await run.request("HEAD", _PREFIX + "head"), 200, "HEAD /__contract/head")


async def _numbered(run: _Run, kind: str, count: int, limits: Any = None) -> None:
    """``count`` POSTs to ``/__contract/KIND/i`` through one httpx client, all at
    once or (``limits``: one connection) one after another on a kept-alive
    connection; each response must be its own request's."""
    import httpx  # the kit's test extra; imported here so the battery module loads without it

    prefix = f"{_PREFIX}{kind}/"
    for i in range(count):
        run.origin.script(f"{prefix}{i}", Reply(headers=[("x-contract-id", str(i))]))
    answers: dict[int, httpx.Response | BaseException] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        try:
            answers[i] = await client.post(
                f"{prefix}{i}", content=f"exchange {i}\n".encode(),
                headers={**dict(run.spec.options.request_headers), "x-contract-id": str(i)})
        except httpx.HTTPError as exc:
            answers[i] = exc

    host, port = run.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=_WAIT,
                                 limits=limits or httpx.Limits()) as client:
        if limits is None:
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, client, i, name=f"{_HARNESS}-client-{i}")
        else:
            for i in range(count):
                await one(client, i)
    for i in range(count):
        answer = answers.get(i)
        if not isinstance(answer, httpx.Response):
            run.violate(ENDED, f"{kind} exchange {i} failed: {answer!r}")
            continue
        got = answer.headers.get("x-contract-id")
        if answer.status_code == 200 and got != str(i):
            run.violate(ISOLATED, f"{kind} exchange {i} got the response of exchange {got}")
        sent = f"exchange {i}\n".encode()
        if answer.status_code == 200 and not run.body_phases and answer.content != sent:
            run.violate(ISOLATED, f"{kind} exchange {i} got the body {answer.content[:40]!r}")
    for r in run.origin.requests:
        if r.path.startswith(prefix) and r.header("x-contract-id") != r.path.rsplit("/", 1)[1]:
            run.violate(ISOLATED, f"the origin got {r.path} with x-contract-id {r.header('x-contract-id')}")
    run.check_origin(prefix)


@_scenario("keep-alive")
async def _keep_alive(run: _Run) -> None:
    import httpx

    await _numbered(run, "keep-alive", 5, httpx.Limits(max_connections=1, max_keepalive_connections=1))


@_scenario("concurrent")
async def _concurrent(run: _Run) -> None:
    await _numbered(run, "concurrent", 20)
