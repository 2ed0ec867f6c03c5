"""The downstream side of one HTTP/1.1 connection: the trio edge over the protocol.

It reads request heads and bodies and writes responses, with every wait
bounded: a connection's first request head, from its first byte to its
end, within ``header_read`` of the connection being accepted (slowloris;
the wait for the first byte is no idle wait); the first byte of each later
request within ``idle``, then its head within ``header_read``; each body
read and each write within ``idle``.

While it waits for the first byte of a request, and only then, the
connection is in its listener's ``idle`` dict: the listener may ``evict()``
it to free a slot for a new client (``slots.py``), which ends the wait as
a timeout would.

The exchange talks to it through the methods below only, so an HTTP/2
stream can stand in for it later. ``upgrade`` is what the current request
proposes to switch to (by ``heads.py``'s rules); ``tunnel()`` accepts it and
carries the connection's bytes to and from the upstream's (``tunnel.py``)
until the tunnel ends, and the connection with it. Bytes move through a ``byteio``
object, so a read or write the kernel can do at once costs no wait.
"""

from __future__ import annotations

import trio

from ..errors import ClientGone
from ..messages import Response
from ..protocol.events import NEED_DATA, Closed, End, ProtocolError, RequestHead
from ..protocol.http1 import Codec
from .byteio import SocketIO, StreamIO
from .tunnel import pump

__all__ = ["H1Downstream", "HeadTimeout", "TlsOnPlain"]

_CONTINUE = Response(100)
_FLUSH_SIZE = 64 * 1024


class HeadTimeout(Exception):
    """The client did not finish a request head in time."""


class TlsOnPlain(Exception):
    """A connection on a plain listener opened with a TLS record (a
    ClientHello, ``\\x16\\x03...``): its client waits for a handshake, not
    for an HTTP answer, and would otherwise hold on until ``header_read``."""


# The first byte of a TLS record that opens a handshake. No request line
# can start with it (a method is a token), so one byte decides.
_TLS_HANDSHAKE = 0x16


class H1Downstream:
    """One client connection, one exchange at a time."""

    def __init__(self, io: SocketIO | StreamIO, codec: Codec, *, max_head_bytes: int,
                 max_header_count: int, header_timeout: float, idle_timeout: float,
                 idle: dict | None = None, first_deadline: float | None = None,
                 plain: bool = False) -> None:
        """``idle``: the listener's dict of evictable connections (a private
        one by default); ``first_deadline``: when the first head must be in
        (trio time; default: ``header_timeout`` after it is first asked for);
        ``plain``: no TLS below, so a TLS record first is refused."""
        self.io = io
        self.proto = codec.server(
            max_head_bytes=max_head_bytes, max_header_count=max_header_count
        )
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.close_after = False  # the exchange wants the connection closed
        self.idle_waiting = False  # waiting for the first byte of a request
        self.body_done = True  # the request body has been read to its end
        self.expects_100 = False
        self._eof = False
        self._idle = {} if idle is None else idle
        self._first = True  # no request head read yet
        self._first_deadline = first_deadline
        self._plain = plain
        self._tunneled = False  # the connection became a tunnel (it ends with it)
        # Response bytes are queued and written together: a small response
        # (head, body, end) goes out in one send instead of three.
        self._out: list[bytes] = []
        self._out_size = 0

    async def _receive(self, timeout: float) -> bool:
        """Feed the next bytes to the protocol; False on timeout (or interrupted)."""
        try:
            data = await self.io.receive(trio.current_time() + timeout)
        except trio.BrokenResourceError:
            data = b""
        if data is None:
            return False
        self._eof = not data
        self.proto.feed(data)
        return True

    def evict(self) -> None:
        """End the wait for a next request now (the listener needs the slot)."""
        self.io.interrupt()

    async def next_request(self) -> RequestHead | None:
        """The next request head, or None if the client closed, sent nothing
        in time, or the wait was ended (evicted, or the server is draining).

        While it waits for the first byte, ``idle_waiting`` is true, the
        connection is in ``idle``, and ``evict()`` ends the wait (it never
        interrupts a head already arriving).
        Raises ProtocolError for a bad head, HeadTimeout for a slow one and
        TlsOnPlain for a TLS handshake on a plain listener.
        """
        self.close_after = False
        proto = self.proto
        event = proto.next_event()
        deadline = None
        if self._first:
            self._first = False
            deadline = self._first_deadline
            if deadline is None:
                deadline = trio.current_time() + self.header_timeout
        if event is NEED_DATA and not proto.has_buffered:
            idle = self._idle
            idle[self] = None
            self.idle_waiting = True
            try:
                data = await self.io.receive(
                    trio.current_time() + self.idle_timeout if deadline is None else deadline
                )
            except trio.BrokenResourceError:
                data = b""
            finally:
                self.idle_waiting = False
                idle.pop(self, None)
            if data is None:
                return None  # nothing came in time, evicted, or draining
            if deadline is not None and data and data[0] == _TLS_HANDSHAKE and self._plain:
                raise TlsOnPlain()  # the first bytes of a connection
            self._eof = not data
            proto.feed(data)
            event = proto.next_event()
        if deadline is None:
            deadline = trio.current_time() + self.header_timeout
        while event is NEED_DATA:
            if not await self._receive(deadline - trio.current_time()):
                raise HeadTimeout()
            event = proto.next_event()
        if type(event) is Closed:
            return None
        assert type(event) is RequestHead
        self.body_done = not event.has_body
        self.expects_100 = event.expect_continue
        if self.body_done:  # consume the (immediate) end of a bodiless request
            end = proto.next_event()
            assert type(end) is End, end
        return event

    async def read_body_event(self):
        """The next Body or End of the request; ClientGone on close or stall."""
        proto = self.proto
        while True:
            try:
                event = proto.next_event()
            except ProtocolError:
                if self._eof:
                    raise ClientGone("client closed mid-body") from None
                raise
            if event is NEED_DATA:
                if not await self._receive(self.idle_timeout):
                    raise ClientGone("client stalled mid-body", timed_out=True)
                continue
            if type(event) is End:
                self.body_done = True
            return event

    async def watch_disconnect(self) -> None:
        """Wait, while the upstream works, for the client to go away.

        Raises ClientGone when it closes; returns (keeping the bytes for the
        next request) when it pipelines more instead.
        """
        try:
            data = await self.io.receive(float("inf"))
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self._eof = True
            raise ClientGone("client closed before the response")
        self.proto.feed(data)

    async def _send(self, data: bytes) -> None:
        try:
            sent = await self.io.send_all(data, trio.current_time() + self.idle_timeout)
        except trio.BrokenResourceError:
            raise ClientGone("client connection broke") from None
        if not sent:
            raise ClientGone("client stopped reading")

    @property
    def response_started(self) -> bool:
        return self.proto.response_started

    @property
    def waiting_for_100_continue(self) -> bool:
        return self.proto.waiting_for_100_continue

    def _queue(self, data: bytes) -> None:
        if data:
            self._out.append(data)
            self._out_size += len(data)

    async def flush(self) -> None:
        """Write what is queued (before any wait on the upstream)."""
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._out_size = 0
            await self._send(data)

    async def send_continue(self) -> None:
        self._queue(self.proto.informational(_CONTINUE))
        await self.flush()

    async def send_informational(self, response: Response) -> None:
        if self.proto.peer_http_version == b"1.1":
            self._queue(self.proto.informational(response))
            await self.flush()

    async def send_response(self, response: Response) -> None:
        if self.close_after:
            response.headers.set(b"connection", b"close")
        self._queue(self.proto.respond(response))

    async def send_body(self, chunk: bytes) -> None:
        self._queue(self.proto.data(chunk))
        if self._out_size >= _FLUSH_SIZE:
            await self.flush()

    async def send_end(self, trailers) -> None:
        self._queue(self.proto.end(trailers))
        await self.flush()

    @property
    def upgrade(self) -> bytes | None:
        """The ``Upgrade`` value the current request proposes, or None."""
        return self.proto.upgrade

    async def tunnel(self, response: Response, upstream: SocketIO | StreamIO, early: bytes, *,
                     idle: float, limit: float, stats) -> str:
        """Send the 101 ``response``, then pump bytes between the client and
        ``upstream`` (``early``: upstream bytes that followed its 101) until
        the tunnel ends; returns how (``tunnel.CLOSED``, ``IDLE``, ``LIMIT``).
        ClientGone when the 101 cannot be written. The connection is done
        after it, whatever happened."""
        self.close_after = True
        self._tunneled = True
        self._queue(self.proto.switch(response))
        await self.flush()
        return await pump(self.io, upstream, to_up=self.proto.take_buffered(), to_down=early,
                          idle=idle, limit=limit, stats=stats)

    def reusable(self) -> bool:
        return not self.close_after and not self._eof and self.proto.reusable()

    @property
    def client_closed(self) -> bool:
        """The client closed its side (or broke the connection)."""
        return self._eof

    def may_have_unread(self) -> bool:
        """Request bytes may be left unread as the connection closes, and
        closing now could reset it under the answer (see ``lingering.py``):
        the body was not read to its end, or bytes wait in the codec or the
        socket. Never once the client closed its side, nor for an EOF alone
        (a client that asked to close often closes first: nothing to protect)."""
        if self._eof or self._tunneled:  # a tunnel's bytes were all its own
            return False
        return not self.body_done or self.proto.has_buffered or self.io.data_waiting()
