"""The trio edge: a listener's sockets, its accept loop, its connections, its drain.

One task per connection runs exchanges one after another (HTTP/1.1
keep-alive). Each connection holds one of the listener's slots
(``slots.py``): at ``max_connections`` a new client takes the slot of the
connection that has waited longest for a request, or is refused when every
slot has a request in flight. A connection that closes while request bytes
may still be arriving closes lingering (``lingering.py``), so the client
reads its answer instead of a reset. Draining stops accepting, ends
connections waiting for a request (and lingering ones), lets exchanges in
flight finish (their responses say ``Connection: close``), and after the
drain timeout cancels what is left.

What the core refuses before it becomes a request still reaches the
chain's ``on_complete`` (the access log), with a flag that says why and,
when the head got that far, the method and target:

=================================================  ===========  =======
refused                                            client gets  flags
=================================================  ===========  =======
a bad request head (the codec's ProtocolError)     its status   DPE
a head not complete within ``header_read``         408          DT
a TLS handshake that failed                        (a close)    DTLS
a TLS handshake not done within ``header_read``    (a close)    DTLS,DT
a TLS ClientHello on a plain listener              (a close)    TLSP
every slot has a request in flight                 503 [#]_     DO
=================================================  ===========  =======

.. [#] On a TLS listener, a close: a 503 would need a handshake first.

A connection that sends nothing at all, idles out or is evicted made no
request and is not logged (nor by nginx); evictions and refusals are
counted in sluice's own log instead, one line per ``slots.REPORT_EVERY``.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..addresses import parse_hostport
from ..errors import ClientGone
from ..messages import Headers, Request, Response
from ..protocol.events import ProtocolError
from ..protocol.h2_codec import PREFACE
from ..protocol.http1 import Codec, reason_phrase, simple_response
from ..proxy.answers import complete
from ..proxy.chain import Chain
from ..proxy.context import Context
from ..proxy.exchange import run_exchange
from .byteio import StreamIO, borrowed, peek_eof, socket_io
from .downstream import H1Downstream, HeadTimeout, TlsOnPlain
from .http2 import H2Connection
from .lingering import linger, shut_now
from .pool import Pool
from .slots import Slots, Waiting, connection_budget
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..control.config import ListenerConfig

__all__ = ["Listener", "bind"]

log = structlog.get_logger("sluice.server")

_EXPECTED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ClientGone)
_BUSY = simple_response(503, b"service unavailable\n", [(b"content-type", b"text/plain; charset=utf-8")])


def bind(address: str, *, reuse_port: bool, backlog: int = 1024) -> trio.SocketListener:
    """A listening socket; SO_REUSEPORT lets worker processes share the port."""
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


@dataclass(eq=False)
class Listener:
    """A listener's runtime: its chain, limits, transport and connections."""

    config: ListenerConfig
    chain: Chain
    pool: Pool
    codec: Codec
    watchdog: Watchdog
    route_overrides: bool = False
    transport: Any = None  # a ServerTransport (TLS) or None
    draining: bool = False
    slots: Slots = field(init=False)
    _downstreams: set[H1Downstream] = field(default_factory=set)
    _h2: set[H2Connection] = field(default_factory=set)
    _accepting: trio.CancelScope = field(default_factory=trio.CancelScope)

    def __post_init__(self) -> None:
        limit = self.config.limits.max_connections
        if limit is None:  # the app sizes it at startup; this is for a listener run alone
            limit = connection_budget(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1, 0)
        self.slots = Slots(limit, self.name)

    @property
    def name(self) -> str:
        return self.config.name or self.config.address

    @property
    def active(self) -> int:
        """Connections open (each holds a slot)."""
        return self.slots.active

    @property
    def trust_forwarded(self) -> bool:
        return self.config.trust_forwarded

    @property
    def max_body_bytes(self) -> int:
        return self.config.limits.max_body_bytes

    @property
    def max_buffered(self) -> int:
        return self.config.limits.max_buffered_body_bytes

    @property
    def scheme(self) -> str:
        return "https" if self.transport is not None else "http"

    async def serve(self, sock: trio.SocketListener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept until drained; returns when the last connection has ended."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
                await self._accept(sock, nursery)
        self.slots.report()

    async def _accept(self, sock, nursery: trio.Nursery) -> None:
        slots = self.slots
        async with sock:
            while True:
                try:
                    stream = await sock.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log.warning("accept failed", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                if slots.admit():
                    nursery.start_soon(self._connection, stream, trio.current_time())
                else:
                    nursery.start_soon(self._overloaded, stream)

    def drain(self) -> None:
        """Stop accepting; connections waiting for a request close now."""
        self.draining = True
        self._accepting.cancel()
        for down in self._downstreams:
            down.close_after = True  # responses not yet started say Connection: close
        for conn in self._h2:
            conn.drain()  # GOAWAY: its streams in flight finish
        self.slots.evict_all()

    async def _connection(self, stream: trio.SocketStream, accepted: float) -> None:
        opened = time.monotonic()
        io = None
        try:
            peer = stream.socket.getpeername()
            client = (peer[0], peer[1])
            local = stream.socket.getsockname()
            local = (local[0], local[1])
            # The first head, and under TLS the handshake before it, must be
            # in within header_read of the accept.
            first_deadline = accepted + self.config.timeouts.header_read
            tls_peer = None
            if self.transport is not None:
                wrapped = await self._handshake(stream, client, local, first_deadline, opened)
                if wrapped is None:
                    return
                stream, tls_peer = wrapped
                io = StreamIO(stream, self.watchdog)
                if _alpn(stream) == "h2":
                    await self._http2(io, client, local, tls_peer)
                    return
            else:
                h2c = self.config.http2.enabled and await self._preface(stream, first_deadline)
                if h2c is None:
                    return  # nothing came in time, or evicted
                io = socket_io(stream, self.watchdog)
                if h2c:
                    await self._http2(io, client, local, None)
                    return
            await self._exchanges(io, client, local, tls_peer, first_deadline, opened)
        except _EXPECTED as exc:  # resets, broken connections: routine
            log.debug("connection ended", error=repr(exc))
        except Exception as exc:  # a bug: log it loudly, but the worker lives on
            log.error("connection failed", exc_info=exc)
        finally:
            self.slots.release()
            if io is not None:
                await io.aclose()
            else:
                await trio.aclose_forcefully(stream)

    async def _first_byte(self, stream: trio.SocketStream, deadline: float) -> bool:
        """Wait for the client's first byte (evictable, like any wait for a
        request) until ``deadline``; False if it sent nothing (a port probe,
        an idle client), closed, or was evicted."""
        waiting = Waiting(trio.CancelScope(deadline=deadline))
        idle = self.slots.idle
        idle[waiting] = None
        try:
            with waiting.scope:
                await trio.lowlevel.wait_readable(stream.socket)
        finally:
            idle.pop(waiting, None)
        return not waiting.scope.cancelled_caught and not peek_eof(stream.socket.fileno())

    async def _preface(self, stream: trio.SocketStream, deadline: float) -> bool | None:
        """On a plain listener with HTTP/2: whether the client opens with the
        HTTP/2 preface (h2c with prior knowledge, RFC 9113 3.3), judged on the
        bytes without taking them; None if it sent nothing in time."""
        if not await self._first_byte(stream, deadline):
            return None
        fd = stream.socket.fileno()
        while True:
            with borrowed(fd) as sock:
                try:
                    seen = sock.recv(len(PREFACE), socket.MSG_PEEK)
                except OSError:
                    return False  # let the HTTP/1.1 path meet the error
            if len(seen) == len(PREFACE) or not seen or not PREFACE.startswith(seen):
                return seen == PREFACE
            # A prefix of the preface so far: the rest is on its way.
            with trio.move_on_at(deadline) as late:
                await trio.sleep(0.005)
            if late.cancelled_caught:
                return False

    async def _http2(self, io, client, local, tls_peer) -> None:
        conn = H2Connection(self, io, client, local, tls_peer)
        self._h2.add(conn)
        try:
            if self.draining:
                conn.drain()
            await conn.serve()
        finally:
            self._h2.discard(conn)

    async def _handshake(self, stream: trio.SocketStream, client, local, deadline: float, opened: float):
        """TLS: wait for the client's first byte (evictable, like any wait for
        a request), then the handshake, all by ``deadline``. Returns the
        protected stream and the peer's identity, or None: the connection is done."""
        if not await self._first_byte(stream, deadline):
            return None
        try:
            with trio.move_on_at(deadline):
                return await self.transport.wrap_server(stream)
        except Exception as exc:  # a refused protocol version or client certificate, garbage, a reset
            reason = self.transport.refusal(exc)
            if reason is not None:
                log.warning("tls handshake failed", client=client[0], reason=reason)
            elif isinstance(exc, _EXPECTED):
                log.debug("tls handshake failed", client=client[0], error=repr(exc))
            else:
                log.error("tls handshake failed", client=client[0], exc_info=exc)
            await self._refused(client, local, None, ("DTLS",), None, exc, opened)
            return None
        log.debug("tls handshake timed out", client=client[0])
        await self._refused(client, local, None, ("DTLS", "DT"), None, None, opened)
        return None

    async def _overloaded(self, stream: trio.SocketStream) -> None:
        """A client no slot could be found for: refused at once (a 503 on a
        plain listener; on TLS a close: a 503 would need a handshake first),
        without lingering (that would hold the descriptor there was no room for)."""
        opened = time.monotonic()
        status = None
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
            if self.transport is None:
                fd = stream.socket.fileno()
                with borrowed(fd) as sock, contextlib.suppress(OSError):
                    sock.send(_BUSY)  # a fresh socket's buffer takes it at once
                    status = 503
                shut_now(fd)
        except OSError:  # already gone
            return
        finally:
            await trio.aclose_forcefully(stream)
        await self._refused((peer[0], peer[1]), (local[0], local[1]), None, ("DO",), status, None, opened)

    async def _exchanges(self, io, peer, local, tls_peer, first_deadline: float | None = None,
                         opened: float | None = None) -> None:
        cfg = self.config
        down = H1Downstream(
            io,
            self.codec,
            max_head_bytes=cfg.limits.max_header_bytes,
            max_header_count=cfg.limits.max_header_count,
            header_timeout=cfg.timeouts.header_read,
            idle_timeout=cfg.timeouts.idle,
            idle=self.slots.idle,
            first_deadline=first_deadline,
            plain=self.transport is None,
        )
        client = (peer[0], peer[1])
        self._downstreams.add(down)
        try:
            refused = await self._serve_connection(down, client, local, tls_peer, opened)
        finally:
            self._downstreams.discard(down)
        if (refused and not down.client_closed) or down.may_have_unread():
            timeouts = cfg.timeouts
            quiet = timeouts.lingering_timeout
            total = quiet if self.draining else timeouts.lingering_time
            await linger(io, self.slots.idle, total=total, quiet=quiet)

    async def _serve_connection(self, down: H1Downstream, client, local, tls_peer,
                                since: float | None = None) -> bool:
        """Serve requests until the connection should close. True when it
        ends on a refused head (the rest of it may still be arriving)."""
        if since is None:
            since = time.monotonic()
        accepted = since  # every exchange's ctx.timings["accepted"]
        while not self.draining:
            try:
                head = await down.next_request()
            except ProtocolError as exc:
                # The detail may quote what the client sent: log it, never echo it.
                log.info("bad request head", client=client[0], status=exc.status, error=str(exc))
                await _refuse(down, exc.status)
                await self._refused(client, local, tls_peer, ("DPE",), exc.status, exc, since)
                return True
            except HeadTimeout as exc:
                await _refuse(down, 408)
                await self._refused(client, local, tls_peer, ("DT",), 408, exc, since)
                return True
            except TlsOnPlain as exc:
                # Its client waits for a ServerHello: no answer it could read.
                self.slots.note("tls_on_plain")
                await self._refused(client, local, tls_peer, ("TLSP",), None, exc, since)
                return False
            if head is None:
                return False
            if self.draining:
                down.close_after = True
            ctx = Context(client=client, local=local, scheme=self.scheme, listener=self.name,
                          tls_peer=tls_peer, trust_forwarded=self.trust_forwarded)
            ctx._began(accepted)
            await run_exchange(self, down, head, ctx)
            if not down.reusable():
                return False
            down.proto.next_cycle()
            since = time.monotonic()
            if down.proto.has_buffered:
                # A pipelined request is already here: let other connections
                # run first (the I/O fast path itself never yields).
                await trio.lowlevel.checkpoint()
        return False

    async def _refused(self, client, local, tls_peer, flags: tuple[str, ...], status: int | None,
                       error: BaseException | None, since: float) -> None:
        """Run the chain's on_complete (the access log) for what the core
        refused before it became a request: no other phase ran, and
        ``ctx.request`` has the method and target only, when the refused
        head got that far (target "" when it was too long to keep). It is
        counted in the metrics with no on_complete too (``answers.complete``)."""
        chain = self.chain
        ctx = Context(client=client, local=local, scheme=self.scheme, listener=self.name, tls_peer=tls_peer)
        ctx.start = since
        ctx.flags.extend(flags)
        ctx.error = error
        if isinstance(error, ProtocolError) and error.method is not None:
            ctx.request = Request(error.method, error.target or "", Headers())
        if status is not None:
            ctx.response = Response(status)
        await complete(chain, ctx)


def _alpn(stream: trio.abc.Stream) -> str | None:
    """The protocol ALPN chose on a TLS stream (trio.SSLStream says), else None."""
    selected = getattr(stream, "selected_alpn_protocol", None)
    return selected() if selected is not None else None


async def _refuse(down: H1Downstream, status: int) -> None:
    """Answer a request that never became one (bad or slow head), then close."""
    if down.response_started:
        return
    body = f"{reason_phrase(status).lower()}\n".encode()
    with contextlib.suppress(trio.BrokenResourceError):
        await down.io.send_all(
            simple_response(status, body, [(b"content-type", b"text/plain; charset=utf-8")]),
            trio.current_time() + 1,
        )
