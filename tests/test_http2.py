"""HTTP/2 downstream to an HTTP/1.1 upstream: h2c with prior knowledge and h2
by ALPN, with real clients (curl, httpx) and a raw h2 client where the
frames matter (trailers, resets, GOAWAY).

Each stream is its own exchange through the same chain, so what is tested
here is what HTTP/2 adds: many streams on one connection, the translation
(``:authority`` to Host, cookie crumbs joined), flow control as
backpressure, streams that end early, and a graceful drain.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest
import trio
import trustme
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

from sluice.protocol.h2_codec import PREFACE
from sluice.testing import serve

from .conftest import config
from .origin import Reply

pytestmark = pytest.mark.trio

PLUGINS = ["router", "balancer", "tls", "access_log"]


def h2_config(origin, **listener):
    return config(origin.address, listener={"http2": True, **listener})


async def _curl(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process(["curl", "-sS", "--max-time", "10", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_curl_with_prior_knowledge_gets_its_answer_over_h2c(start_origin):
    origin = await start_origin()
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        url = f"http://127.0.0.1:{proxy.address[1]}/echo"
        done = await _curl("--http2-prior-knowledge", "-w", "\\n%{http_version}", "-d", "payload", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"payload\n2", done.stdout
    request, body = origin.requests[0]
    assert request.method == b"POST" and request.target == b"/echo" and body == b"payload"
    headers = dict(request.headers)
    assert headers[b"host"] == f"127.0.0.1:{proxy.address[1]}".encode()  # from :authority
    assert request.http_version == b"1.1"


async def test_many_streams_share_one_connection(start_origin):
    async def slow_echo(request, body):
        await trio.sleep(0.05)  # so the streams overlap
        return Reply(200, [(b"content-type", b"text/plain")], request.target)

    origin = await start_origin(slow_echo)
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        base = f"http://127.0.0.1:{proxy.address[1]}"
        async with httpx.AsyncClient(http1=False, http2=True, base_url=base) as client:
            results = {}

            async def get(i: int) -> None:
                response = await client.get(f"/n/{i}")
                results[i] = (response.http_version, response.status_code, response.text)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for i in range(60):
                        nursery.start_soon(get, i)
    assert results == {i: ("HTTP/2", 200, f"/n/{i}") for i in range(60)}


async def test_cookie_crumbs_are_joined_for_the_http1_upstream(start_origin):
    origin = await start_origin()
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        events, _ = await _raw_h2(proxy.address, [(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert _status(events) == 200
    request, _ = origin.requests[0]
    assert [v for n, v in request.headers if n == b"cookie"] == [b"a=1; b=2"]


async def test_response_trailers_reach_the_h2_client(start_origin):
    async def with_trailers(request, body):
        async def chunks():
            yield b"part"

        return Reply(200, [(b"trailer", b"grpc-status")], chunks(), trailers=[(b"grpc-status", b"0")])

    origin = await start_origin(with_trailers)
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        events, data = await _raw_h2(proxy.address, [(b"te", b"trailers")])
    assert _status(events) == 200 and data == b"part"
    trailers = [e for e in events if type(e) is h2.events.TrailersReceived]
    assert trailers and (b"grpc-status", b"0") in trailers[0].headers


async def test_a_refused_path_is_a_400_on_its_stream_only(start_origin):
    origin = await start_origin()
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        base = f"http://127.0.0.1:{proxy.address[1]}"
        async with httpx.AsyncClient(http1=False, http2=True, base_url=base) as client:
            bad = await client.get("/a/%2e%2e/%2e%2e/etc/passwd")
            good = await client.get("/fine")
    assert bad.status_code == 400 and good.status_code == 200
    assert [r.target for r, _ in origin.requests] == [b"/fine"]


async def test_large_bodies_stream_both_ways_under_flow_control(start_origin):
    size = 8 * 1024 * 1024
    origin = await start_origin()  # echo: the body comes back
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        base = f"http://127.0.0.1:{proxy.address[1]}"
        payload = bytes(range(256)) * (size // 256)

        async def chunks():
            for i in range(0, size, 65536):
                yield payload[i:i + 65536]

        async with httpx.AsyncClient(http1=False, http2=True, base_url=base, timeout=30) as client:
            response = await client.post("/up", content=chunks())
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    assert len(response.content) == size and response.content == payload


async def test_tls_offers_h2_and_http11_by_alpn(start_origin, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = (str(tmp_path / n) for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    origin = await start_origin()
    cfg = h2_config(origin, tls={"cert": cert_file, "key": key_file})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        url = f"https://127.0.0.1:{proxy.address[1]}/tls"
        h2_done = await _curl("--http2", "--cacert", ca_file, "-w", "\\n%{http_version}", url)
        h1_done = await _curl("--http1.1", "--cacert", ca_file, "-w", "\\n%{http_version}", url)
    assert h2_done.stdout == b"/tls\n2", h2_done.stderr
    assert h1_done.stdout == b"/tls\n1.1", h1_done.stderr


async def test_without_http2_a_plain_listener_refuses_the_preface(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        done = await _curl("--http2-prior-knowledge", f"http://127.0.0.1:{proxy.address[1]}/")
    assert done.returncode != 0
    assert not origin.requests


async def test_a_stream_reset_by_the_client_leaves_the_others_alone(start_origin):
    async def slow(request, body):
        await trio.sleep(0.5 if request.target == b"/slow" else 0)
        return Reply(200, [], request.target)

    origin = await start_origin(slow)
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        events, data = await _raw_h2(proxy.address, [], reset_first=True)
    assert _status(events) == 200 and data == b"/fast"


async def test_drain_sends_goaway_and_lets_the_stream_in_flight_finish(start_origin):
    async def slow(request, body):
        await trio.sleep(0.5)
        return Reply(200, [], b"finished")

    origin = await start_origin(slow)
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        client.send_headers(1, [(b":method", b"GET"), (b":path", b"/slow"), (b":scheme", b"http"),
                                (b":authority", b"a.test")], end_stream=True)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(client.data_to_send())
            await trio.sleep(0.2)
            proxy.app.stop()
            received = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    received += chunk
    # h2's client refuses frames after a GOAWAY, so the frames are read raw.
    frames = list(_frames(received))
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways and goaways[0].error_code == 0 and goaways[0].last_stream_id == 1
    data = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == 1)
    assert data == b"finished"
    assert frames.index(goaways[0]) < max(i for i, f in enumerate(frames) if f.stream_id == 1)


def _frames(data: bytes):
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        yield frame
        data = data[9 + length:]


async def test_the_access_log_has_h2_requests(start_origin, tmp_path):
    origin = await start_origin()
    log_path = tmp_path / "access.jsonl"
    cfg = config(origin.address, filters=["access_log", "router"], listener={"http2": True},
                 filter_settings={"access_log": {"path": str(log_path), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        await _curl("--http2-prior-knowledge", f"http://127.0.0.1:{proxy.address[1]}/logged")
        await trio.sleep(0.2)
    line = json.loads(log_path.read_text().splitlines()[0])
    assert (line["method"], line["path"], line["status"]) == ("GET", "/logged", 200)


# -- a raw HTTP/2 client ----------------------------------------------------------


def _status(events) -> int | None:
    for e in events:
        if type(e) is h2.events.ResponseReceived:
            return int(dict(e.headers)[b":status"])
    return None


async def _raw_h2(address, extra, *, path: bytes = b"/x", reset_first: bool = False,
                  until_close: bool = False):
    """One request (and, with ``reset_first``, a /slow one reset first) over
    a fresh h2c connection; returns the events of the last stream, its body,
    and (with ``until_close``) reads until the server closes."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream = await trio.open_tcp_stream(*address)
    events, data = [], b""

    def head(p: bytes):
        return [(b":method", b"GET"), (b":path", p), (b":scheme", b"http"),
                (b":authority", b"a.test"), *extra]

    async with stream:
        if reset_first:
            conn.send_headers(1, head(b"/slow"), end_stream=True)
            await stream.send_all(conn.data_to_send())
            await trio.sleep(0.1)
            conn.reset_stream(1)
            sid, path = 3, b"/fast"
        else:
            sid = 1
        conn.send_headers(sid, head(path), end_stream=True)
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(5):
            ended = False
            while not ended or until_close:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if getattr(event, "stream_id", sid) in (sid, 0):
                        events.append(event)
                    if type(event) is h2.events.DataReceived:
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_id == sid:
                            data += event.data
                    if type(event) is h2.events.StreamEnded and event.stream_id == sid:
                        ended = True
                    if type(event) is h2.events.ConnectionTerminated and ended:
                        until_close = False
                await stream.send_all(conn.data_to_send())
    return events, data



async def test_h2load_gets_every_answer_over_many_streams(start_origin):
    """nghttp2's load tool: 4 connections, 20 streams at once on each."""
    origin = await start_origin()
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        done = await trio.run_process(
            ["h2load", "-n", "2000", "-c", "4", "-m", "20", f"http://127.0.0.1:{proxy.address[1]}/load"],
            capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 2000 2xx" in out, out
    assert len(origin.requests) == 2000


async def test_a_client_that_never_opens_its_window_loses_the_stream_not_the_connection(start_origin):
    """It can hold a stream's answer forever: after ``idle`` the stream is
    reset, and the connection still serves the client's next stream."""
    origin = await start_origin()
    async with serve(h2_config(origin, timeouts={"idle": 1}), plugins=PLUGINS) as proxy:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        conn.initiate_connection()
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            head = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test")]
            conn.send_headers(1, [*head, (b":path", b"/stuck")], end_stream=True)
            await stream.send_all(conn.data_to_send())
            events = []
            with trio.fail_after(5):
                while not any(type(e) is h2.events.StreamReset for e in events):
                    events += conn.receive_data(await stream.receive_some(65536))
                    await stream.send_all(conn.data_to_send())
            reset = next(e for e in events if type(e) is h2.events.StreamReset)
            assert reset.stream_id == 1
            # The same connection, a bodiless answer: no window needed.
            conn.send_headers(3, [(b":method", b"HEAD"), (b":scheme", b"http"), (b":authority", b"a.test"),
                                  (b":path", b"/next")], end_stream=True)
            await stream.send_all(conn.data_to_send())
            with trio.fail_after(5):
                while not any(type(e) is h2.events.StreamEnded and e.stream_id == 3 for e in events):
                    events += conn.receive_data(await stream.receive_some(65536))
    assert [r.target for r, _ in origin.requests] == [b"/stuck", b"/next"]


async def test_an_upstream_breaking_the_protocol_costs_only_its_stream(start_origin):
    async def picky(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        if b" /bad " in data:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    origin = await start_origin(raw=picky)
    async with serve(h2_config(origin), plugins=PLUGINS) as proxy:
        base = f"http://127.0.0.1:{proxy.address[1]}"
        async with httpx.AsyncClient(http1=False, http2=True, base_url=base) as client:
            results = {}

            async def get(path: str) -> None:
                results[path] = (await client.get(path)).status_code

            async with trio.open_nursery() as nursery:
                for path in ("/bad", "/good", "/bad", "/good2"):
                    nursery.start_soon(get, path)
            assert (await client.get("/after")).status_code == 200  # the connection lives on
    assert results == {"/bad": 502, "/good": 200, "/good2": 200}


async def test_a_connection_error_reaches_the_access_log(start_origin, tmp_path):
    origin = await start_origin()
    log_path = tmp_path / "access.jsonl"
    cfg = config(origin.address, filters=["access_log", "router"], listener={"http2": True},
                 filter_settings={"access_log": {"path": str(log_path), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            # The preface, then a DATA frame on stream 0: a connection error (RFC 9113 6.1).
            await stream.send_all(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                                  + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            with trio.fail_after(5):
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
        await trio.sleep(0.2)
    goaway = [f for f in _frames(received) if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[-1].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    line = json.loads(log_path.read_text().splitlines()[0])
    assert line["flags"] == "DPE" and line["status"] is None


GRPC = {"content-type": "application/grpc", "te": "trailers"}


async def test_sluice_answers_grpc_calls_the_grpc_way(start_origin, tmp_path):
    """Trailers-only: HTTP 200, the outcome in grpc-status, no body."""
    async def slow(request, body):
        await trio.sleep(3)
        return Reply(200, [(b"content-type", b"application/grpc")], b"")

    origin = await start_origin(slow)
    cfg = config(origin.address, listener={"http2": True}, filters=["api_key", "router"],
                 routes=[{"match": {"prefix": "/svc.Open/"}, "cluster": "backend",
                          "filters": {"api_key": {"disabled": True}}},
                         {"match": {"prefix": "/svc.Locked/"}, "cluster": "backend"},
                         {"match": {"prefix": "/svc.Gone/"}, "direct_response": {"status": 503}}],
                 filter_settings={"api_key": {"keys": {"k": hashlib.sha256(b"secret").hexdigest()}}})
    async with serve(cfg, plugins=[*PLUGINS, "auth"]) as proxy:
        base = f"http://127.0.0.1:{proxy.address[1]}"
        async with httpx.AsyncClient(http1=False, http2=True, base_url=base, timeout=10) as client:
            answers = {}
            key = {"x-api-key": "secret"}
            for path, extra in [("/nowhere/Call", key), ("/svc.Locked/Call", {}),
                                ("/svc.Open/Call", {"grpc-timeout": "200m"}), ("/svc.Gone/Call", key)]:
                start = trio.current_time()
                r = await client.post(path, content=b"\x00\x00\x00\x00\x00", headers={**GRPC, **extra})
                answers[path] = (r.status_code, r.headers.get("content-type"), r.headers.get("grpc-status"),
                                 r.content, trio.current_time() - start)
    assert {p: a[:4] for p, a in answers.items()} == {
        "/nowhere/Call": (200, "application/grpc", "12", b""),  # no route: UNIMPLEMENTED
        "/svc.Locked/Call": (200, "application/grpc", "16", b""),  # no key: UNAUTHENTICATED
        "/svc.Open/Call": (200, "application/grpc", "4", b""),  # DEADLINE_EXCEEDED
        "/svc.Gone/Call": (200, "application/grpc", "14", b""),  # UNAVAILABLE
    }
    assert answers["/svc.Open/Call"][4] < 1.5  # grpc-timeout, not the 30 s response timeout


async def test_a_local_reply_to_a_plain_request_stays_http(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"http2": True},
                 routes=[{"match": {"prefix": "/only"}, "cluster": "backend"}])
    async with serve(cfg, plugins=PLUGINS) as proxy:
        base = f"http://127.0.0.1:{proxy.address[1]}"
        async with httpx.AsyncClient(http1=False, http2=True, base_url=base) as client:
            r = await client.post("/x", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 404 and "grpc-status" not in r.headers and r.text == "no route\n"


async def test_an_idle_h2_connection_gives_its_slot_up_at_the_limit(start_origin):
    """As an idle HTTP/1.1 one does: a new client is served, not refused."""
    origin = await start_origin()
    async with serve(h2_config(origin, limits={"max_connections": 2}), plugins=PLUGINS) as proxy:
        idle = []
        for _ in range(2):
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            conn.initiate_connection()
            stream = await trio.open_tcp_stream(*proxy.address)
            await stream.send_all(conn.data_to_send())
            conn.receive_data(await stream.receive_some(65536))  # its SETTINGS: it is served
            idle.append(stream)
            await trio.sleep(0.05)
        done = await _curl("--http2-prior-knowledge", "-w", "%{http_code}", "-o", "/dev/null",
                           f"http://127.0.0.1:{proxy.address[1]}/fresh")
        with trio.fail_after(5):  # the longest idle one was told GOAWAY and closed
            received = b""
            while chunk := await idle[0].receive_some(65536):
                received += chunk
        for stream in idle:
            await stream.aclose()
    assert done.stdout == b"200", done.stderr
    assert any(isinstance(f, GoAwayFrame) for f in _frames(received))
