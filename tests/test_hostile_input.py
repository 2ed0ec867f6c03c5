"""Nothing a client sends gets a 500, a traceback, or a hang (security review,
defect 1's audit), on both codecs.

Hypothesis builds request heads from the shapes that have broken proxies
(Connection naming framing and routing fields, Host variants, HTTP versions,
target forms, framing fields, Expect, Upgrade) and sends each, with a body
consistent with its framing, to a real ``sluice run`` in front of a real
origin (the standard library's threaded HTTP server). Every answer must be a
status sluice may give for bad input or a forwarded one, never 500, never a
Python traceback, and the proxy must log no error.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .proc import Running, free_port


class _Origin(BaseHTTPRequestHandler):
    """Answers every method 200, reading a Content-Length body; closes after."""

    def _answer(self) -> None:
        length = self.headers.get("content-length")
        if length and length.isdigit():
            self.rfile.read(int(length))
        body = b"origin\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module", params=["h11", "httptools"])
def proxy(request, origin):
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}", "--upstream", f"http://{origin}",
                 "--http1-codec", request.param) as running:
        yield running, port
        assert running.proc.poll() is None, "the proxy died"
        logged = "".join(running.stderr + running.stdout)
        for bad in ("Traceback", "exchange failed", "connection failed", "[error"):
            assert bad not in logged, logged[-4000:]


FIELD_NAMES = [b"Host", b"Connection", b"Content-Length", b"Transfer-Encoding", b"TE", b"Expect",
               b"Upgrade", b"Keep-Alive", b"Proxy-Connection", b"X-Forwarded-For", b"X-Request-Id",
               b"Via", b"Trailer", b"Cookie", b"Authorization", b"X-Other"]
CONNECTION_TOKENS = [b"close", b"keep-alive", b"host", b"Host", b"content-length", b"transfer-encoding",
                     b"upgrade", b"x-forwarded-for", b"x-request-id", b"te", b"via", b"expect", b"",
                     b"x-other", b"HOST"]
VALUES = {
    b"Host": [b"a.test", b"", b"a.test:80", b"[::1]:8080", b"a b", b"a.test:99999", b"\xff"],
    b"Content-Length": [b"0", b"5", b"00", b"+5", b"-1", b"5, 5", b"18446744073709551621", b"0x5", b""],
    b"Transfer-Encoding": [b"chunked", b"gzip, chunked", b"identity", b"Chunked", b"chunked, chunked", b""],
    b"TE": [b"trailers", b"gzip", b""],
    b"Expect": [b"100-continue", b"200-ok", b""],
    b"Upgrade": [b"websocket", b"h2c", b""],
}
TARGETS = [b"/", b"/a?b=c", b"*", b"http://a.test/x", b"http://a.test?q=1", b"https://a.test:443",
           b"http://u@a.test/", b"http://[::1]/", b"/%2e%2e/x", b"/a/../b", b"//x", b"/%zz", b"/a%2fb",
           b"a", b"http://", b"/\\x", b"/" + b"a" * 300]
METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"CONNECT", b"TRACE", b"PATCH", b"FOO"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9"]


@st.composite
def requests(draw) -> bytes:
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(VERSIONS))
    fields = []
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=6)):
        if name == b"Connection":
            value = b", ".join(draw(st.lists(st.sampled_from(CONNECTION_TOKENS), min_size=1, max_size=3)))
        else:
            value = draw(st.sampled_from(VALUES.get(name, [b"x", b"1.2.3.4", b""])))
        fields.append((name, value))
    # A body consistent with the framing fields drawn (a client that
    # promises bytes and sends none is waited for, rightly).
    body = draw(st.sampled_from([b"", b"hello"]))
    lengths = [v for n, v in fields if n == b"Content-Length"]
    if any(n == b"Transfer-Encoding" for n, _ in fields):
        body = (b"5\r\nhello\r\n" if body else b"") + b"0\r\n\r\n"
    elif len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) < 100:
        body = b"x" * int(lengths[0])
    elif body and not lengths:
        fields.append((b"Content-Length", b"5"))
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    return head + b"Connection: close\r\n\r\n" + body


def _answer(port: int, data: bytes) -> bytes:
    """What the proxy sends back until it closes; fails on a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer within 5 s to {data!r}; got {received!r}") from None
            if not chunk:
                break
            received += chunk
    return received


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=requests())
def test_no_request_gets_a_500_or_a_traceback(proxy, data):
    _, port = proxy
    answer = _answer(port, data)
    if not answer:
        return  # closed without a word: only for a request whose body it could not frame
    status = int(answer[9:12])
    assert status != 500 and 100 <= status < 600, f"{data!r} -> {answer[:300]!r}"
    assert b"Traceback" not in answer, answer


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host, close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Host\r\nConnection: close\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length, close\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding, close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_the_reviewed_host_removals_are_forwarded(proxy, data):
    answer = _answer(proxy[1], data)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"origin\n"), answer
