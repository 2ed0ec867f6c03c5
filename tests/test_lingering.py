"""Lingering close: an answer sent while the client is still sending reaches it,
within bounds, and a normal close does not linger. Real sockets; the client's
send buffer is kept small so the proxy really has to read what it is sent."""

from __future__ import annotations

import socket
import ssl

import trio

from sluice.testing import serve

from .conftest import config, read_until_closed
from .test_slots import until
from .test_tls import ca, cert_files  # noqa: F401 - fixtures

PLUGINS = ["router", "balancer", "tls"]
HUGE_HEAD = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"b" * (1 << 20) + b"\r\n\r\n"


async def connect(address, tls: ssl.SSLContext | None = None) -> trio.abc.Stream:
    stream = await trio.open_tcp_stream(*address)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    if tls is None:
        return stream
    wrapped = trio.SSLStream(stream, tls, server_hostname="localhost", https_compatible=True)
    await wrapped.do_handshake()
    return wrapped


async def send_then_read(stream: trio.abc.Stream, data: bytes) -> bytes:
    """What most clients do: send the whole request, only then read the answer."""
    async with stream:
        with trio.fail_after(10):
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError as exc:
                raise AssertionError(f"the proxy reset the connection under its answer: {exc!r}") from None
        return await read_until_closed(stream)


def codec_config(origin, codec, **listener):
    return config(origin.address, listener=listener, server={"http1_codec": codec.name})


async def test_a_431_reaches_a_client_still_sending_a_huge_head(start_origin, codec):
    origin = await start_origin()
    async with serve(codec_config(origin, codec), plugins=PLUGINS) as proxy:
        answer = await send_then_read(await connect(proxy.address), HUGE_HEAD)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


async def test_a_413_reaches_a_client_still_sending_a_huge_body(start_origin, codec):
    origin = await start_origin()
    cfg = codec_config(origin, codec, limits={"max_body_bytes": 1000})
    body = b"u" * (4 << 20)
    async with serve(cfg, plugins=PLUGINS) as proxy:
        answer = await send_then_read(
            await connect(proxy.address),
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % len(body) + body,
        )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert origin.requests == []


async def test_a_431_reaches_a_tls_client_still_sending(start_origin, cert_files):  # noqa: F811
    origin = await start_origin()
    cert, key, ca_path = cert_files
    cfg = config(origin.address, listener={"tls": {"cert": str(cert), "key": str(key)}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        client_tls = ssl.create_default_context(cafile=str(ca_path))
        answer = await send_then_read(await connect(proxy.address, client_tls), HUGE_HEAD)
        await until(lambda: proxy.app.listeners[0].active == 0)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


async def test_lingering_ends_when_the_client_goes_quiet(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"timeouts": {"lingering_timeout": 0.3}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n")
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 400 ")  # FIN at once
            start = trio.current_time()
            assert listener.active == 1  # lingering, reading what we might still send
            await until(lambda: listener.active == 0)
            assert 0.1 < trio.current_time() - start < 2  # the 0.3 s began before the read


async def test_lingering_ends_after_lingering_time_whatever_the_client_does(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"timeouts": {"lingering_time": 0.5, "lingering_timeout": 10}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n")
            start = trio.current_time()
            with trio.move_on_after(3):
                while listener.active:  # a client that never stops sending
                    await stream.send_all(b"x" * 1024)
                    await trio.sleep(0.02)
            assert listener.active == 0
            assert 0.45 < trio.current_time() - start < 2


async def test_a_normal_close_does_not_linger(start_origin):
    """Nothing unread (the request said Connection: close): the connection
    closes as soon as the answer is out, even if the client stays."""
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            assert (await read_until_closed(stream, timeout=1)).startswith(b"HTTP/1.1 200 ")
            await until(lambda: listener.active == 0, timeout=0.5)  # lingering_timeout is 5 s


async def test_a_lingering_connection_gives_its_slot_up(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"limits": {"max_connections": 1}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        lingering = await connect(proxy.address)
        async with lingering:
            await lingering.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n")
            assert (await read_until_closed(lingering)).startswith(b"HTTP/1.1 400 ")
            assert proxy.app.listeners[0].active == 1
            newcomer = await connect(proxy.address)
            async with newcomer:
                await newcomer.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
                assert (await read_until_closed(newcomer)).startswith(b"HTTP/1.1 200 ")
        assert proxy.app.listeners[0].slots.counts["evicted"] == 1
