"""HTTP/2 upstreams: clusters with ``protocol = "h2c"`` or ``"h2"`` (TLS, ALPN).

The upstreams are real HTTP/2 servers on loopback: nginx (h2c and h2, its
GOAWAY after ``keepalive_requests``, its MAX_CONCURRENT_STREAMS), sluice
itself with an h2c listener in front of a recording HTTP/1.1 origin (so the
origin shows what crossed the HTTP/2 hop), and, where a server must
misbehave on purpose, a small h2-library server scripted per test.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
import trio
import trustme

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config, raw_request
from .origin import Reply
from .proc import free_port

pytestmark = pytest.mark.trio

PLUGINS = ["router", "balancer", "tls", "access_log"]


def _front(address: str, **cluster) -> dict:
    return config(address, cluster={"protocol": "h2c", **cluster})


async def _back(origin, **http2):
    """sluice with an h2c listener in front of ``origin``: an HTTP/2 upstream."""
    return serve(config(origin.address, listener={"http2": {"enabled": True, **http2}}), plugins=PLUGINS)


def _pool_connections(running) -> int:
    return sum(len(conns) for conns in running.app.pool._h2.values())


# -- translation, through sluice's own h2c listener --------------------------------


async def test_an_http1_request_crosses_an_h2c_hop_translated(start_origin):
    origin = await start_origin()
    async with await _back(origin) as back, \
            serve(_front(f"127.0.0.1:{back.address[1]}"), plugins=PLUGINS) as front:
        host = f"127.0.0.1:{front.address[1]}"
        head = (b"GET /hello?x=1 HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                b"Cookie: a=1\r\nCookie: b=2\r\nTE: trailers\r\nX-Hop: 1\r\n"
                b"Connection: close, x-hop\r\nKeep-Alive: timeout=5\r\n\r\n")
        reply = await raw_request(front.address, head)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert reply.endswith(b"/hello?x=1")
    request, _ = origin.requests[0]
    fields = dict(request.headers)
    assert request.target == b"/hello?x=1"
    assert fields[b"host"] == host.encode()  # Host -> :authority -> Host
    assert fields[b"cookie"] == b"a=1; b=2"  # joined for HTTP/1.1 (RFC 9113 8.2.3)
    assert b"x-hop" not in fields and b"keep-alive" not in fields  # hop-by-hop stays behind
    assert fields[b"via"] == b"1.1 sluice, 1.1 sluice"  # both hops


async def test_bodies_stream_both_ways_over_h2c(start_origin):
    """3 MiB up and back down: more than the stream windows, so flow control
    has to turn both ways for it to finish."""
    origin = await start_origin()
    payload = bytes(range(256)) * (3 * 4096)
    async with await _back(origin) as back, \
            serve(_front(f"127.0.0.1:{back.address[1]}"), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            with trio.fail_after(20):
                response = await client.post("/up", content=payload)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(payload).digest()
    assert origin.requests[0][1] == payload


async def test_trailers_cross_the_h2c_hop_both_ways(start_origin):
    async def with_trailers(request, body):
        async def chunks():
            yield b"part1"
            yield b"part2"

        return Reply(200, [(b"transfer-encoding", b"chunked")], chunks(), trailers=[(b"x-sum", b"42")])

    origin = await start_origin(with_trailers)
    async with await _back(origin) as back, \
            serve(_front(f"127.0.0.1:{back.address[1]}"), plugins=PLUGINS) as front:
        request = (b"POST /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n"
                   b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n")
        reply = await raw_request(front.address, request)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert b"part1" in reply and b"part2" in reply
    assert b"\r\nx-sum: 42\r\n" in reply.lower()
    _, body = origin.requests[0]
    assert body == b"hello"
    assert origin.trailers[0] == [(b"x-checksum", b"abc")]


async def test_h2_client_to_h2_upstream_end_to_end(start_origin):
    """curl speaks h2c to the front, which speaks h2c to the back."""
    origin = await start_origin()
    async with await _back(origin) as back, \
            serve(config(f"127.0.0.1:{back.address[1]}", listener={"http2": True},
                         cluster={"protocol": "h2c"}), plugins=PLUGINS) as front:
        done = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-w", "\\n%{http_version}",
             "-d", "over two hops", f"http://127.0.0.1:{front.address[1]}/x"],
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"over two hops\n2"


async def test_streams_past_the_peers_limit_open_more_connections(start_origin):
    """The back allows 4 streams per connection; 40 requests at once all
    succeed (none refused), over at least 10 connections."""
    async def slow(request, body):
        await trio.sleep(1.0)  # long enough that all 40 are in flight at once, even on a busy machine
        return Reply(200, [], request.target)

    origin = await start_origin(slow)
    async with await _back(origin, max_concurrent_streams=4) as back, \
            serve(_front(f"127.0.0.1:{back.address[1]}"), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}",
                                     limits=httpx.Limits(max_connections=100)) as client:
            answers = {}

            async def get(i: int) -> None:
                response = await client.get(f"/n/{i}")
                answers[i] = (response.status_code, response.text)

            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    for i in range(40):
                        nursery.start_soon(get, i)
            opened = _pool_connections(front)
    assert answers == {i: (200, f"/n/{i}") for i in range(40)}
    assert opened >= 10, opened
    assert len(origin.requests) == 40


async def test_a_client_leaving_mid_response_resets_only_its_stream(start_origin):
    """The client goes after the first chunk of an endless answer: its
    upstream stream is reset, and the connection serves the next request."""
    async def endless(request, body):
        if request.target != b"/endless":
            return Reply(200, [], b"fine")

        async def chunks():
            try:
                while True:
                    yield b"x" * 16384
                    await trio.sleep(0.01)
            finally:
                stopped.set()

        return Reply(200, [(b"transfer-encoding", b"chunked")], chunks())

    stopped = trio.Event()
    origin = await start_origin(endless)
    async with await _back(origin) as back, \
            serve(_front(f"127.0.0.1:{back.address[1]}"), plugins=PLUGINS) as front:
        base = f"http://127.0.0.1:{front.address[1]}"
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=base) as client:
                async with client.stream("GET", "/endless") as response:
                    async for chunk in response.aiter_raw():
                        assert chunk
                        break
            async with httpx.AsyncClient(base_url=base) as client:
                after = await client.get("/after")
            await stopped.wait()  # the reset reached the back, which let the origin go
        assert (after.status_code, after.text) == (200, "fine")
        assert _pool_connections(front) == 1


async def test_many_requests_share_one_connection_when_the_limit_allows(start_origin):
    origin = await start_origin()
    async with await _back(origin) as back, \
            serve(_front(f"127.0.0.1:{back.address[1]}"), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            for i in range(20):
                assert (await client.get(f"/s/{i}")).text == f"/s/{i}"
        assert _pool_connections(front) == 1


# -- nginx: another implementation's GOAWAY, limits and ALPN --------------------------

NGINX = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests {requests};
    http2_max_concurrent_streams {streams};
    server {{
        listen 127.0.0.1:{port} {listen};
        {tls}
        location / {{
            add_header x-connection $connection always;
            return 200 "nginx $request_uri\\n";
        }}
    }}
}}
"""


class Nginx:
    """nginx as an HTTP/2 upstream, started for the test and stopped by PID."""

    def __init__(self, directory: Path, *, requests: int = 1000, streams: int = 128,
                 tls: trustme.LeafCert | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        tls_lines = ""
        if tls is not None:
            cert, key = directory / "cert.pem", directory / "key.pem"
            tls.cert_chain_pems[0].write_to_path(cert)
            tls.private_key_pem.write_to_path(key)
            tls_lines = f"ssl_certificate {cert}; ssl_certificate_key {key};"
        conf = directory / "nginx.conf"
        conf.write_text(NGINX.format(dir=directory, port=self.port, requests=requests, streams=streams,
                                     listen="ssl http2" if tls else "http2", tls=tls_lines))
        self.proc = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(conf), "-e", "stderr"],
                                     stderr=subprocess.PIPE)

    async def ready(self) -> Nginx:
        with trio.fail_after(10):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"nginx did not start: {self.proc.stderr.read().decode()}")
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", self.port)).aclose()
                    return self
                except OSError:
                    await trio.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nginx(tmp_path):
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: `make test` installs it (Debian package nginx-light)")
    started = []

    def start(**kwargs) -> Nginx:
        server = Nginx(tmp_path / f"nginx{len(started)}", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def test_nginx_goaway_after_keepalive_requests_moves_streams_to_a_new_connection(nginx):
    """nginx says GOAWAY after 5 requests on a connection: 40 requests, 20
    of them at once, all succeed, over at least 8 connections."""
    upstream = await nginx(requests=5).ready()
    async with serve(_front(upstream.address), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            answers = {}

            async def get(i: int) -> None:
                response = await client.get(f"/g/{i}")
                answers[i] = (response.status_code, response.text, response.headers.get("x-connection"))

            with trio.fail_after(20):
                for i in range(20):
                    await get(i)
                async with trio.open_nursery() as nursery:
                    for i in range(20, 40):
                        nursery.start_soon(get, i)
    assert {i: a[:2] for i, a in answers.items()} == {i: (200, f"nginx /g/{i}\n") for i in range(40)}
    connections = {a[2] for a in answers.values()}
    assert len(connections) >= 8, connections


async def test_nginx_max_concurrent_streams_is_honoured(nginx):
    upstream = await nginx(streams=2).ready()
    async with serve(_front(upstream.address), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    answers = []

                    async def get(i: int) -> None:
                        answers.append((await client.get(f"/c/{i}")).status_code)

                    for i in range(30):
                        nursery.start_soon(get, i)
    assert answers == [200] * 30


async def test_h2_over_tls_negotiates_by_alpn(nginx, tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    upstream = await nginx(tls=ca.issue_cert("127.0.0.1")).ready()
    cluster = {"protocol": "h2", "tls": {"ca": str(ca_file)}}
    async with serve(config(upstream.address, cluster=cluster), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            response = await client.get("/tls")
            assert (await client.get("/again")).headers["x-connection"] == response.headers["x-connection"]
    assert response.status_code == 200 and response.text == "nginx /tls\n"


async def test_h2_to_a_tls_upstream_without_h2_is_a_503(start_origin, tmp_path):
    """ALPN must select h2: an HTTP/1.1-only TLS upstream is refused at connect."""
    ca = trustme.CA()
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "cert.pem"
    ca.cert_pem.write_to_path(ca_file)
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(cert_file)
    origin = await start_origin()
    h1_only = config(origin.address, listener={"tls": {"cert": str(cert_file), "key": str(cert_file)}})
    async with serve(h1_only, plugins=PLUGINS) as tls_back:
        cluster = {"protocol": "h2", "tls": {"ca": str(ca_file)}}
        async with serve(config(f"127.0.0.1:{tls_back.address[1]}", cluster=cluster), plugins=PLUGINS) as front:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
                response = await client.get("/x")
    assert response.status_code == 503
    assert origin.requests == []


# -- a scripted h2 server: what a well-behaved one never does ---------------------------


class ScriptedH2:
    """An HTTP/2 server from the h2 library; ``answer(conn, stream_id, headers)``
    decides per request (answer, reset, malformed fields...)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.port = 0
        self.requests: list[dict] = []
        self.connections = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        conn.initiate_connection()
        async with stream:
            await stream.send_all(conn.data_to_send())
            while data := await stream.receive_some(65536):
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        self.requests.append(headers)
                        self.answer(conn, event.stream_id, headers, self)
                await stream.send_all(conn.data_to_send())


async def test_a_malformed_upstream_response_is_a_502_on_that_stream_only(nursery):
    def answer(conn, sid, headers, server):
        if headers[b":path"] == b"/bad":
            conn.send_headers(sid, [(b":status", b"200"), (b"X-Upper", b"no")], end_stream=True)
        else:
            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
            conn.send_data(sid, b"ok", end_stream=True)

    upstream = await nursery.start(ScriptedH2(answer).serve)
    async with serve(_front(f"127.0.0.1:{upstream.port}"), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            results = {}

            async def get(path: str) -> None:
                response = await client.get(path)
                results[path] = (response.status_code, response.text)

            async with trio.open_nursery() as inner:
                for path in ("/bad", "/good", "/good2"):
                    inner.start_soon(get, path)
    assert results["/bad"][0] == 502
    assert results["/good"] == (200, "ok") and results["/good2"] == (200, "ok")
    assert upstream.connections == 1  # the stream error did not cost the connection


async def test_a_refused_stream_is_replayed_even_for_post(nursery):
    """REFUSED_STREAM means the request was never processed (RFC 9113 8.7):
    sluice sends it again, whatever the method. (A request whose body
    streams is not replayed: its body is gone. Retries with buffered bodies
    are the retry policy's.)"""
    def answer(conn, sid, headers, server):
        if len(server.requests) == 1:
            conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
        else:
            conn.send_headers(sid, [(b":status", b"201"), (b"content-length", b"7")])
            conn.send_data(sid, b"created", end_stream=True)

    upstream = await nursery.start(ScriptedH2(answer).serve)
    async with serve(_front(f"127.0.0.1:{upstream.port}"), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            response = await client.post("/make")
    assert (response.status_code, response.text) == (201, "created")
    assert [r[b":method"] for r in upstream.requests] == [b"POST", b"POST"]


async def test_an_upstream_reset_is_a_502(nursery):
    def answer(conn, sid, headers, server):
        conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)

    upstream = await nursery.start(ScriptedH2(answer).serve)
    async with serve(_front(f"127.0.0.1:{upstream.port}"), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            response = await client.get("/x")
    assert response.status_code == 502
    assert len(upstream.requests) == 1  # a reset after processing is not replayed


async def test_a_slow_h2_upstream_is_a_504_and_other_streams_go_on(nursery):
    def answer(conn, sid, headers, server):
        if headers[b":path"] != b"/never":
            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
            conn.send_data(sid, b"ok", end_stream=True)

    upstream = await nursery.start(ScriptedH2(answer).serve)
    cfg = _front(f"127.0.0.1:{upstream.port}", response_timeout=0.5)
    async with serve(cfg, plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            with trio.fail_after(10):
                slow = await client.get("/never")
                fast = await client.get("/fine")
    assert slow.status_code == 504
    assert (fast.status_code, fast.text) == (200, "ok")
    assert upstream.connections == 1


async def test_an_upstream_that_is_not_h2_is_a_503(start_origin):
    origin = await start_origin()  # speaks HTTP/1.1 only
    async with serve(_front(origin.address, connect_timeout=1), plugins=PLUGINS) as front:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.address[1]}") as client:
            with trio.fail_after(10):
                response = await client.get("/x")
    assert response.status_code in (502, 503)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("cluster, message", [
    ({"protocol": "h2"}, "clusters.backend.protocol: \"h2\" is HTTP/2 over TLS and needs a tls table"),
    ({"protocol": "h2c", "tls": {}}, "clusters.backend.protocol: \"h2c\" is HTTP/2 without TLS"),
    ({"protocol": "h3"}, "clusters.backend.protocol"),
])
async def test_protocol_config_errors_name_the_key(cluster, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        async with serve(config("127.0.0.1:1", cluster=cluster), plugins=PLUGINS):
            pass
