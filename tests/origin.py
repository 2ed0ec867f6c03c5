"""A scriptable upstream for tests: real loopback sockets, h11, no sluice code.

Each test gives a handler ``async def handler(request, body) -> Reply``
(``request`` is the h11.Request, ``body`` the received bytes), or a raw
handler that gets the socket stream and does whatever it likes (close at
once, send garbage, never answer). The origin counts connections and keeps
every request it parsed.

New tests, and every plugin's, use ``sluice.testing.Origin`` (scripted per
path, records requests as they arrive). This one stays for the suite's
older tests because what they assert rests on its different contract:
handlers see the ``h11.Request`` itself, raw handlers own the socket,
``requests`` holds only requests whose body arrived whole (as
``(head, body)`` pairs), ``close`` closes without a ``Connection: close``,
and ``Expect: 100-continue`` is never answered. Moving its ~20 users over
is a change of its own, test by test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes] = b"ok"
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    close: bool = False  # close the connection after this response (no header said so)


Handler = Callable[[h11.Request, bytes], Awaitable[Reply]]


async def echo(request: h11.Request, body: bytes) -> Reply:
    return Reply(200, [(b"content-type", b"text/plain")], body or request.target)


class Origin:
    def __init__(self, handler: Handler = echo, raw: Callable | None = None) -> None:
        self.handler = handler
        self.raw = raw
        self.connections = 0
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.trailers: list[list[tuple[bytes, bytes]]] = []  # each request's (maybe empty)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")  # 0: a free one
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            if self.raw is not None:
                await self.raw(stream)
                return
            conn = h11.Connection(h11.SERVER)
            try:
                while await self._exchange(stream, conn):
                    conn.start_next_cycle()
            except (trio.BrokenResourceError, h11.ProtocolError):
                return

    async def _next(self, stream, conn):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            return event

    async def _exchange(self, stream, conn) -> bool:
        event = await self._next(stream, conn)
        if not isinstance(event, h11.Request):
            return False
        request = event
        body = bytearray()
        while True:
            event = await self._next(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.trailers.append(list(event.headers))
                break
        self.requests.append((request, bytes(body)))
        reply = await self.handler(request, bytes(body))
        headers = list(reply.headers)
        if isinstance(reply.body, bytes) and not any(n.lower() == b"content-length" for n, _ in headers):
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        if isinstance(reply.body, bytes):
            if reply.body:
                await stream.send_all(conn.send(h11.Data(data=reply.body)))
        else:
            async for chunk in reply.body:
                await stream.send_all(conn.send(h11.Data(data=chunk)))
        await stream.send_all(conn.send(h11.EndOfMessage(headers=reply.trailers)))
        return not reply.close and conn.our_state is h11.DONE
