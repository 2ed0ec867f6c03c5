"""The HTTP/2 downstream: one connection, many streams, each its own exchange.

``H2Connection`` owns the socket: one task reads it and feeds the protocol
(``protocol/h2_codec.py``), and each request stream runs ``run_exchange``
in a task of its own, through an ``H2Stream``, which offers the exchange
the same methods ``H1Downstream`` does. So every filter, route and limit
applies per stream, as it does per HTTP/1.1 request.

Writes from all streams go through ``flush()``, which takes the protocol's
pending bytes and writes them under one lock: HPACK state and frame order
are the connection's, so the bytes must leave in the order they were made.

Backpressure both ways is HTTP/2's own flow control: a request body's DATA
is acknowledged only when the exchange takes it (the client can have at
most a stream window in flight per stream), and a response body is sent no
faster than the client's windows open (``H2Stream.send_body`` waits).

Timeouts: the connection closes after ``idle`` with no stream open and
nothing received; a stream's body read or window wait ends after ``idle``
(the exchange answers 408 or gives up). These are cancel scopes, not the
watchdog's deadlines: a watchdog expiry wakes every wait on the socket, and
here one socket has a reader and many writers at once.

WebSockets (RFC 8441): an extended CONNECT reaches the exchange as the
HTTP/1.1 handshake it stands for (``WebSocketHead``), and its ``H2Stream``
proposes the upgrade (``upgrade``) as an ``H1Downstream`` does, so routes,
filters and the upgrade rules apply unchanged. On the upstream's 101,
``tunnel()`` checks its Sec-WebSocket-Accept (a wrong one: 502), answers
``:status 200`` and lends ``tunnel.pump`` the stream as one end
(``_TunnelEnd``): DATA to the upstream, acknowledged only once written
there, its bytes back as DATA as the client's windows allow; END_STREAM
and the upstream's EOF are each other's half-close; the upstream breaking
resets the stream (CONNECT_ERROR, RFC 9113 8.5), the client's reset ends
the tunnel. Any other answer is relayed, but a 2xx: on an extended CONNECT
it would tell the client the tunnel is open (RFC 8441 5), so it is a 502.

Draining sends GOAWAY (the last stream id sluice will serve), lets the
streams in flight finish, then closes. A connection with no stream open is
evictable, like an idle HTTP/1.1 one (``slots.py``): at max_connections it
gives its slot up to a new client, with GOAWAY.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import h2.errors
import h2.exceptions
import structlog
import trio

from ..errors import ClientGone, UpstreamError
from ..messages import Headers, Response
from ..protocol.events import Body, End, ProtocolError, RequestHead
from ..protocol.h2_codec import Data, H2Server, Refused, StreamReset, Terminated, WebSocketHead, WindowOpen
from ..protocol.http1 import reason_phrase
from ..proxy.context import Context
from ..proxy.exchange import run_exchange
from .tunnel import BROKEN, pump

if TYPE_CHECKING:
    from .listener import Listener

__all__ = ["H2Connection", "H2Stream"]

log = structlog.get_logger("sluice.http2")

_FLUSH_SIZE = 64 * 1024
_HOLD_SIZE = 16 * 1024  # a body piece this small may wait for the end (one DATA frame)
_LAST_WORDS = 1.0  # seconds a broken or abusive connection's last bytes may take
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.StreamClosedError)


class H2Stream:
    """One request stream, as the exchange sees its downstream."""

    def __init__(self, conn: H2Connection, stream_id: int, *, has_body: bool,
                 websocket_key: bytes | None = None) -> None:
        """``websocket_key``: the stream is an extended CONNECT for a
        WebSocket, whose handshake upstream carries this key."""
        self.conn = conn
        self.stream_id = stream_id
        self.io = self  # what the watchdog peeks while the upstream is slow
        self.close_after = False  # a connection matter; streams end on their own
        self.body_done = not has_body
        self.expects_100 = False  # (no 100-continue on HTTP/2 streams yet)
        self.waiting_for_100_continue = False
        # What the request proposes to switch to, as H1Downstream.upgrade says.
        self.upgrade = None if websocket_key is None else b"websocket"
        self.ctx: Context | None = None  # set by the exchange's task
        self._key = websocket_key
        self._not_a_switch: bytes | None = None  # the body of the 502 a 2xx became
        self.response_started = False
        self.ended = False  # our side of the stream is over
        self.reset = False  # the client reset it, or the connection is gone
        self._events: deque = deque()
        self._wake = trio.Event()
        self._gone = trio.Event()  # set once reset: what watch_disconnect waits for
        self._head: Response | None = None
        self._held: bytes | None = None  # a small first piece of body, held with the head
        self._unacked = 0  # body bytes taken but not yet given back to the window
        self._unflushed = 0  # body bytes given to the protocol since the last write

    # -- what the connection's reader calls --------------------------------

    def arrived(self, event: object) -> None:
        self._events.append(event)
        self._wake.set()

    def poke(self) -> None:
        """Something changed (a window opened, a reset): waiters look again."""
        self._wake.set()
        if self.reset:
            self._gone.set()

    def peer_closed(self) -> bool:
        return self.reset

    # -- the downstream interface -------------------------------------------

    async def _wait(self, what: str) -> None:
        if self.reset:
            raise ClientGone(f"stream reset while {what}")
        self._wake = trio.Event()
        with trio.move_on_after(self.conn.idle_timeout) as waited:
            await self._wake.wait()
        if waited.cancelled_caught:
            raise ClientGone(f"client stalled while {what}", timed_out=True)

    async def read_body_event(self):
        """The next Body or End of the request; ClientGone on reset or stall."""
        while not self._events:
            await self._wait("sending the body")
        event = self._events.popleft()
        if type(event) is Data:
            # Windows are given back in quarters, not per frame: one
            # WINDOW_UPDATE (and one write) per quarter window taken.
            self._unacked += event.size
            if self._unacked >= self.conn.ack_every:
                self.conn.proto.acknowledge(self.stream_id, self._unacked)
                self._unacked = 0
                await self.conn.flush()
            return Body(event.data)
        self.body_done = True
        return event

    async def _nudged(self) -> None:
        """Wait for the next event or ``poke``. Unlike ``_wait`` it shares the
        wake-up with any task already waiting (a tunnel has two), and has no
        timeout of its own (the tunnel's cancel scopes bound it)."""
        if self._wake.is_set():
            self._wake = trio.Event()
        await self._wake.wait()

    async def watch_disconnect(self) -> None:
        """Wait, while the upstream works, for the client to reset the stream."""
        # Its own event: the relay may be waiting on ``_wake`` for a window
        # at the same time, and one replacing the other's event strands it.
        if not self.reset:
            await self._gone.wait()
        raise ClientGone("stream reset before the response")

    async def flush(self) -> None:
        if self._held is not None:
            await self._put(b"")
        await self.conn.flush()

    async def send_continue(self) -> None:
        return None

    async def send_informational(self, response: Response) -> None:
        self._send(lambda p: p.respond(self.stream_id, response))
        await self.conn.flush()

    async def send_response(self, response: Response) -> None:
        # Held until the body or the end: a bodiless answer is one HEADERS
        # frame with END_STREAM.
        if self._key is not None and 200 <= response.status < 300:
            response = self._no_switch(response)
        self._head = response
        self.response_started = True

    def _no_switch(self, response: Response) -> Response:
        """A 2xx that is not the upstream's 101, to a WebSocket stream: a 200
        would tell the client its tunnel is open (RFC 8441 5), and the body
        would be read as WebSocket frames. It becomes a 502 (its body dropped)."""
        body = self._not_a_switch = b"upstream did not switch to websocket\n"
        answer = Response(502, Headers([(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", b"%d" % len(body))]))
        ctx = self.ctx
        if ctx is not None:
            ctx.response = answer
            ctx.flags.append("UPE")
        log.info("a 2xx to a websocket handshake is no switch", status=response.status,
                 request_id=None if ctx is None else ctx.request_id)
        return answer

    async def send_body(self, chunk: bytes) -> None:
        if self._not_a_switch is not None:
            return  # the dropped body of a 2xx that became a 502
        if self._head is not None and self._held is None and len(chunk) <= _HOLD_SIZE:
            # The first small piece waits with the head: if the end comes
            # next, it carries END_STREAM itself (HEADERS and one DATA frame,
            # not an empty DATA frame more).
            self._held = chunk
            return
        await self._put(chunk)

    async def _put(self, chunk: bytes) -> None:
        """Send ``chunk`` (after the head and a held piece) as the windows allow."""
        self._send_head(False)
        held = self._held
        if held is not None:
            self._held = None
            chunk = held + chunk
        proto = self.conn.proto
        sid = self.stream_id
        start = 0
        while start < len(chunk):
            room = proto.window(sid)
            if room <= 0:
                await self.conn.flush()
                self._unflushed = 0
                if proto.window(sid) <= 0:  # (it may have opened during the flush)
                    await self._wait("opening its window")
                continue
            piece = chunk[start:start + room]
            self._send(lambda p, piece=piece: p.send_data(sid, piece))
            start += len(piece)
        # As H1Downstream does: small pieces wait for the end (one write for
        # a small answer's head, body and end), large ones go now; the
        # exchange flushes before it waits on the upstream.
        self._unflushed += len(chunk)
        if self._unflushed >= _FLUSH_SIZE:
            self._unflushed = 0
            await self.conn.flush()

    async def send_end(self, trailers: Headers | None) -> None:
        sid = self.stream_id
        if self._not_a_switch is not None:
            body, self._not_a_switch = self._not_a_switch, None
            await self.send_body(body)
            trailers = None
        held = self._held
        if held is not None:
            if trailers is None and self.conn.proto.window(sid) >= len(held):
                self._held = None
                self._send_head(False)
                self._send(lambda p: p.send_data(sid, held, end=True))
                self.ended = True
                await self.conn.flush()
                return
            await self._put(b"")
        if self._head is not None:
            self._send_head(trailers is None)
            if trailers is not None:
                self._send(lambda p: p.trailers(sid, trailers))
        elif trailers is not None:
            self._send(lambda p: p.trailers(sid, trailers))
        else:
            self._send(lambda p: p.send_data(sid, b"", end=True))
        self.ended = True
        await self.conn.flush()

    async def tunnel(self, response: Response, upstream, early: bytes, *, idle: float, limit: float,
                     stats) -> str:
        """Answer the upstream's 101 ``response`` with ``:status 200``, then pump
        bytes between the stream and ``upstream`` (``early``: bytes that
        followed its 101) until the tunnel ends; returns how (``tunnel.pump``).
        UpstreamError (502) when the 101 does not answer our key; ClientGone
        when the stream is gone."""
        sid = self.stream_id
        key = self._key
        if key is None:  # the exchange tunnels only what ``upgrade`` proposed
            raise UpstreamError("a switch on a stream that proposed none", status=502, flag="UPE")
        if not self._send(lambda p: p.open_tunnel(sid, response, key)):
            raise UpstreamError("upstream's Sec-WebSocket-Accept does not answer the key",
                                status=502, flag="UPE")
        self.response_started = True
        end = _TunnelEnd(self)
        try:
            await end.flush()
        except trio.BrokenResourceError as exc:
            raise ClientGone(str(exc)) from None
        ended = await pump(end, upstream, to_down=early, idle=idle, limit=limit, stats=stats)
        with contextlib.suppress(trio.BrokenResourceError):
            if not self.reset and not self.ended:
                if ended == BROKEN:
                    # The upstream broke: a TCP reset, which RFC 9113 8.5
                    # says a CONNECT stream reports as CONNECT_ERROR.
                    self.conn.proto.reset(sid, h2.errors.ErrorCodes.CONNECT_ERROR)
                    self.ended = True
                else:
                    await end.send_eof()  # idle or over time: as a FIN would end it
            await end.flush()
        return ended

    def _send_head(self, end: bool) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._send(lambda p: p.respond(self.stream_id, head, end=end))
            if end:
                self.ended = True

    def _send(self, act):
        """``act(protocol)``'s result; ClientGone when the stream is gone."""
        if self.reset:
            raise ClientGone("stream reset")
        try:
            return act(self.conn.proto)
        except h2.exceptions.StreamClosedError:
            self.reset = True
            raise ClientGone("stream closed by the client") from None
        except h2.exceptions.ProtocolError as exc:  # e.g. a header h2 will not send
            raise ClientGone(f"cannot send on the stream: {exc}") from None


class _TunnelEnd:
    """A WebSocket stream as ``tunnel.pump`` sees the client's end: the
    stream's DATA, read and written as a byte stream.

    Data read is acknowledged (its window given back) only on the next
    read, once ``pump`` has written it upstream: a client can have at most a
    stream window in flight. Writes go no faster than the client's windows
    open. Each write of the connection is shielded: ``pump`` ends a tunnel
    by cancelling it, and a write cut short would cut a frame of the
    connection's other streams too.
    """

    __slots__ = ("stream",)

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream

    async def flush(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self.stream.conn.flush()
        except (*_GONE, ClientGone) as exc:
            raise trio.BrokenResourceError(f"client connection: {exc!r}") from None

    async def receive(self, deadline: float) -> bytes:
        """The next bytes of the client; b"" at its END_STREAM."""
        stream = self.stream
        conn = stream.conn
        if stream._unacked >= conn.ack_every:
            conn.proto.acknowledge(stream.stream_id, stream._unacked)
            stream._unacked = 0
            await self.flush()
        while True:
            if stream.reset:
                raise trio.BrokenResourceError("stream reset by the client")
            if stream._events:
                event = stream._events.popleft()
                if type(event) is not Data:
                    return b""  # End (trailers on a tunnel mean nothing)
                stream._unacked += event.size
                if event.data:
                    return event.data
                continue  # padding alone, or an empty frame
            await stream._nudged()

    async def send_all(self, data: bytes, deadline: float) -> bool:
        stream = self.stream
        proto = stream.conn.proto
        sid = stream.stream_id
        start = 0
        while start < len(data):
            if stream.reset:
                raise trio.BrokenResourceError("stream reset by the client")
            room = proto.window(sid)
            if room <= 0:
                await self.flush()
                # Look again before waiting: a window may have opened
                # during the write, and its poke would be lost.
                if proto.window(sid) <= 0 and not stream.reset:
                    await stream._nudged()
                continue
            piece = data[start:start + room]
            try:
                proto.send_data(sid, piece)
            except h2.exceptions.H2Error as exc:
                raise trio.BrokenResourceError(f"stream closed: {exc!r}") from None
            start += len(piece)
        await self.flush()
        return True

    async def send_eof(self) -> bool:
        """END_STREAM: the upstream's EOF, passed on (RFC 8441 5)."""
        stream = self.stream
        if stream.ended or stream.reset:
            return False
        try:
            stream.conn.proto.send_data(stream.stream_id, b"", end=True)
        except h2.exceptions.H2Error:
            return False
        stream.ended = True
        await self.flush()
        return True


class H2Connection:
    """One HTTP/2 client connection of a listener."""

    def __init__(self, listener: Listener, io: Any, client: tuple[str, int], local: tuple[str, int],
                 tls_peer: dict | None) -> None:
        cfg = listener.config
        settings = cfg.http2
        self.listener = listener
        self.io = io
        self.client = client
        self.local = local
        self.tls_peer = tls_peer
        self.idle_timeout = cfg.timeouts.idle
        self.ack_every = settings.initial_window // 4
        self.proto = H2Server(
            max_concurrent_streams=settings.max_concurrent_streams,
            initial_window=settings.initial_window,
            max_header_list_size=settings.max_header_list_size,
            max_header_count=cfg.limits.max_header_count,
        )
        self.streams: dict[int, H2Stream] = {}
        self.draining = False
        self._lock = trio.Lock()
        self._reading = trio.CancelScope()
        self._look_again = False  # the reader must not wait (a drain, a last stream)
        self._broken = False
        self._evicted = False
        self._error: Terminated | None = None  # a connection error (ours to log)
        self._opened = time.monotonic()

    async def serve(self) -> None:
        """Serve streams until the client leaves, idles out, or a drain ends."""
        try:
            await self.flush()  # our SETTINGS
            async with trio.open_nursery() as nursery:
                await self._read(nursery)
                # Nothing more will be read: streams still running finish
                # (or are reset, if the connection is gone).
                if self._broken:
                    for stream in self.streams.values():
                        stream.reset = True
                        stream.poke()
        finally:
            wait = _LAST_WORDS if self._broken else self.idle_timeout
            with trio.CancelScope(shield=True), contextlib.suppress(*_GONE, ClientGone), \
                    trio.move_on_after(wait):
                await self.flush()
        if self._error is not None:  # the access log hears of it, as of a refused head
            error = ProtocolError(f"HTTP/2 connection error {self._error.error_code}: {self._error.reason}")
            await self.listener._refused(self.client, self.local, self.tls_peer, ("DPE",), None, error,
                                         self._opened)

    def drain(self) -> None:
        """GOAWAY: streams in flight finish, no new one is served."""
        if not self.draining:
            self.draining = True
            self.proto.goaway()
            self._wake_reader()  # it flushes the GOAWAY and waits for the streams

    def evict(self) -> None:
        """Give the slot up (the listener needs it): GOAWAY and close, once
        the streams in flight, if any, are done."""
        self._evicted = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        self._look_again = True
        self._reading.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        io = self.io
        evictable = self.listener.slots.idle
        while True:
            if self.draining or self._evicted:
                await self.flush()
                if not self.streams:
                    self.proto.close()
                    return
            # With no stream open the connection only waits, as an idle
            # HTTP/1.1 one does: at max_connections it gives its slot up,
            # and after the idle timeout it closes. One scope for both ends
            # of the wait (a wake-up and the timeout): they cost per read.
            waiting = not self.streams
            idle_at = trio.current_time() + self.idle_timeout if waiting else math.inf
            reading = self._reading = trio.CancelScope(deadline=idle_at)
            if self._look_again:  # asked while the reader was not waiting
                self._look_again = False
                reading.cancel()
            if waiting:
                evictable[self] = None
            try:
                with reading:
                    try:
                        data = await io.receive(math.inf)
                    except trio.BrokenResourceError:
                        data = b""
            finally:
                if waiting:
                    evictable.pop(self, None)
            if reading.cancelled_caught:
                if self._look_again or trio.current_time() < idle_at:
                    self._look_again = False
                    continue  # drained, or the last stream of a drain ended: look again
                if not self.streams:
                    self.proto.close()
                    return
                continue
            if not data:
                self._broken = True
                return
            for stream_id, event in self.proto.feed(data):
                if not self._dispatch(nursery, stream_id, event):
                    # Our GOAWAY, as far as it goes at once: a client flooding
                    # us may not be reading, and waiting for it to would let
                    # it hold the connection (both sides blocked in send).
                    with trio.move_on_after(_LAST_WORDS):
                        await self.flush()
                    return
            await self.flush()
            # A read and a write the kernel completes at once never yield:
            # the streams just started get to run before the next read.
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _dispatch(self, nursery: trio.Nursery, stream_id: int, event: object) -> bool:
        """Route one event; False when the connection is over."""
        kind = type(event)
        stream = self.streams.get(stream_id)
        if kind is Data or kind is End:
            if stream is not None:
                stream.arrived(event)
            elif kind is Data:
                self.proto.acknowledge(stream_id, event.size)  # a stream we no longer serve
        elif kind is RequestHead:
            stream = self.streams[stream_id] = H2Stream(self, stream_id, has_body=event.has_body)
            nursery.start_soon(self._exchange, stream, event)
        elif kind is WebSocketHead:
            stream = self.streams[stream_id] = H2Stream(self, stream_id, has_body=False,
                                                        websocket_key=event.key)
            nursery.start_soon(self._exchange, stream, event.head)
        elif kind is Refused:
            nursery.start_soon(self._refuse, stream_id, event)
        elif kind is WindowOpen:
            if stream_id == 0:
                for s in self.streams.values():
                    s.poke()
            elif stream is not None:
                stream.poke()
        elif kind is StreamReset:
            if stream is not None:
                stream.reset = True
                stream.poke()
        elif kind is Terminated:
            if event.error_code:
                log.info("HTTP/2 connection error", client=self.client[0], code=event.error_code,
                         reason=event.reason)
                self._broken = True
                self._error = event
                return False
            self.draining = True  # the client's GOAWAY: its open streams finish
        return True

    async def _exchange(self, stream: H2Stream, head: RequestHead) -> None:
        listener = self.listener
        ctx = Context(client=self.client, local=self.local, scheme=listener.scheme, listener=listener.name,
                      tls_peer=self.tls_peer, trust_forwarded=listener.trust_forwarded)
        ctx._began(self._opened)
        stream.ctx = ctx
        sid = stream.stream_id
        try:
            await run_exchange(listener, stream, head, ctx)
        finally:
            proto = self.proto
            # Body bytes never taken still count against the connection's
            # window: give them back, or it shrinks with every such stream.
            untaken = stream._unacked + sum(e.size for e in stream._events if type(e) is Data)
            proto.acknowledge(sid, untaken)
            if not stream.ended and not stream.reset:
                # The answer could not be finished (an upstream broke mid-body):
                # the client must not take what came for the whole.
                proto.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif proto.remote_open(sid):
                # Answered before the body ended: it may stop sending (RFC 9113 8.1).
                proto.reset(sid, h2.errors.ErrorCodes.NO_ERROR)
            self.streams.pop(sid, None)
            if proto.has_pending():  # (a scope costs; most answers are out already)
                with trio.CancelScope(shield=True), contextlib.suppress(*_GONE, ClientGone):
                    await self.flush()
            if self.draining and not self.streams:
                self._wake_reader()

    async def _refuse(self, stream_id: int, refused: Refused) -> None:
        """Answer a request sluice will not forward (its status), and log it;
        a malformed one (status 0) was reset already."""
        status = refused.status
        if not status:
            log.info("malformed request", client=self.client[0], error=str(refused.error))
            with contextlib.suppress(*_GONE, ClientGone):
                await self.flush()
            await self.listener._refused(self.client, self.local, self.tls_peer, ("DPE",), None, refused.error,
                                         time.monotonic())
            return
        body = f"{reason_phrase(status).lower()}\n".encode()
        response = Response(status, Headers([(b"content-type", b"text/plain; charset=utf-8"),
                                             (b"content-length", b"%d" % len(body))]))
        try:
            self.proto.respond(stream_id, response)
            self.proto.send_data(stream_id, body, end=True)
        except h2.exceptions.H2Error:
            return
        log.info("bad request head", client=self.client[0], status=status, error=str(refused.error))
        with contextlib.suppress(*_GONE, ClientGone):
            await self.flush()
        await self.listener._refused(self.client, self.local, self.tls_peer, ("DPE",), status, refused.error,
                                     time.monotonic())

    async def flush(self) -> None:
        """Write what the protocol has pending, in order (one writer at a
        time); whole (see ``byteio``): a frame cut short would garble the
        connection for every stream.

        The lock is taken the usual way even when nobody holds it: its
        acquire is a checkpoint, and without it a tunnel's pump could go
        round (a read and a write the kernel completes at once) without
        ever yielding; a WebSocket close over h2 then stalled now and then
        until the upstream's own timeout."""
        async with self._lock:
            await self._write()

    async def _write(self) -> None:
        data = self.proto.pending()
        if data and not await self.io.send_all(data, trio.current_time() + self.idle_timeout, whole=True):
            raise ClientGone("client stopped reading")

