"""The recording upstream: a threaded raw-socket server that sees the proxy's exact bytes.

It records every byte each connection receives and parses requests just enough to know
where each one ends (Content-Length and chunked bodies, keep-alive). What it answers is
scripted per test with `Reply` values: a queue for the next requests, then a default.
`reset()` forgets everything between tests without restarting, so a proxy's pooled
keep-alive connections to it stay usable.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass

from .wire import (
    Body,
    BufferedSocket,
    HeaderAccess,
    PeerClosed,
    WireError,
    read_head,
    read_request_body,
)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HANG_LIMIT = 60.0  # a hung reply ends at reset() or after this, whichever is first


@dataclass(frozen=True)
class Reply:
    """What the upstream does after reading a request: send `data`, then maybe close or hang.

    With `early`, `data` goes out as soon as the head is read, before the body (as a server
    refusing an upload does); the body is then still read and recorded, and `close` and
    `hang` apply once it has arrived.
    """

    data: bytes = b""
    close: bool = False  # close the connection after sending `data`
    hang: bool = False  # then send nothing more until reset()
    early: bool = False  # send `data` before reading the body


def respond(
    status: str = "200 OK",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"ok",
    framing: str = "length",
) -> Reply:
    """Builds a response. `framing`: "length" (adds Content-Length), "chunked", "close"
    (no framing, then the connection closes) or "none" (exactly the given fields)."""
    lines = [f"HTTP/1.1 {status}", *(f"{n}: {v}" for n, v in headers)]
    payload = body
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        parts = [p for p in (body[:half], body[half:]) if p]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return Reply(head + payload, close=framing == "close")


OK = respond()
CLOSE = Reply(close=True)  # close without answering
HANG = Reply(hang=True)  # never answer
GARBAGE = Reply(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n", close=True)


@dataclass
class Request(HeaderAccess):
    """One request as the upstream received it; `complete` once its whole body arrived."""

    conn_id: int
    line: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes = b""
    framing: str = "none"
    trailers: list[tuple[str, str]] | None = None
    complete: bool = False
    error: str | None = None

    @property
    def method(self) -> str:
        return self.line.split(" ")[0]

    @property
    def target(self) -> str:
        return self.line.split(" ")[1]


class Recorder:
    """A recording upstream listening on 127.0.0.1:`port`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._conn_ids = iter(range(1, 1 << 30))
        self._running = True
        self._last_data = 0.0  # when the latest byte arrived (time.monotonic())
        self.reset()
        threading.Thread(target=self._accept_loop, name="recorder-accept", daemon=True).start()

    # -- scripting and inspection (test side) --------------------------------------------

    def reset(self) -> None:
        """Forgets recorded traffic and scripted replies; releases hung replies."""
        with self._lock:
            if hasattr(self, "_release"):
                self._release.set()
            self._release = threading.Event()
            self.requests: list[Request] = []
            self._received: list[bytes] = []
            self._queue: list[Reply] = []
            self.default = OK

    def settle(self, quiet: float = 0.05, limit: float = 2.0) -> None:
        """Waits until no byte has arrived for `quiet` seconds (at most `limit`).

        What a proxy was still forwarding when the previous test ended (the
        start of a body it went on to refuse with 413) can reach the recorder
        a moment later on a busy machine; settling before `reset()` keeps it
        out of the next test's `received()`.
        """
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                idle = time.monotonic() - self._last_data
                unread = any(_unread(sock) for sock in self._sockets)
            if idle >= quiet and not unread:
                return
            time.sleep(max(quiet - idle, 0.01))

    def queue(self, *replies: Reply) -> None:
        """Scripts the replies to the next requests, in order; `default` serves the rest."""
        with self._lock:
            self._queue.extend(replies)

    def received(self) -> bytes:
        """Every byte received on any connection since the last reset."""
        with self._lock:
            return b"".join(self._received)

    def wait_for(
        self, count: int = 1, timeout: float = 5.0, complete: bool = True
    ) -> list[Request]:
        """Waits for `count` requests (complete ones by default); returns all there are."""
        deadline = time.monotonic() + timeout
        done: list[Request] = []
        while time.monotonic() < deadline:
            with self._lock:
                done = [r for r in self.requests if r.complete or not complete]
            if len(done) >= count:
                return done
            time.sleep(0.01)
        raise AssertionError(
            f"upstream got {len(done)} of {count} requests in {timeout}s;"
            f" bytes received: {self.received()!r}"
        )

    def close(self) -> None:
        self._running = False
        self._release.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _shutdown(sock)

    # -- serving (recorder threads) ------------------------------------------------------

    def _accept_loop(self) -> None:
        while self._running:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.add(sock)
            conn_id = next(self._conn_ids)
            threading.Thread(
                target=self._serve, args=(sock, conn_id), name=f"recorder-{conn_id}", daemon=True
            ).start()

    def _serve(self, sock: socket.socket, conn_id: int) -> None:
        def on_data(data: bytes) -> None:
            with self._lock:
                self._received.append(data)
                self._last_data = time.monotonic()

        stream = BufferedSocket(sock, on_data)
        try:
            while self._running and self._serve_one(stream, conn_id):
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(sock)
            _shutdown(sock)
            sock.close()

    def _serve_one(self, stream: BufferedSocket, conn_id: int) -> bool:
        """Reads one request and replies; False when the connection should end."""
        try:
            head = read_head(stream)
        except PeerClosed:
            return False
        except WireError as exc:
            self._record(Request(conn_id, "", [], stream.buffer, error=str(exc)))
            return False
        request = Request(conn_id, head.start_line, head.headers, head.raw)
        self._record(request)
        early = self._next_reply(early=True)
        if early is not None:
            stream.sock.sendall(early[0].data)
        elif "100-continue" in head.tokens("expect") and not stream.buffer:
            stream.sock.sendall(_CONTINUE)  # as a real server would, unless the body is here
        try:
            body: Body = read_request_body(stream, head)
        except WireError as exc:  # includes the proxy closing mid-body
            request.error = str(exc)
            return False
        request.body, request.framing, request.trailers = body.data, body.framing, body.trailers
        request.complete = True

        reply, release = early or self._next_reply()
        if reply.data and early is None:
            stream.sock.sendall(reply.data)
        if reply.hang:
            release.wait(_HANG_LIMIT)
            return False
        return not reply.close

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_reply(self, early: bool = False) -> tuple[Reply, threading.Event] | None:
        """The reply to the request being read; with `early`, only an early one (else None),
        so that a request that never completes leaves the queue as it was."""
        with self._lock:
            reply = self._queue[0] if self._queue else self.default
            if early and not reply.early:
                return None
            if self._queue:
                self._queue.pop(0)
            return reply, self._release


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _unread(sock: socket.socket) -> bool:
    """Whether bytes wait in the socket's receive buffer (FIONREAD), not yet read."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except (OSError, ValueError):  # closed meanwhile
        return False
