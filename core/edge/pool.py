"""Upstream connections and the per-endpoint pool, for HTTP/1.1 and HTTP/2.

A cluster's ``protocol`` says how its endpoints are spoken to: ``h1``
(HTTP/1.1, one exchange per connection at a time), ``h2`` (HTTP/2 over TLS,
negotiated by ALPN) or ``h2c`` (HTTP/2 over TCP, prior knowledge). For
HTTP/2 ``acquire`` gives a stream (``upstream_http2.py``) on a connection
with room under the peer's MAX_CONCURRENT_STREAMS, and opens another
connection when every one is full; one dial per endpoint at a time, which
the exchanges waiting for it share. A connection that goes away (GOAWAY)
takes no new stream and closes once its last one ends.

For HTTP/1.1 the pool keeps at most ``max_idle`` idle connections per endpoint, drops those
idle longer than ``idle_timeout``, and never hands out one the upstream has
already closed: an idle HTTP/1.1 connection that has become readable is
either closed (EOF) or carrying bytes nobody asked for, so it is discarded.
What slips through (the close races our check) is caught by the exchange,
which replays an idempotent request once on a fresh connection.
"""

from __future__ import annotations

import time
from collections import deque
from functools import cached_property

import structlog
import trio

from ..errors import UpstreamError
from ..messages import Headers, Request
from ..protocol.events import NEED_DATA, ProtocolError
from ..protocol.http1 import Codec
from ..upstream.cluster import Cluster, Endpoint, Overflow
from .byteio import SocketIO, StreamIO, local_address, socket_io
from .upstream_http2 import H2Upstream, H2UpstreamStream
from .watchdog import Watchdog

__all__ = ["Pool", "UpstreamConnection"]

log = structlog.get_logger("sluice.upstream")

H2_WINDOW = 256 * 1024  # each upstream stream's receive window: its most unread response bytes


class _Dial:
    """An HTTP/2 connection being opened; others wanting one wait for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: UpstreamError | None = None

class UpstreamConnection:
    """One connection to an endpoint, carrying one exchange at a time."""

    def __init__(self, io: SocketIO | StreamIO, endpoint: Endpoint, codec: Codec, *,
                 io_timeout: float, max_head_bytes: int, max_header_count: int,
                 on_close=None) -> None:
        self.io = io
        self._on_close = on_close  # called once, when it closes (the cluster's breaker)
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
        self.opened = time.monotonic()
        self.peer_closed = False  # the upstream's EOF was read

    @cached_property
    def local(self) -> tuple[str, int] | None:
        """This connection's own address (the access log's upstream local
        address), read from the socket once."""
        return local_address(self.io)

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
            if self.peer_closed:  # closed before (or in the middle of) its answer: a reset, not garbage
                raise self._failed(f"upstream closed the connection: {exc}", "UC") from None
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
            if not data:
                self.peer_closed = True
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
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        with trio.CancelScope(shield=True):
            await self.io.aclose()


class Pool:
    """Upstream connections per endpoint, and how new ones are opened."""

    def __init__(self, codec: Codec, watchdog: Watchdog, *, max_head_bytes: int = 64 * 1024,
                 max_header_count: int = 200) -> None:
        self.codec = codec
        self.watchdog = watchdog
        self._idle: dict[int, deque[UpstreamConnection]] = {}
        self._h2: dict[int, list[H2Upstream]] = {}
        self._dials: dict[int, _Dial] = {}
        self._limits = {"max_head_bytes": max_head_bytes, "max_header_count": max_header_count}
        self._nursery: trio.Nursery | None = None
        self.closed = False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The pool's tasks: HTTP/2 connection readers, and the reaper."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.reap()

    def spawn(self, fn, *args) -> bool:
        """Run ``fn(*args)`` in the pool's nursery (work that outlives an
        exchange: a mirrored request); False when the pool is closing."""
        if self._nursery is None or self.closed:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    async def acquire(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamConnection | H2UpstreamStream:
        if cluster.protocol != "h1":
            return await self._stream(cluster, endpoint)
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

    async def connect(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamConnection | H2UpstreamStream:
        """A fresh HTTP/1.1 connection; for HTTP/2 a stream on a live one."""
        if cluster.protocol != "h1":
            return await self._stream(cluster, endpoint)
        return UpstreamConnection(await self._open(cluster, endpoint), endpoint, self.codec,
                                  io_timeout=cluster.response_timeout,
                                  on_close=cluster.breaker.connection_closed, **self._limits)

    async def _open(self, cluster: Cluster, endpoint: Endpoint) -> SocketIO | StreamIO:
        """A connected (and, with a transport, protected) socket, within
        connect_timeout, counted by the cluster's breaker (the caller's
        connection object gives the count back when it closes)."""
        breaker = cluster.breaker
        try:
            await breaker.connection_slot(cluster.connect_timeout, lambda: self._drop_idle(cluster))
        except Overflow as exc:
            raise UpstreamError(f"cluster {cluster.name}: circuit breaker {exc} reached", status=503,
                                flag="UO") from None
        try:
            return await self._connect(cluster, endpoint)
        except BaseException:
            breaker.connection_closed()
            raise

    async def _drop_idle(self, cluster: Cluster) -> bool:
        """Close one idle HTTP/1.1 connection of ``cluster`` (to make room
        under max_connections); False when it has none."""
        for endpoint in cluster.endpoints:
            idle = self._idle.get(id(endpoint))
            if idle:
                await idle.popleft().aclose()
                return True
        return False

    async def _connect(self, cluster: Cluster, endpoint: Endpoint) -> SocketIO | StreamIO:
        with trio.move_on_after(cluster.connect_timeout) as scope:
            try:
                stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            except OSError as exc:
                raise UpstreamError(
                    f"connect to {endpoint.address} failed: {exc.strerror or exc}",
                    status=503, flag="UF",
                ) from None
            if cluster.transport is None:
                return socket_io(stream, self.watchdog)
            try:
                tls = await cluster.transport.wrap_client(stream, cluster.tls_server_name or endpoint.host)
            except Exception as exc:
                await trio.aclose_forcefully(stream)
                raise UpstreamError(
                    f"TLS to {endpoint.address} failed: {exc.__cause__ or exc!r}",
                    status=503, flag="UF",
                ) from None
            if cluster.protocol == "h2" and getattr(tls, "selected_alpn_protocol", lambda: None)() != "h2":
                await trio.aclose_forcefully(tls)
                raise UpstreamError(f"{endpoint.address} did not negotiate h2 by ALPN", status=503, flag="UF")
            return StreamIO(tls, self.watchdog)
        assert scope.cancelled_caught
        raise UpstreamError(
            f"connect to {endpoint.address} timed out after {cluster.connect_timeout}s",
            status=503, flag="UF",
        )

    # -- HTTP/2 ------------------------------------------------------------------

    async def _stream(self, cluster: Cluster, endpoint: Endpoint) -> H2UpstreamStream:
        """A stream on a connection with room; dial one when none has any."""
        key = id(endpoint)
        while True:
            age = cluster.max_connection_age
            for conn in self._h2.get(key, ()):
                if age is not None and not conn.retired and time.monotonic() - conn.opened > age:
                    conn.retired = True  # no new stream; closed by the reaper once its last one ends
                if conn.has_room():
                    return conn.stream()
            dial = self._dials.get(key)
            if dial is not None:  # another exchange is opening one: share it
                await dial.done.wait()
                if dial.error is not None:
                    raise dial.error
                continue
            dial = self._dials[key] = _Dial()
            try:
                conn = await self._dial_h2(cluster, endpoint)
            except UpstreamError as exc:
                dial.error = exc
                raise
            finally:
                del self._dials[key]
                dial.done.set()
            return conn.stream()

    async def _dial_h2(self, cluster: Cluster, endpoint: Endpoint) -> H2Upstream:
        if self.closed or self._nursery is None:
            raise UpstreamError("the pool is closed", status=503, flag="UF")
        conn = H2Upstream(await self._open(cluster, endpoint), endpoint,
                          io_timeout=cluster.response_timeout, idle_timeout=cluster.idle_timeout,
                          initial_window=H2_WINDOW, tls=cluster.protocol == "h2",
                          on_close=cluster.breaker.connection_closed, **self._limits)
        self._nursery.start_soon(self._read_h2, conn)
        try:
            await conn.handshake(cluster.connect_timeout)
        except UpstreamError:
            await conn.aclose()
            raise
        if conn.broken:
            raise UpstreamError(f"{endpoint.address} closed the connection in the HTTP/2 handshake",
                                status=503, flag="UF")
        self._h2.setdefault(id(endpoint), []).append(conn)
        return conn

    async def _read_h2(self, conn: H2Upstream) -> None:
        try:
            await conn.run()
        except Exception as exc:  # a bug of ours must cost this connection, not the pool
            log.error("HTTP/2 upstream reader failed", endpoint=conn.endpoint.address, exc_info=exc)
        finally:
            self._forget(conn)

    def _forget(self, conn: H2Upstream) -> None:
        conns = self._h2.get(id(conn.endpoint))
        if conns is not None and conn in conns:
            conns.remove(conn)

    # -- returning ---------------------------------------------------------------

    async def release(self, cluster: Cluster, conn: UpstreamConnection | H2UpstreamStream) -> None:
        """Return a connection after an exchange: pooled if reusable, else
        closed; an HTTP/2 stream ends (reset if unfinished)."""
        if not self._keep(cluster, conn):
            await conn.aclose()

    def _keep(self, cluster: Cluster, conn) -> bool:
        """Pool a connection only when both messages were fully written and
        read on the wire, and both sides will keep it alive."""
        if (cluster.protocol != "h1" or self.closed or conn.discard or not conn.request_written
                or not conn.proto.reusable()):
            return False
        age = cluster.max_connection_age
        if age is not None and time.monotonic() - conn.opened > age:
            return False  # retired: the next exchange opens a fresh one
        idle = self._idle.setdefault(id(conn.endpoint), deque())
        if len(idle) >= cluster.max_idle:
            return False
        conn.proto.next_cycle()
        conn.idle_deadline = time.monotonic() + cluster.idle_timeout
        idle.append(conn)
        cluster.breaker.connection_idle()
        return True

    async def reap(self, interval: float = 1.0) -> None:
        """Background task: close idle connections expired or closed by the
        upstream, and HTTP/2 ones gone away with no stream left."""
        while True:
            await trio.sleep(interval)
            now = time.monotonic()
            # Take every victim out first, without awaiting: exchanges may
            # take from or add to the pool while the closes below are awaited.
            victims: list = []
            for idle in self._idle.values():
                expired = [c for c in idle if now > c.idle_deadline or c.looks_stale()]
                for conn in expired:
                    idle.remove(conn)
                victims += expired
            for conns in self._h2.values():
                over = [c for c in conns if c.done or (not c.active and now > c.idle_deadline)]
                for conn in over:
                    conns.remove(conn)
                victims += over
            for conn in victims:
                await conn.aclose()

    def retire(self, endpoints) -> None:
        """Endpoints a reload dropped (their cluster changed or went): their
        idle connections close at the reaper's next round, and their HTTP/2
        connections once their streams end."""
        for endpoint in endpoints:
            for conn in self._idle.get(id(endpoint), ()):
                conn.idle_deadline = 0.0
            for conn in self._h2.get(id(endpoint), ()):
                conn.idle_deadline = 0.0

    async def aclose(self) -> None:
        self.closed = True
        for idle in list(self._idle.values()):
            while idle:
                await idle.popleft().aclose()
        for conns in list(self._h2.values()):
            while conns:
                await conns.pop().aclose()
