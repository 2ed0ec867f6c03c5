"""How an exchange ends when sluice has the last word: local replies, the
drain of a request body answered early, and the ``on_complete`` phases.

The exchange (``exchange.py``) decides *that* sluice answers; this module is
*how*: the reply through the response phases of the filters before the one
that answered, in gRPC's form for a gRPC call (``grpc.py``), with the
connection kept only when what is left of the request body is small
enough to drain. ``complete`` runs for every exchange, and for what the
edge refuses before it becomes one.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any

import structlog
import trio

from .. import metrics
from ..errors import ClientGone
from ..messages import Headers, Response
from ..protocol.events import Body, ProtocolError
from ..protocol.http1 import reason_phrase
from .chain import Chain, filter_time
from .filters import LocalReply
from .grpc import grpc_reply, is_grpc

if TYPE_CHECKING:
    from .context import Context

__all__ = ["DRAIN_LIMIT", "DRAIN_TIME", "answer", "complete", "drain_body", "keeps_open", "reason"]

log = structlog.get_logger("sluice.exchange")

_COMPLETE_TIMEOUT = 5.0  # seconds on_complete phases get, even when cancelled
# The rest of a request body read and dropped after an early answer, to keep
# the connection (nginx discards an unread body the same way): past these,
# closing is cheaper than reading.
DRAIN_LIMIT = 1024 * 1024
DRAIN_TIME = 5.0


def keeps_open(down: Any, ctx: Context) -> bool:
    """Whether a response head going out before the request body was read
    may promise to keep the connection (the body is then drained)."""
    return down.body_done or (ctx._drainable and not down.waiting_for_100_continue)


async def drain_body(down: Any, ctx: Context) -> None:
    """Read and drop the rest of a request body answered early; the
    connection closes (at the next check) unless it ends within bounds."""
    left = DRAIN_LIMIT
    with trio.move_on_after(DRAIN_TIME):
        try:
            while type(event := await down.read_body_event()) is Body:
                left -= len(event.data)
                if left < 0:
                    break
            else:
                return
        except (ProtocolError, ClientGone):
            pass
    log.info("request body not drained; closing", request_id=ctx.request_id)
    down.close_after = True


def reason(status: int) -> str:
    return f"{reason_phrase(status).lower()}\n"


async def answer(chain: Chain, down: Any, ctx: Context, reply: LocalReply, limit: int) -> None:
    """Send a local reply, through the response phases of filters before ``limit``."""
    if reply.flag:
        ctx.flags.append(reply.flag)
    if down.response_started:
        down.close_after = True  # too late for a status: cut the connection
        return
    try:
        body = reply.body.encode() if isinstance(reply.body, str) else bytes(reply.body)
        fields = reply.headers
        headers = Headers(fields.items() if isinstance(fields, dict) else fields)
        if body and b"content-type" not in headers:
            headers.add(b"content-type", b"text/plain; charset=utf-8")
        response = Response(reply.status, headers)  # no Via: sluice is this response's origin
        ctx.response = response
        await chain.run_heads(chain.response_headers, ctx, response, limit)
        if chain.response_body:
            data = await chain.run_body(chain.response_body, ctx, body, True, limit)
            body = data if type(data) is bytes else body
    except Exception as exc:  # a bad reply, or a filter failing on it: plain 500
        log.error("local reply failed", request_id=ctx.request_id, exc_info=exc)
        response = Response(500, Headers([(b"content-type", b"text/plain; charset=utf-8")]))
        body = reason(500).encode()
        ctx.response = response
    if is_grpc(ctx.request):
        # A gRPC client reads the outcome from grpc-status (see grpc.py).
        response = ctx.response = grpc_reply(response, body, ctx.flags)
        body = b""
    status = response.status
    if status in (204, 304) or is_grpc(ctx.request):  # no body, no length (RFC 9110 8.6)
        body = b""
        response.headers.remove(b"content-length")
    else:
        response.headers.set(b"content-length", str(len(body)).encode())
    if ctx.request is not None and ctx.request.method == "HEAD":
        body = b""  # the length stays: it is the GET's (RFC 9110 9.3.2)
    if status == 413 or not keeps_open(down, ctx):
        down.close_after = True  # the unread body is too much to drain
    try:
        await down.send_response(response)
        if body:
            ctx.bytes_out += len(body)
            await down.send_body(body)
        await down.send_end(None)
    except ClientGone:
        ctx.flags.append("DC")
        down.close_after = True


async def complete(chain: Chain, ctx: Context) -> None:
    """Run every on_complete, shielded and bounded, each isolated from the others;
    then the request is counted (``sluice.metrics.record``), its filters' time too.

    When no on_complete of the chain can suspend (Chain.complete_never_suspends)
    there is nothing to shield or bound: each runs to its end in one step.
    """
    try:
        if chain.complete:
            await _run_complete(chain, ctx, filter_time(ctx) if metrics.timing else None)
    finally:
        metrics.record(ctx)


async def _run_complete(chain: Chain, ctx: Context, spent: dict | None) -> None:
    if chain.complete_never_suspends:
        for fn, key in zip(chain.complete, chain.complete_keys, strict=True):
            began = perf_counter()
            coro = fn(ctx)
            try:
                coro.send(None)
            except StopIteration:
                continue
            except Exception as exc:
                log.error("on_complete failed", request_id=ctx.request_id, exc_info=exc)
                continue
            finally:
                if spent is not None:
                    spent[key] = perf_counter() - began
            coro.close()  # cannot happen (no await in it), but never leave one half-run
            log.error("on_complete suspended", request_id=ctx.request_id)
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _COMPLETE_TIMEOUT):
        for fn, key in zip(chain.complete, chain.complete_keys, strict=True):
            began = perf_counter()
            try:
                await fn(ctx)
            except Exception as exc:
                log.error("on_complete failed", request_id=ctx.request_id, exc_info=exc)
            if spent is not None:
                spent[key] = perf_counter() - began
