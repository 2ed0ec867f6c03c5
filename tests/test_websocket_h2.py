"""WebSockets over HTTP/2 (RFC 8441) through sluice to HTTP/1.1 WebSocket upstreams.

The client is the ``h2`` library on a real socket doing the extended
CONNECT, speaking WebSocket frames through the ``websockets`` sans-I/O
protocol on the stream; the upstream is a real ``websockets`` server (the
echo server of ``test_websocket.py``), or a raw one where the bytes of the
handshake or the way it ends are the point.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import threading
from collections import defaultdict
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trustme
from websockets.frames import Close, Opcode
from websockets.protocol import Protocol, Side, State
from websockets.sync.server import serve as ws_serve

from sluice.testing import serve

from .conftest import InProcess, config
from .test_websocket import EchoServer, Watcher, read_head, read_lines

pytestmark = pytest.mark.trio

PLUGINS = ["router", "balancer", "auth", "access_log", "tls"]
MIB = 1024 * 1024


class ChatServer(EchoServer):
    """The echo server, also choosing a subprotocol, and closing (1000, "bye")
    when it gets the text ``bye``."""

    def __init__(self) -> None:
        self.headers = []
        self._server = ws_serve(self._handler, "127.0.0.1", 0, subprotocols=["chat"])
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self, ws) -> None:
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        for message in ws:
            if message == "bye":
                ws.close(1000, "bye")
                return
            ws.send(message)


@pytest.fixture
def echo_server():
    with EchoServer() as server:
        yield server


@pytest.fixture
def chat_server():
    with ChatServer() as server:
        yield server


def h2_config(upstream: str, *, plain: str | None = None, **listener) -> dict:
    """h2c on the listener; /ws/ goes to ``upstream``, the rest to ``plain``."""
    routes = [{"match": {"prefix": "/ws/"}, "cluster": "backend"}]
    if plain is not None:
        routes.append({"match": {"prefix": "/"}, "cluster": "plain"})
    cfg = config(upstream, routes=routes, listener={"http2": True, **listener})
    if plain is not None:
        cfg["clusters"]["plain"] = {"endpoints": [plain]}
    return cfg


# -- the client ---------------------------------------------------------------------


class Client:
    """An HTTP/2 client on a real socket: ``run`` reads it in the background,
    each stream's h2 events collect in ``events``, and a WebSocket stream's
    bytes go through its own ``websockets`` protocol (client side, no handshake:
    RFC 8441 has the extended CONNECT instead)."""

    def __init__(self, sock: trio.abc.Stream) -> None:
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.events: dict[int, list] = defaultdict(list)
        self.body: dict[int, bytes] = defaultdict(bytes)
        self.ws: dict[int, Protocol] = {}
        self.messages: dict[int, list] = defaultdict(list)  # text and binary frames received
        self.close: dict[int, Close] = {}  # the close frame received
        self.settings: dict[int, int] | None = None
        self.closed = False
        self._changed = trio.Event()
        self._lock = trio.Lock()

    async def flush(self) -> None:
        async with self._lock:
            data = self.conn.data_to_send()
            if data:
                await self.sock.send_all(data)

    def _wake(self) -> None:
        self._changed.set()

    async def until(self, done, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not done():
                if self.closed:
                    raise AssertionError("connection closed while waiting")
                if self._changed.is_set():
                    self._changed = trio.Event()
                await self._changed.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.conn.initiate_connection()
        await self.flush()
        task_status.started()
        while chunk := await self._receive():
            for event in self.conn.receive_data(chunk):
                sid = getattr(event, "stream_id", 0) or 0
                self.events[sid].append(event)
                kind = type(event)
                if kind is h2.events.RemoteSettingsChanged:
                    self.settings = {**(self.settings or {}),
                                     **{k: v.new_value for k, v in event.changed_settings.items()}}
                elif kind is h2.events.DataReceived:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    ws = self.ws.get(sid) if self.status(sid) == 200 else None  # else a refusal's body
                    if ws is None:
                        self.body[sid] += event.data
                    else:
                        ws.receive_data(event.data)
                        self._take(sid)
                elif kind is h2.events.StreamEnded and sid in self.ws and self.status(sid) == 200:
                    self.ws[sid].receive_eof()
                    self._take(sid)
            await self.flush()
            self._wake()
        self.closed = True
        self._wake()

    async def _receive(self) -> bytes:
        try:
            return await self.sock.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def _take(self, sid: int) -> None:
        """Keep the frames the protocol parsed; send what it answers (a close
        frame's echo: small, so the window always has room)."""
        ws = self.ws[sid]
        for frame in ws.events_received():
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                self.messages[sid].append(frame)
            elif frame.opcode is Opcode.CLOSE:
                self.close[sid] = Close.parse(frame.data)
        for data in ws.data_to_send():
            if data and self.conn.local_flow_control_window(sid) >= len(data):
                self.conn.send_data(sid, data)

    # -- requests --

    def request(self, path: str, method: bytes = b"GET", extra=(), *, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", method), (b":scheme", b"http"), (b":path", path.encode()),
                                     (b":authority", b"proxy.test"), *extra], end_stream=end)
        return sid

    def websocket(self, path: str, extra=(), *, protocol: bytes = b"websocket") -> int:
        """Open an extended CONNECT stream (RFC 8441 4), with its WebSocket protocol."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":protocol", protocol),
                                     (b":scheme", b"http"), (b":path", path.encode()),
                                     (b":authority", b"proxy.test"), (b"sec-websocket-version", b"13"),
                                     *extra])
        self.ws[sid] = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
        return sid

    def response(self, sid: int) -> h2.events.ResponseReceived | None:
        return next((e for e in self.events[sid] if type(e) is h2.events.ResponseReceived), None)

    def status(self, sid: int) -> int | None:
        response = self.response(sid)
        return None if response is None else int(dict(response.headers)[b":status"])

    def headers(self, sid: int) -> dict[bytes, bytes]:
        return dict(self.response(sid).headers)

    def reset(self, sid: int) -> int | None:
        return next((e.error_code for e in self.events[sid] if type(e) is h2.events.StreamReset), None)

    def ended(self, sid: int) -> bool:
        return any(type(e) in (h2.events.StreamEnded, h2.events.StreamReset) for e in self.events[sid])

    async def ping_pong(self) -> None:
        """A PING round trip: what the proxy sent before its ACK has been read."""
        self.conn.ping(b"syncsync")
        await self.flush()
        count = len(self.events[0])
        await self.until(lambda: any(type(e) is h2.events.PingAckReceived for e in self.events[0][count:]))

    async def answered(self, sid: int) -> int | None:
        """Send what is queued, then wait for ``sid``'s response head (or reset)."""
        await self.flush()
        await self.until(lambda: self.response(sid) is not None or self.reset(sid) is not None)
        return self.status(sid)

    async def send(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """DATA on ``sid``, as fast as the proxy's windows allow."""
        conn = self.conn
        start = 0
        while start < len(data):
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if room <= 0:
                await self.flush()
                await self.until(lambda: conn.local_flow_control_window(sid) > 0)
                continue
            conn.send_data(sid, data[start:start + room])
            start += room
            await self.flush()
        if end:
            conn.end_stream(sid)
        await self.flush()

    async def send_message(self, sid: int, message: str | bytes) -> None:
        ws = self.ws[sid]
        if isinstance(message, str):
            ws.send_text(message.encode())
        else:
            ws.send_binary(message)
        await self.send(sid, b"".join(ws.data_to_send()))

    async def receive_message(self, sid: int) -> str | bytes:
        """The next text or binary message."""
        messages = self.messages[sid]
        await self.until(lambda: messages or self.ended(sid))
        assert messages, f"stream {sid} ended: {self.events[sid][-3:]}"
        frame = messages.pop(0)
        return frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data)


@asynccontextmanager
async def h2_client(proxy, ssl_context: ssl.SSLContext | None = None):
    """A client connected to ``proxy`` (over TLS, ``h2`` by ALPN, with
    ``ssl_context``), past its SETTINGS; closed after."""
    async with trio.open_nursery() as nursery:
        sock = await trio.open_tcp_stream(*proxy.address)
        if ssl_context is not None:
            sock = trio.SSLStream(sock, ssl_context, server_hostname="127.0.0.1")
            await sock.do_handshake()
            assert sock.selected_alpn_protocol() == "h2"
        client = Client(sock)
        await nursery.start(client.run)
        try:
            await client.until(lambda: client.settings is not None)
            yield client
        finally:
            nursery.cancel_scope.cancel()
    await client.sock.aclose()


# -- a raw upstream ------------------------------------------------------------------


GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


def accept_for(head: bytes) -> bytes:
    """The Sec-WebSocket-Accept a handshake ``head`` asks for (RFC 6455 4.2.2)."""
    key = next(line.partition(b":")[2].strip() for line in head.split(b"\r\n")[1:]
               if line.partition(b":")[0].strip().lower() == b"sec-websocket-key")
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def switched(accept: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


# -- the tests -----------------------------------------------------------------------


async def test_the_settings_offer_extended_connect(echo_server):
    """RFC 8441 3: SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 in the server's SETTINGS."""
    async with serve(h2_config(echo_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        assert client.settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1


async def test_messages_echo_through_the_tunnel_with_flow_control(echo_server):
    """Text, binary, and a 1 MiB message: four times the stream's window, so
    both ways wait on WINDOW_UPDATEs."""
    big = os.urandom(MIB)
    async with serve(h2_config(echo_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        sid = client.websocket("/ws/chat")
        assert await client.answered(sid) == 200
        got = []
        for message in ("hello", b"\x00\x01binary", big, "after"):
            await client.send_message(sid, message)
            got.append(await client.receive_message(sid))
        headers = client.headers(sid)
    assert got == ["hello", b"\x00\x01binary", big, "after"]
    # RFC 8441 5: a 200, without the fields only a 101 has.
    assert not {b"upgrade", b"connection", b"sec-websocket-accept"} & set(headers), headers
    handshake = echo_server.headers[0]
    assert handshake["upgrade"] == "websocket" and "upgrade" in handshake["connection"].lower()
    assert handshake["sec-websocket-version"] == "13"
    assert len(base64.b64decode(handshake["sec-websocket-key"])) == 16  # RFC 6455 4.1
    assert handshake["via"] == "1.1 sluice"


async def test_each_handshake_gets_a_fresh_key(echo_server):
    async with serve(h2_config(echo_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        first = client.websocket("/ws/a", [(b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")])
        second = client.websocket("/ws/b")
        assert [await client.answered(first), await client.answered(second)] == [200, 200]
    keys = [h["sec-websocket-key"] for h in echo_server.headers]
    assert len(set(keys)) == 2 and "dGhlIHNhbXBsZSBub25jZQ==" not in keys


async def test_a_client_close_handshake_ends_the_stream_cleanly(echo_server):
    async with serve(h2_config(echo_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        sid = client.websocket("/ws/chat")
        assert await client.answered(sid) == 200
        ws = client.ws[sid]
        ws.send_close(1000, "done")
        await client.send(sid, b"".join(ws.data_to_send()))
        # The server echoes the close and closes its connection: END_STREAM.
        await client.until(lambda: client.ended(sid))
        await client.send(sid, b"", end=True)  # the client's side, as a TCP close
        await client.ping_pong()
    assert client.close.get(sid) == Close(1000, "done"), (client.events[sid], ws.state, ws.close_rcvd)
    assert ws.state is State.CLOSED
    assert client.reset(sid) is None, client.events[sid]


async def test_the_subprotocol_is_negotiated_end_to_end(chat_server):
    async with serve(h2_config(chat_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        sid = client.websocket("/ws/chat", [(b"sec-websocket-protocol", b"superchat, chat")])
        assert await client.answered(sid) == 200
        await client.send_message(sid, "hi")
        assert await client.receive_message(sid) == "hi"
        headers = client.headers(sid)
    assert chat_server.headers[0]["sec-websocket-protocol"] == "superchat, chat"
    assert headers[b"sec-websocket-protocol"] == b"chat"


async def test_an_upstream_close_ends_the_stream(chat_server):
    async with serve(h2_config(chat_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        sid = client.websocket("/ws/chat", [(b"sec-websocket-protocol", b"chat")])
        assert await client.answered(sid) == 200
        await client.send_message(sid, "bye")
        await client.until(lambda: client.ended(sid))
        events = client.events[sid]
    assert client.close[sid] == Close(1000, "bye")
    assert any(type(e) is h2.events.StreamEnded for e in events), events


async def test_a_refusing_upstream_is_relayed(start_origin):
    async def forbid(stream):
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n")

    origin = await start_origin(raw=forbid)
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/chat")
        assert await client.answered(sid) == 403
        await client.until(lambda: client.ended(sid))
    assert client.body[sid] == b"no\n"


async def test_a_2xx_that_is_no_switch_becomes_a_502(start_origin):
    """RFC 8441 5: a 2xx to the extended CONNECT says the tunnel is open; an
    upstream (here plain HTTP) answering 200 to the handshake did not open it."""
    origin = await start_origin()  # the h11 echo origin: 200, the target as the body
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/chat")
        assert await client.answered(sid) == 502
        await client.until(lambda: client.ended(sid))
    assert b"/ws/chat" not in client.body[sid]
    assert dict(origin.requests[0][0].headers)[b"upgrade"] == b"websocket"


async def test_a_101_with_the_wrong_accept_is_a_502(start_origin):
    async def wrong(stream):
        head, _ = await read_head(stream)
        await stream.send_all(switched(base64.b64encode(b"\x00" * 20)))
        await trio.sleep(1)

    origin = await start_origin(raw=wrong)
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/chat")
        assert await client.answered(sid) == 502


async def test_half_closes_go_both_ways(start_origin):
    """END_STREAM is the upstream's EOF, and its EOF the client's END_STREAM;
    each direction goes on after the other ended."""
    seen = []

    async def half(stream):
        head, rest = await read_head(stream)
        await stream.send_all(switched(accept_for(head)) + b"early")
        while chunk := await stream.receive_some(65536):
            rest += chunk
        seen.append(rest)  # the client's END_STREAM came as an EOF
        await stream.send_all(b"after your EOF")

    origin = await start_origin(raw=half)
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/raw")
        client.ws.pop(sid)  # raw bytes on this one
        assert await client.answered(sid) == 200
        await client.send(sid, b"raw bytes", end=True)
        await client.until(lambda: client.ended(sid))
        events = client.events[sid]
    assert seen == [b"raw bytes"]
    assert client.body[sid] == b"earlyafter your EOF"
    assert any(type(e) is h2.events.StreamEnded for e in events) and client.reset(sid) is None, events


async def test_a_slow_reader_upstream_holds_the_client_back(start_origin):
    """Backpressure: DATA is acknowledged only once written upstream, so a
    client can push what the stream window and the kernel's buffers on the
    way hold, not the 64 MiB it offers."""
    async def never_reads(stream):
        head, _ = await read_head(stream)
        await stream.send_all(switched(accept_for(head)))
        await trio.sleep(3)

    origin = await start_origin(raw=never_reads)
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/raw")
        assert await client.answered(sid) == 200
        sent = 0
        with trio.move_on_after(1.5):
            while sent < 64 * MIB:
                await client.send(sid, bytes(65536))
                sent += 65536
    assert sent < 16 * MIB


async def test_an_upstream_reset_resets_the_stream(start_origin):
    """RFC 9113 8.5: a TCP reset of the upstream is RST_STREAM CONNECT_ERROR."""
    async def reset(stream):
        head, _ = await read_head(stream)
        await stream.send_all(switched(accept_for(head)))
        await trio.sleep(0.2)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    origin = await start_origin(raw=reset)
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/raw")
        assert await client.answered(sid) == 200
        await client.until(lambda: client.ended(sid))
    assert client.reset(sid) == h2.errors.ErrorCodes.CONNECT_ERROR


async def test_a_client_reset_closes_the_upstream_connection(start_origin):
    closed = trio.Event()

    async def wait_eof(stream):
        head, _ = await read_head(stream)
        await stream.send_all(switched(accept_for(head)))
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        closed.set()

    origin = await start_origin(raw=wait_eof)
    async with serve(h2_config(origin.address), plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/raw")
        assert await client.answered(sid) == 200
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        await client.flush()
        with trio.fail_after(5):
            await closed.wait()
        other = client.websocket("/ws/raw")  # the connection goes on
        assert await client.answered(other) == 200


async def test_an_idle_tunnel_ends_and_is_logged(echo_server, tmp_path):
    log = tmp_path / "access.jsonl"
    cfg = h2_config(echo_server.address, timeouts={"tunnel_idle": 0.5})
    cfg["listeners"][0]["filters"] = ["access_log", "router"]
    cfg["filters"] = {"access_log": {"path": str(log), "flush_interval": 0.05}}
    async with serve(cfg, plugins=PLUGINS) as proxy, h2_client(proxy) as client:
        sid = client.websocket("/ws/quiet")
        assert await client.answered(sid) == 200
        with trio.fail_after(3):
            await client.until(lambda: client.ended(sid))
        line = (await read_lines(log, 1))[0]
    assert line["flags"] == "TI" and line["upgraded"] == "websocket"


async def test_filters_see_an_upgrade_as_over_http1(echo_server):
    """The extended CONNECT reaches the chain as the HTTP/1.1 handshake:
    ``ctx.upgrade`` on the request, ``upgraded`` on the 101, and a filter's
    reply to the 101 is what the client gets."""
    Watcher.seen = []
    cfg = h2_config(echo_server.address)
    cfg["listeners"][0]["filters"] = ["watcher", "router"]
    async with serve(cfg, plugins=PLUGINS, extra={"watch": InProcess(Watcher)}) as proxy, \
            h2_client(proxy) as client:
        sid = client.websocket("/ws/chat")
        assert await client.answered(sid) == 200
        await client.send_message(sid, "hello")
        assert await client.receive_message(sid) == "hello"
        refused = client.websocket("/ws/refuse")
        assert await client.answered(refused) == 403
        await client.send(sid, b"", end=True)
        await client.until(lambda: client.ended(sid) and client.ended(refused))
        with trio.fail_after(5):
            while len(Watcher.seen) < 6:
                await trio.sleep(0.02)
    assert sorted(Watcher.seen, key=str) == sorted([
        ("request", "websocket", None), ("response", 101, "websocket"), ("complete", "websocket", 101),
        ("request", "websocket", None), ("response", 101, "websocket"), ("complete", None, 403),
    ], key=str)


async def test_over_tls_by_alpn(echo_server, tmp_path):
    """Browsers speak RFC 8441 over TLS only: the same tunnel, h2 chosen by ALPN."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    cfg = h2_config(echo_server.address, tls={"cert": cert_file, "key": key_file})
    async with serve(cfg, plugins=PLUGINS) as proxy, h2_client(proxy, context) as client:
        sid = client.websocket("/ws/secure")
        assert await client.answered(sid) == 200
        await client.send_message(sid, b"x" * 300_000)
        assert await client.receive_message(sid) == b"x" * 300_000


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ([(b":method", b"CONNECT"), (b":authority", b"proxy.test:443")], 501),  # plain CONNECT
        ([(b":method", b"CONNECT"), (b":protocol", b"connect-udp"), (b":scheme", b"https"),
          (b":path", b"/ws/x"), (b":authority", b"proxy.test")], 501),
    ],
    ids=["plain-connect", "another-protocol"],
)
async def test_connect_sluice_does_not_carry_is_501(echo_server, fields, status):
    async with serve(h2_config(echo_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, fields)
        assert await client.answered(sid) == status
    assert echo_server.headers == []


async def test_protocol_on_a_get_is_malformed(echo_server):
    """RFC 8441 4: ``:protocol`` belongs to CONNECT; elsewhere the request is malformed."""
    async with serve(h2_config(echo_server.address), plugins=PLUGINS) as proxy, \
            h2_client(proxy) as client:
        client.conn.config.validate_outbound_headers = False  # h2 would not send it
        sid = client.request("/ws/x", extra=[(b":protocol", b"websocket")])
        await client.flush()
        assert await client.answered(sid) is None
        assert client.reset(sid) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert echo_server.headers == []


async def test_websockets_and_requests_share_one_connection(echo_server, start_origin):
    origin = await start_origin()
    cfg = h2_config(echo_server.address, plain=origin.address)
    results = {}
    async with serve(cfg, plugins=PLUGINS) as proxy, h2_client(proxy) as client:

        async def chat(i: int) -> None:
            sid = client.websocket(f"/ws/{i}")
            assert await client.answered(sid) == 200
            got = []
            for n in range(3):
                await client.send_message(sid, f"{i}.{n}")
                got.append(await client.receive_message(sid))
            await client.send_message(sid, os.urandom(300_000))
            got.append(len(await client.receive_message(sid)))
            results[f"ws{i}"] = got

        async def get(i: int) -> None:
            sid = client.request(f"/plain/{i}")
            assert await client.answered(sid) == 200
            await client.until(lambda: client.ended(sid))
            results[f"get{i}"] = client.body[sid]

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(chat, i)
                    nursery.start_soon(get, i)
    assert results == {**{f"ws{i}": [f"{i}.0", f"{i}.1", f"{i}.2", 300_000] for i in range(4)},
                       **{f"get{i}": f"/plain/{i}".encode() for i in range(4)}}
    assert len(echo_server.headers) == 4
