"""Request heads from the security review (README, "Security review side by side"): what a
proxy reads leniently where RFC 9112 2.2 and RFC 9110 2.5 say to, what it refuses with the
status that names the problem, and what no client field may take from a request.

Found elsewhere: an HTTP/1.0 request without Host to a routed path (test_targets.py), and
Connection naming Host or Content-Length on a POST (test_hop_by_hop.py).
"""

import pytest

from .. import targets
from ..checks import answered_on_one_connection, assert_clean_error, assert_rejected, describe, forward
from ..client import RawClient, request


def test_http10_request_without_host_to_no_route_is_a_client_answer(target, recorder):
    """`/` matches no route: 404 (or 400), never the 500 the review got."""
    sent = b"GET / HTTP/1.0\r\n\r\n"
    with RawClient(target.address) as client:
        client.send(sent)
        response = client.read_response()
    assert response.status in (400, 404), f"got {response.status}{describe(sent, response)}"
    assert_clean_error(response, response.status, sent)


@pytest.mark.parametrize("connection", ["host", "keep-alive, Host"])
def test_connection_naming_host_leaves_it_in_place(target, recorder, connection):
    """The review's exact fields: the upstream gets the client's own Host, not none, not a
    substitute."""
    sent = request(headers=(("Connection", connection),))
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200, describe(sent, response)
    assert forwarded.get_all("host") == ["proxy.test"], forwarded.raw_head


def test_one_empty_line_before_the_request_line_is_ignored(target, recorder):
    """RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request-line."""
    sent = b"\r\nGET /app HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200, describe(sent, response)
    assert forwarded.target == "/app", forwarded.raw_head


def test_http12_is_served_as_http11(target, recorder):
    """RFC 9110 2.5: a higher minor version is handled as the highest one the recipient
    implements, so an HTTP/1.2 request is an HTTP/1.1 one, kept alive."""
    for response in answered_on_one_connection(target.address, request(version="HTTP/1.2")):
        assert response.version == "HTTP/1.1", response.raw_head
    forwarded = recorder.wait_for(2)
    assert all(r.line.endswith(" HTTP/1.1") for r in forwarded), [r.line for r in forwarded]


def test_request_target_over_the_head_limit_is_414(target, recorder):
    """The request line alone is too long: 414 URI Too Long (RFC 9112 3), not 431."""
    sent = request(target="/app/" + "t" * targets.MAX_HEADER_BYTES)
    assert_rejected(target.address, recorder, sent, 414, closes=False)
