"""The sans-I/O HTTP/1.1 layer, byte for byte, with no sockets."""

from __future__ import annotations

import pytest

from sluice.messages import Headers, Request, Response
from sluice.protocol.events import (
    NEED_DATA,
    Body,
    Closed,
    End,
    Informational,
    LocalProtocolError,
    ProtocolError,
    RequestHead,
    ResponseHead,
)
from sluice.protocol.http1 import simple_response

LIMITS = {"max_head_bytes": 1024, "max_header_count": 10}


def server(codec, data: bytes):
    conn = codec.server(**LIMITS)
    conn.feed(data)
    return conn


def events(conn) -> list:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if type(event) in (End, Closed):
            break
    return out


def test_parses_a_request_with_a_body(codec):
    conn = server(codec, b"POST /up?x=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello")
    head, body, end = events(conn)
    assert type(head) is RequestHead
    assert head.request.method == "POST" and head.request.target == "/up?x=1"
    assert head.request.path == "/up" and head.request.host == "a.test"
    assert head.content_length == 5 and head.has_body
    assert body == Body(b"hello") and end == End(None)


def test_chunked_body_and_trailers(codec):
    conn = server(codec, 
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n"
    )
    head, body, end = events(conn)
    assert head.has_body and head.content_length is None
    assert body.data == b"abc"
    assert end.trailers.get("x-sum") == "9"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, id="bare-LF"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400, id="one-bare-LF"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400, id="bare-CR"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", 400, id="obs-fold"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="CL+TE"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="two-TE"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400, id="xchunked"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400, id="chunked-twice"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400, id="space-before-colon"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400, id="chunked-not-last"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, id="unsupported-coding"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, id="two-CL"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n", 400, id="CL-list"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 10 + b"\r\n", 431, id="too-many-fields"),
        pytest.param(b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n", 431, id="head-too-large"),
    ],
)
def test_rejects_ambiguous_or_oversized_heads(codec, raw, status):
    with pytest.raises(ProtocolError) as info:
        events(server(codec, raw))
    assert info.value.status == status


@pytest.mark.parametrize("size_line", [b"zz", b"-1", b"0x5", b"1" * 20])
def test_rejects_bad_chunk_sizes(codec, size_line):
    conn = server(codec, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nabcde\r\n0\r\n\r\n")
    assert type(conn.next_event()) is RequestHead
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert info.value.status == 400


def test_head_may_arrive_one_byte_at_a_time(codec):
    conn = codec.server(**LIMITS)
    raw = b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
    for i in range(len(raw) - 1):
        conn.feed(raw[i:i + 1])
        assert conn.next_event() is NEED_DATA
    conn.feed(raw[-1:])
    assert conn.next_event().request.target == "/slow"


def test_pipelined_requests_each_pass_the_scan(codec):
    conn = server(codec, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\nHost: a\n\n")
    head, end = events(conn)
    assert head.request.target == "/1"
    conn.respond(Response(200, Headers([(b"content-length", b"0")])))
    conn.end()
    assert conn.reusable()
    conn.next_cycle()
    with pytest.raises(ProtocolError):  # the second one has bare LFs
        conn.next_event()


def test_eof_between_requests_is_a_clean_close(codec):
    conn = codec.server(**LIMITS)
    conn.feed(b"")
    assert type(conn.next_event()) is Closed


def test_response_framing_chunked_when_length_unknown(codec):
    conn = server(codec, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    events(conn)
    out = conn.respond(Response(200, Headers()))
    out += conn.data(b"hi") + conn.end()
    assert out.lower() == b"http/1.1 200 ok\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"


def test_simple_response_is_complete_and_closes(codec):
    assert simple_response(400, b"bad\n") == (
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbad\n"
    )


def test_client_side_relays_informational_then_final(codec):
    conn = codec.client(**LIMITS)
    request = Request("POST", "/", Headers([(b"host", b"a"), (b"content-length", b"2")]))
    assert conn.request(request, chunked=False).startswith(b"POST / HTTP/1.1\r\n")
    conn.data(b"hi")
    conn.end()
    conn.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first, final, body, end = events(conn)
    assert type(first) is Informational and first.response.status == 103
    assert type(final) is ResponseHead and final.response.status == 200
    assert body.data == b"ok" and type(end) is End
    assert conn.reusable()


def test_client_side_eof_before_response_is_an_error(codec):
    conn = codec.client(**LIMITS)
    conn.request(Request("GET", "/", Headers([(b"host", b"a")])), chunked=False)
    conn.end()
    conn.feed(b"")
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert not conn.response_bytes_seen


def test_client_side_rejects_bare_lf_in_response(codec):
    conn = codec.client(**LIMITS)
    conn.request(Request("GET", "/", Headers([(b"host", b"a")])), chunked=False)
    conn.end()
    conn.feed(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n")
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_client_side_bytes_after_response_make_it_unreusable(codec):
    conn = codec.client(**LIMITS)
    conn.request(Request("GET", "/", Headers([(b"host", b"a")])), chunked=False)
    conn.end()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nsurprise")
    events(conn)
    assert not conn.reusable()


def test_absolute_form_becomes_origin_form_with_its_authority_as_host(codec):
    conn = server(codec, b"GET http://Example.test:8080/a/b?c=1 HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
    head = conn.next_event()
    assert head.request.target == "/a/b?c=1"
    assert head.request.headers.get_all("host") == ["Example.test:8080"]
    assert head.request.host == "example.test"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, id="http2-in-h1"),
        pytest.param(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 501, id="connect"),
        pytest.param(b"GET ftp://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="other-scheme"),
        pytest.param(b"GET http://user@a.test/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="userinfo"),
    ],
)
def test_refuses_what_a_reverse_proxy_does_not_speak(codec, raw, status):
    with pytest.raises(ProtocolError) as info:
        server(codec, raw).next_event()
    assert info.value.status == status


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/a/b/c", b"/a/b/c"),
        (b"/public/../admin", b"/admin"),
        (b"/public/%2e%2e/admin?x=/../y", b"/admin?x=/../y"),
        (b"/public/%2E%2e/admin", b"/admin"),
        (b"/a/./b/", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/file.tar.gz", b"/file.tar.gz"),
        (b"/a/.hidden/b", b"/a/.hidden/b"),
        (b"/%2e", b"/"),
    ],
)
def test_dot_segments_are_removed_before_routing(codec, target, normal):
    conn = server(codec, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert conn.next_event().request.target == normal.decode()


def _answer(conn, response: Response, body: bytes = b"") -> bytes:
    return conn.respond(response) + conn.data(body) + conn.end()


@pytest.mark.parametrize("connection", [b"keep-alive", b"Keep-Alive", b"foo, keep-alive"])
def test_http10_keep_alive_is_kept_when_the_response_has_a_length(codec, connection):
    conn = server(codec, b"GET /a HTTP/1.0\r\nConnection: " + connection + b"\r\n\r\n"
                         b"GET /b HTTP/1.0\r\n\r\n")
    head, _ = events(conn)
    assert head.request.http_version == "1.0"
    out = _answer(conn, Response(200, Headers([(b"content-length", b"2")])), b"ok")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: keep-alive\r\n" in out.lower() and b"close" not in out.lower()
    assert conn.reusable()
    conn.next_cycle()
    head, _ = events(conn)
    assert head.request.target == "/b"
    out = _answer(conn, Response(200, Headers([(b"content-length", b"2")])), b"ok")
    assert b"\r\nconnection: close\r\n" in out.lower() and not conn.reusable()


def test_http10_keep_alive_without_a_length_ends_with_the_connection(codec):
    conn = server(codec, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    events(conn)
    out = _answer(conn, Response(200), b"streamed")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"transfer-encoding" not in head.lower()
    assert body == b"streamed" and not conn.reusable()


def test_a_later_http1_minor_version_is_served_as_1_1(codec):
    conn = server(codec, b"GET / HTTP/1.2\r\nHost: a\r\n\r\n")
    head, _ = events(conn)
    assert head.request.http_version == "1.1" and conn.peer_http_version == b"1.1"
    out = _answer(conn, Response(200))
    assert b"transfer-encoding: chunked" in out.lower() and conn.reusable()


def test_empty_lines_before_a_request_line_are_ignored(codec):
    conn = server(codec, b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _ = events(conn)
    assert head.request.target == "/"


@pytest.mark.parametrize(
    ("raw", "status", "method", "target"),
    [
        pytest.param(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "GET", None, id="long-target"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 2000 + b"\r\n\r\n", 431, "GET", "/x",
                     id="long-head"),
        pytest.param(b"GET /x HTTP/3.0\r\nHost: a\r\n\r\n", 505, "GET", "/x", id="version"),
        pytest.param(b"POST /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "POST", "/x", id="two-hosts"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: a\r\nX\x01: y\r\n\r\n", 400, "GET", "/x", id="control-byte"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, None, None, id="not-http"),
    ],
)
def test_a_refused_head_names_its_request_line_when_known(codec, raw, status, method, target):
    conn = server(codec, raw)
    with pytest.raises(ProtocolError) as refused:
        events(conn)
    assert (refused.value.status, refused.value.method, refused.value.target) == (status, method, target)


def test_trailer_fields_count_against_the_field_limit(codec):
    trailers = b"".join(b"X-%d: y\r\n" % i for i in range(LIMITS["max_header_count"] + 1))
    conn = server(codec, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"1\r\nx\r\n0\r\n" + trailers + b"\r\n")
    with pytest.raises(ProtocolError) as refused:
        events(conn)
    assert refused.value.status == 431


@pytest.mark.parametrize(
    ("host", "status"),
    [
        pytest.param(b"a.test", None, id="name"),
        pytest.param(b"a.test:8080", None, id="port"),
        pytest.param(b"[::1]:8080", None, id="ipv6"),
        pytest.param(b"", None, id="empty"),  # RFC 9110 7.2: a target without authority
        pytest.param(b"u@a.test", 400, id="userinfo"),
        pytest.param(b"a.test?x", 400, id="query"),
        pytest.param(b"a.test/x", 400, id="path"),
        pytest.param(b"a b", 400, id="space"),
        pytest.param(b"a.test:99999", 400, id="port-range"),
        pytest.param(b"[::1", 400, id="open-bracket"),
        pytest.param(b"a%2etest", 400, id="percent"),
    ],
)
def test_a_host_field_must_be_an_authority(codec, host, status):
    conn = server(codec, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    if status is None:
        assert conn.next_event().request.headers.get("host") == host.decode()
    else:
        with pytest.raises(ProtocolError) as refused:
            conn.next_event()
        assert refused.value.status == status


@pytest.mark.parametrize(("method", "status"), [(b"OPTIONS", None), (b"GET", 400), (b"POST", 400)])
def test_the_asterisk_form_is_for_options_only(codec, method, status):
    conn = server(codec, method + b" * HTTP/1.1\r\nHost: a\r\n\r\n")
    if status is None:
        assert conn.next_event().request.target == "*"
    else:
        with pytest.raises(ProtocolError) as refused:
            conn.next_event()
        assert refused.value.status == status


# -- protocol upgrades (heads.py's table) ---------------------------------------

_UPGRADE = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
_SWITCH = Response(101, Headers([(b"connection", b"upgrade"), (b"upgrade", b"websocket")]))


def test_a_switch_writes_the_101_and_hands_back_the_tunnels_first_bytes(codec):
    conn = server(codec, _UPGRADE + b"\x81\x05hello")
    head, end = events(conn)
    assert conn.upgrade == b"websocket" and type(end) is End
    assert conn.next_event() is NEED_DATA  # the tunnel's bytes are no request
    assert conn.switch(_SWITCH) == (b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                                    b"upgrade: websocket\r\n\r\n")
    assert conn.response_started and not conn.reusable()
    conn.feed(b"more")
    assert conn.take_buffered() == b"\x81\x05hellomore"


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", id="no-connection-upgrade"),
        pytest.param(b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", id="http/1.0"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                     b"Content-Length: 2\r\n\r\nhi", id="with-a-body"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", id="no-upgrade-field"),
    ],
)
def test_what_proposes_no_upgrade_cannot_be_switched(codec, head):
    conn = server(codec, head)
    events(conn)
    assert conn.upgrade is None
    with pytest.raises(LocalProtocolError):
        conn.switch(_SWITCH)


def test_an_upgrade_answered_plainly_keeps_the_connection(codec):
    conn = server(codec, _UPGRADE + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    events(conn)
    conn.respond(Response(200, Headers([(b"content-length", b"0")])))
    conn.end()
    assert conn.reusable()
    conn.next_cycle()
    assert conn.next_event().request.target == "/next"


def test_a_101_is_sent_through_switch_only(codec):
    conn = server(codec, _UPGRADE)
    events(conn)
    with pytest.raises(LocalProtocolError):
        conn.informational(_SWITCH)


def _upgrade_client(codec, fields):
    conn = codec.client(**LIMITS)
    conn.request(Request("GET", "/chat", Headers([(b"host", b"a"), *fields])), chunked=False)
    conn.end()
    return conn


def test_a_client_accepts_the_101_it_asked_for_and_hands_back_what_followed(codec):
    conn = _upgrade_client(codec, [(b"connection", b"upgrade"), (b"upgrade", b"websocket")])
    conn.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    event = conn.next_event()
    assert type(event) is Informational and event.response.status == 101
    assert conn.next_event() is NEED_DATA
    assert conn.take_buffered() == b"\x81\x02hi" and not conn.reusable()


def test_a_client_refuses_a_101_it_did_not_ask_for(codec):
    conn = _upgrade_client(codec, [])
    conn.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_a_client_that_asked_takes_a_plain_answer_too(codec):
    conn = _upgrade_client(codec, [(b"connection", b"upgrade"), (b"upgrade", b"websocket")])
    conn.feed(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
    assert [type(e) for e in events(conn)] == [ResponseHead, Body, End]
    assert conn.reusable()
