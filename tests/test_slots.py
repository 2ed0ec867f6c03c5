"""Connection slots: silent clients cannot lock others out, the longest waiting
connection gives its slot up at the limit, busy ones never do, and nothing of a
closed connection stays behind. Real sockets, bounded counts."""

from __future__ import annotations

import resource
import socket
import ssl

import pytest
import trio
from structlog.testing import capture_logs

from sluice.edge.slots import RESERVED_FDS, connection_budget
from sluice.testing import serve

from .conftest import config
from .origin import Reply
from .test_tls import ca, cert_files  # noqa: F401 - fixtures

PLUGINS = ["router", "balancer"]
GET = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"


def closed_by_peer(stream: trio.SocketStream) -> bool:
    """The proxy closed this client's connection (peeked, nothing read)."""
    sock = socket.socket(fileno=stream.socket.fileno())
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.detach()


async def get(stream: trio.abc.Stream) -> bytes:
    """One keep-alive request on ``stream``; its response head and body (echo: "/")."""
    await stream.send_all(GET)
    received = b""
    with trio.fail_after(5):
        while not received.endswith(b"\r\n\r\n/"):
            chunk = await stream.receive_some(65536)
            assert chunk, received
            received += chunk
    return received


async def connections(address, n: int, then=None) -> list[trio.SocketStream]:
    """``n`` connections opened one after another, each given to ``then``
    (if any) before the next opens; silent ones without it."""
    streams = []
    for _ in range(n):
        stream = await trio.open_tcp_stream(*address)
        if then is not None:
            await then(stream)
        streams.append(stream)
    return streams


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def close_all(streams) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def test_a_request_is_served_at_once_while_2000_silent_connections_are_held(start_origin):
    """The review's slot exhaustion: 1,030 silent connections used to lock every
    other client out for 60 s. With the default config they cost nothing."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4 * 2000 + RESERVED_FDS:
        pytest.skip("the descriptor limit is too low to hold both ends of 2000 connections")
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        silent = await connections(proxy.address, 2000)
        try:
            await until(lambda: listener.active == 2000)
            start = trio.current_time()
            stream = await trio.open_tcp_stream(*proxy.address)
            async with stream:
                assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
            assert trio.current_time() - start < 1.0
        finally:
            await close_all(silent)


async def test_a_silent_connection_waits_header_read_not_idle(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"timeouts": {"header_read": 0.3, "idle": 60}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(3):
                assert await stream.receive_some(4096) == b""  # closed, nothing said
            assert 0.25 <= trio.current_time() - start < 2
        await until(lambda: listener.active == 0)


async def test_at_the_limit_the_longest_waiting_connections_give_their_slots_up(start_origin):
    """Keep-alive connections between requests and fresh ones that sent nothing
    are evicted oldest first; new clients are served."""
    origin = await start_origin()
    cfg = config(origin.address, listener={"limits": {"max_connections": 50}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        kept = await connections(proxy.address, 30, get)  # served, now waiting for a next request
        silent = await connections(proxy.address, 20)
        await until(lambda: len(listener.slots.idle) == 50)  # all 50 wait for a request
        new = []
        try:
            for i in range(35):
                stream = await trio.open_tcp_stream(*proxy.address)
                new.append(stream)
                assert (await get(stream)).startswith(b"HTTP/1.1 200 "), i
            # 35 slots came from the 30 keep-alive connections, then the 5
            # oldest silent ones, in that order; the rest are untouched.
            await until(lambda: all(closed_by_peer(s) for s in kept + silent[:5]))
            assert not any(closed_by_peer(s) for s in silent[5:] + new)
            assert listener.active == 50
            assert listener.slots.counts["evicted"] == 35 and listener.slots.counts["refused"] == 0
            assert (await get(new[0])).startswith(b"HTTP/1.1 200 ")  # the newcomers stay served
        finally:
            await close_all(kept + silent + new)


async def test_a_connection_with_a_request_in_flight_is_never_evicted(start_origin):
    release = trio.Event()

    async def slow(request, body):
        await release.wait()
        return Reply(200, [], b"done")

    origin = await start_origin(slow)
    cfg = config(origin.address, listener={"limits": {"max_connections": 3}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        listener = proxy.app.listeners[0]
        busy = await connections(proxy.address, 3, lambda stream: stream.send_all(GET))
        await until(lambda: len(origin.requests) == 3)
        refused = await trio.open_tcp_stream(*proxy.address)
        async with refused:
            with trio.fail_after(5):
                answer = await refused.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"connection: close" in answer.lower()
        assert listener.slots.counts["refused"] == 1 and listener.slots.counts["evicted"] == 0
        release.set()
        for stream in busy:
            with trio.fail_after(5):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
        await close_all(busy)


async def test_nothing_of_a_closed_connection_stays_behind(start_origin):
    """Bookkeeping, not RSS: after connections of every kind closed, the
    listener's and the watchdog's tables are empty."""
    origin = await start_origin()
    cfg = config(origin.address, listener={"limits": {"max_connections": 20},
                                           "timeouts": {"lingering_timeout": 0.2}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        listener, watchdog = proxy.app.listeners[0], proxy.app.watchdog
        streams = await connections(proxy.address, 15, get)
        streams += await connections(proxy.address, 10)  # 5 of the kept ones evicted
        bad = await trio.open_tcp_stream(*proxy.address)
        await bad.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n")
        with trio.fail_after(5):
            assert (await bad.receive_some(4096)).startswith(b"HTTP/1.1 400 ")  # then it lingers
        streams.append(bad)
        assert listener.slots.counts["evicted"] == 6
        await close_all(streams)
        await until(lambda: listener.active == 0)
        await trio.sleep(0.2)  # a watchdog tick or two
        assert listener.slots.idle == {} and listener._downstreams == set()
        assert all(watchdog._buckets.values()), "an emptied deadline bucket was kept"
        assert not watchdog._watched


def test_the_default_limit_leaves_room_for_upstreams_and_pools():
    assert connection_budget(20000, 1, 64) == (20000 - RESERVED_FDS - 64) // 2
    assert connection_budget(20000, 2, 64) == (20000 - RESERVED_FDS - 64) // 4
    assert connection_budget(256, 1, 1000) == 16  # never nothing at all


async def test_startup_raises_the_fd_limit_and_sizes_listeners_from_it(start_origin):
    origin = await start_origin()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    try:
        cfg = config(origin.address, cluster={"max_idle": 10})
        cfg["listeners"].append({"address": "127.0.0.1:0", "filters": ["router"],
                                 "limits": {"max_connections": 10 * hard}})
        with capture_logs() as logs:
            async with serve(cfg, plugins=PLUGINS) as proxy:
                now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                derived, explicit = (lst.slots.limit for lst in proxy.app.listeners)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert now == hard
    assert derived == connection_budget(hard, 2, 10) and explicit == 10 * hard
    events = {e["event"] for e in logs}
    assert any(e.startswith("max_connections is more than") for e in events), events
    assert any(e.startswith("file descriptor limit") for e in events), events


async def test_tls_connections_give_their_slots_up_too(start_origin, cert_files):  # noqa: F811
    """Before its handshake (nothing sent yet) and between requests alike."""
    origin = await start_origin()
    cert, key, ca_path = cert_files
    cfg = config(origin.address, listener={"tls": {"cert": str(cert), "key": str(key)},
                                           "limits": {"max_connections": 2}})
    client_tls = ssl.create_default_context(cafile=str(ca_path))

    async with serve(cfg, plugins=[*PLUGINS, "tls"]) as proxy:
        listener = proxy.app.listeners[0]
        silent = await trio.open_tcp_stream(*proxy.address)  # not even a ClientHello
        kept = trio.SSLStream(await trio.open_tcp_stream(*proxy.address), client_tls,
                              server_hostname="localhost", https_compatible=True)
        assert (await get(kept)).startswith(b"HTTP/1.1 200 ")
        await until(lambda: len(listener.slots.idle) == 2)
        newcomers = []
        for _ in range(2):  # each takes the slot of the longest waiting: silent, then kept
            newcomer = trio.SSLStream(await trio.open_tcp_stream(*proxy.address), client_tls,
                                      server_hostname="localhost", https_compatible=True)
            newcomers.append(newcomer.transport_stream)
            assert (await get(newcomer)).startswith(b"HTTP/1.1 200 ")
        await until(lambda: closed_by_peer(silent))
        with trio.fail_after(5):
            assert await kept.receive_some(65536) == b""  # evicted: closed
        assert listener.slots.counts["evicted"] == 2
        await close_all([silent, kept.transport_stream, *newcomers])
