"""Trying an upstream: a connection, the request, its response head, and trying again.

What the exchange (``exchange.py``) asks of an upstream, one attempt after
another, for a request whose body is all in hand:

- ``connect``: a connection to the chosen endpoint; when it cannot be
  reached, to another eligible one (nothing was sent: any method), up to
  ``connect_tries`` and while the cluster's ``max_retries`` allow;
- ``send_whole``: the request and its response head, replayed on a fresh
  connection when a reused one died before answering (idempotent methods),
  or when the upstream says it never processed it (HTTP/2 REFUSED_STREAM,
  GOAWAY: any method);
- ``retrying``: ``send_whole`` under a route's retry policy;
- ``final_head``: the final head, the 1xx before it relayed.

Each failed attempt counts against its endpoint (``Cluster.report``).
"""

from __future__ import annotations

import random
import time

import structlog
import trio

from ..errors import ClientGone, UpstreamError
from ..messages import Response
from ..protocol.events import Informational
from ..upstream.cluster import CONNECT_FAILURE, HTTP_5XX, PROTOCOL_ERROR, RESET, SUCCESS, TIMEOUT
from .context import Context
from .forwarding import set_host

__all__ = ["FAILURES", "NOT_THE_ENDPOINTS", "ask", "connect", "final_head", "outcome", "pinned", "retrying",
           "send_whole", "timed_out"]

log = structlog.get_logger("sluice.exchange")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_UNPROCESSED_REPLAYS = 5  # a peer that keeps going away (GOAWAY after N requests) gets this many


def pinned(cluster, address: str):
    """The cluster's endpoint at ``address`` when it is available, else None."""
    now = time.monotonic()
    for endpoint in cluster.endpoints:
        if endpoint.address == address:
            return endpoint if endpoint.available(now) else None
    return None


def outcome(response: Response) -> str:
    return HTTP_5XX if response.status >= 500 else SUCCESS


FAILURES = {"UT": TIMEOUT, "UPE": PROTOCOL_ERROR, "UC": RESET}
# Failures not counted against the endpoint here: a failed connect was
# counted by connect; a breaker's overflow is the cluster's, not its.
NOT_THE_ENDPOINTS = frozenset({"UF", "UO"})


async def connect(pool, cluster, endpoint, ctx: Context, *, fresh: bool = False):
    """A connection to ``endpoint`` (``fresh``: never a pooled one), or,
    when it cannot be reached, to another eligible one (nothing was sent:
    safe for any method), up to ``connect_tries`` endpoints and while the
    cluster's ``max_retries`` allow. Each failed connect counts against its
    endpoint (outlier detection)."""
    tried = ctx.tried
    breaker = cluster.breaker
    retrying = False
    try:
        while True:
            started = time.monotonic()
            try:
                conn = await (pool.connect if fresh else pool.acquire)(cluster, endpoint)
            except UpstreamError as exc:
                if exc.flag != "UF":
                    raise
                cluster.report(endpoint, CONNECT_FAILURE, None, time.monotonic() - started)
                following = (cluster.pick(ctx, [*tried, endpoint])
                             if len(tried) + 1 < cluster.connect_tries else None)
                if following is None:
                    raise
                if not retrying:
                    if not breaker.retry_allowed():
                        log.info("no failover: the cluster's max_retries are in flight",
                                 request_id=ctx.request_id, cluster=cluster.name)
                        raise
                    breaker.retries += 1
                    retrying = True
                log.info("connect failed, trying another endpoint", request_id=ctx.request_id,
                         endpoint=endpoint.address, next=following.address, error=str(exc))
                tried.append(endpoint)
                endpoint.active -= 1
                following.active += 1
                endpoint = following
                ctx._choose(following)
                continue
            route = ctx.matched_route
            if route is not None and route.host_to_endpoint:
                set_host(ctx.request.headers, endpoint.address.encode("ascii"))
            ctx.upstream_local = conn.local
            return conn, endpoint
    finally:
        if retrying:
            breaker.retries -= 1



async def retrying(pool, cluster, conn, down, ctx, timeout: float, body: bytes, policy):
    """``send_whole`` under a route's retry policy (``routes.RetryPolicy``):
    returns the connection, the response to relay and when its try began.
    Every try but the last is counted against its endpoint here."""
    request = ctx.request
    idempotent = request.method in _IDEMPOTENT
    deadline = trio.current_time() + timeout  # the route's timeout covers every try
    breaker = cluster.breaker
    original = conn
    counted = False
    tries = 1
    try:
        while True:
            left = deadline - trio.current_time()
            per_try = min(policy.per_try_timeout or left, left)
            started = time.monotonic()
            failure = response = None
            try:
                conn, response = await send_whole(pool, cluster, ctx.endpoint, conn, down, ctx,
                                                   max(per_try, 0.001), body)
            except UpstreamError as exc:
                if not (idempotent and policy.on_failure(exc.flag)):
                    raise
                failure = exc
            else:
                if not (idempotent and policy.on_status(response.status)):
                    return conn, response, started
            endpoint = ctx.endpoint
            retry = (tries < policy.attempts and deadline - trio.current_time() > 0.001
                     and not down.io.peer_closed()
                     and (counted or budget_allows(breaker, policy)))
            if not retry:
                if failure is not None:
                    raise failure
                return conn, response, started
            if failure is not None:
                cluster.report(endpoint, FAILURES.get(failure.flag, RESET), None, time.monotonic() - started)
                why = str(failure)
            else:
                cluster.report(endpoint, outcome(response), response.status, time.monotonic() - started)
                conn.discard = True  # its body is never read
                why = f"status {response.status}"
            if not counted:
                breaker.retries += 1
                counted = True
            await pool.release(cluster, conn)
            conn = None
            ctx.tried.append(endpoint)
            following = cluster.pick(ctx, ctx.tried) or cluster.pick(ctx) or endpoint
            log.info("retrying on another try", request_id=ctx.request_id, attempt=tries + 1,
                     endpoint=endpoint.address, next=following.address, reason=why)
            pause = random.uniform(0, min(policy.max_backoff, policy.backoff * 2 ** (tries - 1)))
            await trio.sleep(min(pause, max(deadline - trio.current_time(), 0)))
            endpoint.active -= 1
            following.active += 1
            ctx._choose(following)
            tries += 1
            conn, _ = await connect(pool, cluster, following, ctx)
    except BaseException:
        if conn is not None and conn is not original:  # (the caller releases only the one it gave)
            await conn.aclose()
        raise
    finally:
        if counted:
            breaker.retries -= 1


def budget_allows(breaker, policy) -> bool:
    """A retry budget: retries in flight at most ``budget_percent`` of the
    requests in flight (always ``min_retries``), and the max_retries breaker."""
    if not breaker.retry_allowed():
        return False
    return breaker.retries < max(policy.min_retries, int(breaker.requests * policy.budget_percent / 100))


async def send_whole(pool, cluster, endpoint, conn, down, ctx, timeout, body: bytes):
    """Send a request whose body (maybe none) is all in hand and wait for its
    head. It is sent again on a fresh connection once if a reused one died
    before answering (idempotent methods only), and up to
    ``_UNPROCESSED_REPLAYS`` times, whatever the method, when the upstream
    says it never processed it (HTTP/2 REFUSED_STREAM or GOAWAY, RFC 9113
    8.7), while the cluster's ``max_retries`` allow. Returns the connection
    and response."""
    request = ctx.request
    original = conn
    retried = False
    replays = 0
    breaker = cluster.breaker
    counted = False  # this request holds one of the cluster's retries in flight
    try:
        while True:
            try:
                return conn, await ask(down, conn, ctx, timeout, body)
            except UpstreamError as exc:
                if exc.unprocessed and replays < _UNPROCESSED_REPLAYS:
                    replays += 1
                elif exc.retryable and not retried and request.method in _IDEMPOTENT:
                    retried = True
                else:
                    if conn is not original:  # (the caller releases only the one it gave)
                        await conn.aclose()
                    raise
                if not counted and not breaker.retry_allowed():
                    if conn is not original:
                        await conn.aclose()
                    log.info("no replay: the cluster's max_retries are in flight",
                             request_id=ctx.request_id, cluster=cluster.name)
                    raise
                if down.io.peer_closed():
                    # Nobody is waiting for the answer: sending the request again
                    # would only do its work twice (and take the answer another
                    # request was due).
                    if conn is not original:
                        await conn.aclose()
                    raise ClientGone("client left before the upstream answered") from None
                if not counted:
                    breaker.retries += 1
                    counted = True
                log.info("retrying on a fresh connection", request_id=ctx.request_id, error=str(exc))
                await conn.aclose()
                # A fresh one: the endpoint's pooled connections may be as dead.
                conn, endpoint = await connect(pool, cluster, endpoint, ctx, fresh=True)
    finally:
        if counted:
            breaker.retries -= 1


async def ask(down, conn, ctx, timeout: float, body: bytes = b"") -> Response:
    """Send a request with its whole body; wait for its final head; 504 past ``timeout``.

    An upstream slower than a moment also has the client watched (by the
    edge's watchdog, see ``watchdog.py``), so a client that leaves ends the
    wait with ClientGone.
    """
    deadline = trio.current_time() + timeout
    await conn.send_whole(ctx.request, body, deadline)
    event = await conn.next_event(deadline, watch=down.io)
    return await final_head(down, conn, ctx, event, deadline)


def timed_out() -> UpstreamError:
    return UpstreamError("upstream response timed out", status=504, flag="UT")


async def final_head(down, conn, ctx, event, deadline: float) -> Response:
    """Relay 1xx responses until the final head (None: the deadline passed)."""
    while type(event) is Informational:
        status = event.response.status
        if status == 101:
            if ctx.upgrade is None:
                raise UpstreamError("upstream switched protocols unasked", status=502, flag="UPE")
            break  # the final head of an upgrade: the tunnel's
        if status != 100 or down.expects_100:  # an unasked-for 100 is dropped (RFC 9110 15.2.1)
            await down.send_informational(event.response)
        event = await conn.next_event(deadline)
    if event is None:
        raise timed_out()
    ctx.response = event.response
    return event.response
