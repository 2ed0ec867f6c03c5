"""Answers that come before the request body was read, and bodies that go bad
after the answer: the client gets a whole answer (or a 400), never nothing,
and a request pipelined behind is served or the answer says it will not be.

Real loopback sockets on both sides, on both HTTP/1.1 codecs. The upstream
is raw: it answers as soon as it has a request head, then reads and drops
whatever else comes (so it never stops the proxy from writing).
"""

from __future__ import annotations

import h11
import pytest
import trio

from sluice import CONTINUE, Filter, LocalReply
from sluice.testing import serve

from .conftest import InProcess, config

pytestmark = pytest.mark.trio

DENIED = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\ncontent-type: text/plain\r\n\r\ndenied"


async def _answer_at_once(stream: trio.SocketStream, pause: float = 0) -> None:
    """An upstream that answers 403 to the first head without reading the
    body (its own body ``pause`` seconds after its head), then reads and
    drops whatever else comes."""
    buf = b""
    with trio.move_on_after(10):
        while data := await stream.receive_some(65536):
            if buf is not None:
                buf += data
                if b"\r\n\r\n" in buf:
                    buf = None
                    if pause:
                        head, _, body = DENIED.partition(b"\r\n\r\n")
                        await stream.send_all(head + b"\r\n\r\n")
                        await trio.sleep(pause)
                        await stream.send_all(body)
                    else:
                        await stream.send_all(DENIED)


async def _answer_slowly(stream: trio.SocketStream) -> None:
    await _answer_at_once(stream, pause=0.3)


class DenyUploads(Filter):
    """Answers 401 to a POST from its head, before any of the body is read."""

    name = "deny_uploads"

    async def on_request_headers(self, ctx, request):
        return LocalReply(401, "no\n") if request.method == "POST" else CONTINUE


def _proxy_config(origin, codec, filters=("router",)):
    return config(origin.address, filters=list(filters), server={"http1_codec": codec.name})


def _responses(data: bytes, method: bytes = b"POST") -> list[h11.Response | bytes]:
    """The responses (status, body) in ``data``, as a client reads them; the
    last entry is the bytes after the last complete response."""
    client = h11.Connection(h11.CLIENT)
    out = []
    client.send(h11.Request(method=method, target="/", headers=[("host", "a"), ("content-length", "0")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    status, body = None, b""
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            break
        if type(event) is h11.Response:
            status = event.status_code
        elif type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            out.append((status, body))
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                break
            client.start_next_cycle()
            client.send(h11.Request(method=b"GET", target="/", headers=[("host", "a")]))
            client.send(h11.EndOfMessage())
            status, body = None, b""
        else:
            break
    return out


async def _exchange(address, first: bytes, then: bytes = b"", *, wait_head: bool = True) -> bytes:
    """Send ``first``; once a response head is back (if ``wait_head``), send
    ``then``; return all that came back until the proxy closed."""
    stream = await trio.open_tcp_stream(*address)
    received = bytearray()
    async with stream:
        await stream.send_all(first)
        with trio.fail_after(5):
            if wait_head:
                while b"\r\n\r\n" not in received:
                    chunk = await stream.receive_some(65536)
                    assert chunk, f"closed before any answer: {bytes(received)!r}"
                    received += chunk
            if then:
                try:
                    await stream.send_all(then)
                except trio.BrokenResourceError:
                    pass
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += chunk
    return bytes(received)


CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


@pytest.mark.parametrize(
    "bad_rest",
    [
        pytest.param(b"10000000000000005\r\nhello\r\n0\r\n\r\n", id="chunk-size-over-63-bits"),
        pytest.param(b"00000000000000000000000005\r\nhello\r\n0\r\n\r\n", id="26-digit-chunk-size"),
        pytest.param(b"5;a\rb\r\nhello\r\n0\r\n\r\n", id="cr-in-chunk-extension"),
        pytest.param(b"5\nhello\n0\n\n", id="lf-only-chunk-lines"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="chunk-without-crlf"),
    ],
)
@pytest.mark.parametrize("upstream", [_answer_at_once, _answer_slowly], ids=["whole", "body-later"])
async def test_a_body_malformed_after_an_early_answer_still_gets_that_answer(
        start_origin, codec, bad_rest, upstream):
    """``whole``: the answer is relayed before the bad bytes are read (they
    end the connection after it); ``body-later``: they are read while the
    answer's body is still coming, and must not cut it short."""
    origin = await start_origin(raw=upstream)
    async with serve(_proxy_config(origin, codec)) as proxy:
        data = await _exchange(proxy.address, CHUNKED_HEAD, bad_rest)
    assert _responses(data) == [(403, b"denied")], data


@pytest.mark.parametrize(
    "bad_rest",
    [
        pytest.param(b"10000000000000005\r\nhello\r\n0\r\n\r\n", id="chunk-size-over-63-bits"),
        pytest.param(b"5\nhello\n0\n\n", id="lf-only-chunk-lines"),
    ],
)
async def test_a_body_malformed_before_any_answer_is_400_at_once(start_origin, codec, bad_rest):
    async def never_answers(stream):
        await trio.sleep(10)

    origin = await start_origin(raw=never_answers)
    async with serve(_proxy_config(origin, codec)) as proxy:
        start = trio.current_time()
        data = await _exchange(proxy.address, CHUNKED_HEAD + bad_rest, wait_head=False)
        took = trio.current_time() - start
    assert _responses(data)[:1] == [(400, b"bad request\n")], data
    assert took < 2, f"answered after {took:.1f} s"


async def test_a_request_pipelined_behind_an_early_answer_is_served(start_origin, codec):
    origin = await start_origin(raw=_answer_at_once)
    async with serve(_proxy_config(origin, codec)) as proxy:
        data = await _exchange(
            proxy.address,
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            b"hello" + b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    responses = _responses(data)
    # Both answered (the upstream denies every request), on one connection.
    assert responses == [(403, b"denied"), (403, b"denied")], data
    assert origin.connections == 2  # an upstream connection the POST body never finished is not reused


async def test_an_early_answer_to_a_large_body_says_the_connection_closes(start_origin, codec):
    origin = await start_origin(raw=_answer_at_once)
    async with serve(_proxy_config(origin, codec)) as proxy:
        data = await _exchange(
            proxy.address,
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n",
            b"x" * 65536,
        )
    responses = _responses(data)
    assert responses == [(403, b"denied")], data
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head, data


async def test_a_filter_answer_before_a_small_body_keeps_the_connection(start_origin, codec):
    origin = await start_origin()
    async with serve(_proxy_config(origin, codec, ("deny_uploads", "router")),
                     extra={"t": InProcess(DenyUploads)}) as proxy:
        data = await _exchange(
            proxy.address,
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    assert [r[0] for r in _responses(data)] == [401, 200], data
    assert origin.requests[0][0].target == b"/next"


async def test_a_filter_answer_to_a_client_waiting_for_100_continue_closes(start_origin, codec):
    """It may never send the body, or send it after all: the connection
    cannot tell which bytes come next, so it ends after the answer."""
    origin = await start_origin()
    async with serve(_proxy_config(origin, codec, ("deny_uploads", "router")),
                     extra={"t": InProcess(DenyUploads)}) as proxy:
        data = await _exchange(
            proxy.address,
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
    assert _responses(data) == [(401, b"no\n")], data
    assert b"connection: close" in data.lower() and b"100 continue" not in data.lower(), data
    assert not origin.requests
