"""Request mirroring: a copy of a request to a shadow cluster, fire and forget.

A route with ``mirror = { cluster = "shadow", percent = 10 }`` sends that
share of its requests, as the chain left them, to the shadow cluster too.
The copy goes in a task of the pool's, after the main request has gone
upstream, and nothing about it reaches the client: its answer is read and
dropped, its failures are logged at debug level, and it never delays or
fails the main exchange. Its Host gets ``-shadow`` appended (as Envoy does),
so the shadow can tell mirrored traffic apart. Requests whose body streams
(a body that was not read whole) are not mirrored: the body is gone once
sent. At most ``MAX_IN_FLIGHT`` copies per route are in flight; past that,
copies are dropped (counted in the log), so a slow shadow costs nothing.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ..messages import Headers, Request
from ..protocol.events import NEED_DATA, End

__all__ = ["MAX_IN_FLIGHT", "Mirror", "mirror"]

log = structlog.get_logger("sluice.mirror")

MAX_IN_FLIGHT = 100


@dataclass(eq=False)
class Mirror:
    """A route's mirror: the shadow cluster and the share of requests copied."""

    cluster: Any
    fraction: float = 1.0
    in_flight: int = 0
    dropped: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def wanted(self) -> bool:
        return self.fraction >= 1.0 or self.rng.random() < self.fraction


def mirror(pool, route_mirror: Mirror, request: Request, body: bytes, request_id: str) -> None:
    """Start a copy of ``request`` (whole ``body``) to the shadow cluster."""
    if route_mirror.in_flight >= MAX_IN_FLIGHT:
        route_mirror.dropped += 1
        if route_mirror.dropped % 100 == 1:
            log.info("mirror copies dropped: the shadow is slow", cluster=route_mirror.cluster.name,
                     dropped=route_mirror.dropped)
        return
    fields = [(n, v) for n, v in request.headers.raw()]
    for i, (name, value) in enumerate(fields):
        if name == b"host":
            fields[i] = (name, value + b"-shadow")
    copy = Request(request.method, request.target, Headers._trusted(fields), "1.1", request.scheme)
    if body or request.headers.get_raw(b"content-length") is not None:
        copy.headers.set(b"content-length", str(len(body)).encode())
    route_mirror.in_flight += 1
    if not pool.spawn(_send, pool, route_mirror, copy, body, request_id):
        route_mirror.in_flight -= 1  # shutting down


async def _send(pool, route_mirror: Mirror, request: Request, body: bytes, request_id: str) -> None:
    cluster = route_mirror.cluster
    conn = None
    endpoint = None
    started = time.monotonic()
    try:
        endpoint = cluster.pick(None)
        if endpoint is None:
            return
        with trio.move_on_after(cluster.response_timeout):
            conn = await pool.acquire(cluster, endpoint)
            deadline = trio.current_time() + cluster.response_timeout
            await conn.send_whole(request, body, deadline)
            while True:  # read the answer whole and drop it, so the connection can be pooled
                event = conn.poll()
                if event is NEED_DATA:
                    event = await conn.next_event(deadline)
                if event is None or type(event) is End:
                    break
        log.debug("mirrored", request_id=request_id, cluster=cluster.name, endpoint=endpoint.address,
                  seconds=round(time.monotonic() - started, 4))
    except Exception as exc:  # the shadow's trouble is never the client's
        log.debug("mirror failed", request_id=request_id, cluster=cluster.name, error=repr(exc))
        if conn is not None:
            conn.discard = True
    finally:
        route_mirror.in_flight -= 1
        if conn is not None:
            with trio.CancelScope(shield=True):
                await pool.release(cluster, conn)
