"""A raw HTTP/1.1 client: sends exact bytes to the proxy and reads responses strictly.

Every receive is bounded by the socket timeout, so no test can hang on a silent proxy.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from .wire import Body, BufferedSocket, HeaderAccess, WireError, read_head, read_response_body

TIMEOUT = 5.0


@dataclass
class Response(HeaderAccess):
    """One response as the client received it."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # how the body was delimited: "none" | "length" | "chunked" | "close"
    raw_head: bytes


class RawClient:
    """One client connection to `address`; use as a context manager."""

    def __init__(
        self, address: tuple[str, int], timeout: float = TIMEOUT, send_buffer: int | None = None
    ):
        """`send_buffer` caps the kernel's send buffer (SO_SNDBUF), so that what a test sends
        must be read by the peer, not merely queued, before `send` returns."""
        if send_buffer is None:
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.stream = BufferedSocket(self.sock)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_background(self, data: bytes) -> Sending:
        """Starts sending `data` from a thread, for inputs too large to send before reading:
        a proxy that stops reading would otherwise block the test in `send`."""
        return Sending(self.sock, data)

    def read_response(self, method: str = "GET", interim: bool = False) -> Response:
        """Reads the next response; 1xx responses are skipped unless `interim` is set."""
        while True:
            try:
                response = self._read_one(method)
            except TimeoutError:
                raise TimeoutError(
                    f"no complete response; pending {self.stream.buffer!r}"
                ) from None
            if interim or response.status >= 200 or response.status == 101:
                return response

    def _read_one(self, method: str) -> Response:
        head = read_head(self.stream)
        version, _, rest = head.start_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not (version.startswith("HTTP/1.") and code.isdigit() and len(code) == 3):
            raise WireError(f"bad status line in {head.raw!r}")
        body: Body = read_response_body(self.stream, head, int(code), method)
        return Response(version, int(code), reason, head.headers, body.data, body.framing, head.raw)

    def wait_closed(self, timeout: float = TIMEOUT) -> tuple[bytes, float]:
        """Reads until the peer closes; returns what arrived and how long it took."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            data = self.stream.read_to_eof()
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s") from None
        return data, time.monotonic() - start


class Sending:
    """Bytes being sent from a background thread; `finish()` says how that ended."""

    def __init__(self, sock: socket.socket, data: bytes):
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(sock, data), daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:  # a reset, or the timeout of a proxy that stopped reading
            self.error = exc

    def finish(self, timeout: float = TIMEOUT) -> str:
        """Waits up to `timeout` for the send to end; returns how it went, for messages."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return f"still sending after {timeout}s"
        return "sent everything" if self.error is None else f"sending failed: {self.error!r}"


def request(
    method: str = "GET",
    target: str = "/app/",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes | None = None,
    host: str | None = "proxy.test",
    version: str = "HTTP/1.1",
) -> bytes:
    """Builds request bytes; a Content-Length is added when `body` is given."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
