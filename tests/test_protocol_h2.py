"""The sans-I/O HTTP/2 server (``sluice.protocol.h2_codec``) against h2's own
client, frame by frame, with no sockets: translation, stream errors, the
limits that keep one client from taking a connection (or the proxy) down."""

from __future__ import annotations

import base64
import hashlib

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from sluice.messages import Headers, Request, Response
from sluice.protocol.events import End, RequestHead, ResponseHead
from sluice.protocol.h2_client import H2Client
from sluice.protocol.h2_codec import (
    Data,
    H2Server,
    Refused,
    StreamReset,
    Terminated,
    WebSocketHead,
    WindowOpen,
    websocket_accept,
)

BASE = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a.test")]
MAX_STREAMS = 10


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def pair(clock=None):
    server = H2Server(max_concurrent_streams=MAX_STREAMS, initial_window=65535, max_header_list_size=16384,
                      max_header_count=20, **({"clock": clock} if clock else {}))
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    client.initiate_connection()
    client.receive_data(server.pending())
    server.feed(client.data_to_send())
    client.receive_data(server.pending())
    return server, client


def frames(data: bytes) -> list:
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def test_a_request_becomes_the_events_the_http1_codecs_make():
    server, client = pair()
    client.send_headers(1, [(b":method", b"POST"), (b":path", b"/a/../b?q"), (b":scheme", b"https"),
                            (b":authority", b"a.test:8443"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
                            (b"content-length", b"5")])
    client.send_data(1, b"hello", end_stream=True)
    (_, head), (_, data), (_, end) = server.feed(client.data_to_send())
    assert type(head) is RequestHead and head.has_body and head.content_length == 5
    request = head.request
    assert (request.method, request.target, request.http_version, request.scheme) == ("POST", "/b?q", "2", "https")
    assert request.headers.raw() == [(b"host", b"a.test:8443"), (b"content-length", b"5"), (b"cookie", b"a=1; b=2")]
    assert data == Data(b"hello", 5) and end == End(None)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ([(b"X-Upper", b"1")], "invalid field name"),
        ([(b"connection", b"close")], "connection-specific"),
        ([(b"transfer-encoding", b"chunked")], "connection-specific"),
        ([(b"te", b"gzip")], "TE other than trailers"),
        ([(b"x", b"a\r\nb")], "invalid value"),
        ([(b"x", b" leading")], "invalid value"),
        ([(b"x", b"trailing\t")], "invalid value"),
        ([(b"caf\xc3\xa9", b"1")], "invalid field name"),  # 0x80-0xff (RFC 9113 8.2.1)
        ([(b"a:b", b"1")], "invalid field name"),
        ([(b"a b", b"1")], "invalid field name"),
        ([(b":foo", b"x")], "pseudo-header"),
    ],
)
def test_a_malformed_request_is_a_stream_error_and_the_connection_goes_on(extra, why):
    server, client = pair()
    client.send_headers(1, BASE + extra, end_stream=True)
    [(sid, refused)] = server.feed(client.data_to_send())
    assert sid == 1 and type(refused) is Refused and refused.status == 0 and why in str(refused.error)
    [reset] = [f for f in frames(server.pending()) if isinstance(f, RstStreamFrame)]
    assert reset.stream_id == 1 and reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    client.send_headers(3, BASE, end_stream=True)
    assert [type(e) for _, e in server.feed(client.data_to_send())] == [RequestHead, End]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")], 400),  # no authority, no Host
        (BASE[:1] + [(b":path", b"/../x")] + BASE[2:], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], 501),
        (BASE + [(b"x-%d" % i, b"v") for i in range(25)], 431),
    ],
)
def test_requests_sluice_refuses_get_a_status_on_their_stream(headers, status):
    server, client = pair()
    client.send_headers(1, headers, end_stream=True)
    [(_, refused)] = server.feed(client.data_to_send())
    assert type(refused) is Refused and refused.status == status


@pytest.mark.parametrize("one_write", [False, True], ids=["a-write-each", "one-write"])
def test_streams_past_the_limit_are_refused_one_by_one(one_write):
    """RFC 9113 5.1.2: REFUSED_STREAM for the streams opened last, and the
    streams allowed go on (nginx and nghttpx drop the whole connection here)."""
    server, client = pair()
    client.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000  # a client ignoring ours
    client.remote_settings.acknowledge()
    heads = []
    for i in range(MAX_STREAMS + 3):
        client.send_headers(1 + 2 * i, BASE, end_stream=False)  # open: bodies still to come
        if not one_write:
            heads += [s for s, e in server.feed(client.data_to_send()) if type(e) is RequestHead]
    if one_write:
        heads = [s for s, e in server.feed(client.data_to_send()) if type(e) is RequestHead]
    assert heads == [1 + 2 * i for i in range(MAX_STREAMS)]
    resets = [f for f in frames(server.pending()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [
        (1 + 2 * i, h2.errors.ErrorCodes.REFUSED_STREAM) for i in range(MAX_STREAMS, MAX_STREAMS + 3)]
    server.respond(1, Response(200, Headers([(b"content-length", b"0")])), end=True)
    assert any(type(e) is h2.events.ResponseReceived for e in client.receive_data(server.pending()))


def test_rapid_reset_ends_the_connection():
    """CVE-2023-44487: streams opened and reset at once, without end."""
    server, client = pair()
    last = []
    for i in range(300):
        sid = 1 + 2 * i
        client.send_headers(sid, BASE, end_stream=True)
        client.reset_stream(sid)
        last = server.feed(client.data_to_send())
        if last and type(last[-1][1]) is Terminated:
            break
    assert type(last[-1][1]) is Terminated and last[-1][1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert any(isinstance(f, GoAwayFrame) and f.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
               for f in frames(server.pending()))


def test_a_client_cancelling_now_and_then_keeps_its_connection():
    server, client = pair()
    for i in range(400):
        sid = 1 + 2 * i
        client.send_headers(sid, BASE, end_stream=True)
        if i % 3 == 0:
            client.reset_stream(sid)
        events = server.feed(client.data_to_send())
        assert not any(type(e) is Terminated for _, e in events)
        reset = {s for s, e in events if type(e) is StreamReset}
        for s, e in events:
            if type(e) is End and s not in reset:
                server.respond(s, Response(204), end=True)
        client.receive_data(server.pending())


def test_a_ping_flood_ends_the_connection_but_a_steady_ping_does_not():
    clock = Clock()
    server, client = pair(clock)
    for i in range(3000):  # 100 a second for 30 s: within the rate
        clock.now = i / 100
        client.ping(b"%08d" % i)
        assert not any(type(e) is Terminated for _, e in server.feed(client.data_to_send()))
    for i in range(1200):  # then a burst
        client.ping(b"%08d" % i)
    events = server.feed(client.data_to_send())
    assert type(events[-1][1]) is Terminated and events[-1][1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_block_past_the_list_size_ends_the_connection():
    """HPACK bombs and CONTINUATION floods both make a header block past
    MAX_HEADER_LIST_SIZE; it cannot be decoded partly, so the connection goes."""
    server, client = pair()
    client.send_headers(1, BASE + [(b"x-big", b"a" * 20000)], end_stream=True)
    [(_, terminated)] = server.feed(client.data_to_send())
    assert type(terminated) is Terminated and terminated.error_code


def test_a_continuation_flood_ends_the_connection():
    """CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION frames without end."""
    server, _ = pair()
    headers = HeadersFrame(1)
    headers.data = b"\x82"  # :method GET, indexed
    data = headers.serialize()
    for _ in range(200):
        continuation = ContinuationFrame(1)
        continuation.data = b"\x00\x01a\x01b"  # literal x: b, again and again
        data += continuation.serialize()
    [(_, terminated)] = server.feed(data)
    assert type(terminated) is Terminated and terminated.error_code


def test_after_a_graceful_goaway_new_streams_are_refused_and_old_ones_answered():
    server, client = pair()
    client.send_headers(1, BASE, end_stream=True)
    server.feed(client.data_to_send())
    server.goaway()
    client.send_headers(3, BASE, end_stream=True)
    assert not any(type(e) is RequestHead for _, e in server.feed(client.data_to_send()))
    server.respond(1, Response(200, Headers([(b"content-length", b"2")])))
    server.send_data(1, b"ok", end=True)
    sent = frames(server.pending())
    goaway = next(f for f in sent if isinstance(f, GoAwayFrame))
    assert goaway.last_stream_id == 1 and goaway.error_code == 0
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 3
               and f.error_code == h2.errors.ErrorCodes.REFUSED_STREAM for f in sent)
    assert sent.index(goaway) < max(i for i, f in enumerate(sent) if f.stream_id == 1)


def test_request_data_is_acknowledged_only_when_taken():
    server, client = pair()
    client.send_headers(1, BASE, end_stream=False)
    for _ in range(4):
        client.send_data(1, b"x" * 15000)
    server.feed(client.data_to_send())
    assert client.local_flow_control_window(1) == 65535 - 60000
    client.receive_data(server.pending())
    assert client.local_flow_control_window(1) == 65535 - 60000  # nothing given back yet
    server.acknowledge(1, 60000)
    client.receive_data(server.pending())
    assert client.local_flow_control_window(1) == 65535


def test_a_client_reset_reaches_its_stream():
    server, client = pair()
    client.send_headers(1, BASE, end_stream=False)
    server.feed(client.data_to_send())
    client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    assert server.feed(client.data_to_send()) == [(1, StreamReset(h2.errors.ErrorCodes.CANCEL))]


# -- the client side (an upstream speaking HTTP/2) ------------------------------


def upstream(max_streams: int = 100):
    """sluice's H2Client against h2's own server, settings exchanged."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    server.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
    server.initiate_connection()
    client = H2Client(initial_window=65535, max_header_list_size=16384, max_header_count=20)
    server.receive_data(client.pending())
    client.feed(server.data_to_send())
    server.receive_data(client.pending())
    client.feed(server.data_to_send())
    return client, server


def test_a_request_goes_upstream_with_authority_and_without_connection_fields():
    client, server = upstream()
    request = Request("POST", "/up?x", Headers([(b"host", b"api.test:8080"), (b"te", b"trailers"),
                                               (b"content-length", b"2"), (b"keep-alive", b"5")]))
    sid = client.request(request, end=False)
    client.send_data(sid, b"hi", end=True)
    received = server.receive_data(client.pending())
    [head] = [e for e in received if type(e) is h2.events.RequestReceived]
    assert head.headers == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"api.test:8080"),
                            (b":path", b"/up?x"), (b"te", b"trailers"), (b"content-length", b"2")]
    assert any(type(e) is h2.events.DataReceived and e.data == b"hi" for e in received)


def test_a_response_becomes_head_data_and_end_with_trailers():
    client, server = upstream()
    sid = client.request(Request("GET", "/", Headers([(b"host", b"a")])), end=True)
    server.receive_data(client.pending())
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
    server.send_data(sid, b"ok")
    server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    events = [e for s, e in client.feed(server.data_to_send()) if s == sid]
    head, data, end = events
    assert type(head) is ResponseHead and head.response.status == 200
    assert head.response.headers.raw() == [(b"content-type", b"text/plain")]
    assert data == Data(b"ok", 2) and end.trailers.raw() == [(b"grpc-status", b"0")]


@pytest.mark.parametrize("bad", [[(b":status", b"200"), (b"X-Upper", b"1")],
                                 [(b":status", b"200"), (b"connection", b"close")],
                                 [(b"content-type", b"x")],
                                 [(b":status", b"101")]])
def test_a_malformed_response_resets_its_stream_only(bad):
    client, server = upstream()
    first = client.request(Request("GET", "/a", Headers([(b"host", b"a")])), end=True)
    second = client.request(Request("GET", "/b", Headers([(b"host", b"a")])), end=True)
    server.receive_data(client.pending())
    server.send_headers(first, bad, end_stream=False)  # open still: a reset must go out
    server.send_headers(second, [(b":status", b"204")], end_stream=True)
    events = client.feed(server.data_to_send())
    assert [type(e) for s, e in events if s == first] == [StreamReset]
    assert [type(e) for s, e in events if s == second] == [ResponseHead, End]
    resets = [f for f in frames(client.pending()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(first, h2.errors.ErrorCodes.PROTOCOL_ERROR)]


def test_the_peers_stream_limit_and_goaway_say_when_a_new_connection_is_needed():
    client, server = upstream(max_streams=2)
    assert client.can_open()
    for path in ("/1", "/2"):
        client.request(Request("GET", path, Headers([(b"host", b"a")])), end=True)
    assert not client.can_open()  # full: the pool opens another connection
    server.receive_data(client.pending())
    server.send_headers(1, [(b":status", b"204")], end_stream=True)
    client.feed(server.data_to_send())
    assert client.can_open()
    server.close_connection(last_stream_id=3)
    [(_, terminated)] = client.feed(server.data_to_send())
    assert type(terminated) is Terminated and terminated.last_stream_id == 3
    assert not client.can_open()  # streams up to 3 still finish; new ones go elsewhere


def test_a_field_block_that_does_not_decode_is_a_compression_error():
    """RFC 9113 4.3; h2 says PROTOCOL_ERROR, the GOAWAY goes out with the right code."""
    server, _ = pair()
    headers = HeadersFrame(1)
    headers.data = b"\x82\x80"  # :method GET, then index 0: no such entry (RFC 7541 6.1)
    headers.flags.add("END_HEADERS")
    headers.flags.add("END_STREAM")
    [(_, terminated)] = server.feed(headers.serialize())
    assert terminated.error_code == h2.errors.ErrorCodes.COMPRESSION_ERROR
    [goaway] = [f for f in frames(server.pending()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == h2.errors.ErrorCodes.COMPRESSION_ERROR


# -- WebSockets over HTTP/2 (RFC 8441) ----------------------------------------------

WEBSOCKET = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
             (b":path", b"/chat?room=1"), (b":authority", b"a.test")]


def test_extended_connect_is_offered_in_the_settings():
    server, client = pair()
    assert client.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
    quiet = H2Server(max_concurrent_streams=1, initial_window=65535, max_header_list_size=16384,
                     max_header_count=20, extended_connect=False)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.receive_data(quiet.pending())
    assert peer.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 0


def test_a_websocket_connect_becomes_the_http1_handshake():
    """RFC 8441 5 and RFC 6455 4.1: a GET with Upgrade, a fresh 16-byte key,
    version 13, the client's other fields kept and its own key dropped."""
    server, client = pair()
    client.send_headers(1, WEBSOCKET + [(b"sec-websocket-protocol", b"chat"), (b"origin", b"https://a.test"),
                                        (b"sec-websocket-key", b"bm90IG91cnM=")])
    [(sid, event)] = server.feed(client.data_to_send())
    assert sid == 1 and type(event) is WebSocketHead
    request = event.head.request
    assert (request.method, request.target, request.scheme) == ("GET", "/chat?room=1", "https")
    assert not event.head.has_body  # the stream's DATA are the tunnel's
    assert request.headers.raw() == [
        (b"host", b"a.test"), (b"sec-websocket-protocol", b"chat"), (b"origin", b"https://a.test"),
        (b"connection", b"upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-key", event.key),
        (b"sec-websocket-version", b"13")]
    assert len(base64.b64decode(event.key, validate=True)) == 16
    client.send_headers(3, WEBSOCKET)
    [(_, again)] = server.feed(client.data_to_send())
    assert again.key != event.key


def test_the_101_becomes_a_200_only_when_it_answers_the_key():
    server, client = pair()
    client.send_headers(1, WEBSOCKET)
    client.send_headers(3, WEBSOCKET)
    [(_, first), (_, second)] = server.feed(client.data_to_send())
    good = base64.b64encode(hashlib.sha1(first.key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert websocket_accept(first.key) == good
    switched = Headers([(b"upgrade", b"websocket"), (b"connection", b"upgrade"),
                        (b"sec-websocket-accept", good), (b"sec-websocket-protocol", b"chat")])
    assert not server.open_tunnel(3, Response(101, switched), second.key)  # another stream's key
    assert server.open_tunnel(1, Response(101, switched), first.key)
    [response] = [e for e in client.receive_data(server.pending()) if type(e) is h2.events.ResponseReceived]
    assert response.stream_id == 1
    assert response.headers == [(b":status", b"200"), (b"sec-websocket-protocol", b"chat")]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (WEBSOCKET[:1] + [(b":authority", b"a.test:443")], 501),  # plain CONNECT
        ([(n, b"connect-udp" if n == b":protocol" else v) for n, v in WEBSOCKET], 501),
        ([(n, v) for n, v in WEBSOCKET if n != b":authority"], 400),
    ],
    ids=["plain-connect", "another-protocol", "no-authority"],
)
def test_connect_sluice_cannot_carry_gets_a_status(headers, status):
    server, client = pair()
    client.send_headers(1, headers, end_stream=True)
    [(_, refused)] = server.feed(client.data_to_send())
    assert type(refused) is Refused and refused.status == status


@pytest.mark.parametrize(
    "headers",
    [
        BASE + [(b":protocol", b"websocket")],  # outside a CONNECT
        [(n, v) for n, v in WEBSOCKET if n != b":path"],  # RFC 8441 4: :scheme and :path too
        [(n, v) for n, v in WEBSOCKET if n != b":scheme"],
    ],
    ids=["protocol-on-get", "no-path", "no-scheme"],
)
def test_a_malformed_extended_connect_is_a_stream_error(headers):
    server, client = pair()
    client.send_headers(1, headers, end_stream=True)
    [(_, refused)] = server.feed(client.data_to_send())
    assert type(refused) is Refused and refused.status == 0
    [reset] = [f for f in frames(server.pending()) if isinstance(f, RstStreamFrame)]
    assert reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_protocol_is_malformed_when_extended_connect_was_not_offered():
    server = H2Server(max_concurrent_streams=1, initial_window=65535, max_header_list_size=16384,
                      max_header_count=20, extended_connect=False)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, WEBSOCKET)
    [refused] = [e for _, e in server.feed(client.data_to_send()) if type(e) is not WindowOpen]
    assert type(refused) is Refused and refused.status == 0 and ":protocol" in str(refused.error)


# -- errors RFC 9113 names and h2 would make others ----------------------------------

POST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a.test")]


def raw(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def still_serves(server, client, stream_id: int = 5) -> None:
    """The connection goes on: a request after the error is read whole."""
    client.send_headers(stream_id, POST + [(b"content-length", b"2")])
    client.send_data(stream_id, b"ok", end_stream=True)
    events = [e for _, e in server.feed(client.data_to_send()) if type(e) is not WindowOpen]
    assert [type(e) for e in events] == [RequestHead, Data, End]


def test_a_settings_ack_with_a_payload_is_a_frame_size_error():
    """RFC 9113 6.5 (h2 says PROTOCOL_ERROR)."""
    server, _ = pair()
    [(_, terminated)] = server.feed(raw(0x4, 0x1, 0, b"\x00\x04\x00\x00\x00\x01"))
    assert terminated.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    [goaway] = [f for f in frames(server.pending()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


@pytest.mark.parametrize(("stream_id", "connection_error"), [(1, False), (0, True), (9, True)],
                         ids=["open-stream", "connection", "idle-stream"])
def test_a_window_update_of_0_is_an_error_of_its_stream_or_connection(stream_id, connection_error):
    """RFC 9113 6.9: of the stream it names (5.1: an idle one is the connection's)."""
    server, client = pair()
    client.send_headers(1, POST)
    server.feed(client.data_to_send())
    events = server.feed(raw(0x8, 0, stream_id, b"\x00\x00\x00\x00"))
    if connection_error:
        assert events[-1][1].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert type(events[-1][1]) is Terminated
        return
    assert events == [(1, StreamReset(h2.errors.ErrorCodes.PROTOCOL_ERROR))]
    [reset] = frames(server.pending())
    assert isinstance(reset, RstStreamFrame) and reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    client.receive_data(reset.serialize())
    still_serves(server, client)


@pytest.mark.parametrize(("length", "body"), [(b"10", b"12345"), (b"3", b"12345")], ids=["short", "long"])
def test_data_that_breaks_the_content_length_resets_its_stream(length, body):
    """RFC 9113 8.1.1: a malformed request, a stream error (h2: a connection
    error); its DATA still counts against the connection's window."""
    server, client = pair()
    client.send_headers(1, POST + [(b"content-length", length)])
    client.send_data(1, body, end_stream=True)
    events = server.feed(client.data_to_send())
    assert (1, StreamReset(h2.errors.ErrorCodes.PROTOCOL_ERROR)) in events
    assert not any(type(e) in (End, Data) for _, e in events)
    sent = frames(server.pending())
    assert [f.error_code for f in sent if isinstance(f, RstStreamFrame)][0] == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert not any(isinstance(f, GoAwayFrame) for f in sent)
    client.receive_data(b"".join(f.serialize() for f in sent))
    still_serves(server, client)


def test_a_content_length_with_no_body_is_malformed():
    server, client = pair()
    client.send_headers(1, POST + [(b"content-length", b"5")], end_stream=True)
    [(_, refused)] = server.feed(client.data_to_send())
    assert type(refused) is Refused and refused.status == 0 and "no body" in str(refused.error)


def test_a_head_with_data_resets_its_stream():
    """h2 counts a HEAD's body as 0 whatever its content-length; so does sluice."""
    server, client = pair()
    client.send_headers(1, [(b":method", b"HEAD")] + POST[1:] + [(b"content-length", b"3")])
    client.send_data(1, b"abc", end_stream=True)
    assert (1, StreamReset(h2.errors.ErrorCodes.PROTOCOL_ERROR)) in server.feed(client.data_to_send())


@pytest.mark.parametrize(("end", "body"), [(False, b"hello"), (True, b"hel")], ids=["no-end-stream", "short-body"])
def test_bad_trailers_reset_their_stream_and_the_hpack_state_holds(end, body):
    """RFC 9113 8.1: trailers end the stream, and the body before them is
    whole; otherwise a stream error (h2: a connection error). h2 still
    decodes the block, so the next request's fields, which index the
    dynamic table, come out right."""
    server, client = pair()
    client.send_headers(1, POST + [(b"content-length", b"5"), (b"x-custom", b"kept in the table")])
    client.send_data(1, body)
    trailers = HeadersFrame(1, data=client.encoder.encode([(b"x-checksum", b"abc")]),
                            flags=["END_HEADERS"] + (["END_STREAM"] if end else []))
    events = server.feed(client.data_to_send() + trailers.serialize())
    assert events[-1] == (1, StreamReset(h2.errors.ErrorCodes.PROTOCOL_ERROR))
    assert not any(type(e) is End for _, e in events)
    client.send_headers(3, POST + [(b"content-length", b"0"), (b"x-custom", b"kept in the table")],
                        end_stream=True)
    [(_, head), _] = [(s, e) for s, e in server.feed(client.data_to_send()) if s == 3]
    assert head.request.headers.get_raw(b"x-custom") == b"kept in the table"


def test_good_trailers_still_end_the_request():
    server, client = pair()
    client.send_headers(1, POST + [(b"content-length", b"5")])
    client.send_data(1, b"hello")
    client.send_headers(1, [(b"x-checksum", b"abc")], end_stream=True)
    events = [e for _, e in server.feed(client.data_to_send())]
    assert [type(e) for e in events] == [RequestHead, Data, End]
    assert events[-1].trailers.raw() == [(b"x-checksum", b"abc")]


def test_frames_split_anywhere_read_the_same():
    """The look before h2 holds a header cut between reads."""
    conversation = []
    for one_byte in (False, True):
        server, client = pair()
        client.send_headers(1, POST + [(b"content-length", b"10")])
        client.send_data(1, b"12345", pad_length=3)
        client.send_data(1, b"67890", end_stream=True)
        client.send_headers(3, POST + [(b"content-length", b"2")])
        data = client.data_to_send() + raw(0x8, 0, 3, b"\x00\x00\x00\x00")
        events = []
        for chunk in ([data[i:i + 1] for i in range(len(data))] if one_byte else [data]):
            events += [(s, e) for s, e in server.feed(chunk) if type(e) is not WindowOpen]
        conversation.append([(s, type(e).__name__, getattr(e, "data", None)) for s, e in events])
    assert conversation[0] == conversation[1]
    assert [kind for _, kind, _ in conversation[0]] == ["RequestHead", "Data", "Data", "End", "RequestHead",
                                                        "StreamReset"]
