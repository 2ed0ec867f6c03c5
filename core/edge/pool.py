"""Upstream HTTP/1.1 connections and the per-endpoint keep-alive pool.

The pool keeps at most ``max_idle`` idle connections per endpoint, drops those
idle longer than ``idle_timeout``, and never hands out one the upstream has
already closed: an idle HTTP/1.1 connection that has become readable is
either closed (EOF) or carrying bytes nobody asked for, so it is discarded.
What slips through (the close races our check) is caught by the exchange,
which replays an idempotent request once on a fresh connection.
"""

from __future__ import annotations

import time
from collections import deque

import trio

from ..errors import UpstreamError
from ..messages import Headers, Request
from ..protocol.events import NEED_DATA, ProtocolError
from ..protocol.http1 import Codec
from ..upstream.cluster import Cluster, Endpoint
from .byteio import SocketIO, StreamIO, socket_io
from .watchdog import Watchdog

__all__ = ["Pool", "UpstreamConnection"]

class UpstreamConnection:
    """One connection to an endpoint, carrying one exchange at a time."""

    def __init__(self, io: SocketIO | StreamIO, endpoint: Endpoint, codec: Codec, *,
                 io_timeout: float, max_head_bytes: int, max_header_count: int) -> None:
        self.io = io
        self.io_timeout = io_timeout
        self.endpoint = endpoint
        self.proto = codec.client(
            max_head_bytes=max_head_bytes, max_header_count=max_header_count
        )
        self.reused = False
        self.discard = False  # set when an exchange abandons it mid-message
        # The whole request reached the socket. The protocol object knows a
        # message was *serialised*; only a completed send says it was
        # written, and a connection whose request was cut short (an early
        # answer cancelled the upload) must never be pooled: its upstream
        # would read the next request as the rest of this one.
        self.request_written = False
        self.idle_deadline = 0.0  # when an idle connection expires

    def _failed(self, message: str, flag: str) -> UpstreamError:
        """A 502; replayable when a reused connection died before answering."""
        return UpstreamError(
            message, status=502, flag=flag,
            retryable=self.reused and not self.proto.response_bytes_seen,
        )

    async def send(self, data: bytes, *, deadline: float | None = None, last: bool = False) -> None:
        """Write to the upstream; an upstream that stops reading is a timeout.

        ``deadline`` defaults to ``io_timeout`` from now. ``last``: these
        bytes end the request (see ``request_written``).
        """
        if deadline is None:
            deadline = trio.current_time() + self.io_timeout
        try:
            sent = await self.io.send_all(data, deadline)
        except trio.BrokenResourceError as exc:
            raise self._failed(f"upstream write failed: {exc!r}", "UC") from None
        if not sent:
            raise UpstreamError("upstream stopped reading", status=504, flag="UT")
        if last:
            self.request_written = True

    # -- the upstream stream interface the exchange uses ------------------------

    async def send_head(self, request: Request, *, chunked: bool) -> None:
        """Start a request whose body follows (``chunked``: its length is unknown)."""
        await self.send(self.proto.request(request, chunked=chunked))

    async def send_data(self, data: bytes) -> None:
        await self.send(self.proto.data(data))

    async def send_end(self, trailers: Headers | None) -> None:
        await self.send(self.proto.end(trailers), last=True)

    async def send_whole(self, request: Request, body: bytes, deadline: float) -> None:
        """A request with its whole body (maybe none), in one write."""
        proto = self.proto
        await self.send(proto.request(request, chunked=False) + proto.data(body) + proto.end(),
                        deadline=deadline, last=True)

    def poll(self):
        """The next event if it needs no I/O, else NEED_DATA."""
        try:
            return self.proto.next_event()
        except ProtocolError as exc:
            raise self._failed(f"upstream protocol error: {exc}", "UPE") from None

    async def next_event(self, deadline: float = float("inf"), watch=None):
        """The next response event, or None past ``deadline``; raises
        UpstreamError on reset or bad bytes, ClientGone when the client
        whose I/O is ``watch`` leaves first."""
        while (event := self.poll()) is NEED_DATA:
            try:
                data = await self.io.receive(deadline, watch)
            except trio.BrokenResourceError as exc:
                raise self._failed(f"upstream read failed: {exc!r}", "UC") from None
            if data is None:
                return None
            self.proto.feed(data)
        return event

    def switched(self) -> bytes:
        """The upstream accepted an upgrade: the connection is a tunnel's
        from now on (never pooled); returns the bytes that followed the 101."""
        self.discard = True
        return self.proto.take_buffered()

    def looks_stale(self) -> bool:
        """An idle connection with something to read has been closed or broken."""
        return self.io.readable_now()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.io.aclose()


class Pool:
    """Idle upstream connections per endpoint, and how new ones are opened."""

    def __init__(self, codec: Codec, watchdog: Watchdog, *, max_head_bytes: int = 64 * 1024,
                 max_header_count: int = 200) -> None:
        self.codec = codec
        self.watchdog = watchdog
        self._idle: dict[int, deque[UpstreamConnection]] = {}
        self._limits = {"max_head_bytes": max_head_bytes, "max_header_count": max_header_count}
        self.closed = False

    async def acquire(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamConnection:
        idle = self._idle.get(id(endpoint))
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely closed
            if now > conn.idle_deadline or conn.looks_stale():
                await conn.aclose()
                continue
            conn.reused = True
            conn.request_written = False
            return conn
        return await self.connect(cluster, endpoint)

    async def connect(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamConnection:
        with trio.move_on_after(cluster.connect_timeout) as scope:
            try:
                stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            except OSError as exc:
                raise UpstreamError(
                    f"connect to {endpoint.address} failed: {exc.strerror or exc}",
                    status=503, flag="UF",
                ) from None
            if cluster.transport is None:
                io = socket_io(stream, self.watchdog)
            else:
                try:
                    io = StreamIO(await cluster.transport.wrap_client(
                        stream, cluster.tls_server_name or endpoint.host
                    ), self.watchdog)
                except Exception as exc:
                    await trio.aclose_forcefully(stream)
                    raise UpstreamError(
                        f"TLS to {endpoint.address} failed: {exc.__cause__ or exc!r}",
                        status=503, flag="UF",
                    ) from None
        if scope.cancelled_caught:
            raise UpstreamError(
                f"connect to {endpoint.address} timed out after {cluster.connect_timeout}s",
                status=503, flag="UF",
            )
        return UpstreamConnection(io, endpoint, self.codec, io_timeout=cluster.response_timeout,
                                  **self._limits)

    async def release(self, cluster: Cluster, conn: UpstreamConnection) -> None:
        """Return a connection after an exchange: pooled if reusable, else closed."""
        if not self._keep(cluster, conn):
            await conn.aclose()

    def _keep(self, cluster: Cluster, conn: UpstreamConnection) -> bool:
        """Pool a connection only when both messages were fully written and
        read on the wire, and both sides will keep it alive."""
        if self.closed or conn.discard or not conn.request_written or not conn.proto.reusable():
            return False
        idle = self._idle.setdefault(id(conn.endpoint), deque())
        if len(idle) >= cluster.max_idle:
            return False
        conn.proto.next_cycle()
        conn.idle_deadline = time.monotonic() + cluster.idle_timeout
        idle.append(conn)
        return True

    async def reap(self, interval: float = 1.0) -> None:
        """Background task: close idle connections expired or closed by the upstream."""
        while True:
            await trio.sleep(interval)
            now = time.monotonic()
            # Take every victim out first, without awaiting: exchanges may
            # take from or add to the pool while the closes below are awaited.
            victims = []
            for idle in self._idle.values():
                expired = [c for c in idle if now > c.idle_deadline or c.looks_stale()]
                for conn in expired:
                    idle.remove(conn)
                victims += expired
            for conn in victims:
                await conn.aclose()

    async def aclose(self) -> None:
        self.closed = True
        for idle in list(self._idle.values()):
            while idle:
                await idle.popleft().aclose()
