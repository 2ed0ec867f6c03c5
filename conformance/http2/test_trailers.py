"""Trailers (RFC 9113 8.1): a trailer section is a HEADERS frame with END_STREAM after the
body, without pseudo-header fields. Sent on to an HTTP/1.1 upstream they follow the same
rules as over HTTP/1.1 (`http1/test_trailers.py`): fields that route or authenticate never
reach it.
"""

import pytest

from ..checks import settle
from ..h2client import fetch, request_fields
from ..recorder import Reply, respond
from .checks import assert_usable

_NGINX_REFUSES = pytest.mark.quirk(
    "nginx", "a request trailer section is a connection error (GOAWAY PROTOCOL_ERROR)"
)


@_NGINX_REFUSES
def test_a_request_with_trailers_is_forwarded(client, recorder):
    stream = client.response(client.request(
        "/app/trailers", method="POST", body=b"hello", trailers=[("x-checksum", "abc")]
    ))
    assert stream.status == 200, client.describe()
    [forwarded] = recorder.wait_for(1)
    assert forwarded.body == b"hello"
    assert forwarded.trailers in (None, [], [("x-checksum", "abc")]), forwarded.trailers


@_NGINX_REFUSES
@pytest.mark.parametrize("field", [("host", "evil.test"), ("authorization", "Basic Zm9vOmJhcg==")],
                         ids=lambda f: f[0])
def test_trailers_that_route_or_authenticate_are_not_forwarded(client, recorder, field):
    stream = client.response(client.request(
        "/app/trailers", method="POST", body=b"hello", trailers=[field]
    ))
    settle()
    received = recorder.received().lower()
    assert b"evil.test" not in received and b"zm9vomjhcg==" not in received, received
    assert stream.status == 200 or stream.reset is not None, client.describe()


@pytest.mark.parametrize(
    ("trailers", "end_stream"),
    [
        pytest.param([(":path", "/app/other")], True, id="pseudo-header", marks=_NGINX_REFUSES),
        pytest.param([("x-checksum", "abc")], False, id="without-end-stream", marks=_NGINX_REFUSES),
    ],
)
def test_a_bad_trailer_section_is_malformed(client, recorder, trailers, end_stream):
    """RFC 9113 8.1: trailers carry no pseudo-header fields, and the HEADERS frame that
    carries them ends the stream; otherwise the request is malformed (RST_STREAM
    PROTOCOL_ERROR, or a 400), and the upstream never sees it complete."""
    stream_id = client.request("/app/bad-trailers", method="POST", body=b"hello", end_stream=False)
    client.send(client.headers(stream_id, trailers, end_stream=end_stream))
    stream = client.response(stream_id)
    assert stream.reset is not None or stream.status == 400, client.describe()
    settle()
    assert not [r for r in recorder.requests if r.complete], recorder.requests
    assert_usable(client)


def test_response_trailers_carry_no_pseudo_or_connection_fields(h2, recorder):
    """An upstream's chunked trailers may be sent on as HTTP/2 trailers (the client asked
    with `te: trailers`) or dropped; either way the answer is valid HTTP/2."""
    chunked = respond(body=b"hello", framing="chunked").data
    recorder.queue(Reply(chunked.replace(b"0\r\n\r\n", b"0\r\nX-Checksum: abc\r\n\r\n")))
    [answer] = fetch(h2, request_fields("/app/rt", extra=(("te", "trailers"),)))
    assert (answer.status, answer.body) == (200, b"hello"), answer
    assert answer.trailers in (None, [("x-checksum", "abc")]), answer.trailers
