"""One GET through a configured cluster: how a remote JWKS is fetched.

Envoy fetches a provider's keys through a cluster of its config
(``remote_jwks.http_uri.cluster``) so that the key server gets what every
upstream gets: the cluster's endpoints (static or discovered), its
balancing, its TLS transport and client certificate, its connect and
response timeouts, its circuit breaker and its pooled connections. sluice
does the same with its own upstream pool (``app.pool``), as ``mirror`` does
for shadow traffic: pick an endpoint, send the request whole, read the
answer whole (at most ``max_bytes``), give the connection back.
"""

from __future__ import annotations

import trio

from sluice.messages import Headers, Request
from sluice.protocol.events import NEED_DATA, Body, End, Informational, ResponseHead

__all__ = ["FetchError", "get"]


class FetchError(Exception):
    """The key server could not be reached, or did not answer 200 with a body."""


async def get(pool, cluster, target: str, host: str, *, timeout: float, max_bytes: int) -> bytes:
    """The body of a 200 answer to ``GET target`` (``Host: host``) from one of ``cluster``'s endpoints."""
    endpoint = cluster.pick(None)
    if endpoint is None:
        raise FetchError(f"no healthy endpoint in cluster {cluster.name!r}")
    request = Request("GET", target, Headers([("host", host), ("accept", "application/json"),
                                              ("user-agent", "sluice-jwt")]))
    conn = None
    try:
        with trio.move_on_after(timeout):
            conn = await pool.acquire(cluster, endpoint)
            deadline = trio.current_time() + timeout
            await conn.send_whole(request, b"", deadline)
            status, body = None, bytearray()
            while True:
                event = conn.poll()
                if event is NEED_DATA:
                    event = await conn.next_event(deadline)
                if event is None:
                    break  # past the deadline
                if type(event) is ResponseHead:
                    status = event.response.status
                elif type(event) is Body:
                    body += event.data
                    if len(body) > max_bytes:
                        conn.discard = True
                        raise FetchError(f"{endpoint.address}: the key set is larger than {max_bytes} bytes")
                elif type(event) is End:
                    if status != 200:
                        raise FetchError(f"{endpoint.address}: answered {status}")
                    return bytes(body)
                elif type(event) is not Informational:
                    break
        if conn is not None:
            conn.discard = True
        raise FetchError(f"{endpoint.address}: no whole answer within {timeout:g} s")
    except FetchError:
        raise
    except Exception as exc:  # UpstreamError (refused, reset, bad bytes), OSError, TLS errors
        if conn is not None:
            conn.discard = True
        raise FetchError(f"{endpoint.address}: {exc}") from None
    finally:
        if conn is not None:
            with trio.CancelScope(shield=True):
                await pool.release(cluster, conn)
