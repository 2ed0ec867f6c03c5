"""HTTP/2 upstreams: one connection carries many exchanges, one stream each.

An ``H2Upstream`` is one connection to an endpoint. A reader task (in the
pool's nursery) reads the socket, feeds the protocol (``protocol/h2_client.py``)
and hands each stream's events to its ``H2UpstreamStream``, which offers the
exchange the methods an HTTP/1.1 ``UpstreamConnection`` does (``send_head``,
``send_data``, ``send_end``, ``send_whole``, ``poll``, ``next_event``), so the
exchange is the same whatever protocol the cluster speaks.

The pool (``pool.py``) hands out streams, never more at once on a connection
than the peer's MAX_CONCURRENT_STREAMS, and opens another connection when
every one is full. A connection is used only once the peer's SETTINGS have
arrived, so that limit is known before the first stream.

What can go wrong, and what the exchange hears (as ``UpstreamError``):

====================================================  ======  =====  ===========
what happened                                         status  flag   replayable
====================================================  ======  =====  ===========
the stream was refused (REFUSED_STREAM), or a GOAWAY   502     UC     yes, any
  names a last stream below it (never processed)                     method
the peer reset the stream                             502     UC     no
the response head was malformed (our RST_STREAM)      502     UPE    no
the connection broke or the peer broke the protocol   502     UC     no
  (every stream on it)
the peer stopped reading (no window, full socket)     504     UT     no
====================================================  ======  =====  ===========

Backpressure is HTTP/2's flow control both ways: response DATA is
acknowledged only once the exchange takes it, a request body is sent no
faster than the peer's windows open. Writes from all streams go through
one lock, in the order the protocol made them (HPACK state is shared).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from functools import cached_property
from typing import Any

import h2.errors
import h2.exceptions
import structlog
import trio

from ..errors import ClientGone, UpstreamError
from ..messages import Headers, Request
from ..protocol.events import NEED_DATA, Body, End
from ..protocol.h2_client import H2Client
from ..protocol.h2_codec import Data, StreamReset, Terminated, WindowOpen
from ..upstream.cluster import Endpoint
from .byteio import local_address
from .watchdog import WATCH_AFTER

__all__ = ["H2Upstream", "H2UpstreamStream"]

log = structlog.get_logger("sluice.upstream")

_FLUSH_SIZE = 64 * 1024
_REFUSED = int(h2.errors.ErrorCodes.REFUSED_STREAM)
_NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class H2UpstreamStream:
    """One exchange's stream on an ``H2Upstream``, as the exchange sees its upstream."""

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn
        self.endpoint = conn.endpoint
        self.stream_id = 0  # opened by the first send
        self.io = None  # no tunnel over an HTTP/2 stream (an upstream 101 is malformed)
        self.reused = conn.streams_opened > 0
        self.discard = False
        self.request_written = False
        self.response_ended = False
        self.released = False
        self._events: deque = deque()
        self._wake = trio.Event()  # the reader: an event arrived (or the stream failed)
        self._window = trio.Event()  # the sender: a window opened (or the stream failed)
        self._failure: UpstreamError | None = None
        self._answered = False  # the whole response has arrived (End queued or taken)
        self._upload_over = False  # the upstream wants no more of the request (see stop_upload)
        self._unacked = 0

    @property
    def local(self) -> tuple[str, int] | None:
        return self.conn.local

    # -- what the connection's reader calls ---------------------------------

    def arrived(self, event: object) -> None:
        self._events.append(event)
        if type(event) is End:
            self._answered = True
        self._wake.set()

    def stop_upload(self) -> bool:
        """The upstream reset the stream with NO_ERROR: after a complete
        response that is RFC 9113 8.1's "send no more of the request" (grpcio
        does it after every unary answer), and what is left of the request
        body is dropped quietly. Before one it is a failure: returns False."""
        if not self._answered:
            return False
        self._upload_over = True
        self._window.set()
        return True

    def fail(self, error: UpstreamError) -> None:
        """The stream is over without a (whole) response."""
        if self._failure is None:
            self._failure = error
        self._wake.set()
        self._window.set()

    def poke(self) -> None:
        """A window opened: a send waiting may go on."""
        self._window.set()

    # -- sending ---------------------------------------------------------------

    def _check(self) -> None:
        if self._failure is not None and not self._answered:
            raise self._failure

    def _closed(self) -> None:
        """h2 says the stream is closed to our sending: fine once the answer
        is whole (the rest of the request is not wanted), else a 502."""
        if self._answered:
            self._upload_over = True
            return
        self._check()
        raise UpstreamError("upstream closed the stream", status=502, flag="UC")

    def _open(self, request: Request, *, end: bool) -> None:
        self._check()
        conn = self.conn
        try:
            self.stream_id = conn.proto.request(request, end=end, authority=conn.authority)
        except h2.exceptions.H2Error as exc:
            # h2 refuses to send what HTTP/2 may not carry (e.g. a field name
            # with uppercase letters that came in over HTTP/1.1).
            raise UpstreamError(f"request cannot go over HTTP/2: {exc}", status=502, flag="UPE") from None
        conn.streams[self.stream_id] = self
        conn.streams_opened += 1

    async def send_head(self, request: Request, *, chunked: bool) -> None:
        """Open the stream; the body follows (its framing is HTTP/2's)."""
        self._open(request, end=False)
        await self.conn.flush()

    async def send_data(self, data: bytes, *, end: bool = False, deadline: float | None = None) -> None:
        """Send body bytes as the peer's windows allow; 504 when they stay shut."""
        conn = self.conn
        proto = conn.proto
        sid = self.stream_id
        view = memoryview(data)
        start = 0
        if deadline is None:
            deadline = trio.current_time() + conn.io_timeout
        while start < len(view) or end:
            if self._upload_over:
                return
            self._check()
            room = proto.window(sid)
            if room <= 0 and start < len(view):
                self._window = trio.Event()  # before the flush: a window may open during it
                await conn.flush()
                if proto.window(sid) <= 0:
                    await self._wait_window(deadline)
                continue
            piece = view[start:start + room]
            start += len(piece)
            last = end and start >= len(view)
            try:
                proto.send_data(sid, piece, end=last)
            except h2.exceptions.StreamClosedError:
                self._closed()
                return
            if last:
                break
        await conn.flush()

    async def _wait_window(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._window.wait()
            return
        raise UpstreamError("upstream stopped reading (its flow-control window stayed shut)",
                            status=504, flag="UT")

    async def send_end(self, trailers: Headers | None) -> None:
        if self._upload_over:
            pass
        elif trailers is not None:
            self._check()
            try:
                self.conn.proto.trailers(self.stream_id, trailers)
            except h2.exceptions.StreamClosedError:
                self._closed()
            await self.conn.flush()
        else:
            await self.send_data(b"", end=True)
        self.request_written = True

    async def send_whole(self, request: Request, body: bytes, deadline: float) -> None:
        """A request with its whole body (maybe none)."""
        self._open(request, end=not body)
        if body:
            await self.send_data(body, end=True, deadline=deadline)
        else:
            await self.conn.flush()
        self.request_written = True

    # -- receiving ---------------------------------------------------------------

    def poll(self):
        """The next response event if one has arrived, else NEED_DATA."""
        events = self._events
        if events:
            event = events.popleft()
            kind = type(event)
            if kind is Data:
                self._unacked += event.size
                if self._unacked >= self.conn.ack_every:
                    self.conn.proto.acknowledge(self.stream_id, self._unacked)
                    self._unacked = 0
                return Body(event.data)
            if kind is End:
                self.response_ended = True
            return event
        if self._failure is not None:
            raise self._failure
        return NEED_DATA

    async def next_event(self, deadline: float = math.inf, watch: Any = None):
        """The next response event, or None past ``deadline``; ClientGone
        when the client whose I/O is ``watch`` leaves while we wait."""
        while (event := self.poll()) is NEED_DATA:
            self._wake = trio.Event()  # before the flush: an event may arrive during it
            await self.conn.flush()  # window updates for what was taken
            if self._events or self._failure is not None:
                continue
            if watch is None:
                with trio.move_on_at(deadline):
                    await self._wake.wait()
            else:
                with trio.move_on_at(min(deadline, trio.current_time() + WATCH_AFTER * 2)):
                    await self._wake.wait()
                if not self._wake.is_set() and watch.peer_closed():
                    raise ClientGone("client left while the upstream worked")
            if not self._wake.is_set() and trio.current_time() >= deadline:
                return None
        return event

    def switched(self) -> bytes:  # pragma: no cover - H2Client never yields a 101
        raise UpstreamError("HTTP/2 upstreams do not switch protocols", status=502, flag="UPE")

    # -- the end -------------------------------------------------------------------

    async def aclose(self) -> None:
        """The exchange is done with the stream: reset it if either side is
        unfinished, and give back what was received but never taken."""
        if self.released:
            return
        self.released = True
        conn = self.conn
        conn.active -= 1
        if not conn.active:
            conn.idle_deadline = time.monotonic() + conn.idle_timeout
        sid = self.stream_id
        if not sid:
            return
        conn.streams.pop(sid, None)
        proto = conn.proto
        untaken = self._unacked + sum(e.size for e in self._events if type(e) is Data)
        self._events.clear()
        proto.acknowledge(sid, untaken)
        if not (self.response_ended and self.request_written) and self._failure is None \
                and not self._upload_over:
            proto.reset(sid, h2.errors.ErrorCodes.CANCEL)
        proto.local_resets.discard(sid)
        with trio.CancelScope(shield=True):
            await conn.flush_quietly(1.0)


class H2Upstream:
    """One HTTP/2 connection to an endpoint, shared by the streams on it."""

    def __init__(self, io: Any, endpoint: Endpoint, *, io_timeout: float, idle_timeout: float,
                 initial_window: int, max_head_bytes: int, max_header_count: int, tls: bool,
                 on_close=None) -> None:
        self.io = io
        self._on_close = on_close  # called once, when it closes (the cluster's breaker)
        self.endpoint = endpoint
        self.authority = endpoint.address.encode("ascii")
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.ack_every = initial_window // 4
        self.proto = H2Client(initial_window=initial_window, max_header_list_size=max_head_bytes,
                              max_header_count=max_header_count, tls=tls)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.active = 0  # streams handed out and not yet released (opened or about to be)
        self.streams_opened = 0
        self.broken = False
        self.idle_deadline = math.inf
        self.opened = time.monotonic()
        self.retired = False  # past max_connection_age: no new stream
        self.settled = trio.Event()  # the peer's SETTINGS arrived
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"H2Upstream({self.endpoint.address}, active={self.active})"

    @cached_property
    def local(self) -> tuple[str, int] | None:
        """This connection's own address (the access log's upstream local address), read once."""
        return local_address(self.io)

    # -- the pool's view ------------------------------------------------------------

    def has_room(self) -> bool:
        proto = self.proto
        return not self.broken and not self.retired and not proto.closed and self.active < proto.max_streams

    @property
    def done(self) -> bool:
        """Nothing more will go over it: broken, or going away (or retired)
        with no stream left."""
        return self.broken or ((self.proto.closed or self.retired) and not self.active)

    def stream(self) -> H2UpstreamStream:
        self.active += 1
        self.idle_deadline = math.inf
        return H2UpstreamStream(self)

    async def handshake(self, timeout: float) -> None:
        """Send our preface and wait for the peer's SETTINGS (the reader runs)."""
        await self.flush()
        with trio.move_on_after(timeout):
            await self.settled.wait()
            return
        raise UpstreamError(f"HTTP/2 handshake with {self.endpoint.address} timed out after {timeout}s",
                            status=503, flag="UF")

    # -- the reader ----------------------------------------------------------------

    async def run(self) -> None:
        """Read until the connection ends; every stream still open then fails."""
        reason = "upstream closed the connection"
        try:
            while True:
                try:
                    data = await self.io.receive(math.inf)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                if not self._dispatch(self.proto.feed(data)):
                    reason = "upstream HTTP/2 connection error"
                    break
                await self.flush_quietly()
                if self.done:
                    break
        finally:
            self.broken = True
            for stream in list(self.streams.values()):
                stream.fail(UpstreamError(reason, status=502, flag="UC"))
            self.settled.set()  # a handshake waiting finds it broken
            with trio.CancelScope(shield=True):
                await self.flush_quietly(1.0)
                await self._close_io()

    def _dispatch(self, events: list[tuple[int, object]]) -> bool:
        """Hand events to their streams; False when the connection is over."""
        streams = self.streams
        for stream_id, event in events:
            kind = type(event)
            stream = streams.get(stream_id)
            if kind is Data or kind is End or kind is StreamReset or kind is Terminated:
                pass
            elif kind is WindowOpen:
                if stream_id == 0:
                    if self.proto.settled:
                        self.settled.set()
                    for s in streams.values():
                        s.poke()
                elif stream is not None:
                    stream.poke()
                continue
            if kind is Terminated:
                if not self._going_away(event):
                    return False
                continue
            if stream is None:
                if kind is Data:
                    self.proto.acknowledge(stream_id, event.size)  # a stream we gave up
                continue
            if kind is StreamReset:
                code = event.code
                if code == _NO_ERROR and stream.stop_upload():
                    pass
                elif code == _REFUSED:
                    stream.fail(UpstreamError("upstream refused the stream", status=502, flag="UC",
                                              retryable=True, unprocessed=True))
                elif stream_id in self.proto.local_resets:
                    stream.fail(UpstreamError("upstream sent a malformed response", status=502, flag="UPE"))
                else:
                    stream.fail(UpstreamError(f"upstream reset the stream (code {code})", status=502, flag="UC"))
            else:
                stream.arrived(event)
        return True

    def _going_away(self, event: Terminated) -> bool:
        """The peer's GOAWAY (or our connection error): streams above its
        last stream id were never processed and may be replayed anywhere;
        those below finish. False when the connection is over now."""
        last = event.last_stream_id
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream.fail(UpstreamError("upstream went away before the stream", status=502,
                                          flag="UC", retryable=True, unprocessed=True))
        if event.error_code:
            log.info("upstream HTTP/2 connection error", endpoint=self.endpoint.address,
                     code=event.error_code, reason=event.reason)
            return False
        return True

    # -- writing ---------------------------------------------------------------

    async def flush(self) -> None:
        """Write what the protocol has pending, in order; a peer that stops
        reading for ``io_timeout`` breaks the connection (504 for the writer)."""
        async with self._lock:
            data = self.proto.pending()
            if not data:
                return
            try:
                # Whole: a frame cut short by one exchange's cancellation
                # would garble the connection for every stream on it.
                sent = await self.io.send_all(data, trio.current_time() + self.io_timeout, whole=True)
            except _GONE as exc:
                self.broken = True
                raise UpstreamError(f"upstream write failed: {exc!r}", status=502, flag="UC") from None
            if not sent:
                self.broken = True
                raise UpstreamError("upstream stopped reading", status=504, flag="UT")

    async def flush_quietly(self, timeout: float | None = None) -> None:
        with contextlib.suppress(UpstreamError), trio.move_on_after(timeout or math.inf):
            await self.flush()

    async def aclose(self) -> None:
        """Close now (GOAWAY first, if the socket takes it at once)."""
        self.broken = True
        with trio.CancelScope(shield=True):
            self.proto.close()
            await self.flush_quietly(1.0)
            await self._close_io()

    async def _close_io(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        await self.io.aclose()
