"""Content-Length values from the security review (RFC 9112 6.3, RFC 9110 8.6): what does
not fit in 64 bits is refused, and what is accepted reaches the upstream as one canonical
decimal, so the next hop cannot read another length from it.

Lists of different values and signs are in test_smuggling.py.
"""

import pytest

from ..checks import assert_clean_error, assert_nothing_forwarded, assert_rejected, describe, forward
from ..client import RawClient


def _post(*fields: str, body: bytes) -> bytes:
    lines = ["POST /app/length HTTP/1.1", "Host: proxy.test", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_content_length_over_64_bits_is_400(target, recorder):
    """2**64 + 5: a reader that wraps around would take it for 5."""
    sent = _post("Content-Length: 18446744073709551621", body=b"hello")
    assert_rejected(target.address, recorder, sent, 400)


def test_content_length_with_leading_zeros_is_forwarded_canonical(target, recorder):
    sent = _post("Content-Length: 0010", body=b"0123456789")
    forwarded, response = forward(target.address, recorder, sent, method="POST")
    assert response.status == 200, describe(sent, response)
    assert forwarded.get_all("content-length") == ["10"], forwarded.raw_head
    assert forwarded.body == b"0123456789"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(("Content-Length: 5, 5",), id="list"),
        pytest.param(("Content-Length: 5", "Content-Length: 5"), id="two-fields"),
    ],
)
def test_repeated_equal_content_length_is_refused_or_made_one(target, recorder, fields):
    """RFC 9112 6.3 allows either: refuse, or take the one value and forward just it."""
    sent = _post(*fields, body=b"hello")
    with RawClient(target.address) as client:
        client.send(sent)
        response = client.read_response("POST")
    if response.status == 400:
        assert_clean_error(response, 400, sent)
        assert_nothing_forwarded(recorder, sent)
        return
    assert response.status == 200, describe(sent, response)
    [forwarded] = recorder.wait_for(1)
    assert forwarded.get_all("content-length") == ["5"], forwarded.raw_head
    assert forwarded.body == b"hello"
