"""Request targets (RFC 9112 3.2, RFC 3986 5.2.4): what a reverse proxy accepts and
how it forwards it. Routing happens on the normalised target, so the upstream must
receive exactly that; otherwise a route's rules can be dodged with dot-segments."""

import pytest

from ..checks import assert_rejected, describe, forward
from ..client import request


@pytest.mark.quirk("nginx", "keeps the client's Host header (the generated config forwards $http_host)")
def test_absolute_form_is_forwarded_in_origin_form_with_its_host(target, recorder):
    sent = request(target="http://other.test/app/abs?q=1", host="proxy.test")
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.target == "/app/abs?q=1", describe(sent)
    assert forwarded.get_all("host") == ["other.test"], forwarded.raw_head


@pytest.mark.quirk("nginx", "routes on the normalised URI but forwards the raw one (proxy_pass with no URI)")
@pytest.mark.parametrize(
    ("sent_target", "expected"),
    [
        pytest.param("/app/x/../y", "/app/y", id="dot-dot"),
        pytest.param("/app/./y", "/app/y", id="dot"),
        pytest.param("/app/x/%2e%2e/y", "/app/y", id="encoded-dot-dot"),
        pytest.param("/app/y?path=/../z", "/app/y?path=/../z", id="query-untouched"),
    ],
)
def test_dot_segments_are_removed_before_forwarding(target, recorder, sent_target, expected):
    sent = request(target=sent_target)
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.target == expected, describe(sent)


def test_unsupported_http_version_is_505(target, recorder):
    assert_rejected(target.address, recorder, request(version="HTTP/2.0"), 505)


def test_http10_request_without_host_gets_the_upstream_as_host(target, recorder):
    """HTTP/1.0 allows a request without Host; the upstream is spoken to in HTTP/1.1, which
    requires one, so the proxy supplies the upstream's own authority (never a 500)."""
    sent = request(version="HTTP/1.0", host=None)
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.get_all("host") == [f"127.0.0.1:{recorder.port}"], forwarded.raw_head
