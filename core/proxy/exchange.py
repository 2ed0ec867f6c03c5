"""One request/response exchange: through the chain, to the upstream and back.

This is where the error table of DESIGN.md is enforced:

==========================================  ===========  ====
cause                                       client gets  flag
==========================================  ===========  ====
a filter answered                           its reply    LR
no filter chose a cluster (no route)        404          NR
request body over ``max_body_bytes``        413          LR
no healthy endpoint                         503          UH
connect failure / connect timeout, on       503          UF
  every endpoint tried (``connect_tries``)
upstream reset, closed, or broke protocol   502          UC / UPE
no response head within the timeout         504          UT
a buffered response body over the limit     502          UBL
a buffered request body over the limit      413          LR
the client sent a bad body                  400          DPE
the client stalled mid-body                 408          DT
a filter raised                             500          FE
the client went away                        (nothing)    DC
an upstream 101 to no (or another) upgrade  502          UPE
a tunnel idle for ``tunnel_idle``           (a close)    TI
a tunnel open for ``tunnel_max``            (a close)    TM
==========================================  ===========  ====

What is refused before it becomes a request (a bad or slow head, TLS
failures, no free slot: DPE, DT, DTLS, TLSP, DO) is the edge's, in the
table of ``sluice.edge.listener``.

Once response bytes have gone downstream no status can change: the
downstream connection is closed instead, and the log says why. Once the
upstream's answer has arrived, it is what the client gets, whole: a request
body that turns out malformed or too large after it only ends the
connection when the answer is done.
``on_complete`` of every filter runs exactly once, whatever happened.

An upgrade proposal (``ctx.upgrade``, see ``context.py``) is forwarded
with the tokens the route allows, never ``h2c``; an upstream 101 naming one
of them turns the exchange into a byte tunnel, which the downstream carries
(``down.tunnel()``, by the listener's ``tunnel_idle`` and ``tunnel_max``);
the upstream connection is never pooled after it. Any other answer to the
proposal is relayed as usual.

An answer that comes before the request body was read (a filter's, or the
upstream's early one) keeps the connection when the rest of the body is
small: sluice reads and drops up to ``DRAIN_LIMIT`` bytes of it within
``DRAIN_TIME`` seconds (``answers.py``, with the local replies and ``on_complete``), so a request pipelined behind it is served. A body
known to be larger, a 413, a broken body, or a client still waiting for
``100 Continue`` (it may never send the body) close the connection instead,
and the answer says ``Connection: close``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from ..errors import ClientGone, UpstreamError
from ..messages import Headers, Response
from ..protocol.events import NEED_DATA, Body, End, ProtocolError, RequestHead
from ..protocol.heads import content_length
from ..upstream.cluster import RESET
from .answers import DRAIN_LIMIT, answer, complete, drain_body, keeps_open, reason
from .attempts import (
    FAILURES,
    NOT_THE_ENDPOINTS,
    connect,
    final_head,
    outcome,
    pinned,
    retrying,
    send_whole,
    timed_out,
)
from .chain import Chain
from .filters import LocalReply
from .forwarding import (
    add_via,
    forward_request,
    offer_upgrade,
    strip_hop_by_hop,
    strip_trailers,
    switched_protocol,
)
from .grpc import grpc_timeout
from .mirror import mirror

if TYPE_CHECKING:
    from ..edge.pool import Pool
    from .context import Context


class Site(Protocol):
    """What an exchange needs of the listener it runs on (the edge passes
    itself; nothing here imports the edge)."""

    chain: Chain
    pool: Pool
    route_overrides: bool
    trust_forwarded: bool
    max_body_bytes: int  # 0: unlimited
    max_buffered: int
    config: Any  # the listener's config; a tunnel reads timeouts.tunnel_idle and tunnel_max
    transport: Any  # its ServerTransport or None: the x-forwarded-client-cert mode and element

__all__ = ["Site", "run_exchange"]

log = structlog.get_logger("sluice.exchange")

_MIRROR_BODY = 64 * 1024  # the largest body a mirror's copy keeps (without a retry policy's own cap)
_UPGRADES = frozenset({"websocket"})  # when no route says (Route.upgrades' default)


class _Reply(Exception):
    """Carries a local reply out of a task (request body pump) to the exchange."""

    def __init__(self, reply: LocalReply, limit: int | None = None) -> None:
        self.reply = reply
        self.limit = limit


class BodyResized(Exception):
    """A body phase changed a streamed body's size under the Content-Length
    its head kept: the bytes cannot go out as declared (a filter's bug, FE)."""

    def __init__(self, which: str, declared: int | None, produced: int) -> None:
        what = (f"a {which} body phase made {produced} bytes of a body whose head says "
                f"Content-Length: {declared}" if declared is not None
                else f"a filter left a malformed Content-Length on the {which} head")
        super().__init__(
            f"{what}; a filter that changes sizes removes content-length in on_{which}_headers "
            f"(the body is then chunked) or asks for the whole body (ctx.buffer_{which}_body())")


def _declared(headers: Headers, which: str) -> int | None:
    """The Content-Length a head carries after its header phases, if any."""
    value = headers.get_raw(b"content-length")
    if value is None:
        return None
    try:
        return content_length(value)
    except ProtocolError:  # a filter wrote it: theirs to fix, not the peer's
        raise BodyResized(which, None, 0) from None


def _collapse(group: BaseExceptionGroup) -> BaseException:
    """The exception worth handling in a nursery's group (not a Cancelled)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, trio.Cancelled):
            return exc
    return leaves[0] if leaves else group  # only Cancelled: let the one cancel through


async def run_exchange(listener: Site, down: Any, head: RequestHead, ctx: Context) -> None:
    """Run one exchange to the end; never raises except Cancelled."""
    chain = base = listener.chain
    base.active += 1
    try:
        try:
            chain = _prepare(listener, down, head, ctx)
            await _proxy(listener, chain, down, head, ctx)
        except BaseExceptionGroup as group:
            raise _collapse(group) from None
    except _Reply as r:
        await answer(chain, down, ctx, r.reply, _unseen(ctx, len(chain.filters) if r.limit is None else r.limit))
    except UpstreamError as exc:
        ctx.error = exc
        ctx.flags.append(exc.flag)
        log.info("upstream failed", request_id=ctx.request_id, error=str(exc))
        await answer(chain, down, ctx, LocalReply(exc.status, reason(exc.status), flag=""),
                      _unseen(ctx, len(chain.filters)))
    except ProtocolError as exc:
        ctx.error = exc
        ctx.flags.append("DPE")
        log.info("bad request body", request_id=ctx.request_id, error=str(exc))
        down.close_after = True  # the body's framing is lost
        await answer(chain, down, ctx, LocalReply(exc.status, reason(exc.status), flag=""), 0)
    except ClientGone as exc:
        ctx.error = exc
        if exc.timed_out:
            ctx.flags.append("DT")
            down.close_after = True
            await answer(chain, down, ctx, LocalReply(408, "request body timed out\n", flag=""), 0)
        else:
            ctx.flags.append("DC")
            down.close_after = True
    except trio.Cancelled as exc:
        ctx.error = exc
        down.close_after = True
        raise
    except Exception as exc:  # a filter's bug (or ours): 500, the traceback to the log
        ctx.error = exc
        ctx.flags.append("FE")
        log.error("exchange failed", request_id=ctx.request_id, exc_info=exc)
        await answer(chain, down, ctx, LocalReply(500, reason(500), flag=""), 0)
    finally:
        try:
            await complete(chain, ctx)
        finally:
            base.active -= 1  # a reload closes the old chain's filters at 0 (sluice.control.reload)
    if not down.body_done and not down.close_after:
        await drain_body(down, ctx)


def _unseen(ctx: Context, limit: int) -> int:
    """How far back a reply made now runs through the response phases: not
    at all once they ran on the upstream's head (each runs at most once per
    exchange; the filter learns of the failure from ctx.flags, ctx.error and
    ctx.response in on_complete)."""
    return 0 if ctx._responded else limit


def _client_cert(transport: Any, peer: dict | None) -> tuple[str, bytes | None]:
    """The listener's x-forwarded-client-cert mode and this connection's element."""
    if transport is None:
        return ("sanitize", None)
    return (transport.forward_client_cert, transport.client_cert(peer))


def _prepare(listener: Site, down: Any, head: RequestHead, ctx: Context) -> Chain:
    """Apply the proxy's own header rules; return the chain for this request."""
    request = head.request
    ctx.request = request
    ctx.request_id, ctx.trace_id = forward_request(
        request.headers,
        client_ip=ctx.client[0],
        scheme=ctx.scheme,
        trusted=listener.trust_forwarded,
        drop_expect=head.expect_continue,  # we answer 100-continue ourselves
        client_cert=_client_cert(listener.transport, ctx.tls_peer),
    )
    upgrade = down.upgrade
    if upgrade is not None:
        ctx.upgrade = upgrade.decode("latin-1")
    chain = listener.chain
    ctx._resolver = chain.resolver
    ctx._drainable = not head.has_body or (head.content_length or 0) <= DRAIN_LIMIT
    if listener.route_overrides:
        route = ctx.route
        if route is not None:
            chain = chain.without(route.disabled_filters)
    return chain


async def _proxy(listener: Site, chain: Chain, down: Any, head: RequestHead, ctx: Context) -> None:
    request = head.request
    full = len(chain.filters)
    replied = await chain.run_heads(chain.request_headers, ctx, request, full)
    if replied is not None:
        i, reply = replied
        raise _Reply(reply, i)
    limit = listener.max_body_bytes
    if limit and head.content_length is not None and head.content_length > limit:
        raise _Reply(LocalReply(413, "request body too large\n"))
    cluster = ctx.cluster
    if cluster is None:
        raise _Reply(LocalReply(404, "no route\n", flag="NR"))
    breaker = cluster.breaker
    if breaker.max_requests is not None and not breaker.request_allowed():
        raise _Reply(LocalReply(503, "upstream overloaded\n", flag="UO"))
    pin = ctx._pinned
    endpoint = pinned(cluster, pin) if pin is not None else None
    if endpoint is None:
        endpoint = cluster.pick(ctx)
        if endpoint is None:
            raise _Reply(LocalReply(503, "no healthy upstream\n", flag="UH"))
    ctx._choose(endpoint)
    if ctx.upgrade is not None:
        route = ctx.route
        ctx.upgrade = offer_upgrade(request.headers, ctx.upgrade,
                                    _UPGRADES if route is None else route.upgrades)
    add_via(request.headers)
    if cluster.request_edits is not None:
        cluster.request_edits.apply(request.headers, ctx)

    pool = listener.pool
    route = ctx.route
    timeout = (route.timeout if route is not None and route.timeout else None) or cluster.response_timeout
    if request.http_version == "2" and (deadline := grpc_timeout(request)) is not None \
            and deadline < timeout:
        timeout = max(deadline, 0.001)  # a gRPC call's own deadline, capped by the route's
    endpoint.active += 1
    breaker.requests += 1
    conn = None
    started = time.monotonic()
    counted = False  # the try's outcome is counted (once)
    try:
        conn, endpoint = await connect(pool, cluster, endpoint, ctx)
        ctx.mark("upstream_connected")
        if request.http_version == "1.0" and request.headers.get_raw(b"host") is None:
            # HTTP/1.0 may omit Host; the upstream hears HTTP/1.1, which may not.
            request.headers.raw().append((b"host", endpoint.address.encode("ascii")))
        policy = route.retry if route is not None else None
        if policy is not None and policy.attempts < 2:
            policy = None
        shadow = route.mirror if route is not None else None
        if shadow is not None and not shadow.wanted():
            shadow = None
        # A body is kept for a replay (or a mirror's copy) only when it is
        # small enough; a larger one streams, and that request is never
        # retried or mirrored.
        keep = ((policy is not None or shadow is not None) and head.content_length is not None
                and head.content_length <= (policy.max_body_bytes if policy is not None else _MIRROR_BODY))
        if head.has_body and not ctx.buffer_request and not keep:
            async with trio.open_nursery() as nursery:
                # Framing follows the head as the filters left it: one that
                # resized the body removed Content-Length, so it goes chunked.
                chunked = request.headers.get_raw(b"content-length") is None
                await conn.send_head(request, chunked=chunked)
                if down.waiting_for_100_continue:
                    # Here, before the pump starts: one writer per downstream
                    # connection, and an early response must not race the 100.
                    await down.send_continue()
                deadline = trio.CancelScope()  # armed when the body has been sent
                nursery.start_soon(_pump_request, listener, chain, down, conn, ctx, deadline, timeout)
                response = await _response_head(down, conn, deadline, ctx)
                ctx.mark("upstream_headers")
                counted = True
                cluster.report(endpoint, outcome(response), response.status, time.monotonic() - started)
                await _relay_response(listener, chain, down, conn, ctx, response, timeout)
                nursery.cancel_scope.cancel()  # an early response ends the upload
        else:
            body = await _whole_request_body(listener, chain, down, head, ctx) if head.has_body else b""
            if policy is None:
                conn, response = await send_whole(pool, cluster, endpoint, conn, down, ctx, timeout, body)
            else:
                conn, response, started = await retrying(pool, cluster, conn, down, ctx, timeout, body,
                                                          policy)
            ctx.mark("upstream_headers")
            endpoint = ctx.endpoint  # (a replay or a retry may have gone elsewhere)
            counted = True
            if shadow is not None:
                mirror(pool, shadow, request, body, ctx.request_id)
            cluster.report(endpoint, outcome(response), response.status, time.monotonic() - started)
            if response.status == 101:
                await _tunnel(listener, chain, down, conn, ctx, response)
            else:
                await _relay_response(listener, chain, down, conn, ctx, response, timeout)
        ctx.mark("upstream_done")  # the response's last byte relayed
    except UpstreamError as exc:
        if not counted and exc.flag not in NOT_THE_ENDPOINTS:
            cluster.report(ctx.endpoint, FAILURES.get(exc.flag, RESET), None, time.monotonic() - started)
        raise
    finally:
        ctx.endpoint.active -= 1
        breaker.requests -= 1
        if conn is not None:
            await pool.release(cluster, conn)


async def _pump_request(listener, chain, down, conn, ctx, deadline, timeout) -> None:
    """Stream the request body upstream through the body phases, then watch the client."""
    limit = listener.max_body_bytes
    phases = chain.request_body
    full = len(chain.filters)
    total = 0
    # Body phases may resize chunks: what goes up must still match the
    # Content-Length the head went with (chunked when a filter removed it).
    declared = _declared(ctx.request.headers, "request") if phases else None
    sent = 0
    try:
        while True:
            try:
                event = await down.read_body_event()
            except ProtocolError as exc:
                if ctx.response is None:
                    raise
                # The upstream has answered: the client gets that answer
                # whole, and the connection ends after it.
                _stop_reading(down, ctx, exc, "DPE")
                return
            if type(event) is Body:
                data = event.data
                total += len(data)
                if limit and total > limit:
                    if ctx.response is None:
                        raise _Reply(LocalReply(413, "request body too large\n"))
                    _stop_reading(down, ctx, None, "")
                    return
                ctx.bytes_in += len(data)
                if phases:
                    data = await chain.run_body(phases, ctx, data, False, full)
                    if type(data) is LocalReply:
                        raise _Reply(data)
                    sent += len(data)
                    if declared is not None and sent > declared:
                        raise BodyResized("request", declared, sent)
                if data:
                    await conn.send_data(data)
            else:
                if phases:
                    data = await chain.run_body(phases, ctx, b"", True, full)
                    if type(data) is LocalReply:
                        raise _Reply(data)
                    sent += len(data)
                    if declared is not None and sent != declared:
                        raise BodyResized("request", declared, sent)
                    if data:
                        await conn.send_data(data)
                trailers = _trailers(ctx, event.trailers)
                if trailers is not None and chain.request_trailers:
                    replied = await chain.run_heads(chain.request_trailers, ctx, trailers, full)
                    if replied is not None:
                        raise _Reply(replied[1], replied[0])
                await conn.send_end(trailers)
                deadline.deadline = trio.current_time() + timeout
                break
        await down.watch_disconnect()
    except UpstreamError:
        if down.response_started:
            return  # the upstream answered early and stopped reading: fine
        raise


def _stop_reading(down: Any, ctx: Context, exc: BaseException | None, flag: str) -> None:
    """The request body goes no further once the upstream has answered."""
    if exc is not None:
        ctx.error = exc
        log.info("bad request body after the upstream answered", request_id=ctx.request_id,
                 error=str(exc))
    if flag:
        ctx.flags.append(flag)
    down.close_after = True


def _trailers(ctx: Context, trailers: Headers | None) -> Headers | None:
    """A trailer section without the fields trailers may not carry (logged)."""
    if trailers is None:
        return None
    dropped = strip_trailers(trailers)
    if dropped:
        log.info("trailer fields dropped", request_id=ctx.request_id, fields=dropped)
    return trailers if trailers.raw() else None


async def _whole_request_body(listener, chain, down, head, ctx) -> bytes:
    """Read the request body whole (a filter asked), through the body and
    trailer phases once; the head then carries its exact length."""
    limit = min(listener.max_buffered, listener.max_body_bytes or listener.max_buffered)
    if head.content_length is not None and head.content_length > limit:
        raise _Reply(LocalReply(413, "request body too large\n"))
    if down.waiting_for_100_continue:
        await down.send_continue()
    parts: list[bytes] = []
    total = 0
    while type(event := await down.read_body_event()) is Body:
        total += len(event.data)
        if total > limit:
            raise _Reply(LocalReply(413, "request body too large\n"))
        parts.append(event.data)
    ctx.bytes_in += total
    body = b"".join(parts)
    full = len(chain.filters)
    if chain.request_body:
        data = await chain.run_body(chain.request_body, ctx, body, True, full)
        if type(data) is LocalReply:
            raise _Reply(data)
        body = data
    trailers = _trailers(ctx, event.trailers)
    if trailers is not None and chain.request_trailers:  # dropped after: the length frames it
        replied = await chain.run_heads(chain.request_trailers, ctx, trailers, full)
        if replied is not None:
            raise _Reply(replied[1], replied[0])
    ctx.request.headers.set(b"content-length", str(len(body)).encode())
    return body


async def _response_head(down, conn, deadline: trio.CancelScope, ctx) -> Response:
    """Wait for the final response head, relaying 1xx; 504 past the deadline."""
    with deadline:
        return await final_head(down, conn, ctx, await conn.next_event(), float("inf"))
    raise timed_out()


async def _tunnel(listener: Site, chain: Chain, down: Any, conn: Any, ctx: Context,
                  response: Response) -> None:
    """The upstream accepted the upgrade: its 101 goes through the response
    header phases to the client, then the downstream carries bytes both ways
    until the tunnel ends (the upstream connection is never pooled again)."""
    protocol = switched_protocol(response.headers, ctx.upgrade)
    if protocol is None:
        raise UpstreamError("upstream switched to a protocol not offered", status=502, flag="UPE")
    add_via(response.headers)
    ctx.upgraded = protocol
    replied = await chain.run_heads(chain.response_headers, ctx, response, len(chain.filters))
    if replied is not None:  # a filter refused the switch: the client gets its reply
        ctx.upgraded = None
        conn.discard = True
        down.close_after = True  # the client may already be sending the new protocol
        raise _Reply(replied[1], replied[0])
    ctx._responded = True
    timeouts = listener.config.timeouts
    ended = await down.tunnel(response, conn.io, conn.switched(), idle=timeouts.tunnel_idle,
                              limit=timeouts.tunnel_max, stats=ctx)
    if ended == "idle":
        ctx.flags.append("TI")
    elif ended == "limit":
        ctx.flags.append("TM")


async def _upstream_body_event(conn, down, timeout: float):
    """The next response body event; what is queued for the client goes out
    before any wait, and a stall past ``timeout`` is a 504."""
    event = conn.poll()
    if event is NEED_DATA:
        await down.flush()
        event = await conn.next_event(trio.current_time() + timeout)
        if event is None:
            raise UpstreamError("upstream body stalled", status=504, flag="UT")
    if type(event) not in (Body, End):
        raise UpstreamError("upstream closed mid-response", status=502, flag="UC")
    return event


async def _relay_response(listener, chain, down, conn, ctx, response: Response, timeout: float) -> None:
    full = len(chain.filters)
    headers = response.headers
    strip_hop_by_hop(headers)
    add_via(headers)
    edits = ctx.cluster.response_edits
    if edits is not None:
        edits.apply(headers, ctx)
    replied = await chain.run_heads(chain.response_headers, ctx, response, full)
    if replied is not None:
        conn.discard = True  # its unread body makes the connection unusable
        raise _Reply(replied[1], replied[0])
    ctx._responded = True  # a later failure's reply skips the response phases (_unseen)
    if not keeps_open(down, ctx):
        # The upstream answers before the upload ended, and what is left of
        # it is too much to drain: the connection closes after the answer;
        # say so now, while the head can still carry it.
        down.close_after = True
    if ctx.buffer_response:
        return await _relay_whole(listener, chain, down, conn, ctx, response, timeout)
    phases = chain.response_body
    declared = None
    if phases:
        if ctx.request.method == "HEAD" or response.status in (204, 304):
            phases = ()  # no body, so no body phase (as _relay_whole)
        else:
            declared = _declared(headers, "response")
    sent = 0
    await down.send_response(response)
    while True:
        event = await _upstream_body_event(conn, down, timeout)
        if type(event) is Body:
            data = event.data
            if phases:
                data = await chain.run_body(phases, ctx, data, False, full)
                if type(data) is LocalReply:
                    raise UpstreamError("a filter replied after the response started", status=500, flag="FE")
                sent += len(data)
                if declared is not None and sent > declared:
                    raise BodyResized("response", declared, sent)
            if data:
                ctx.bytes_out += len(data)
                await down.send_body(data)
        elif type(event) is End:
            if phases:
                data = await chain.run_body(phases, ctx, b"", True, full)
                if type(data) is LocalReply:
                    raise UpstreamError("a filter replied after the response started", status=500, flag="FE")
                sent += len(data)
                if declared is not None and sent != declared:
                    raise BodyResized("response", declared, sent)
                if data:
                    ctx.bytes_out += len(data)
                    await down.send_body(data)
            trailers = _trailers(ctx, event.trailers)
            if trailers is not None and chain.response_trailers:
                await chain.run_heads(chain.response_trailers, ctx, trailers, full)
            await down.send_end(trailers)
            return


async def _relay_whole(listener, chain, down, conn, ctx, response: Response, timeout: float) -> None:
    """Read the response body whole (a filter asked), run the body phases once,
    and send it with its exact length. Nothing has reached the client yet, so
    a body past the buffer limit is still a clean 502."""
    limit = listener.max_buffered
    parts: list[bytes] = []
    total = 0
    while type(event := await _upstream_body_event(conn, down, timeout)) is Body:
        total += len(event.data)
        if total > limit:
            raise UpstreamError(f"response body over the {limit}-byte buffer limit", status=502, flag="UBL")
        parts.append(event.data)
    body = b"".join(parts)
    full = len(chain.filters)
    bodiless = ctx.request.method == "HEAD" or response.status in (204, 304)
    if chain.response_body and not bodiless:
        data = await chain.run_body(chain.response_body, ctx, body, True, full)
        if type(data) is LocalReply:
            raise _Reply(data)
        body = data
    trailers = _trailers(ctx, event.trailers)
    if trailers is not None and chain.response_trailers:
        await chain.run_heads(chain.response_trailers, ctx, trailers, full)
    if not bodiless:  # a HEAD keeps the upstream's length: it is the GET's
        response.headers.set(b"content-length", str(len(body)).encode())
    await down.send_response(response)
    if body:
        ctx.bytes_out += len(body)
        await down.send_body(body)
    await down.send_end(None)  # trailers cannot follow a Content-Length body


