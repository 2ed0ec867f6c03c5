"""Request smuggling defences: ambiguous framing or malformed heads are refused outright.

Every case in REJECTED must get 400, the connection must close, and the upstream must
receive nothing at all (RFC 9112 6.1, 6.3, 2.2, 5.1, 5.2).

BAD_CHUNKS differ: their head is valid, so a streaming proxy may already have sent the head
upstream before it finds the bad chunk-size line. For those the client must still get 400
(the recording upstream never answers before a request is complete, so no response can have
started) and the connection must close, and the upstream must never see a complete request.
"""

import pytest

from ..checks import assert_clean_error, assert_rejected, describe, settle
from ..client import RawClient
from ..recorder import Recorder
from ..wire import PeerClosed

_NGINX_TE = pytest.mark.quirk("nginx", "answers 501 for a transfer coding it does not know")
_NGINX_LF = pytest.mark.quirk("nginx", "accepts a bare LF as a line terminator")


def _head(method: bytes, fields: tuple[bytes, ...]) -> bytes:
    start = method + b" /app/smuggle HTTP/1.1\r\nHost: proxy.test\r\n"
    return start + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def _post(*fields: bytes, body: bytes = b"0\r\n\r\n") -> bytes:
    return _head(b"POST", fields) + body


def _get(*fields: bytes) -> bytes:
    return _head(b"GET", fields)


def _case(case_id: str, sent: bytes, *marks) -> pytest.param:
    return pytest.param(sent, id=case_id, marks=marks)


# The default body "0\r\n\r\n" is 5 bytes: both readings of a CL: 5 + chunked request
# consume it, which is what makes the ambiguity exploitable.
REJECTED = [
    _case("cl-then-te", _post(b"Content-Length: 5", b"Transfer-Encoding: chunked")),
    _case("te-then-cl", _post(b"Transfer-Encoding: chunked", b"Content-Length: 5")),
    _case("cl-conflicting", _post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!")),
    _case("cl-list", _post(b"Content-Length: 1, 2", body=b"ab")),
    _case("cl-plus-sign", _post(b"Content-Length: +5", body=b"hello")),
    _case("cl-space-before-colon", _post(b"Content-Length : 5", body=b"hello")),
    _case("te-xchunked", _post(b"Transfer-Encoding: xchunked"), _NGINX_TE),
    _case("te-chunked-twice", _post(b"Transfer-Encoding: chunked, chunked"), _NGINX_TE),
    _case("te-two-fields", _post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")),
    _case("te-chunked-not-last", _post(b"Transfer-Encoding: chunked, identity"), _NGINX_TE),
    _case("te-space-before-colon", _post(b"Transfer-Encoding : chunked")),
    _case("te-vertical-tab", _post(b"Transfer-Encoding: chunked\x0b"), _NGINX_TE),
    _case("te-form-feed", _post(b"Transfer-Encoding:\x0cchunked"), _NGINX_TE),
    _case("bare-lf", b"GET /app/smuggle HTTP/1.1\nHost: proxy.test\n\n", _NGINX_LF),
    _case("bare-lf-one-line", _get(b"X-A: 1\nX-B: 2"), _NGINX_LF),
    _case("bare-cr", _get(b"X-A: a\rb")),
    _case("obs-fold-space", _get(b"X-A: a", b" b")),
    _case("obs-fold-tab", _get(b"X-A: a", b"\tb")),
    _case("space-before-first-field", b"GET /app/smuggle HTTP/1.1\r\n Host: proxy.test\r\n\r\n"),
]

BAD_CHUNKS = [
    _case("non-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    _case("negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    _case("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    _case("overflow-20-digits", b"1" + b"0" * 19 + b"\r\nhello\r\n0\r\n\r\n"),
    _case("data-overrun", b"5\r\nhelloXX0\r\n\r\n"),
]


@pytest.mark.parametrize("sent", REJECTED)
def test_ambiguous_request_rejected(target, recorder, sent):
    assert_rejected(target.address, recorder, sent, 400)


@pytest.mark.parametrize("chunks", BAD_CHUNKS)
def test_bad_chunk_rejected(target, recorder: Recorder, chunks):
    sent = _post(b"Transfer-Encoding: chunked", body=chunks)
    with RawClient(target.address) as client:
        client.send(sent)
        try:
            response = client.read_response()
        except PeerClosed:
            pytest.fail(f"closed without a response{describe(sent)}")
        assert_clean_error(response, 400, sent)
        client.wait_closed()
    settle()
    complete = [r for r in recorder.requests if r.complete]
    assert not complete, (
        f"upstream got complete requests {[r.body for r in complete]}{describe(sent)}"
    )
