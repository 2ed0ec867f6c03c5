"""Connection management from the security review (RFC 9112 9): refusals reach a client
that is still sending, connections that should persist do, and a connection that is no HTTP
at all is let go at once.

The lingering-close tests send the whole input before reading anything, as most clients do.
A proxy that answers and closes with the client's bytes still unread makes its kernel reset
the connection (RFC 9112 9.6): the client's send fails, and a client that stops there (curl,
most libraries) never reads the answer; some kernels even discard it. So the proxy must read
and drop the rest for a while before closing. The client's send buffer is kept small so that
the input really has to be read by the proxy, not merely queued by the kernels.
"""

import ssl

import pytest

from .. import targets
from ..checks import answered_on_one_connection, describe
from ..client import RawClient, request
from ..recorder import Reply, respond
from ..wire import PeerClosed

_SEND_BUFFER = 64 * 1024
_AT_ONCE = 1.0


def _sent_then_answered(address, sent: bytes, method: str = "GET"):
    """Sends all of `sent` (from a thread, so a proxy that stops reading cannot hang the
    test), then reads the answer."""
    with RawClient(address, send_buffer=_SEND_BUFFER) as client:
        sending = client.send_in_background(sent)
        how = sending.finish()
        assert how == "sent everything", f"the answer is lost to the client: {how}{describe(sent)}"
        try:
            return client.read_response(method)
        except PeerClosed as exc:
            pytest.fail(f"no answer: {exc}{describe(sent)}")


@pytest.mark.quirk("nginx", "answers 400 to a field line over its 8k buffer, not 431")
def test_431_reaches_a_client_sending_a_huge_head(target, recorder):
    sent = request(headers=(("X-Big", "b" * (1 << 20)),))
    response = _sent_then_answered(target.address, sent)
    assert response.status == 431, describe(sent, response)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_413_reaches_a_client_sending_a_huge_body(target, recorder, framing):
    body = b"u" * (2 << 20)
    if framing == "length":
        sent = request("POST", body=body)
    else:
        chunks = b"".join(b"4000\r\n" + body[i : i + 0x4000] + b"\r\n" for i in range(0, len(body), 0x4000))
        sent = request("POST", headers=(("Transfer-Encoding", "chunked"),)) + chunks + b"0\r\n\r\n"
    response = _sent_then_answered(target.address, sent, "POST")
    assert response.status == 413, describe(sent, response)


def _client_hello() -> bytes:
    """The first flight of a real TLS client: a ClientHello record (b"\\x16\\x03\\x01...")."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="proxy.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_tls_client_hello_on_the_plain_listener_is_closed_at_once(target, recorder):
    """Its first byte cannot start a request line: no need to wait for header_read (408)."""
    hello = _client_hello()
    assert hello.startswith(b"\x16\x03"), hello[:16]
    with RawClient(target.address) as client:
        client.send(hello)
        rest, elapsed = client.wait_closed(targets.HEADER_READ + 2)
    assert elapsed < _AT_ONCE, f"closed after {elapsed:.2f}s{describe(hello)}"
    assert rest == b"" or rest.startswith(b"HTTP/1.1 400 "), rest
    assert recorder.received() == b""


def test_http10_keep_alive_is_honoured(target, recorder):
    """An HTTP/1.0 client asking for keep-alive gets a length-framed response that says
    `Connection: keep-alive`, and the connection serves its next request."""
    sent = request(version="HTTP/1.0", headers=(("Connection", "keep-alive"),))
    for response in answered_on_one_connection(target.address, sent):
        assert response.framing == "length", response.raw_head
        assert "keep-alive" in response.tokens("connection"), response.raw_head
    assert len(recorder.wait_for(2)) == 2


def test_request_behind_an_early_answered_post_is_not_dropped(target, recorder):
    """The upstream answers the POST before reading its body. The GET pipelined behind the
    body is then answered too, or the first answer says `Connection: close`."""
    recorder.queue(Reply(respond(body=b"early").data, early=True))
    sent = request("POST", body=b"p" * 60_000) + request(target="/app/second")
    with RawClient(target.address) as client:
        client.send(sent)
        first = client.read_response("POST")
        assert (first.status, first.body) == (200, b"early"), describe(sent, first)
        if "close" in first.tokens("connection"):
            rest, _ = client.wait_closed()
            assert rest == b"", f"bytes after a response that closes: {rest!r}"
            return
        try:
            second = client.read_response()
        except (PeerClosed, TimeoutError) as exc:
            pytest.fail(f"the pipelined GET was dropped: {exc}\nfirst: {first.raw_head!r}")
        assert (second.status, second.body) == (200, b"ok"), describe(sent, second)
    assert [r.target for r in recorder.wait_for(2)] == ["/app/", "/app/second"]
