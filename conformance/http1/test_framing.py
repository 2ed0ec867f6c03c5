"""Message framing across the proxy (RFC 9112 6 and 7): bodies arrive whole and correctly
delimited in both directions, whatever framing the other side used."""

import pytest

from ..checks import describe, forward
from ..client import RawClient, request
from ..recorder import OK, Reply, respond

BINARY = bytes(range(256)) * 4 + b"\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"
LARGE = bytes(i % 251 for i in range(100_000))

CHUNKED_BODIES = [
    pytest.param(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", id="plain"),
    pytest.param(
        b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\n\r\n", b"hello world", id="extensions"
    ),
    pytest.param(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="upper-hex"),
    pytest.param(b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n", b"hello", id="trailer"),
]


def _assert_in_sync(client: RawClient) -> None:
    """A further request on the same connection gets its own answer (no stray body bytes)."""
    client.send(request())
    response = client.read_response()
    assert (response.status, response.body) == (200, b"ok"), response.raw_head


@pytest.mark.parametrize("body", [b"", b"hello", BINARY], ids=["empty", "short", "binary"])
def test_content_length_body_forwarded_exactly(target, recorder, body):
    sent = request("POST", body=body)
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.body == body, describe(sent)
    if forwarded.has("content-length"):
        assert forwarded.get_all("content-length") == [str(len(body))], forwarded.raw_head


@pytest.mark.quirk("nginx", "sends a chunked body it has read whole with Content-Length")
@pytest.mark.parametrize(("chunked", "decoded"), CHUNKED_BODIES)
def test_chunked_request_body_rechunked(target, recorder, chunked, decoded):
    sent = request("POST", headers=(("Transfer-Encoding", "chunked"),)) + chunked
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.body == decoded, describe(sent)
    assert forwarded.framing == "chunked", forwarded.raw_head
    assert [v.lower() for v in forwarded.get_all("transfer-encoding")] == ["chunked"], (
        forwarded.raw_head
    )
    assert not forwarded.has("content-length"), forwarded.raw_head


@pytest.mark.parametrize("upstream_framing", ["length", "chunked", "close"])
def test_response_body_reframed_for_http11_client(target, recorder, upstream_framing):
    recorder.queue(respond(body=LARGE, framing=upstream_framing))
    _, response = forward(target.address, recorder, request())
    assert response.framing in ("length", "chunked"), response.raw_head
    assert response.body == LARGE


@pytest.mark.parametrize("upstream_framing", ["length", "chunked", "close"])
def test_http10_client_gets_readable_response(target, recorder, upstream_framing):
    recorder.queue(respond(body=LARGE, framing=upstream_framing))
    _, response = forward(target.address, recorder, request(version="HTTP/1.0"))
    assert response.status == 200
    assert response.framing in ("length", "close"), response.raw_head
    assert not response.has("transfer-encoding"), response.raw_head
    assert response.body == LARGE


def test_head_response_keeps_length_without_body(target, recorder):
    recorder.queue(respond(headers=(("Content-Length", "1234"),), body=b"", framing="none"))
    with RawClient(target.address) as client:
        client.send(request("HEAD"))
        response = client.read_response("HEAD")
        assert response.status == 200
        assert response.get_all("content-length") == ["1234"], response.raw_head
        _assert_in_sync(client)


@pytest.mark.parametrize(
    "status",
    [pytest.param("204 No Content", id="204"), pytest.param("304 Not Modified", id="304")],
)
def test_no_body_statuses(target, recorder, status):
    recorder.queue(respond(status, headers=(("ETag", '"v1"'),), body=b"", framing="none"))
    with RawClient(target.address) as client:
        client.send(request())
        response = client.read_response()
        assert response.status == int(status[:3])
        assert not response.has("transfer-encoding"), response.raw_head
        if response.status == 204:
            assert not response.has("content-length"), response.raw_head
        _assert_in_sync(client)


def test_expect_100_continue(target, recorder):
    body = b"hello world"
    with RawClient(target.address) as client:
        head_only = (("Content-Length", str(len(body))), ("Expect", "100-continue"))
        client.send(request("POST", headers=head_only))
        interim = client.read_response(interim=True)
        assert interim.raw_head.startswith(b"HTTP/1.1 100 "), interim.raw_head
        client.send(body)
        response = client.read_response()
    assert response.status == 200
    [forwarded] = recorder.wait_for(1)
    assert forwarded.body == body


@pytest.mark.quirk("nginx", "takes an upstream 100 for the final response, relays the rest raw")
def test_upstream_interim_response_then_final(target, recorder):
    recorder.queue(Reply(b"HTTP/1.1 100 Continue\r\n\r\n" + OK.data))
    with RawClient(target.address) as client:
        client.send(request())
        response = client.read_response()  # the 100 may be relayed or not; skipped here
        assert (response.status, response.body) == (200, b"ok"), response.raw_head
        _assert_in_sync(client)


def test_keep_alive_two_requests(target, recorder):
    with RawClient(target.address) as client:
        _assert_in_sync(client)
        _assert_in_sync(client)
    assert len(recorder.wait_for(2)) == 2
