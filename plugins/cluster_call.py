"""One request through a configured cluster, its answer read whole: how a filter asks a side service.

A filter that consults another service (ext_authz's check) sends it through
a cluster of the config, as ``mirror`` sends shadow traffic: the service
gets what every upstream gets (the cluster's endpoints, static or
discovered, its balancing, TLS, circuit breaker and pooled connections).
``call`` picks an endpoint, sends the request whole, reads the answer whole
(at most ``max_bytes`` of body) within ``timeout`` (connecting included),
and gives the connection back; every way of failing is one ``CallError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from sluice.messages import Headers, Request
from sluice.protocol.events import NEED_DATA, Body, End, Informational, ResponseHead

__all__ = ["Answer", "CallError", "call"]


class CallError(Exception):
    """No whole answer: no endpoint, refused, reset, bad bytes, too large, or past the timeout."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Headers
    body: bytes


async def call(pool, cluster, request: Request, body: bytes, *, timeout: float, max_bytes: int) -> Answer:
    """``request`` (with its whole ``body``) to one of ``cluster``'s endpoints; its answer."""
    endpoint = cluster.pick(None)
    if endpoint is None:
        raise CallError(f"no healthy endpoint in cluster {cluster.name!r}")
    conn = None
    try:
        with trio.move_on_after(timeout):
            conn = await pool.acquire(cluster, endpoint)
            deadline = trio.current_time() + timeout
            await conn.send_whole(request, body, deadline)
            head, got = None, bytearray()
            while True:
                event = conn.poll()
                if event is NEED_DATA:
                    event = await conn.next_event(deadline)
                kind = type(event)
                if kind is ResponseHead:
                    head = event.response
                elif kind is Body:
                    got += event.data
                    if len(got) > max_bytes:
                        raise CallError(f"{endpoint.address}: an answer larger than {max_bytes} bytes")
                elif kind is End and head is not None:
                    return Answer(head.status, head.headers, bytes(got))
                elif kind is not Informational:
                    break  # None: past the deadline
        raise CallError(f"{endpoint.address}: no whole answer within {timeout:g} s")
    except CallError:
        if conn is not None:
            conn.discard = True
        raise
    except Exception as exc:  # UpstreamError (refused, reset, bad bytes), Overflow, OSError, TLS errors
        if conn is not None:
            conn.discard = True
        raise CallError(f"{endpoint.address}: {exc}") from None
    finally:
        if conn is not None:
            with trio.CancelScope(shield=True):
                await pool.release(cluster, conn)
