"""HTTP/1.1 proxying over real sockets: keep-alive both sides, the upstream
pool (reuse, idle expiry, stale connections and the one safe retry), and the
error rows of DESIGN.md the conformance suite cannot provoke from outside."""

from __future__ import annotations

import h11
import httpx
import trio

from sluice import CONTINUE, Filter
from sluice.testing import serve

from .conftest import InProcess, config, raw_request, read_until_closed
from .origin import Reply

PLUGINS = ["router", "balancer"]


async def test_downstream_keep_alive_serves_many_requests_on_one_connection(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        raw = await raw_request(
            proxy.address,
            b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nhost: a\r\n\r\n"  # pipelined
            b"GET /3 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert raw.endswith(b"/3")  # answered in order, then closed as asked


async def test_upstream_connections_are_reused(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for i in range(5):
                assert (await client.get(f"{proxy.url}/{i}")).status_code == 200
    assert origin.connections == 1
    assert len(origin.requests) == 5


async def test_idle_upstream_connections_expire(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, cluster={"idle_timeout": 0.2})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/a")
            await trio.sleep(0.4)
            await client.get(proxy.url + "/b")
    assert origin.connections == 2


async def test_max_idle_bounds_the_pool(start_origin):
    async def slowish(request, body):
        await trio.sleep(0.1)
        return Reply()

    origin = await start_origin(slowish)
    cfg = config(origin.address, cluster={"max_idle": 1})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with trio.open_nursery() as nursery:  # three at once: three connections
            for i in range(3):
                nursery.start_soon(httpx.AsyncClient().get, f"{proxy.url}/{i}")
        async with httpx.AsyncClient() as client:  # then one at a time: the one kept
            for i in range(3):
                await client.get(f"{proxy.url}/again{i}")
    assert origin.connections == 3


async def test_upstream_closed_idle_connection_is_not_used(start_origin):
    async def close_after(request, body):
        return Reply(close=True)  # closes without saying Connection: close

    origin = await start_origin(close_after)
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for i in range(3):
                await trio.sleep(0.05)  # let the close arrive: the pool must notice it
                assert (await client.get(f"{proxy.url}/{i}")).status_code == 200
    assert origin.connections == 3


def _drop_second_request_on_each_connection():
    """An upstream that answers once per connection, then closes on the next request
    without a byte: the race of a keep-alive close against a reused connection."""

    async def raw(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        served = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.EndOfMessage):
                if served:
                    return  # close in silence
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")])))
                await stream.send_all(conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
                served = True

    return raw


async def test_idempotent_request_is_retried_once_on_a_fresh_connection(start_origin):
    origin = await start_origin(raw=_drop_second_request_on_each_connection())
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            first = await client.get(proxy.url + "/")
            second = await client.get(proxy.url + "/")  # reused connection dies: retried
    assert (first.status_code, second.status_code) == (200, 200)
    assert origin.connections == 2


async def test_non_idempotent_request_is_not_replayed(start_origin):
    origin = await start_origin(raw=_drop_second_request_on_each_connection())
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/")
            r = await client.post(proxy.url + "/", content=b"once")
    assert r.status_code == 502
    assert origin.connections == 1


async def test_no_healthy_endpoint_is_503(start_origin):
    """With panic mode off: by default (panic_threshold 50) a cluster with
    no endpoint available tries them all (tests/test_health.py)."""
    origin = await start_origin()
    async with serve(config(origin.address, cluster={"panic_threshold": 0}), plugins=PLUGINS) as proxy:
        for endpoint in proxy.app.clusters["backend"].endpoints:
            endpoint.healthy = False
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 503
    assert origin.requests == []


async def test_request_body_over_the_limit_is_413_even_when_chunked(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"limits": {"max_body_bytes": 1000}})

    async def body():
        for _ in range(10):
            yield b"x" * 500

    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/", content=body())
    assert r.status_code == 413
    assert all(len(b) <= 1000 for _, b in origin.requests)


async def test_client_stalling_mid_body_gets_408(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, listener={"timeouts": {"idle": 0.3}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        with trio.fail_after(5):
            raw = await raw_request(proxy.address, b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc")
    assert raw.startswith(b"HTTP/1.1 408 ")


async def test_upstream_stalling_mid_body_cuts_the_client(start_origin):
    async def stall(request, body):
        async def chunks():
            yield b"partial"
            await trio.sleep(30)

        return Reply(200, [(b"content-length", b"100")], chunks())

    origin = await start_origin(stall)
    cfg = config(origin.address, cluster={"response_timeout": 0.3})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        with trio.fail_after(5):
            raw = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"partial")  # cut short: the client can tell by Content-Length


async def test_upstream_1xx_is_relayed_and_expect_continue_answered(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n"
                b"connection: close\r\n\r\n"
            )
            with trio.fail_after(5):
                interim = await stream.receive_some(1024)
            assert interim in (b"HTTP/1.1 100 \r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n")
            await stream.send_all(b"hello")
            final = await read_until_closed(stream)
    assert final.startswith(b"HTTP/1.1 200 ") and final.endswith(b"hello")
    assert origin.requests[0][1] == b"hello"
    assert b"expect" not in [n for n, _ in origin.requests[0][0].headers]


async def test_error_bodies_never_echo_what_the_client_sent(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        bad_head = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00<script>\r\n\r\n")
        bad_chunk = await raw_request(
            proxy.address,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz<script>\r\n",
        )
    for raw in (bad_head, bad_chunk):
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert raw.endswith(b"\r\n\r\nbad request\n")
        assert b"<script>" not in raw and b"via" not in raw.lower()


async def test_trusted_forwarding_appends_to_what_the_previous_proxy_said(start_origin):
    origin = await start_origin()
    forwarded = b"x-forwarded-for: 203.0.113.7\r\nx-forwarded-proto: https\r\nx-forwarded-host: shop.test\r\n"
    for trusted, expected in (
        (True, {b"x-forwarded-for": b"203.0.113.7, 127.0.0.1", b"x-forwarded-proto": b"https",
                b"x-forwarded-host": b"shop.test"}),
        (False, {b"x-forwarded-for": b"127.0.0.1", b"x-forwarded-proto": b"http",
                 b"x-forwarded-host": b"a"}),
    ):
        cfg = config(origin.address, listener={"trust_forwarded": trusted})
        async with serve(cfg, plugins=PLUGINS) as proxy:
            await raw_request(proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n" + forwarded + b"\r\n")
        seen = dict(origin.requests[-1][0].headers)
        assert {k: seen[k] for k in expected} == expected, trusted


async def test_an_upstream_answering_before_the_upload_ends_is_relayed(start_origin):
    async def refuse_early(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n")
        await trio.sleep(0.5)  # keep the socket open a little, unread, like a real server

    origin = await start_origin(raw=refuse_early)
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 10000000\r\n\r\n" + b"x" * 65536)
            received = b""
            with trio.fail_after(5):
                while b"too big\n" not in received:
                    chunk = await stream.receive_some(65536)
                    assert chunk, received
                    received += chunk
    assert received.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in received.lower()  # the rest of the upload is not read


async def test_response_trailers_reach_a_filter_and_the_client(start_origin):
    async def with_trailers(request, body):
        async def chunks():
            yield b"part one, "
            yield b"part two"

        return Reply(200, [(b"trailer", b"x-checksum")], chunks(), trailers=[(b"x-checksum", b"42")])

    origin = await start_origin(with_trailers)
    seen = []

    class Trailers(Filter):
        name = "trailers"

        async def on_response_trailers(self, ctx, trailers):
            seen.append(trailers.get("x-checksum"))
            return CONTINUE

    async with serve(config(origin.address, filters=["trailers", "router"]),
                     plugins=PLUGINS, extra={"rec": InProcess(Trailers)}) as proxy:
        raw = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\nte: trailers\r\nconnection: close\r\n\r\n")
    assert seen == ["42"]
    assert b"transfer-encoding: chunked" in raw.lower()
    assert raw.endswith(b"0\r\nx-checksum: 42\r\n\r\n")
    assert b"part one, " in raw and b"part two" in raw


async def test_local_replies_follow_head_204_and_304_rules():
    routes = [
        {"match": {"path": "/direct"}, "direct_response": {"status": 200, "body": "direct\n"}},
        {"match": {"path": "/empty"}, "direct_response": {"status": 204, "body": "ignored"}},
    ]
    async with serve(config("127.0.0.1:9", routes=routes), plugins=PLUGINS) as proxy:
        raw = await raw_request(
            proxy.address,
            b"HEAD /direct HTTP/1.1\r\nhost: a\r\n\r\n"  # the GET's length, no body
            b"HEAD /missing HTTP/1.1\r\nhost: a\r\n\r\n"  # a 404 answered by sluice, no body
            b"GET /empty HTTP/1.1\r\nhost: a\r\n\r\n"  # 204: neither body nor length
            b"GET /direct HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",  # still in sync
        )
    responses = raw.split(b"HTTP/1.1 ")[1:]
    assert [r.split(b" ", 1)[0] for r in responses] == [b"200", b"404", b"204", b"200"]
    head_ok, head_missing, empty, get = responses
    assert b"content-length: 7\r\n" in head_ok and head_ok.endswith(b"\r\n\r\n")
    assert head_missing.endswith(b"\r\n\r\n")
    assert b"content-length" not in empty.lower() and empty.endswith(b"\r\n\r\n")
    assert get.endswith(b"\r\n\r\ndirect\n")


async def test_ipv6_loopback_on_both_sides(nursery):
    import pytest

    from .origin import Origin

    try:
        listeners = await trio.open_tcp_listeners(0, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = listeners[0].socket.getsockname()[1]
    origin = Origin()
    nursery.start_soon(trio.serve_listeners, origin._connection, listeners)
    cfg = config(f"[::1]:{port}", listener={"address": "[::1]:0"})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        assert proxy.app.clusters["backend"].endpoints[0].address == f"[::1]:{port}"
        assert proxy.url.startswith("http://[::1]:")
        raw = await raw_request(proxy.address, b"GET /six HTTP/1.1\r\nhost: [::1]\r\nconnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"/six")
    assert dict(origin.requests[0][0].headers)[b"x-forwarded-for"] == b"::1"


async def test_the_reaper_closes_expired_connections_while_traffic_continues(start_origin):
    origins = [await start_origin() for _ in range(3)]
    cfg = config(*(o.address for o in origins), cluster={"idle_timeout": 0.3})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        pool = proxy.app.pool
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                await client.get(proxy.url + "/")
            assert sum(len(q) for q in pool._idle.values()) == 3
            with trio.fail_after(5):  # the reaper (every second) closes them, the worker lives on
                while sum(len(q) for q in pool._idle.values()):
                    await trio.sleep(0.1)
            assert (await client.get(proxy.url + "/")).status_code == 200
