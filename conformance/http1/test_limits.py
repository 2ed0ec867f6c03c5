"""Listener limits: head size and field count (431), body size (413), slow heads (408)."""

import pytest

from .. import targets
from ..checks import assert_rejected, describe, forward
from ..client import RawClient, request

_NGINX_COUNT = pytest.mark.quirk("nginx", "has no limit on the number of header fields")
_NGINX_SIZE = pytest.mark.quirk(
    "nginx", "limits each field line to 8k (answering 400), not the whole head"
)


def _fields(count: int, size: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"X-Field-{i:03d}", "v" * size) for i in range(count))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(_fields(1, 9000), id="one-large-field", marks=_NGINX_SIZE),
        pytest.param(_fields(40, 230), id="many-medium-fields", marks=_NGINX_SIZE),
        pytest.param(_fields(60, 4), id="too-many-fields", marks=_NGINX_COUNT),
    ],
)
def test_head_over_limits_rejected(target, recorder, fields):
    assert_rejected(target.address, recorder, request(headers=fields), 431, closes=False)


def test_head_within_limits_forwarded(target, recorder):
    sent = request(headers=_fields(40, 150))
    assert len(sent) < targets.MAX_HEADER_BYTES
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200, describe(sent, response)
    assert forwarded.get_all("x-field-039") == ["v" * 150]


def test_body_over_limit_rejected_from_content_length(target, recorder):
    # Only the head is sent: the Content-Length alone must be enough to refuse.
    head = request("POST", headers=(("Content-Length", str(targets.MAX_BODY_BYTES + 1)),))
    assert_rejected(target.address, recorder, head, 413, closes=False)


def test_body_at_limit_forwarded(target, recorder):
    body = b"b" * targets.MAX_BODY_BYTES
    forwarded, response = forward(target.address, recorder, request("POST", body=body))
    assert response.status == 200
    assert forwarded.body == body


def test_slow_head_times_out(target, recorder):
    """408 (or a plain close) about header_read seconds after an unfinished head."""
    with RawClient(target.address) as client:
        client.send(b"GET /app/slow HTTP/1.1\r\nHost: proxy.test\r\n")
        rest, elapsed = client.wait_closed(timeout=targets.HEADER_READ + 2)
    assert elapsed >= targets.HEADER_READ - 0.5, f"closed after {elapsed:.2f}s: too early"
    if rest:
        assert rest.startswith(b"HTTP/1.1 408 "), rest
    assert recorder.received() == b""
