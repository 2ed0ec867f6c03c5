"""``run_filter``: one filter driven through its phases, with no sockets.

A unit test of a filter wants to say "given this request and this response,
what did the filter do?" in microseconds, without a proxy, an origin and a
client. The answer is only worth having if it is what the proxy would do,
so the phases are run by the core's own runners (``Chain.run_heads`` and
``Chain.run_body``), a local reply is sent by the core's own ``answer`` (the
one that adds Content-Type and Content-Length and runs the reply back
through the response phases of the filters before the one that answered)
and ``on_complete`` by the core's own ``complete``, on a real ``Context``::

    from sluice.testing import run_filter

    async def test_denies_without_key():
        run = await run_filter(ApiKey, settings={"keys": {"ci": DIGEST}},
                               request=("GET", "/x", [("host", "a")]))
        assert run.local_reply.status == 401
        assert run.response.status == 401 and run.completed == 1

The order is the exchange's: request headers; the body chunks each with
``end=False``, then ``end=True`` with an empty chunk (the whole body once,
with ``end=True``, when the filter called ``ctx.buffer_request_body()``);
the request trailers, if given; then, unless a request phase answered,
the response head, body (the same two ways) and trailers; then
``on_complete``, once. A response to a HEAD request, and a 204 or 304,
has no body: a ``response_body`` given for one is dropped, and no response
body phase runs, as in the proxy. A local reply from the request headers
or trailers phase skips the response phases of the filter that answered
(one filter: none run); one from a request body phase runs them, as in the
proxy.

What it does not do: pick a route or a cluster (``ctx.route`` is None
unless the filter is a router, given an ``app`` with routes and clusters),
pick an endpoint, apply the listener's limits, or strip forbidden trailer
fields. The request head gets the proxy's own
forwarding rules (``x-request-id``, ``x-forwarded-*``, hop-by-hop removal)
before the filter sees it, as in the proxy. For anything about the wire,
use ``sluice_proxy`` and ``origin``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from structlog.testing import capture_logs

from ..control.app import App, validate
from ..control.config import Config, parse
from ..control.registry import Plugins
from ..errors import UpstreamError
from ..messages import Headers, Request, Response
from ..proxy.answers import answer, complete, reason
from ..proxy.chain import Chain
from ..proxy.context import Context
from ..proxy.filters import Filter, LocalReply, overrides
from ..proxy.forwarding import forward_request

__all__ = ["FilterRun", "run_filter"]

Fields = Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str]
_log = structlog.get_logger("sluice.exchange")  # the exchange's own logger and events
CLIENT = ("127.0.0.1", 40000)  # the downstream peer the Context says the request came from


@dataclass
class FilterRun:
    """What one ``run_filter`` call saw.

    - ``local_reply``: the ``LocalReply`` a request phase returned, or None.
    - ``request`` / ``request_body`` / ``request_trailers``: the request as
      the filter left it (what the upstream would get).
    - ``response`` / ``response_body`` / ``response_trailers``: the response
      as the client would get it: the upstream's as the filter left it, or
      the local reply as the core sends it.
    - ``completed``: how many times ``on_complete`` ran (1, or 0 when the
      filter has none).
    - ``ctx``: the ``Context`` (``ctx.flags``, ``ctx.vars``, ``ctx.error``, ...).
    - ``log``: sluice's log events during the run, as dicts
      (``{"event": "denied", "log_level": "info", "filter": ..., ...}``).
    - ``error``: the exception a phase raised (the proxy would answer 500).
    """

    ctx: Context
    request: Request
    request_body: bytes = b""
    request_trailers: Headers | None = None
    local_reply: LocalReply | None = None
    response: Response | None = None
    response_body: bytes = b""
    response_trailers: Headers | None = None
    completed: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    error: Exception | None = None


class _Client:
    """The downstream as ``answer`` sees it: what it is sent is kept."""

    def __init__(self, run: FilterRun) -> None:
        self.run = run
        self.response_started = False
        self.body_done = True
        self.waiting_for_100_continue = False
        self.close_after = False

    async def send_response(self, response: Response) -> None:
        self.response_started = True
        self.run.response = response
        self.run.response_body = b""

    async def send_body(self, data: bytes) -> None:
        self.run.response_body += data

    async def send_end(self, trailers: Headers | None) -> None:
        self.run.response_trailers = trailers


class _Answered(Exception):
    def __init__(self, reply: LocalReply, limit: int) -> None:
        self.reply, self.limit = reply, limit


def _headers(fields: Fields | Headers | None) -> Headers | None:
    if fields is None or isinstance(fields, Headers):
        return fields
    return Headers(fields.items() if isinstance(fields, Mapping) else fields)


def _chunks(body: bytes | Iterable[bytes] | None) -> list[bytes]:
    if body is None:
        return []
    return [body] if isinstance(body, bytes | bytearray) else [bytes(c) for c in body]


def build_filter(filter: type[Filter] | Filter, settings: Mapping[str, Any] | None = None,
                 app: App | Mapping[str, Any] | Config | None = None) -> Filter:
    """The filter instance ``run_filter`` uses: a class gets its settings
    validated by its ``Config`` (a bad one raises the ``ConfigError`` the
    config file would, with key paths under ``filters.NAME``) and is built
    by ``from_config(settings, app)``; an instance is used as it is.

    ``app`` is what ``from_config`` receives: an ``App``, or a config (a
    dict or parsed ``Config``) from which one is built with every installed
    plugin. Without it, ``from_config`` gets None: enough for a filter
    that reads only its settings::

        limiter = build_filter(RateLimit, {"rate": 1, "burst": 1})
        first = await run_filter(limiter, request=("GET", "/", {"x-user": "ann"}))
        second = await run_filter(limiter, request=("GET", "/", {"x-user": "ann"}))
    """
    if isinstance(filter, Filter):
        if settings is not None:
            raise TypeError("settings are for a filter class; this filter is built already")
        return filter
    config = validate(filter.Config, dict(settings or {}), f"filters.{filter.name}")
    if app is not None and not isinstance(app, App):
        app = App(app if isinstance(app, Config) else parse(dict(app)), Plugins())
    return filter.from_config(config, app)


async def run_filter(
    filter: type[Filter] | Filter,
    settings: Mapping[str, Any] | None = None,
    *,
    request: tuple[str, str, Fields] | tuple[str, str] | Request = ("GET", "/", ()),
    body: bytes | Iterable[bytes] | None = None,
    trailers: Fields | None = None,
    response: tuple[int, Fields] | tuple[int] | Response = (200, ()),
    response_body: bytes | Iterable[bytes] | None = None,
    response_trailers: Fields | None = None,
    app: App | Mapping[str, Any] | Config | None = None,
    raises: bool = True,
) -> FilterRun:
    """Run one filter through one exchange; return a ``FilterRun``.

    ``filter`` is a class (built from ``settings``, see ``build_filter``)
    or an instance (to run several exchanges on one filter and check that
    no state leaks between them). ``request`` is ``(method, target,
    headers)`` or a ``sluice.Request``; ``response`` is ``(status,
    headers)`` or a ``sluice.Response``; headers are a list of pairs or a
    dict; ``body`` and ``response_body`` are bytes or a list of chunks
    (None or empty: no body, and no body phase runs); ``trailers`` and
    ``response_trailers`` are sent when not None.

    The filter's ``open(nursery)`` runs before the exchange and ``close()``
    after, when it has them. A phase that raises is answered as the proxy
    answers it (500, flag ``FE``, ``ctx.error``; ``on_complete`` still
    runs); then the exception is re-raised, unless ``raises=False``, when
    it is in ``run.error``.
    """
    instance = build_filter(filter, settings, app)
    chain = Chain([instance])
    counted = _count_completions(chain)
    if not isinstance(request, Request):
        method, target, *fields = request
        request = Request(method, target, _headers(fields[0] if fields else ()))
    if not isinstance(response, Response):
        status, *fields = response
        response = Response(status, _headers(fields[0] if fields else ()))
    ctx = Context(client=CLIENT, local=("127.0.0.1", 8080), listener="run_filter")
    ctx.request = request
    ctx._resolver = chain.resolver  # a router (resolve_route) answers ctx.route, as in the proxy
    ctx.request_id, ctx.trace_id = forward_request(request.headers, client_ip=CLIENT[0], scheme="http",
                                                   trusted=False, drop_expect=False)
    run = FilterRun(ctx, request)
    with capture_logs() as run.log:
        async with trio.open_nursery() as nursery:
            if overrides(instance, "open"):
                await instance.open(nursery)
            try:
                await _exchange(chain, run, _chunks(body), _headers(trailers),
                                response, _chunks(response_body), _headers(response_trailers))
            finally:
                if overrides(instance, "close"):
                    await instance.close()
                nursery.cancel_scope.cancel()
    run.completed = counted[0]
    if run.error is not None and raises:
        raise run.error
    return run


def _count_completions(chain: Chain) -> list[int]:
    """Count on_complete calls without changing how the core runs them
    (a plain function returning the filter's coroutine; the chain keeps the
    fast path it chose for the filter's own method)."""
    count = [0]

    def counting(fn):
        def call(ctx):
            count[0] += 1
            return fn(ctx)
        return call

    chain.complete = [counting(fn) for fn in chain.complete]
    return count


async def _exchange(chain: Chain, run: FilterRun, body: list[bytes], trailers: Headers | None,
                    response: Response, response_body: list[bytes], response_trailers: Headers | None) -> None:
    ctx, client = run.ctx, _Client(run)
    full = len(chain.filters)
    try:
        try:
            await _request(chain, run, body, trailers)
            await _response(chain, run, client, response, response_body, response_trailers)
        except _Answered as answered:
            run.local_reply = answered.reply
            await answer(chain, client, ctx, answered.reply, answered.limit)
        except UpstreamError as exc:  # a response body phase answered after the head went out
            ctx.error = exc
            ctx.flags.append(exc.flag)
            await answer(chain, client, ctx, LocalReply(exc.status, reason(exc.status), flag=""), full)
        except Exception as exc:  # the filter's bug: the proxy answers 500 and logs it
            ctx.error = run.error = exc
            ctx.flags.append("FE")
            _log.error("exchange failed", request_id=ctx.request_id, exc_info=exc)
            await answer(chain, client, ctx, LocalReply(500, reason(500), flag=""), 0)
    finally:
        await complete(chain, ctx)


async def _request(chain: Chain, run: FilterRun, body: list[bytes], trailers: Headers | None) -> None:
    ctx, full = run.ctx, len(chain.filters)
    replied = await chain.run_heads(chain.request_headers, ctx, run.request, full)
    if replied is not None:
        raise _Answered(replied[1], replied[0])
    if body:
        if ctx.buffer_request:
            parts = [b"".join(body)]
        else:
            parts = [*body, b""]
        sent = []
        for i, chunk in enumerate(parts):
            end = i == len(parts) - 1
            data = await chain.run_body(chain.request_body, ctx, chunk, end, full) if chain.request_body else chunk
            if type(data) is LocalReply:
                raise _Answered(data, full)
            sent.append(data)
        run.request_body = b"".join(sent)
        if ctx.buffer_request:
            run.request.headers.set(b"content-length", str(len(run.request_body)).encode())
    if trailers is not None:
        run.request_trailers = trailers
        replied = await chain.run_heads(chain.request_trailers, ctx, trailers, full)
        if replied is not None:
            raise _Answered(replied[1], replied[0])


async def _response(chain: Chain, run: FilterRun, client: _Client, response: Response,
                    body: list[bytes], trailers: Headers | None) -> None:
    ctx, full = run.ctx, len(chain.filters)
    ctx.response = response
    replied = await chain.run_heads(chain.response_headers, ctx, response, full)
    if replied is not None:
        raise _Answered(replied[1], replied[0])
    bodiless = run.request.method == "HEAD" or response.status in (204, 304)
    if bodiless:
        body = []  # none reaches a client, so no body phase runs: the proxy's rule (its upstream sends none)
    if ctx.buffer_response:
        whole = b"".join(body)
        if chain.response_body and not bodiless:
            data = await chain.run_body(chain.response_body, ctx, whole, True, full)
            if type(data) is LocalReply:
                raise _Answered(data, full)
            whole = data
        if trailers is not None:
            await chain.run_heads(chain.response_trailers, ctx, trailers, full)
        if not bodiless:
            response.headers.set(b"content-length", str(len(whole)).encode())
        await client.send_response(response)
        await client.send_body(whole)
        await client.send_end(None)  # trailers cannot follow a Content-Length body: the proxy drops them
        return
    await client.send_response(response)
    phases = chain.response_body
    for chunk in body:
        data = await chain.run_body(phases, ctx, chunk, False, full) if phases else chunk
        if type(data) is LocalReply:
            raise UpstreamError("a filter replied after the response started", status=500, flag="FE")
        await client.send_body(data)
    if body and phases:
        data = await chain.run_body(phases, ctx, b"", True, full)
        if type(data) is bytes:  # the proxy ignores a LocalReply here too
            await client.send_body(data)
    if trailers is not None:
        await chain.run_heads(chain.response_trailers, ctx, trailers, full)
    await client.send_end(trailers)
