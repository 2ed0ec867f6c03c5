"""Request trailers from the security review (RFC 9112 7.1.2, RFC 9110 6.5): a trailer
section is a head after the body and gets the same limits and the same strict grammar, and
fields that frame, route or authenticate a request never reach the upstream as trailers.
"""

import pytest

from .. import targets
from ..checks import assert_clean_error, assert_refused_mid_body, describe, forward, settle
from ..client import RawClient

_NGINX_IGNORES = pytest.mark.quirk(
    "nginx", "reads request trailers without limit or grammar and drops them (forwards the request)"
)

HEAD = b"POST /app/trailers HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"


def _with_trailers(*lines: bytes) -> bytes:
    return HEAD + b"5\r\nhello\r\n0\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@pytest.mark.parametrize(
    ("lines", "statuses"),
    [
        pytest.param(
            [b"X-Trailer-%04d: %s" % (i, b"v" * 16) for i in range(3001)],
            (431, 400),
            id="3001-fields",
            marks=_NGINX_IGNORES,
        ),
        pytest.param(
            [b"X-Trailer-%02d: v" % i for i in range(targets.MAX_HEADER_COUNT + 10)],
            (431,),
            id="over-the-field-count",  # small: the count alone refuses it
            marks=_NGINX_IGNORES,
        ),
        pytest.param(
            [b"X-Big: " + b"b" * targets.MAX_HEADER_BYTES], (431,), id="over-the-head-limit",
            marks=_NGINX_IGNORES,
        ),
        pytest.param([b"X-A: a", b" b"], (400,), id="obs-fold", marks=_NGINX_IGNORES),
        pytest.param([b"X-A: 1\nX-B: 2"], (400,), id="bare-lf", marks=_NGINX_IGNORES),
    ],
)
def test_bad_trailer_section_is_refused(target, recorder, lines, statuses):
    assert_refused_mid_body(target.address, recorder, _with_trailers(*lines), statuses)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"Host: evil.test", id="host"),
        pytest.param(b"Authorization: Basic Zm9vOmJhcg==", id="authorization"),
        pytest.param(b"Cookie: session=stolen", id="cookie"),
    ],
)
def test_trailers_that_route_or_authenticate_are_not_forwarded(target, recorder, line):
    """RFC 9110 6.5.1: such fields are not allowed in trailers; an upstream that merges
    trailers into the head would take them for the request's own."""
    sent = _with_trailers(b"X-Checksum: 1", line)
    forwarded, response = forward(target.address, recorder, sent, method="POST")
    assert response.status == 200, describe(sent, response)
    name = line.split(b":")[0].decode().lower()
    assert name not in {n.lower() for n, _ in forwarded.trailers or []}, forwarded.trailers
    assert forwarded.get_all("host") == ["proxy.test"], forwarded.raw_head
    assert forwarded.body == b"hello"


def test_content_length_in_trailers_is_refused_or_dropped(target, recorder):
    sent = _with_trailers(b"Content-Length: 50")
    with RawClient(target.address) as client:
        client.send(sent)
        response = client.read_response("POST")
    if response.status == 400:
        assert_clean_error(response, 400, sent)
        settle()
        assert not [r for r in recorder.requests if r.complete], describe(sent, response)
        return
    assert response.status == 200, describe(sent, response)
    [forwarded] = recorder.wait_for(1)
    assert not [n for n, _ in forwarded.trailers or [] if n.lower() == "content-length"], (
        forwarded.trailers
    )
    assert forwarded.get_all("content-length") in ([], ["5"]), forwarded.raw_head
    assert forwarded.body == b"hello"
