"""The built-in demo upstream behind ``sluice run`` with no arguments.

A tiny origin on a loopback port that answers every request with a JSON
description of what it received, so a first ``curl`` shows what the proxy
did (Via, X-Forwarded-*, x-request-id). It runs on sluice's own protocol
layer; it is a demo, not a web server.
"""

from __future__ import annotations

import functools
import json

import trio

from ..edge.byteio import socket_io
from ..edge.downstream import H1Downstream, HeadTimeout
from ..edge.listener import bind
from ..edge.watchdog import Watchdog
from ..errors import ClientGone
from ..messages import Headers, Response
from ..protocol.events import Body, ProtocolError
from ..protocol.http1 import select

__all__ = ["serve_demo"]


async def _handle(watchdog: Watchdog, stream: trio.SocketStream) -> None:
    io = socket_io(stream, watchdog)
    down = H1Downstream(io, select(), max_head_bytes=32768, max_header_count=100,
                        header_timeout=10, idle_timeout=60)
    try:
        try:
            while (head := await down.next_request()) is not None:
                size = 0
                while not down.body_done:
                    event = await down.read_body_event()
                    size += len(event.data) if type(event) is Body else 0
                request = head.request
                payload = json.dumps(
                    {
                        "message": "hello from the sluice demo upstream",
                        "method": request.method,
                        "target": request.target,
                        "headers": dict(request.headers),
                        "body_bytes": size,
                    },
                    indent=2,
                ).encode() + b"\n"
                await down.send_response(Response(200, Headers([
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ])))
                await down.send_body(payload)
                await down.send_end(None)
                if not down.reusable():
                    return
                down.proto.next_cycle()
        except (ProtocolError, ClientGone, HeadTimeout, trio.BrokenResourceError, OSError):
            return  # a bad or slow client: drop it, never the demo
    finally:
        await io.aclose()


async def serve_demo(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on an ephemeral loopback port; reports ``host:port`` when listening."""
    sock = bind("127.0.0.1:0", reuse_port=False)
    host, port = sock.socket.getsockname()[:2]
    task_status.started(f"{host}:{port}")
    watchdog = Watchdog()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run)
        await trio.serve_listeners(functools.partial(_handle, watchdog), [sock])
