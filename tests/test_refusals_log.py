"""What the core refuses before it becomes a request still reaches the access log,
with a flag that says why, and the method and path when the head got that far;
a connection that never sent anything does not. On both codecs."""

from __future__ import annotations

import ssl

import trio

from sluice.testing import serve

from .conftest import config, raw_request
from .origin import Reply
from .test_access_log import read_lines
from .test_lingering import HUGE_HEAD
from .test_tls import ca, cert_files  # noqa: F401 - fixtures

PLUGINS = ["router", "balancer", "access_log", "tls"]


def logged(origin_address: str, log, codec, listener: dict | None = None) -> dict:
    return config(origin_address, filters=["access_log", "router"], listener=listener,
                  server={"http1_codec": codec.name},
                  filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})


def row(entry: dict) -> tuple:
    return entry["method"], entry["path"], entry["status"], entry["flags"], entry["upstream"]


async def test_refused_heads_are_logged_with_their_request_line(start_origin, tmp_path, codec):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    cfg = logged(origin.address, log, codec, {"timeouts": {"header_read": 0.3}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        sent = [
            b"GET /bad HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n",  # 400
            HUGE_HEAD,  # 431
            b"GET /slow HTTP/1.1\r\nhost: a\r\n",  # unfinished: 408
        ]
        for data in sent:
            await raw_request(proxy.address, data)
        entries = await read_lines(log, 3)
    assert [row(e) for e in entries] == [
        ("GET", "/bad", 400, "DPE", None),
        ("GET", "/", 431, "DPE", None),
        (None, None, 408, "DT", None),
    ]
    assert entries[2]["duration_ms"] >= 250  # from the accept to the refusal
    assert all(e["client"] == "127.0.0.1" for e in entries)


async def test_a_tls_hello_on_a_plain_listener_is_closed_at_once_and_logged(start_origin, tmp_path, codec):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    async with serve(logged(origin.address, log, codec), plugins=PLUGINS) as proxy:
        hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                                      server_hostname="localhost")
        try:
            hello.do_handshake()
        except ssl.SSLWantReadError:
            pass
        start = trio.current_time()
        assert await raw_request(proxy.address, outgoing.read()) == b""
        assert trio.current_time() - start < 1  # header_read is 10 s
        entries = await read_lines(log, 1)
    assert [row(e) for e in entries] == [(None, None, None, "TLSP", None)]
    assert proxy.app.listeners[0].slots.counts["tls_on_plain"] == 1


async def test_a_client_refused_for_want_of_a_slot_is_logged(start_origin, tmp_path, codec):
    release = trio.Event()

    async def slow(request, body):
        await release.wait()
        return Reply(200, [], b"done")

    origin = await start_origin(slow)
    log = tmp_path / "access.jsonl"
    async with serve(logged(origin.address, log, codec, {"limits": {"max_connections": 1}}),
                     plugins=PLUGINS) as proxy:
        busy = await trio.open_tcp_stream(*proxy.address)
        async with busy:
            await busy.send_all(b"GET /busy HTTP/1.1\r\nhost: a\r\n\r\n")
            with trio.fail_after(5):
                while not origin.requests:
                    await trio.sleep(0.01)
            refused = await raw_request(proxy.address, b"GET /late HTTP/1.1\r\nhost: a\r\n\r\n")
            release.set()
            with trio.fail_after(5):
                assert (await busy.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
        entries = await read_lines(log, 2)
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert [row(e) for e in entries] == [(None, None, 503, "DO", None),
                                         ("GET", "/busy", 200, None, origin.address)]


async def test_a_silent_connection_is_not_logged(start_origin, tmp_path, codec):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    async with serve(logged(origin.address, log, codec, {"timeouts": {"header_read": 0.2}}),
                     plugins=PLUGINS) as proxy:
        assert await raw_request(proxy.address, b"") == b""  # closed after header_read, unlogged
        await raw_request(proxy.address, b"GET /after HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        await trio.sleep(0.2)  # a few flushes: a line for the silent one would be in by now
        entries = await read_lines(log, 1)
    assert [e["path"] for e in entries] == ["/after"]


async def test_tls_handshake_failures_are_logged(start_origin, tmp_path, cert_files):  # noqa: F811
    origin = await start_origin()
    cert, key, _ = cert_files
    log = tmp_path / "access.jsonl"
    cfg = config(origin.address, filters=["access_log", "router"],
                 listener={"tls": {"cert": str(cert), "key": str(key)}, "timeouts": {"header_read": 0.3}},
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        await raw_request(proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")  # plaintext to TLS
        await raw_request(proxy.address, b"\x16\x03\x01\x02\x00")  # a hello that never ends
        await raw_request(proxy.address, b"")  # a port probe: connects, sends nothing
        entries = await read_lines(log, 2)
    assert [row(e) for e in entries] == [(None, None, None, "DTLS", None), (None, None, None, "DTLS,DT", None)]


async def test_a_request_line_too_long_and_a_body_too_large_are_logged(start_origin, tmp_path, codec):
    """414 (the head's own limit: DPE, like 400 and 431) and 413 (a body
    over ``max_body_bytes``, declared or streamed: the core's local reply, LR)."""
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    cfg = logged(origin.address, log, codec, {"limits": {"max_header_bytes": 4096, "max_body_bytes": 100}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        answers = [
            await raw_request(proxy.address, b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nhost: a\r\n\r\n"),
            await raw_request(proxy.address, b"POST /declared HTTP/1.1\r\nhost: a\r\ncontent-length: 101\r\n\r\n"
                              + b"x" * 101),
            await raw_request(proxy.address, b"POST /streamed HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked"
                              b"\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n"),
        ]
        entries = await read_lines(log, 3)
    assert [a[:13] for a in answers] == [b"HTTP/1.1 414 ", b"HTTP/1.1 413 ", b"HTTP/1.1 413 "]
    assert [row(e) for e in entries] == [
        ("GET", "", 414, "DPE", None),
        ("POST", "/declared", 413, "LR", None),
        ("POST", "/streamed", 413, "LR", origin.address),
    ]
