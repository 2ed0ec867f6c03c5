"""Streams (RFC 9113 5.1, 5.4, 6.4, 8.1): identifiers, states, multiplexing, and how an
error stays on its stream. An upstream that fails gives a 502 on that stream only.
"""

import pytest
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from ..h2client import ErrorCodes, fetch, raw_frame, request_fields
from ..recorder import GARBAGE, HANG, respond
from .checks import assert_connection_error, assert_stream_error, assert_usable
from .test_framing import WINDOW_UPDATE

_NGINX_GOAWAY_NO_ERROR = pytest.mark.quirk(
    "nginx", "closes with GOAWAY NO_ERROR, not PROTOCOL_ERROR, for a frame on an idle stream"
)


def test_concurrent_streams_get_their_own_answers(client, recorder):
    """RFC 9113 5: streams are independent; each answer goes to its own stream."""
    recorder.queue(*(respond(body=b"answer") for _ in range(5)))
    ids = [client.request(f"/app/s{i}") for i in range(5)]
    answers = {i: client.response(i) for i in ids}
    assert all(s.status == 200 and s.body == b"answer" for s in answers.values()), answers
    assert sorted(r.target for r in recorder.wait_for(5)) == [f"/app/s{i}" for i in range(5)]


def test_the_h2_library_finds_nothing_wrong(h2, recorder):
    """The well-behaved path: h2's state machine checks every frame the proxy sends."""
    answers = fetch(h2, request_fields("/app/lib"), count=3)
    assert [a.status for a in answers] == [200, 200, 200], answers


def test_an_even_stream_id_is_a_protocol_error(client, recorder):
    """RFC 9113 5.1.1: streams a client opens have odd identifiers."""
    client.send(client.headers(2, request_fields("/app/even")))
    assert_connection_error(client, ErrorCodes.PROTOCOL_ERROR)
    assert recorder.received() == b""


def test_a_stream_id_lower_than_a_used_one_is_a_protocol_error(client, recorder):
    """RFC 9113 5.1.1: a new stream's identifier is greater than every one opened before."""
    client.send(client.headers(5, request_fields("/app/five")))
    client.response(5)
    client.send(client.headers(3, request_fields("/app/three")))
    assert_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


@_NGINX_GOAWAY_NO_ERROR
def test_data_on_an_idle_stream_is_a_protocol_error(client, recorder):
    """RFC 9113 5.1: only HEADERS and PRIORITY may arrive on an idle stream."""
    client.send(*client.data_frames(1, b"no headers"))
    assert_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


@_NGINX_GOAWAY_NO_ERROR
def test_rst_stream_on_an_idle_stream_is_a_protocol_error(client, recorder):
    """RFC 9113 6.4: RST_STREAM for an idle stream is a connection error PROTOCOL_ERROR."""
    client.send(RstStreamFrame(7, error_code=ErrorCodes.CANCEL))
    assert_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


def test_data_after_end_stream_is_stream_closed(client, recorder):
    """RFC 9113 5.1: a frame other than WINDOW_UPDATE, PRIORITY or RST_STREAM on a half-closed
    (remote) stream is a stream error STREAM_CLOSED (a connection error once closed)."""
    recorder.queue(HANG)
    stream_id = client.request("/app/hang")
    recorder.wait_for(1)
    client.send(*client.data_frames(stream_id, b"late"))
    stream = client.streams[stream_id]
    client.read_until(lambda: stream.reset is not None or client.goaway is not None)
    code = stream.reset if stream.reset is not None else client.goaway.error_code
    assert code == ErrorCodes.STREAM_CLOSED, client.describe()


def test_a_client_reset_leaves_the_connection_usable(client, recorder):
    """RFC 9113 6.4, 8.1: the client may cancel a request; the connection carries on."""
    recorder.queue(HANG)
    stream_id = client.request("/app/cancelled")
    recorder.wait_for(1)
    client.send(RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL))
    assert_usable(client)


@pytest.mark.quirk("nginx", "makes it a connection error (GOAWAY PROTOCOL_ERROR)")
def test_a_window_update_of_0_on_a_stream_is_a_stream_error(client, recorder):
    """RFC 9113 6.9: a WINDOW_UPDATE of 0 on a stream is a stream error PROTOCOL_ERROR."""
    stream_id = client.request("/app/zero", method="POST", end_stream=False)
    client.send(raw_frame(WINDOW_UPDATE, 0, stream_id, b"\x00\x00\x00\x00"))
    assert_stream_error(client, stream_id, ErrorCodes.PROTOCOL_ERROR)


@pytest.mark.quirk(
    "nginx", "relays a non-HTTP answer as HTTP/0.9: `:status 000` and the bytes as the body"
)
def test_an_upstream_that_breaks_http_gives_502_on_that_stream_only(client, recorder):
    """The issue: a broken upstream is a 502 on its stream; the others are answered."""
    recorder.queue(GARBAGE)
    broken = client.request("/app/garbage")
    recorder.wait_for(1, complete=False)
    fine = client.request("/app/fine")
    assert client.response(broken).status == 502, client.describe()
    assert client.response(fine).status == 200, client.describe()
    assert client.goaway is None, client.describe()


@pytest.mark.quirk("nginx", "answers 502 when the upstream refuses (as over HTTP/1.1)")
def test_a_refused_upstream_gives_503_on_that_stream_only(client, recorder):
    """As over HTTP/1.1 (`http1/test_errors.py`): 503 when the upstream refuses."""
    dead = client.request("/dead/x")
    fine = client.request("/app/fine")
    assert client.response(dead).status == 503, client.describe()
    assert client.response(fine).status == 200, client.describe()
    assert client.response(client.request("/nowhere")).status == 404, client.describe()


def test_a_clients_goaway_lets_its_streams_in_flight_finish(client, recorder):
    """RFC 9113 6.8: a GOAWAY stops new streams, and the ones open carry on both ways: the
    body still being sent arrives, and the answer comes back."""
    recorder.queue(respond(body=b"answered after goaway"))
    stream_id = client.request("/app/goaway", method="POST", extra=(("content-length", "4"),),
                               end_stream=False)
    client.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR))
    client.send(*client.data_frames(stream_id, b"body"))
    stream = client.response(stream_id)
    assert stream.status == 200 and stream.body == b"answered after goaway", client.describe()
    assert [r.body for r in recorder.wait_for(1)] == [b"body"]
