"""A scriptable upstream for tests: a real HTTP/1.1 server on loopback (h11 on trio).

A filter is only tested for real when the proxy in front of it talks to a
real server over a real socket, and the edge cases a filter must survive
(a slow head, a body cut short, a reset, an upstream that never answers)
are upstream behaviours. ``Origin`` produces each of them on request, per
path, and records what the proxy sent it::

    from sluice.testing import Origin, Reply

    origin = Origin()                                  # any path: 200, echoes the request body
    origin.script("/slow", Reply(delay=2.0))           # exact path (the query is ignored)
    origin.script("/api/*", Reply(status=503))         # a trailing "*" makes it a prefix
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)              # listens on 127.0.0.1, a free port
        ...                                            # talk to origin.url through the proxy
        assert origin.requests[0].header("x-api-key") is None
        origin.close()

It uses no sluice code (only h11 and trio), so it cannot share a bug with
the proxy it tests.
"""

from __future__ import annotations

import inspect
import socket
import struct
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["Origin", "Recorded", "Reply"]

Header = tuple[str | bytes, str | bytes]


@dataclass
class Reply:
    """What the origin answers, and how it misbehaves while doing so.

    ``Reply()`` is a 200 echoing the request body (or, when the body is
    empty, the request target), framed by Content-Length::

        origin.script("/made", Reply(status=201, headers=[("x-id", "7")], body=b"made"))
        origin.script("/stream", Reply(body=[b"a", b"b"], chunked=True, chunk_delay=0.1))
        origin.script("/grpc", Reply(body=b"...", trailers=[("grpc-status", "0")]))
        origin.script("/flaky", Reply(body=b"x" * 1000, close_after=100))  # the client's response is cut
        origin.script("/down", Reply(reset=True))                          # 502 from the proxy
        origin.script("/slow", Reply(hang=True))                           # 504 past response_timeout

    - ``body``: bytes, a list of chunks (written one by one, ``chunk_delay``
      apart), or None to echo. It may also be an async iterable of chunks
      (sent chunked unless ``headers`` give a content-length), to send the
      rest only when the test says so; it is consumed once, so give it from
      a function script, one per request::

          go_on = trio.Event()

          async def parts():
              yield b"first"
              await go_on.wait()
              yield b"second"

          origin.script("/gated", lambda request: Reply(body=parts()))
    - ``chunked``: Transfer-Encoding: chunked instead of Content-Length;
      ``trailers`` imply it.
    - ``delay``: seconds before the response head.
    - ``early``: answer as soon as the request head arrives, without reading
      the body, then close the connection.
    - ``close_after``: declare the whole body, send only this many bytes of
      it, then close (a response cut mid-body).
    - ``reset``: read the request, then reset the connection (SO_LINGER 0,
      so the kernel sends RST) instead of answering.
    - ``hang``: read the request and never answer (until the peer leaves).
    - ``close``: say ``connection: close`` and close after this response.

    Headers given here win: a ``content-length`` or ``transfer-encoding``
    you set is sent as is, and the origin adds neither (h11 still refuses
    to send more body than a content-length says; ``close_after`` sends
    less). ``early`` applies to a ``Reply`` given to ``script``, not to one
    a function returns (the function sees the whole request).
    """

    status: int = 200
    headers: list[Header] = field(default_factory=list)
    body: bytes | list[bytes] | AsyncIterable[bytes] | None = None
    chunked: bool = False
    trailers: list[Header] = field(default_factory=list)
    delay: float = 0.0
    chunk_delay: float = 0.0
    early: bool = False
    close_after: int | None = None
    reset: bool = False
    hang: bool = False
    close: bool = False


@dataclass
class Recorded:
    """One request as the origin received it (``origin.requests[i]``)::

        seen = origin.requests[-1]
        assert (seen.method, seen.path, seen.body) == ("POST", "/upload", b"data")
        assert seen.header("x-forwarded-for") == "127.0.0.1" and seen.complete

    ``headers`` keep their order and repeats, names lower-cased; ``path`` is
    the target without its query. A request is recorded when its head
    arrives; ``body`` grows as the body arrives, and ``complete`` turns True
    once all of it (and its trailers) did: a request whose body was cut
    short, or that an ``early`` reply answered first, stays incomplete.
    """

    method: str
    target: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case); repeats joined by ", "; None if absent."""
        name = name.lower()
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None


Script = Reply | Callable[[Recorded], Reply | Awaitable[Reply]]


def _b(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def _s(value: bytes) -> str:
    return value.decode("latin-1")


async def _each(chunks: list[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


LINGER = 2.0  # seconds a closing connection keeps reading what the peer still sends


async def _linger(stream: trio.SocketStream) -> None:
    """Close as a careful server does: send EOF, then read and drop what the
    peer still sends until it closes too (or ``LINGER``). Closing a socket
    with unread bytes makes the kernel send RST, which can destroy the
    response before the peer reads it: an early answer to an upload would
    often arrive as a reset instead."""
    with trio.move_on_after(LINGER):
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass


class Origin:
    """A real upstream on ``127.0.0.1:<free port>``, scripted per path.

    ``Origin(default)`` answers every unscripted path with ``default``
    (``Reply()``: echo). ``script(path, reply)`` sets the answer for one
    path; ``reply`` may also be a function of the ``Recorded`` request
    (plain or async) returning a ``Reply``, for answers that depend on the
    request. Start it with ``await nursery.start(origin.serve)``; then
    ``origin.port``, ``origin.address`` (``"127.0.0.1:PORT"``, what a
    cluster's ``endpoints`` take) and ``origin.url`` are set.
    ``origin.requests`` lists every request parsed, in arrival order, and
    ``origin.connections`` counts the connections accepted.
    """

    def __init__(self, default: Script | None = None) -> None:
        self.default: Script = default if default is not None else Reply()
        self.requests: list[Recorded] = []
        self.connections = 0
        self.port = 0
        self._exact: dict[str, Script] = {}
        self._prefixes: dict[str, Script] = {}
        self._scope: trio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str, reply: Script) -> Origin:
        """Answer ``path`` with ``reply`` from now on (a later call for the same path replaces it).

        An exact path matches the request's path with the query removed; a
        path ending in ``*`` matches every path starting with what precedes
        it, the longest such prefix winning. Returns the origin, for chaining.
        """
        if path.endswith("*"):
            self._prefixes[path[:-1]] = reply
        else:
            self._exact[path] = reply
        return self

    def _script_for(self, path: str) -> Script:
        if path in self._exact:
            return self._exact[path]
        matches = [p for p in self._prefixes if path.startswith(p)]
        return self._prefixes[max(matches, key=len)] if matches else self.default

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until ``close()`` or cancellation; ``task_status.started(self)``."""
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._scope is not None:
            self._scope.cancel()

    # -- one connection ---------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while await self._exchange(stream, conn):
                    conn.start_next_cycle()
                if stream.socket.fileno() != -1:  # not reset
                    await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            return  # the peer left or spoke garbage: this connection is over, the origin is not

    async def _next(self, stream: trio.SocketStream, conn: h11.Connection):
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        return event

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """One request and its reply; whether the connection may carry another."""
        head = await self._next(stream, conn)
        if not isinstance(head, h11.Request):
            return False
        target = _s(head.target)
        recorded = Recorded(_s(head.method), target, target.split("?", 1)[0],
                            [(_s(n), _s(v)) for n, v in head.headers])
        self.requests.append(recorded)
        script = self._script_for(recorded.path)
        if isinstance(script, Reply) and script.early:
            await self._respond(stream, conn, recorded, script)
            return False
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            event = await self._next(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
                recorded.body = bytes(body)
            elif isinstance(event, h11.EndOfMessage):
                recorded.trailers = [(_s(n), _s(v)) for n, v in event.headers]
                recorded.complete = True
                break
            else:
                return False
        reply = script if isinstance(script, Reply) else script(recorded)
        if inspect.isawaitable(reply):
            reply = await reply
        return await self._respond(stream, conn, recorded, reply)

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection,
                       recorded: Recorded, reply: Reply) -> bool:
        if reply.reset:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # sends RST
            return False
        if reply.hang:
            while await stream.receive_some(65536):  # until the peer gives up
                pass
            return False
        if reply.delay:
            await trio.sleep(reply.delay)
        streamed = isinstance(reply.body, AsyncIterable)
        if reply.body is None:
            chunks = [recorded.body or recorded.target.encode("latin-1")]
        elif isinstance(reply.body, bytes):
            chunks = [reply.body]
        else:
            chunks = reply.body if streamed else list(reply.body)
        headers = [(_b(n), _b(v)) for n, v in reply.headers]
        names = {n.lower() for n, _ in headers}
        # A streamed body's length is unknown: chunked, unless a header says otherwise.
        chunked = reply.chunked or bool(reply.trailers) or (streamed and b"content-length" not in names)
        if chunked and b"transfer-encoding" not in names:
            headers.append((b"transfer-encoding", b"chunked"))
        elif not chunked and not names & {b"content-length", b"transfer-encoding"}:
            headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
        closing = reply.close or reply.early or reply.close_after is not None
        if closing and b"connection" not in names:
            headers.append((b"connection", b"close"))
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        if recorded.method == "HEAD":
            chunks = []  # the head said how long the body would be; there is none
        budget = reply.close_after
        sent = 0
        async with aclosing(_each(chunks)) as each:
            async for chunk in each:
                if not chunk:
                    continue
                if sent and reply.chunk_delay:
                    await trio.sleep(reply.chunk_delay)
                sent += 1
                if budget is not None:
                    chunk, budget = chunk[:budget], budget - len(chunk[:budget])
                if chunk:
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
                if budget == 0:
                    return False  # cut mid-body: close without finishing the message
        if budget is not None:
            return False
        await stream.send_all(conn.send(h11.EndOfMessage(headers=[(_b(n), _b(v)) for n, v in reply.trailers])))
        return not closing and conn.our_state is h11.DONE
