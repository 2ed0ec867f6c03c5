"""Byte I/O for the trio edge: one small interface, a fast and a general implementation.

Both offer the same calls, with absolute trio deadlines:

``await receive(deadline, watch=None)``
    the next bytes; ``b""`` when the peer closed; None when ``deadline``
    passed first, or the wait was interrupted (a draining listener).
    ``watch``: another I/O (the client's) whose peer closing ends this wait
    with ``ClientGone`` (see ``watchdog.py``).
``await send_all(data, deadline, whole=False)``
    True once all is written, False when ``deadline`` passed first.
    ``whole``: a cancellation never cuts the write short (a frame cut in
    two garbles a connection that many streams share); the deadline still
    bounds it. Free when the kernel takes it all at once.
``interrupt()``
    end a receive in progress now (it returns None); the connection is done.
``readable_now()`` / ``data_waiting()`` / ``peer_closed()``
    bytes or an EOF are waiting / bytes are / the peer has closed (peeking,
    no reading).
``fileno()``
    the TCP socket's descriptor (under TLS too), -1 once closed; what a
    lingering close works on (``lingering.py``).
``await aclose()``

A connection that breaks raises ``trio.BrokenResourceError`` from either call.

``SocketIO`` serves plain TCP. A receive or send the kernel can complete at
once costs one system call and nothing else: no cancel scope, no trip
through trio's scheduler. Measured on the benchmark machine, a send and a
receive through ``trio.SocketStream`` cost 19.6 us against 2.9 us this way
(3 us of it the system calls). A real wait parks on the socket, bounded by
the worker's ``Watchdog`` rather than a cancel scope. ``StreamIO`` serves any
``trio.abc.Stream`` (TLS) through trio's own calls, bounded the same way.

Not yielding on the fast path is safe for fairness: every exchange waits at
least for its client's next request, which cannot arrive before its
response has gone out; a pipelining client gets an explicit checkpoint per
request from the server loop.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ..errors import ClientGone
from .watchdog import Wait, Watchdog

__all__ = ["SocketIO", "StreamIO", "borrowed", "peek_eof", "socket_io"]

RECEIVE_SIZE = 64 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _readable(sock: socket.socket) -> bool:
    """Bytes or an EOF are waiting on a non-blocking socket (or it broke)."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _data_waiting(sock: socket.socket) -> bool:
    """Bytes (not just an EOF) wait on a non-blocking socket: closing it now
    would answer them with a reset."""
    try:
        return len(sock.recv(1, socket.MSG_PEEK)) == 1
    except OSError:  # nothing yet (BlockingIOError), or broken: nothing to protect
        return False


def _peek_closed(sock: socket.socket) -> bool:
    """The peer of a (non-blocking) socket has closed, or it broke."""
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True


@contextmanager
def borrowed(fd: int) -> Iterator[socket.socket]:
    """A stdlib socket object over a descriptor someone else owns, for
    calls trio's sockets do not offer without a wait (a peek, a shutdown, a
    read that must not block); it never closes the descriptor."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def peek_eof(fd: int) -> bool:
    """The peer of this (non-blocking) socket closed, or it broke, with
    nothing before the close left to read."""
    with borrowed(fd) as sock:
        return _peek_closed(sock)


class _Waits:
    """What both implementations share: their watchdog and two wait slots."""

    __slots__ = ("watchdog", "_read", "_write")

    def __init__(self, watchdog: Watchdog, handle) -> None:
        self.watchdog = watchdog
        self._read = Wait(handle)
        self._write = Wait(handle)

    def interrupt(self) -> None:
        if self._read.slot is not None or self._read.watch is not None:
            self.watchdog.expire(self._read, "interrupted")

    def _ended(self, wait: Wait) -> None:
        """A wait woken by the watchdog: None (timed out, interrupted) or
        ClientGone; a socket closed under us otherwise is a broken one."""
        reason = wait.expired
        if reason == "client":
            raise ClientGone("client closed before the response")
        if reason is None:
            raise trio.BrokenResourceError("connection closed")
        return None


class SocketIO(_Waits):
    """Plain TCP over a non-blocking stdlib socket, waits through trio."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket, watchdog: Watchdog) -> None:
        sock.setblocking(False)
        super().__init__(watchdog, sock)
        self.sock = sock

    async def receive(self, deadline: float, watch=None) -> bytes | None:
        sock = self.sock
        try:
            return sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        wait = self._read
        self.watchdog.arm(wait, deadline, watch)
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue  # a spurious wake-up
        except trio.ClosedResourceError:
            return self._ended(wait)
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        finally:
            self.watchdog.disarm(wait)

    async def send_all(self, data: bytes, deadline: float, whole: bool = False) -> bool:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        if sent == len(data):
            return True
        if whole:
            with trio.CancelScope(shield=True):
                return await self._send_rest(memoryview(data)[sent:], deadline)
        return await self._send_rest(memoryview(data)[sent:], deadline)

    async def _send_rest(self, view: memoryview, deadline: float) -> bool:
        sock = self.sock
        wait = self._write
        self.watchdog.arm(wait, deadline)
        try:
            while view:
                await trio.lowlevel.wait_writable(sock)
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    continue
        except trio.ClosedResourceError:
            if wait.expired is None:
                raise trio.BrokenResourceError("connection closed") from None
            return False
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        finally:
            self.watchdog.disarm(wait)
        return True

    def readable_now(self) -> bool:
        return _readable(self.sock)

    def data_waiting(self) -> bool:
        return _data_waiting(self.sock)

    def peer_closed(self) -> bool:
        return _peek_closed(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


def _raw_socket(stream: trio.abc.Stream):
    while not hasattr(stream, "socket"):
        stream = stream.transport_stream  # SSLStream over SocketStream
    return stream.socket


class StreamIO(_Waits):
    """Any trio stream (TLS over TCP), through the stream's own calls."""

    __slots__ = ("stream", "_raw")

    def __init__(self, stream: trio.abc.Stream, watchdog: Watchdog) -> None:
        self._raw = _raw_socket(stream)
        super().__init__(watchdog, self._raw)
        self.stream = stream

    async def receive(self, deadline: float, watch=None) -> bytes | None:
        wait = self._read
        self.watchdog.arm(wait, deadline, watch)
        try:
            return await self.stream.receive_some(RECEIVE_SIZE)
        except _BROKEN as exc:
            if wait.expired is not None:
                return self._ended(wait)
            raise trio.BrokenResourceError(exc) from None
        finally:
            self.watchdog.disarm(wait)

    async def send_all(self, data: bytes, deadline: float, whole: bool = False) -> bool:
        wait = self._write
        self.watchdog.arm(wait, deadline)
        try:
            with trio.CancelScope(shield=whole):
                await self.stream.send_all(data)
        except _BROKEN as exc:
            if wait.expired is not None:
                return False
            raise trio.BrokenResourceError(exc) from None
        finally:
            self.watchdog.disarm(wait)
        return True

    def readable_now(self) -> bool:
        return self._peek(_readable)

    def data_waiting(self) -> bool:
        return self._peek(_data_waiting)

    def peer_closed(self) -> bool:
        return self._peek(_peek_closed)

    def fileno(self) -> int:
        return self._raw.fileno()

    def _peek(self, check) -> bool:
        """``check`` the TCP socket under the TLS layer, through a stdlib
        socket object borrowing its descriptor (no second descriptor kept:
        these checks are rare, a descriptor per TLS connection is not)."""
        fd = self._raw.fileno()
        if fd < 0:
            return True
        with borrowed(fd) as sock:
            return check(sock)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)


def socket_io(stream: trio.SocketStream, watchdog: Watchdog) -> SocketIO:
    """Take the socket out of a trio SocketStream (which is then spent)."""
    return SocketIO(socket.socket(fileno=stream.socket.detach()), watchdog)


def local_address(io: SocketIO | StreamIO) -> tuple[str, int] | None:
    """The local (host, port) of the socket under ``io`` (a SocketIO or a
    StreamIO); None without one, or once it is closed."""
    sock = getattr(io, "sock", None) or getattr(io, "_raw", None)
    try:
        return tuple(sock.getsockname()[:2]) if sock is not None else None
    except OSError:
        return None
