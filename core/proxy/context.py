"""The per-exchange context shared by every filter of a chain.

It carries what the exchange learns as it goes (route, cluster, endpoint,
timings, response flags) and what the connection knows (the client's
address, ``client``, and as trusted through X-Forwarded-For, ``client_ip``;
the local address it reached, ``local``; the TLS peer identity). ``vars`` is free-form state filters share with each other
(e.g. ``auth.user``); ``state(filter)`` is one filter's private state.

Upgrades (WebSocket): ``upgrade`` is what the request proposes to switch to
(its ``Upgrade`` value, by the rules of ``sluice.protocol.heads``), None when
nothing; once the request phases have run and the route is known, it holds
only the tokens the route allows (``h2c`` never), and those are forwarded.
A request filter may set it to None to forward a plain request.
``upgraded`` is the protocol the exchange switched to (``"websocket"``)
once the upstream's 101 arrived, before ``on_response_headers``; the
exchange is then a byte tunnel: no body phase sees its bytes, which are
counted in ``bytes_in``/``bytes_out``, and ``on_complete`` runs when the
tunnel has ended (``duration`` covers it).

Timings: ``start`` is ``time.monotonic()`` when the exchange began, just
after its request head was parsed, and ``duration`` runs from it. Each
entry of ``timings`` is seconds relative to ``start`` (monotonic clock,
one clock read per mark), set by the core as the exchange passes:

======================  ========================================================
``accepted``            the connection was accepted (HTTP/1.1: before any TLS
                        handshake; HTTP/2: when its session began); <= 0, and
                        far below on a reused keep-alive connection or a later
                        stream: ``headers_read - accepted`` is the connection's
                        age when this request's head was in
``headers_read``        the request head was parsed (~0: the exchange starts here)
``upstream_connected``  an upstream connection was ready (pooled or new)
``upstream_headers``    the upstream's final response head arrived
``upstream_done``       the response's last byte was relayed to the client
======================  ========================================================

They come in that order; a mark is absent when the exchange never got
there (a local reply has no upstream marks, a refused head has none).
``mark(name)`` adds one of a filter's own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..messages import Request, Response
    from ..upstream.cluster import Cluster, Endpoint
    from .filters import Filter
    from .routes import Route

__all__ = ["Context"]


class Context:
    """One exchange's shared state. Created by the core, one per request."""

    __slots__ = (
        "request_id",
        "trace_id",
        "client",
        "local",
        "_trusted",
        "tls_peer",
        "scheme",
        "listener",
        "request",
        "response",
        "_cluster",
        "_endpoint",
        "_pinned",
        "_hash_key",
        "_picked",
        "tried",
        "upstream_local",
        "start",
        "timings",
        "filter_time",
        "flags",
        "error",
        "bytes_in",
        "bytes_out",
        "vars",
        "buffer_request",
        "buffer_response",
        "upgrade",
        "upgraded",
        "_states",
        "_route",
        "_resolver",
        "_drainable",
        "_responded",
    )

    def __init__(
        self,
        *,
        client: tuple[str, int],
        local: tuple[str, int] = ("", 0),
        scheme: str = "http",
        listener: str = "",
        tls_peer: dict[str, Any] | None = None,
        trust_forwarded: bool = False,
    ) -> None:
        self.request_id = ""
        self.trace_id = ""  # W3C trace id, kept or started by forwarding.forward_request
        self.client = client
        self.local = local
        self._trusted = trust_forwarded
        self.tls_peer = tls_peer
        self.scheme = scheme
        self.listener = listener
        self.request: Request | None = None
        self.response: Response | None = None
        self._cluster: Cluster | None = None
        self._endpoint: Endpoint | None = None
        self._pinned: str | None = None
        self._hash_key: str | None = None
        self._picked = False  # the upstream endpoint is chosen: selection is over
        self.tried: list[Endpoint] = []  # endpoints this request failed to reach before ``endpoint``
        self.upstream_local: tuple[str, int] | None = None  # the upstream connection's own address
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}
        self.filter_time: dict[tuple[str, str], float] | None = None  # (filter, phase) -> seconds (sluice.metrics)
        self.flags: list[str] = []
        self.error: BaseException | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.vars: dict[str, Any] = {}
        self.buffer_request = False
        self.buffer_response = False
        self.upgrade: str | None = None
        self.upgraded: str | None = None
        self._states: dict[int, Any] | None = None
        self._route: Route | None | bool = False  # False: not resolved yet
        self._resolver = None
        self._drainable = True  # an unread request body is small enough to drain
        self._responded = False  # on_response_headers ran on the upstream's head

    def buffer_request_body(self) -> None:
        """Ask for the whole request body (call from ``on_request_headers``).

        The core then reads it all (413 past ``max_buffered_body_bytes``),
        calls the body phases once with it and ``end=True``, and sends it
        upstream with an exact Content-Length, so a filter may rewrite it.
        """
        self.buffer_request = True

    def buffer_response_body(self) -> None:
        """Ask for the whole response body (call from ``on_response_headers``).

        Nothing reaches the client until it is complete (502 past
        ``max_buffered_body_bytes``); the body phases see it in one call.
        """
        self.buffer_response = True

    @property
    def client_ip(self) -> str:
        """The client's address as sluice trusts it: the peer's; on a
        listener with ``trust_forwarded``, the address the trusted peer put
        last in X-Forwarded-For (the entry before the one sluice appends
        when it forwards the request). Use it for rate limits and source
        rules, where ``client[0]`` would be the load balancer in front."""
        if self._trusted and self.request is not None:
            xff = self.request.headers.get_raw(b"x-forwarded-for")
            if xff is not None:
                entries = xff.split(b",")
                if len(entries) >= 2:
                    return entries[-2].strip(b" \t").decode("latin-1")
        return self.client[0]

    # -- upstream selection: what filters may steer, before the pick ----------------

    @property
    def cluster(self) -> Cluster | None:
        """The cluster the request goes to: the router sets it when it
        resolves the route; a request filter after the router in the chain
        may replace it (a canary: ``app.clusters[name]``)."""
        return self._cluster

    @cluster.setter
    def cluster(self, cluster: Cluster | None) -> None:
        self._too_late("ctx.cluster")
        self._cluster = cluster

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint chosen (the core's: see ``pin_endpoint``)."""
        return self._endpoint

    @endpoint.setter
    def endpoint(self, endpoint: Endpoint | None) -> None:
        raise AttributeError("ctx.endpoint is chosen by the core; to steer it, call "
                             "ctx.pin_endpoint('host:port') or set ctx.hash_key in on_request_headers")

    def pin_endpoint(self, address: str) -> None:
        """Send the request to the cluster's endpoint at ``address``
        ("host:port", as configured) when it is available; when it is not
        (down, ejected, or not in the cluster) the policy picks as usual.
        For sticky sessions: pin what a cookie names."""
        self._too_late("ctx.pin_endpoint()")
        self._pinned = address

    @property
    def pinned(self) -> str | None:
        return self._pinned

    @property
    def hash_key(self) -> str | None:
        """The key hash policies (ring_hash, maglev) use instead of the one
        their settings name; None: theirs."""
        return self._hash_key

    @hash_key.setter
    def hash_key(self, key: str | None) -> None:
        self._too_late("ctx.hash_key")
        self._hash_key = key

    def _too_late(self, what: str) -> None:
        if self._picked:
            raise RuntimeError(f"{what} was written after the upstream endpoint was chosen; steer "
                               "the selection in on_request_headers (or a request body phase)")

    def _choose(self, endpoint: Endpoint) -> None:
        """The core's: the endpoint is chosen (or changed by a failover)."""
        self._endpoint = endpoint
        self._picked = True

    def state(self, filter_: Filter) -> Any:
        """This filter's per-request state, created by ``filter_.new_state()``."""
        states = self._states
        if states is None:
            states = self._states = {}
        key = id(filter_)
        if key not in states:
            states[key] = filter_.new_state()
        return states[key]

    @property
    def route(self) -> Route | None:
        """The route this request matched, resolved on first use.

        The chain's route resolver (the router filter) answers; filters before
        the router can read it too (for per-route settings). ``None`` when no
        route matched or the chain has no router.
        """
        if self._route is False:
            resolver = self._resolver
            self._route = resolver(self) if resolver is not None else None
        return self._route

    @property
    def matched_route(self) -> Route | None:
        """The route if one was already resolved, without resolving it."""
        return self._route or None

    def clear_route(self) -> None:
        """Forget the resolved route (after a filter rewrote host or path)."""
        self._route = False

    def mark(self, name: str) -> None:
        """Record a timing, in seconds since the exchange started."""
        self.timings[name] = time.monotonic() - self.start

    def _began(self, accepted: float) -> None:
        """The edge's: the request head was just read on a connection
        accepted at ``accepted`` (``time.monotonic()``)."""
        self.timings["accepted"] = accepted - self.start
        self.mark("headers_read")

    @property
    def duration(self) -> float:
        return time.monotonic() - self.start
