"""Trailer sections through the proxy: the head rules hold for them too, and
the fields a trailer may not carry (RFC 9110 6.5.1) are dropped both ways.

Real loopback sockets, both codecs; the upstream is raw so the test sees the
exact bytes sluice forwards.
"""

from __future__ import annotations

import pytest
import trio

from sluice.testing import serve

from .conftest import config, raw_request

pytestmark = pytest.mark.trio

SMUGGLED = [
    (b"Host", b"evil.test"),
    (b"Authorization", b"Bearer stolen"),
    (b"X-Forwarded-For", b"10.0.0.1"),
    (b"Cookie", b"session=x"),
    (b"Content-Type", b"text/evil"),
    (b"Connection", b"close"),
]


def _trailer_block(fields) -> bytes:
    return b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"


class Upstream:
    """Records the bytes of one request (up to the end of its trailers) and
    answers with a chunked body and the given trailers."""

    def __init__(self, trailers=()) -> None:
        self.received = b""
        self.trailers = list(trailers)

    async def __call__(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            while not self.received.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in self.received:
                data = await stream.receive_some(65536)
                if not data:
                    return
                self.received += data
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                + _trailer_block(self.trailers)
            )


async def test_request_trailers_lose_the_fields_trailers_may_not_carry(start_origin, codec):
    upstream = Upstream()
    origin = await start_origin(raw=upstream)
    async with serve(config(origin.address, server={"http1_codec": codec.name})) as proxy:
        data = await raw_request(
            proxy.address,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n0\r\n" + _trailer_block([(b"X-Checksum", b"42"), *SMUGGLED]),
        )
    assert data.startswith(b"HTTP/1.1 200 "), data
    head, _, body = upstream.received.partition(b"\r\n\r\n")
    trailers = body.partition(b"\r\n0\r\n")[2].lower()
    assert trailers == b"x-checksum: 42\r\n\r\n", upstream.received
    assert b"evil.test" not in upstream.received and b"stolen" not in upstream.received


async def test_response_trailers_lose_the_fields_trailers_may_not_carry(start_origin, codec):
    upstream = Upstream([(b"grpc-status", b"0"), (b"Set-Cookie", b"admin=1"), (b"Location", b"/x")])
    origin = await start_origin(raw=upstream)
    async with serve(config(origin.address, server={"http1_codec": codec.name})) as proxy:
        data = await raw_request(
            proxy.address,
            b"POST / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n0\r\n\r\n",
        )
    assert data.startswith(b"HTTP/1.1 200 "), data
    trailers = data.partition(b"\r\n0\r\n")[2].lower()
    assert trailers == b"grpc-status: 0\r\n\r\n", data


@pytest.mark.parametrize(
    ("trailers", "status"),
    [
        pytest.param(b"".join(b"X-%d: y\r\n" % i for i in range(3001)) + b"\r\n", 431, id="3001-fields"),
        pytest.param(b"X: " + b"y" * 40000 + b"\r\n\r\n", 431, id="over-the-head-limit"),
        pytest.param(b"X: a\r\n b\r\n\r\n", 400, id="obs-fold"),
        pytest.param(b"X: a\nY: b\r\n\r\n", 400, id="bare-lf"),
        pytest.param(b"Content-Length: 5\r\n\r\n", 400, id="content-length"),
    ],
)
async def test_request_trailers_are_held_to_the_head_rules(start_origin, codec, trailers, status):
    upstream = Upstream()
    origin = await start_origin(raw=upstream)
    async with serve(config(origin.address, server={"http1_codec": codec.name})) as proxy:
        data = await raw_request(
            proxy.address,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n" + trailers,
        )
    assert data.startswith(b"HTTP/1.1 %d " % status), data
    assert b"\r\n0\r\n" not in upstream.received  # the body never ended upstream: nothing half-forwarded
