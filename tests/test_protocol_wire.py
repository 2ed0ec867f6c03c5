"""What sluice writes, read back by both parsers; and both codecs' responses framed alike.

``wire.py`` is where sluice writes HTTP/1.1 itself. Every shape it writes is
fed here to h11 and to llhttp (through httptools), each as a plain parser,
and both must read back exactly what was meant: method, target, fields in
order, status, reason, body, trailers. A few shapes are pinned byte for byte.

Then the httptools codec's ``respond()`` is held to the h11 codec's, which
lets h11 pick the framing: for every request (HTTP/1.0 or 1.1, with or
without ``Connection: close``, GET or HEAD) and every response (200, 204,
304, 404, after a 1xx or not; with Content-Length, without, with
Transfer-Encoding, with both; with ``Connection: close`` or not), both must
write the same message: same framing, same body once parsed, the same
keep-alive decision on the wire and from ``reusable()``. Their bytes may
differ only as ``WRITTEN_DIFFERENCES`` says.
"""

from __future__ import annotations

import itertools

import h11
import httptools
import pytest

from sluice.messages import Headers, Request, Response
from sluice.protocol.events import End, LocalProtocolError
from sluice.protocol.http1 import select
from sluice.protocol.wire import LAST_CHUNK, chunk, last_chunk, request_head, response_head, simple_response

H11 = select("h11")
FAST = select("httptools")
LIMITS = {"max_head_bytes": 8192, "max_header_count": 50}

# -- reading with each parser ---------------------------------------------------


class _Sink:
    """httptools callbacks, collected: fields before the head ends, trailers after."""

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.head_done = False
        self.messages = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        (self.trailers if self.head_done else self.fields).append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.messages += 1


def llhttp_request(data: bytes) -> tuple:
    sink = _Sink()
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(data)
    assert sink.messages == 1
    return parser.get_method(), sink.url, sink.fields, bytes(sink.body), sink.trailers


def h11_request(data: bytes) -> tuple:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    head = conn.next_event()
    body, end = _h11_body(conn)
    return head.method, head.target, list(head.headers), body, list(end.headers)


def llhttp_response(data: bytes) -> tuple:
    sink = _Sink()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(data)
    assert sink.messages == 1
    return parser.get_status_code(), sink.reason, sink.fields, bytes(sink.body), sink.trailers


def h11_response(data: bytes) -> tuple:
    conn = _h11_client("GET")
    conn.receive_data(data)
    head = conn.next_event()
    body, end = _h11_body(conn)
    return head.status_code, head.reason, list(head.headers), body, list(end.headers)


def _h11_client(method: str) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "a.test")]))
    conn.send(h11.EndOfMessage())
    return conn


def _h11_body(conn: h11.Connection) -> tuple[bytes, h11.EndOfMessage]:
    body = bytearray()
    while type(event := conn.next_event()) is h11.Data:
        body += event.data
    assert type(event) is h11.EndOfMessage, event
    return bytes(body), event


def read_request(data: bytes) -> tuple:
    """What both parsers read; they must agree."""
    meant = h11_request(data)
    assert llhttp_request(data) == meant
    return meant


def read_response(data: bytes) -> tuple:
    meant = h11_response(data)
    assert llhttp_response(data) == meant
    return meant


# -- what wire.py writes --------------------------------------------------------

FIELDS = [(b"accept", b"*/*"), (b"x-latin", b"caf\xe9"), (b"x-empty", b""), (b"x-tab", b"a\tb")]


def test_request_head_with_host_first_is_written_as_given():
    fields = [(b"host", b"a.test"), *FIELDS]
    data = request_head(b"GET", b"/a?b=c", fields)
    assert data == (
        b"GET /a?b=c HTTP/1.1\r\nhost: a.test\r\naccept: */*\r\nx-latin: caf\xe9\r\nx-empty: \r\n"
        b"x-tab: a\tb\r\n\r\n"
    )
    assert read_request(data) == (b"GET", b"/a?b=c", fields, b"", [])


def test_request_head_moves_host_first_and_keeps_the_rest_in_order():
    fields = [(b"content-length", b"5"), (b"x-a", b"1"), (b"host", b"a.test"), (b"x-b", b"2")]
    data = request_head(b"POST", b"/up", fields) + b"hello"
    reordered = [(b"host", b"a.test"), (b"content-length", b"5"), (b"x-a", b"1"), (b"x-b", b"2")]
    assert read_request(data) == (b"POST", b"/up", reordered, b"hello", [])
    assert fields[0] == (b"content-length", b"5")  # the caller's list is left alone


def test_chunked_request_with_trailers():
    head = request_head(b"PUT", b"/x", [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
    data = head + chunk(b"abc") + chunk(b"d" * 16) + last_chunk([(b"x-sum", b"9")])
    assert read_request(data) == (
        b"PUT", b"/x", [(b"host", b"a"), (b"transfer-encoding", b"chunked")], b"abc" + b"d" * 16, [(b"x-sum", b"9")]
    )


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        pytest.param(200, b"", b"HTTP/1.1 200 OK\r\n", id="standard"),
        pytest.param(404, b"", b"HTTP/1.1 404 Not Found\r\n", id="standard-404"),
        pytest.param(204, b"", b"HTTP/1.1 204 No Content\r\n", id="standard-204"),
        pytest.param(200, b"Fine", b"HTTP/1.1 200 Fine\r\n", id="custom"),
        pytest.param(200, b"Tout va bien, caf\xe9", b"HTTP/1.1 200 Tout va bien, caf\xe9\r\n", id="custom-obs-text"),
        pytest.param(599, b"", b"HTTP/1.1 599 \r\n", id="unknown-status-no-reason"),
        pytest.param(599, b"Odd", b"HTTP/1.1 599 Odd\r\n", id="unknown-status-custom"),
    ],
)
def test_response_head_status_line(status, reason, line):
    fields, body = ([(b"content-length", b"2"), *FIELDS], b"ok") if status != 204 else (FIELDS, b"")
    data = response_head(status, reason, fields) + body
    assert data.startswith(line)
    assert read_response(data) == (status, reason or line[13:-2], fields, body, [])


def test_informational_heads_then_the_final_one():
    data = (
        response_head(100, b"", [])
        + response_head(103, b"", [(b"link", b"</a.css>; rel=preload")])
        + response_head(200, b"", [(b"content-length", b"0")])
    )
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n")
    conn = _h11_client("GET")
    conn.receive_data(data)
    events = [conn.next_event() for _ in range(4)]
    assert [type(e) for e in events] == [h11.InformationalResponse, h11.InformationalResponse, h11.Response,
                                         h11.EndOfMessage]
    assert [e.status_code for e in events[:3]] == [100, 103, 200]
    assert list(events[1].headers) == [(b"link", b"</a.css>; rel=preload")]
    # llhttp reads a response at a time: it is handed each head in turn.
    heads = data.split(b"\r\n\r\n")[:3]
    assert [llhttp_response(h + b"\r\n\r\n")[0] for h in heads] == [100, 103, 200]


@pytest.mark.parametrize("size", [1, 15, 16, 4096, 65536])
def test_one_chunk(size):
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    written = chunk(data)
    assert written == b"%x\r\n" % size + data + b"\r\n"
    head = response_head(200, b"", [(b"transfer-encoding", b"chunked")])
    assert read_response(head + written + LAST_CHUNK)[3] == data


def test_chunks_of_every_size_in_one_body():
    sizes = [1, 15, 16, 4096, 65536]
    pieces = [bytes([i]) * n for i, n in enumerate(sizes)]
    head = response_head(200, b"", [(b"transfer-encoding", b"chunked")])
    data = head + b"".join(chunk(p) for p in pieces) + last_chunk(None)
    assert read_response(data) == (200, b"OK", [(b"transfer-encoding", b"chunked")], b"".join(pieces), [])


@pytest.mark.parametrize(
    ("trailers", "written"),
    [
        pytest.param(None, b"0\r\n\r\n", id="none"),
        pytest.param([], b"0\r\n\r\n", id="empty"),
        pytest.param([(b"x-sum", b"9")], b"0\r\nx-sum: 9\r\n\r\n", id="one"),
        pytest.param([(b"x-sum", b"9"), (b"server-timing", b"db;dur=53"), (b"x-sum", b"10")],
                     b"0\r\nx-sum: 9\r\nserver-timing: db;dur=53\r\nx-sum: 10\r\n\r\n", id="several"),
    ],
)
def test_last_chunk(trailers, written):
    assert last_chunk(trailers) == written
    head = response_head(200, b"", [(b"transfer-encoding", b"chunked")])
    assert read_response(head + chunk(b"hi") + written) == (
        200, b"OK", [(b"transfer-encoding", b"chunked")], b"hi", trailers or []
    )


@pytest.mark.parametrize(
    ("args", "status", "fields", "body"),
    [
        pytest.param((400, b"bad\n"), 400, [(b"content-length", b"4"), (b"connection", b"close")], b"bad\n",
                     id="closing"),
        pytest.param((431,), 431, [(b"content-length", b"0"), (b"connection", b"close")], b"", id="empty"),
        pytest.param((503, b"later", [(b"retry-after", b"1")], False), 503,
                     [(b"retry-after", b"1"), (b"content-length", b"5")], b"later", id="keep-alive"),
        pytest.param((599, b"?"), 599, [(b"content-length", b"1"), (b"connection", b"close")], b"?",
                     id="unknown-status"),
    ],
)
def test_simple_response(args, status, fields, body):
    read_status, _, read_fields, read_body, trailers = read_response(simple_response(*args))
    assert (read_status, read_fields, read_body, trailers) == (status, fields, body, [])


# -- respond(): the httptools codec frames as h11 does --------------------------

WRITTEN_DIFFERENCES = {
    "field-name case": "h11 writes the fields it adds or rewrites (Transfer-Encoding, Connection) in "
    "Title-Case, the httptools codec in lower case; field names are case-insensitive (RFC 9110 5.1).",
    "field order": "h11 moves the fields it rewrites to the end of the head; the order of fields with "
    "different names carries no meaning (RFC 9110 5.3).",
    "Connection as one field or several": "h11 writes each Connection option as a field of its own, the "
    "httptools codec keeps the list it was given; the two are the same field (RFC 9110 5.3).",
}
"""How the two codecs' bytes may differ, and why that is harmless: ``_written``
forgives exactly these and nothing else."""


def _written(data: bytes) -> tuple:
    """A written response with ``WRITTEN_DIFFERENCES`` taken out: each head's
    status line and fields (names lower-case, sorted, Connection options
    merged), then the body bytes exactly as written."""
    heads = []
    while data.startswith(b"HTTP/1.1 1"):  # informational heads
        end = data.index(b"\r\n\r\n") + 4
        heads.append(_head(data[:end]))
        data = data[end:]
    end = data.index(b"\r\n\r\n") + 4
    return (*heads, _head(data[:end]), data[end:])


def _head(data: bytes) -> tuple:
    line, *lines = data[:-4].split(b"\r\n")
    fields = [(n.lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines)]
    options = sorted(o.strip().lower() for n, v in fields if n == b"connection" for o in v.split(b","))
    return line, sorted(f for f in fields if f[0] != b"connection"), options


TRAILERS = [(b"x-sum", b"9")]


def _exchange(codec, request: bytes, informational: int | None, response: Response, body: bytes):
    """Read ``request``, answer it (with trailers, which only a chunked body
    can carry: elsewhere they are dropped); the bytes written and
    ``reusable()`` after."""
    conn = codec.server(**LIMITS)
    conn.feed(request)
    while type(conn.next_event()) is not End:
        pass
    out = conn.informational(Response(informational)) if informational else b""
    out += conn.respond(response)
    out += conn.data(body) + conn.end(Headers(TRAILERS))
    return out, conn.reusable()


def _as_read(data: bytes, method: str) -> tuple:
    """What an h11 client reads of ``data``: final status, framing, body,
    trailers, and whether the server said it will close (read-until-close
    counts)."""
    conn = _h11_client(method)
    conn.receive_data(data)
    while type(head := conn.next_event()) is h11.InformationalResponse:
        pass
    fields = dict(head.headers)
    if method == "HEAD" or head.status_code in (204, 304):
        framing = "no body"
    elif b"transfer-encoding" in fields:
        framing = "chunked"
    elif b"content-length" in fields:
        framing = "length"
    else:
        framing = "until close"
        conn.receive_data(b"")  # the close is part of the message
    body, end = _h11_body(conn)
    closes = conn.their_state is h11.MUST_CLOSE or b"close" in fields.get(b"connection", b"").lower()
    return head.status_code, framing, body, list(end.headers), closes


REQUESTS = {
    f"{method} {version}{' close' if close else ''}": (method, f"{method} / HTTP/{version}\r\nHost: a\r\n"
                                                       f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n")
    for version, close, method in itertools.product(["1.0", "1.1"], [False, True], ["GET", "HEAD"])
}
FRAMINGS = {
    "length": [(b"content-length", b"5")],
    "no-length": [],
    "chunked": [(b"transfer-encoding", b"chunked")],
    "length-and-chunked": [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
}


@pytest.mark.parametrize("request_id", list(REQUESTS))
@pytest.mark.parametrize("status", [200, 204, 304, 404])
@pytest.mark.parametrize("informational", [None, 100, 103])
@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("closing", [False, True], ids=["keep-alive", "close"])
def test_respond_frames_as_h11_does(request_id, status, informational, framing, closing):
    method, request = REQUESTS[request_id]
    fields = FRAMINGS[framing] + ([(b"connection", b"close")] if closing else [])
    body = b"hello" if method == "GET" and status not in (204, 304) else b""
    written = {}
    for codec in (H11, FAST):
        data, reusable = _exchange(codec, request.encode(), informational, Response(status, Headers(fields)), body)
        written[codec.name] = (_written(data), _as_read(data, method), reusable)
    assert written["httptools"] == written["h11"]
    _, (_, how, read_body, trailers, closes), reusable = written["h11"]
    assert read_body == body
    assert trailers == (TRAILERS if how == "chunked" else [])
    assert reusable is not closes
    http10_or_close = "1.0" in request_id or "close" in request_id or closing
    assert closes is (http10_or_close or how == "until close")


@pytest.mark.parametrize("codec", [H11, FAST], ids=["h11", "httptools"])
def test_respond_refuses_what_h11_will_not_send(codec):
    """Both codecs refuse with sluice's LocalProtocolError (a bug on our side,
    never the peer's): a 1xx or 101 in the wrong place, a body where the
    framing allows none, a body longer or shorter than its Content-Length,
    a Content-Length or Transfer-Encoding they cannot frame by."""

    def answering(request: bytes = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"):
        conn = codec.server(**LIMITS)
        conn.feed(request)
        while type(conn.next_event()) is not End:
            pass
        return conn

    refused = [
        lambda c: c.respond(Response(100)),
        lambda c: c.respond(Response(101)),
        lambda c: c.informational(Response(200)),
        lambda c: c.informational(Response(101, Headers([(b"upgrade", b"h2c")]))),
        lambda c: c.respond(Response(200, Headers([(b"transfer-encoding", b"gzip")]))),
        lambda c: c.respond(Response(200, Headers([(b"content-length", b"5"), (b"content-length", b"6")]))),
        lambda c: c.respond(Response(200, Headers([(b"content-length", b"five")]))),
        lambda c: c.respond(Response(204)) + c.data(b"x"),
        lambda c: c.respond(Response(304, Headers([(b"content-length", b"5")]))) + c.data(b"hello"),
        lambda c: c.respond(Response(200, Headers([(b"content-length", b"2")]))) + c.data(b"abc"),
        lambda c: c.respond(Response(200, Headers([(b"content-length", b"2")]))) + c.data(b"a") + c.end(),
    ]
    for attempt in refused:
        with pytest.raises(LocalProtocolError):
            attempt(answering())
    with pytest.raises(LocalProtocolError):
        conn = answering(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.respond(Response(200, Headers([(b"content-length", b"5")])))
        conn.data(b"hello")


@pytest.mark.parametrize(
    ("fields", "chunked"),
    [
        pytest.param([(b"x-a", b"1"), (b"host", b"a.test"), (b"content-length", b"5")], False, id="length"),
        pytest.param([(b"x-a", b"1"), (b"host", b"a.test")], True, id="chunked"),
        pytest.param([(b"host", b"a.test"), (b"content-length", b"5")], True, id="chunked-drops-length"),
    ],
)
def test_request_frames_as_h11_does(fields, chunked):
    """The upstream side too: both codecs' requests read back alike (fields
    compared as ``WRITTEN_DIFFERENCES`` allows: the httptools codec puts Host
    first), and a Content-Length never goes out beside chunked."""
    read = {}
    for codec in (H11, FAST):
        conn = codec.client(**LIMITS)
        out = conn.request(Request("POST", "/up", Headers(fields)), chunked=chunked)
        out += conn.data(b"hel") + conn.data(b"lo") + conn.end(Headers(TRAILERS))
        method, target, read_fields, body, trailers = read_request(out)
        read[codec.name] = (method, target, sorted(read_fields), body, trailers)
    assert read["httptools"] == read["h11"]
    method, target, read_fields, body, trailers = read["h11"]
    assert (method, target, body) == (b"POST", b"/up", b"hello")
    assert trailers == (TRAILERS if chunked else [])
    assert (b"content-length" in dict(read_fields)) is not chunked
