"""Byte I/O for the trio edge: one small interface, a fast and a general implementation.

Both offer the same four calls, with absolute trio deadlines:

``await receive(deadline, scope=None)``
    the next bytes; ``b""`` when the peer closed; None when ``deadline``
    passed first or ``scope`` (given by a caller that may cancel the wait,
    e.g. a draining listener) was cancelled.
``await send_all(data, deadline)``
    True once all is written, False when ``deadline`` passed first.
``readable_now()``
    bytes or an EOF are waiting (an idle pooled connection that became
    readable was closed or broken by its peer).
``await aclose()``

A connection that breaks raises ``trio.BrokenResourceError`` from either call.

``SocketIO`` serves plain TCP. A receive or send the kernel can complete at
once costs one system call and nothing else: no cancel scope, no trip
through trio's scheduler. Only a real wait parks the task, under a cancel
scope. Measured on the benchmark machine, a send and a receive through
``trio.SocketStream`` cost 19.6 us against 2.9 us this way (3 us of it the
system calls), and a ``move_on_after`` around each costs another 7 us.
``StreamIO`` serves any ``trio.abc.Stream`` (TLS) through trio's own calls.

Not yielding on the fast path is safe for fairness: every exchange waits at
least for its client's next request, which cannot arrive before its
response has gone out; a pipelining client gets an explicit checkpoint per
request from the server loop.
"""

from __future__ import annotations

import select
import socket

import trio

__all__ = ["SocketIO", "StreamIO", "socket_io"]

RECEIVE_SIZE = 64 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class SocketIO:
    """Plain TCP over a non-blocking stdlib socket, waits through trio."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def receive(self, deadline: float, scope: trio.CancelScope | None = None) -> bytes | None:
        sock = self.sock
        try:
            return sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        if scope is None:
            scope = trio.CancelScope()
        scope.deadline = deadline
        with scope:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue  # a spurious wake-up
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from None
        return None

    async def send_all(self, data: bytes, deadline: float) -> bool:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        if sent == len(data):
            return True
        view = memoryview(data)[sent:]
        with trio.CancelScope(deadline=deadline):
            while view:
                await trio.lowlevel.wait_writable(sock)
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from None
            return True
        return False

    def readable_now(self) -> bool:
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


class StreamIO:
    """Any trio stream (TLS over TCP), through the stream's own calls."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive(self, deadline: float, scope: trio.CancelScope | None = None) -> bytes | None:
        if scope is None:
            scope = trio.CancelScope()
        scope.deadline = deadline
        with scope:
            try:
                return await self.stream.receive_some(RECEIVE_SIZE)
            except _BROKEN as exc:
                raise trio.BrokenResourceError(exc) from None
        return None

    async def send_all(self, data: bytes, deadline: float) -> bool:
        with trio.CancelScope(deadline=deadline):
            try:
                await self.stream.send_all(data)
            except _BROKEN as exc:
                raise trio.BrokenResourceError(exc) from None
            return True
        return False

    def readable_now(self) -> bool:
        stream = self.stream
        while not hasattr(stream, "socket"):
            stream = stream.transport_stream  # SSLStream over SocketStream
        try:
            fd = stream.socket.fileno()
            if fd < 0:
                return True
            readable, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)


def socket_io(stream: trio.SocketStream) -> SocketIO:
    """Take the socket out of a trio SocketStream (which is then spent)."""
    return SocketIO(socket.socket(fileno=stream.socket.detach()))
