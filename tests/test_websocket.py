"""WebSocket (HTTP/1.1 Upgrade) tunnels through sluice, with real clients.

The client is the ``websockets`` library (its threaded API, driven from trio
through ``trio.to_thread``) against a ``websockets`` echo server on a free
loopback port; raw sockets where the wire itself is the point (h2c, a slow
reader, an upstream that answers 200 or 101 unasked).
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time

import pytest
import trio
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve as ws_serve

from sluice import ConfigError, Filter, LocalReply
from sluice.messages import Headers
from sluice.proxy.forwarding import offer_upgrade, switched_protocol
from sluice.testing import serve

from .conftest import InProcess, config, raw_request

PLUGINS = ["router", "balancer", "auth", "access_log", "tls"]


class EchoServer:
    """A websockets echo server in a thread; ``headers`` keeps each handshake's."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.headers: list[dict[str, str]] = []
        self._server = ws_serve(self._handler, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _handler(self, ws) -> None:
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._thread.join(5)


@pytest.fixture
def echo_server():
    with EchoServer() as server:
        yield server


def ws_config(upstream: str, codec=None, *, timeouts: dict | None = None, **kw) -> dict:
    listener = {"timeouts": timeouts} if timeouts else None
    cfg = config(upstream, listener=listener, **kw)
    if codec is not None:
        cfg["server"] = {"http1_codec": codec.name}
    return cfg


def ws_url(proxy, path: str = "/chat") -> str:
    return proxy.url.replace("http", "ws", 1) + path


async def run(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


def echo_round_trips(url: str, **kw) -> list:
    with connect(url, open_timeout=5, close_timeout=2, **kw) as ws:
        got = []
        for message in ("hello", b"\x00\x01binary", "x" * 200_000):
            ws.send(message)
            got.append(ws.recv(timeout=5))
        return got


async def test_echo_round_trips_through_the_tunnel(echo_server, codec):
    async with serve(ws_config(echo_server.address, codec), plugins=PLUGINS) as proxy:
        got = await run(echo_round_trips, ws_url(proxy))
    assert got == ["hello", b"\x00\x01binary", "x" * 200_000]
    handshake = echo_server.headers[0]
    assert handshake["upgrade"] == "websocket"
    assert "upgrade" in handshake["connection"].lower()
    assert handshake["via"] == "1.1 sluice"  # it went through the proxy's rules


async def test_auth_applies_to_the_handshake(echo_server):
    import hashlib

    keys = {"ci": hashlib.sha256(b"k3y").hexdigest()}
    cfg = ws_config(echo_server.address, filters=["api_key", "router"],
                    filter_settings={"api_key": {"keys": keys}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        with pytest.raises(InvalidStatus) as refused:
            await run(echo_round_trips, ws_url(proxy))
        got = await run(lambda: echo_round_trips(ws_url(proxy), additional_headers={"x-api-key": "k3y"}))
    assert refused.value.response.status_code == 401
    assert got[0] == "hello"
    assert len(echo_server.headers) == 1 and "x-api-key" not in echo_server.headers[0]


async def test_a_token_the_route_does_not_allow_goes_as_plain_http(start_origin, codec):
    origin = await start_origin()
    routes = [{"match": {"prefix": "/"}, "cluster": "backend", "upgrades": []}]
    async with serve(ws_config(origin.address, codec, routes=routes), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                   b"Upgrade: websocket\r\nSec-WebSocket-Key: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"/chat")
    forwarded = dict(origin.requests[0][0].headers)
    assert b"upgrade" not in forwarded and b"connection" not in forwarded


async def test_h2c_never_reaches_the_upstream(start_origin, codec):
    origin = await start_origin()
    routes = [{"match": {"prefix": "/"}, "cluster": "backend", "upgrades": ["websocket", "foo"]}]
    async with serve(ws_config(origin.address, codec, routes=routes), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, b"GET /x HTTP/1.1\r\nHost: a\r\n"
                                   b"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
                                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        mixed = await raw_request(proxy.address, b"GET /y HTTP/1.1\r\nHost: a\r\n"
                                  b"Connection: Upgrade, close\r\nUpgrade: h2c, foo/2\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"/x")
    assert mixed.startswith(b"HTTP/1.1 200 ")
    first = dict(origin.requests[0][0].headers)
    assert b"upgrade" not in first and b"http2-settings" not in first
    assert dict(origin.requests[1][0].headers)[b"upgrade"] == b"foo/2"  # h2c dropped from the list


async def test_h2c_cannot_be_allowed_on_a_route():
    routes = [{"match": {"prefix": "/"}, "cluster": "backend", "upgrades": ["websocket", "H2C"]}]
    with pytest.raises(ConfigError) as info:
        async with serve(ws_config("127.0.0.1:9", routes=routes), plugins=PLUGINS):
            pass
    assert "h2c" in str(info.value)


def wait_closed(url: str, *, keep_talking: bool) -> float:
    """Seconds until sluice ends the tunnel (the client keeps sending, or not)."""
    with connect(url, open_timeout=5, close_timeout=1, ping_interval=None) as ws:
        start = time.monotonic()
        try:
            while time.monotonic() - start < 10:
                if keep_talking:
                    ws.send("tick")
                    ws.recv(timeout=5)
                    time.sleep(0.1)
                else:
                    ws.recv(timeout=10)
        except (ConnectionClosed, TimeoutError):
            pass
        return time.monotonic() - start


async def test_an_idle_tunnel_is_closed(echo_server, codec, tmp_path):
    log = tmp_path / "access.jsonl"
    cfg = ws_config(echo_server.address, codec, timeouts={"tunnel_idle": 0.5},
                    filters=["access_log", "router"],
                    filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        waited = await run(lambda: wait_closed(ws_url(proxy), keep_talking=False))
        line = (await read_lines(log, 1))[0]
    assert 0.4 < waited < 3
    assert line["flags"] == "TI" and line["status"] == 101


async def test_a_tunnel_ends_at_its_max_duration_even_when_busy(echo_server, tmp_path):
    log = tmp_path / "access.jsonl"
    cfg = ws_config(echo_server.address, timeouts={"tunnel_idle": 5, "tunnel_max": 1},
                    filters=["access_log", "router"],
                    filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        waited = await run(lambda: wait_closed(ws_url(proxy), keep_talking=True))
        line = (await read_lines(log, 1))[0]
    assert 0.9 < waited < 4
    assert line["flags"] == "TM"


async def read_lines(path, n: int) -> list[dict]:
    with trio.fail_after(5):
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= n:
                return [json.loads(line) for line in lines]
            await trio.sleep(0.05)


async def test_the_access_log_line_has_the_tunnels_bytes_and_duration(echo_server, tmp_path):
    log = tmp_path / "access.jsonl"
    cfg = ws_config(echo_server.address, filters=["access_log", "router"],
                    filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})

    def talk(url):
        with connect(url, open_timeout=5, ping_interval=None, compression=None) as ws:
            ws.send(os.urandom(10_000))
            ws.recv(timeout=5)
            time.sleep(0.3)

    async with serve(cfg, plugins=PLUGINS) as proxy:
        await run(talk, ws_url(proxy))
        line = (await read_lines(log, 1))[0]
    assert line["status"] == 101 and line["upgraded"] == "websocket"
    assert 10_000 < line["bytes_in"] < 10_200 and 10_000 < line["bytes_out"] < 10_200
    assert line["duration_ms"] >= 300
    assert line["flags"] is None


HANDSHAKE = (b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


async def read_head(stream) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def test_a_slow_reader_upstream_holds_the_sender_back(start_origin, codec):
    """Backpressure: sluice reads from the client only as fast as the
    upstream takes, so what the client manages to push is what the kernel
    buffers on the way hold, not the megabytes it offers."""
    received = []

    async def slow(stream):
        await read_head(stream)
        await stream.send_all(SWITCHED)
        await trio.sleep(3)  # never reads
        received.append(True)

    origin = await start_origin(raw=slow)
    offered = 256 * 1024 * 1024
    async with serve(ws_config(origin.address, codec), plugins=PLUGINS) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(HANDSHAKE)
            head, _ = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101 ")
            sent = 0
            block = b"\x00" * (64 * 1024)
            with trio.move_on_after(1.5):
                while sent < offered:
                    await stream.send_all(block)
                    sent += len(block)
    assert sent < 16 * 1024 * 1024  # about 320 KiB on loopback; unbounded, it would be all 256 MiB


async def test_an_upstream_that_answers_200_is_relayed_as_a_response(start_origin, codec):
    origin = await start_origin()  # the h11 echo origin: a 200, no switch
    async with serve(ws_config(origin.address, codec), plugins=PLUGINS) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(HANDSHAKE)
            head, body = await read_head(stream)
            await stream.send_all(b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(65536):
                    body += chunk
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body.startswith(b"/chat") and b"/next" in body  # the connection stayed an HTTP one
    assert dict(origin.requests[0][0].headers)[b"upgrade"] == b"websocket"


async def test_a_101_naming_another_protocol_is_a_502(start_origin, codec):
    async def other(stream):
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        await trio.sleep(1)

    origin = await start_origin(raw=other)
    async with serve(ws_config(origin.address, codec), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, HANDSHAKE, timeout=2)
    assert answer.startswith(b"HTTP/1.1 502 ")


async def test_a_101_to_a_plain_request_is_a_502(start_origin, codec):
    async def unasked(stream):
        await read_head(stream)
        await stream.send_all(SWITCHED)
        await trio.sleep(1)

    origin = await start_origin(raw=unasked)
    async with serve(ws_config(origin.address, codec), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=2)
    assert answer.startswith(b"HTTP/1.1 502 ")


async def test_bytes_sent_right_after_the_heads_go_through(start_origin, codec):
    """A client may pipeline its first frame behind the handshake, and an
    upstream its first behind the 101: neither is lost at the switch."""
    async def eager(stream):
        _, rest = await read_head(stream)
        await stream.send_all(SWITCHED + b"early")
        while len(rest) < 5:
            rest += await stream.receive_some(100)
        await stream.send_all(rest[:5].upper())
        await stream.send_eof()

    origin = await start_origin(raw=eager)
    async with serve(ws_config(origin.address, codec), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, HANDSHAKE + b"hello", timeout=3)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert answer.endswith(b"\r\n\r\nearlyHELLO")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


async def test_tls_on_both_sides(ca, tmp_path):
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    client_ctx = ssl.create_default_context(cafile=str(ca_path))
    with EchoServer(server_ctx) as upstream:
        cfg = ws_config(upstream.address)
        cfg["listeners"][0]["tls"] = {"cert": str(cert_path), "key": str(key_path)}
        cfg["clusters"]["backend"]["tls"] = {"ca": str(ca_path), "server_name": "localhost"}
        async with serve(cfg, plugins=PLUGINS) as proxy:
            url = proxy.url.replace("https", "wss", 1) + "/secure"
            got = await run(lambda: echo_round_trips(url, ssl=client_ctx))
    assert got[0] == "hello" and got[2] == "x" * 200_000


class Watcher(Filter):
    """Records what the phases see of an upgraded exchange."""

    name = "watcher"
    seen: list = []

    async def on_request_headers(self, ctx, request):
        self.seen.append(("request", ctx.upgrade, ctx.upgraded))

    async def on_response_headers(self, ctx, response):
        self.seen.append(("response", response.status, ctx.upgraded))
        if "refuse" in ctx.request.target:
            return LocalReply(403, "no tunnels here\n")

    async def on_request_body(self, ctx, chunk, end):
        self.seen.append(("request body", chunk))

    async def on_response_body(self, ctx, chunk, end):
        self.seen.append(("response body", chunk))

    async def on_complete(self, ctx):
        self.seen.append(("complete", ctx.upgraded, ctx.response.status))


async def test_filters_learn_of_the_tunnel_and_never_see_its_bytes(echo_server):
    Watcher.seen = []
    cfg = ws_config(echo_server.address, filters=["watcher", "router"])
    async with serve(cfg, plugins=PLUGINS, extra={"watch": InProcess(Watcher)}) as proxy:
        got = await run(echo_round_trips, ws_url(proxy))
        with pytest.raises(InvalidStatus) as refused:
            await run(echo_round_trips, ws_url(proxy, "/refuse"))
    assert got[0] == "hello"
    assert refused.value.response.status_code == 403
    assert Watcher.seen == [
        ("request", "websocket", None),
        ("response", 101, "websocket"),
        ("complete", "websocket", 101),
        ("request", "websocket", None),
        ("response", 101, "websocket"),  # its reply skips it: it answered (filters.py)
        ("complete", None, 403),
    ]


@pytest.mark.parametrize(
    ("offered", "allowed", "forwarded"),
    [
        ("websocket", {"websocket"}, "websocket"),
        ("WebSocket", {"websocket"}, "WebSocket"),  # tokens compare case-insensitively
        ("h2c", {"websocket", "h2c"}, None),  # never, whatever a route says
        ("h2c, websocket", {"websocket"}, "websocket"),
        ("foo/2, bar", {"foo"}, "foo/2"),  # a version rides along with its name
        ("websocket", set(), None),
    ],
)
def test_only_allowed_tokens_are_offered_upstream(offered, allowed, forwarded):
    headers = Headers([(b"host", b"a")])
    assert offer_upgrade(headers, offered, frozenset(allowed)) == forwarded
    if forwarded is None:
        assert headers.raw() == [(b"host", b"a")]
    else:
        assert headers.raw()[1:] == [(b"connection", b"upgrade"), (b"upgrade", forwarded.encode())]


@pytest.mark.parametrize(
    ("fields", "protocol"),
    [
        ([(b"upgrade", b"WebSocket"), (b"connection", b"Upgrade, x-private"), (b"x-private", b"1")], "websocket"),
        ([(b"upgrade", b"h2c"), (b"connection", b"upgrade")], None),  # not what was offered
        ([(b"upgrade", b"websocket, h2c")], None),  # a 101 switches to one protocol
        ([(b"connection", b"upgrade")], None),
    ],
)
def test_a_101_must_name_an_offered_protocol(fields, protocol):
    headers = Headers(fields)
    assert switched_protocol(headers, "websocket") == protocol
    if protocol is not None:  # the upstream's hop-by-hop fields go, this hop's are set
        assert headers.raw() == [(b"connection", b"upgrade"), (b"upgrade", b"WebSocket")]
