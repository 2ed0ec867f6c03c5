#!/usr/bin/env python3
"""The floor under sluice: a bare trio + httptools HTTP/1.1 reverse proxy.

It does the least an HTTP proxy on this stack must do, and nothing more:
parse each request and each response with httptools (llhttp), rebuild the
heads without the hop-by-hop headers, forward requests over pooled keep-alive
upstream connections, and stream bodies through as they arrive, using the
parser to find where each message ends (Content-Length, chunked, or the
upstream closing). No filters, no routing, no header checks, no timeouts. The
benchmark compares sluice with it to see what sluice costs on top of trio,
llhttp and the kernel.

Rules, so that it is a real proxy and not a fixed-string relay:

- Bodies of any size stream through both ways as they arrive: Content-Length
  bodies as they are, chunked bodies re-chunked piece by piece (trailers are
  dropped).
- ``Connection`` and ``Keep-Alive`` are not forwarded, so the upstream
  connection stays reusable when the client asks to close. The client
  connection is closed after the response, which then says
  ``connection: close``, when the client asked for it or when the upstream
  closes or says ``Connection: close``.
- Upstream connections go back to one shared pool when a response ended
  cleanly (as sluice's per-endpoint pool does), so a new client connection
  does not cost a new upstream connection.
- Plain TCP goes through non-blocking sockets with trio waiting only when
  the kernel cannot complete a call at once, as sluice's edge does; TLS
  through trio's SSLStream, as sluice's does.
- Requests on a connection go upstream one at a time, each after the answer
  to the one before, so pipelined requests work. A response to HEAD ends
  with its head.

Not supported, on purpose: ``Expect: 100-continue`` and 1xx responses,
upgrades, retrying a pooled connection the upstream had closed, an upstream
that answers before it has read the whole request body.

    .venv/bin/python benchmarks/floor.py --listen 127.0.0.1:18090 --upstream 127.0.0.1:18081
    .venv/bin/python benchmarks/floor.py ... --cert cert.pem --key key.pem    # TLS listener
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field

import httptools
import trio

RECEIVE_SIZE = 65536
NOT_FORWARDED = {b"connection", b"keep-alive"}
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class RawSocket:
    """Plain TCP the cheapest way trio allows, as sluice's edge does it: a
    non-blocking stdlib socket, where a receive or send the kernel can do at
    once is one system call, and only a real wait goes through trio. Same
    calls as a trio stream, so TLS uses trio's SSLStream in its place."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    async def receive_some(self) -> bytes:
        while True:
            try:
                return self.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from None

    async def send_all(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from None
        view = memoryview(data)[sent:]
        while view:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from None

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


Client = RawSocket | trio.SSLStream


async def connect(address: tuple[str, int]) -> RawSocket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        await trio.lowlevel.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        sock.close()
        raise OSError(error, os.strerror(error))
    return RawSocket(sock)


async def serve_tcp(handler, host: str, port: int) -> None:
    """Accept connections on host:port, each served by ``handler(RawSocket)`` in its own task."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            nursery.start_soon(handler, RawSocket(sock))


class Pool:
    """Idle keep-alive connections to the one upstream, most recently used first."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.idle: list[RawSocket] = []

    async def acquire(self) -> RawSocket:
        if self.idle:
            return self.idle.pop()
        return await connect(self.address)

    def release(self, upstream: RawSocket) -> None:
        self.idle.append(upstream)


class Framer:
    """httptools callbacks shared by both directions: gather the head, re-frame the body.

    The message is re-serialised into ``out`` as it is parsed: the head rebuilt
    without the hop-by-hop headers, a Content-Length body as it came, a
    chunked body re-chunked piece by piece (trailers are dropped).
    """

    def __init__(self, parser_class: type) -> None:
        self.parser = parser_class(self)
        self.out = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def write_head(self, start_line: bytes, extra: bytes = b"") -> None:
        self.chunked = any(name.lower() == b"transfer-encoding" for name, _ in self.headers)
        out = self.out
        out += start_line
        for name, value in self.headers:
            if name.lower() not in NOT_FORWARDED:
                out += b"%s: %s\r\n" % (name, value)
        out += extra + b"\r\n"

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out += b"%x\r\n%s\r\n" % (len(body), body)
        else:
            self.out += body

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out += b"0\r\n\r\n"


@dataclass
class Request:
    """One parsed request: bytes still to send upstream, and what its answer needs."""

    data: bytearray = field(default_factory=bytearray)
    complete: bool = False
    keep_alive: bool = True
    head_only: bool = False


class RequestReader(Framer):
    """The requests parsed on a client connection, oldest first, each in its own
    ``Request`` so that pipelined requests go upstream one at a time."""

    def __init__(self) -> None:
        super().__init__(httptools.HttpRequestParser)
        self.requests: deque[Request] = deque()
        self.url = b""

    def on_message_begin(self) -> None:
        request = Request()
        self.requests.append(request)
        self.out = request.data
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.write_head(b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), self.url))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        request = self.requests[-1]
        request.complete = True
        request.keep_alive = self.parser.should_keep_alive()
        request.head_only = self.parser.get_method() == b"HEAD"


class ResponseReader(Framer):
    """One response, re-serialised for the client; ``done`` once its end was parsed.

    The client is told ``connection: close`` when it asked to close or when
    the upstream will close (then so does the client connection).
    """

    def __init__(self, request: Request) -> None:
        super().__init__(httptools.HttpResponseParser)
        self.request = request
        self.reason = b""
        self.done = False
        self.keep_alive = False  # the upstream connection's

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        closing = not (self.keep_alive and self.request.keep_alive)
        status = b"HTTP/1.1 %d %s\r\n" % (self.parser.get_status_code(), self.reason)
        self.write_head(status, b"connection: close\r\n" if closing else b"")
        if self.request.head_only:
            self.done = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.done = True


async def relay_response(upstream: RawSocket, client: Client, request: Request) -> bool:
    """Copy one response from upstream to client; True if the upstream connection is reusable."""
    response = ResponseReader(request)
    while not response.done:
        data = await upstream.receive_some()
        if not data:  # closed: the end of a read-until-close body, or a truncated response
            return False
        response.feed(data)
        await client.send_all(response.out)
        response.out.clear()
    return response.keep_alive


async def proxy_connection(pool: Pool, client: Client) -> None:
    """Serve one client connection until it closes or asks to close."""
    reader = RequestReader()
    upstream: RawSocket | None = None
    try:
        while True:
            data = await client.receive_some()
            if not data:
                return
            try:
                reader.feed(data)
            except httptools.HttpParserError:
                await client.send_all(BAD_REQUEST)
                return
            while reader.requests:
                request = reader.requests[0]
                if request.data:
                    upstream = upstream or await pool.acquire()
                    await upstream.send_all(request.data)
                    request.data.clear()
                if not request.complete:
                    break  # more body to come from the client
                reader.requests.popleft()
                if not await relay_response(upstream, client, request):
                    return  # the upstream closed or will close: so does the client
                pool.release(upstream)
                upstream = None
                if not request.keep_alive:
                    return
    except OSError:  # connect failed, or the upstream broke before answering
        await send_quietly(client, BAD_GATEWAY)
    except (trio.BrokenResourceError, trio.ClosedResourceError, httptools.HttpParserError,
            httptools.HttpParserUpgrade):
        pass  # a side went away, or the upstream's answer was not HTTP/1.1, or an upgrade
    finally:
        if upstream is not None:
            await upstream.aclose()
        await client.aclose()


async def send_quietly(stream: Client, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve(args: argparse.Namespace) -> None:
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    handler = functools.partial(proxy_connection, Pool(up_host, int(up_port)))
    if args.cert:
        context = tls_context(args.cert, args.key)
        await trio.serve_ssl_over_tcp(handler, int(port), context, host=host, https_compatible=True)
    else:
        await serve_tcp(handler, host, int(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:18090", help="host:port (%(default)s)")
    parser.add_argument("--upstream", required=True, help="host:port of the HTTP/1.1 upstream")
    parser.add_argument("--cert", help="PEM certificate: listen with TLS")
    parser.add_argument("--key", help="PEM private key for --cert")
    args = parser.parse_args()
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    trio.run(serve, args)


if __name__ == "__main__":
    main()
