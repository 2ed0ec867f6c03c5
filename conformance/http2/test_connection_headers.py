"""Connection-specific fields (RFC 9113 8.2.2): a request that carries one is malformed;
what an HTTP/1.1 upstream answers with is never sent on as HTTP/2.
"""

import pytest

from ..h2client import fetch, request_fields
from ..recorder import respond
from .checks import assert_malformed


@pytest.mark.parametrize(
    "field",
    [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("te", "gzip"),
    ],
    ids=lambda f: f[0] if isinstance(f, tuple) else f,
)
@pytest.mark.quirk("nginx", "drops the field and forwards the request")
def test_a_request_with_a_connection_specific_field_is_malformed(client, recorder, field):
    stream_id = client.request(f"/app/{field[0]}", extra=(field,))
    assert_malformed(client, stream_id, recorder)


def test_te_trailers_is_allowed(client, recorder):
    """RFC 9113 8.2.2: TE may be sent, with "trailers" as its only value."""
    stream = client.response(client.request("/app/te", extra=(("te", "trailers"),)))
    assert stream.status == 200, client.describe()


@pytest.mark.quirk("nginx", "sends on a field the upstream's Connection names (X-Private)")
def test_connection_fields_of_the_upstream_answer_are_not_sent_on(h2, recorder):
    """RFC 9113 8.2.2: an intermediary removes them when it converts an HTTP/1.1 answer,
    with those the Connection field names (RFC 9110 7.6.1); the h2 library refuses any of
    the fixed ones that come through."""
    recorder.queue(respond(
        headers=(("Connection", "x-private"), ("X-Private", "1"), ("Keep-Alive", "timeout=5"),
                 ("Upgrade", "h2c"), ("Proxy-Connection", "keep-alive")),
        body=b"hello",
        framing="chunked",
    ))
    [answer] = fetch(h2, request_fields("/app/conn"))
    assert (answer.status, answer.body) == (200, b"hello"), answer
    names = {n for n, _ in answer.headers}
    assert not names & {"connection", "keep-alive", "upgrade", "proxy-connection",
                        "transfer-encoding", "x-private"}, answer.headers
