"""Request targets (RFC 9112 3.2, RFC 3986 5.2.4): what a reverse proxy accepts and
how it forwards it. Routing happens on the normalised target, so the upstream must
receive exactly that; otherwise a route's rules can be dodged with dot-segments or
percent-encodings. What has no single reading (an encoded slash, a climb above the
root) is refused rather than guessed."""

import pytest

from ..checks import assert_nothing_forwarded, assert_rejected, describe, forward
from ..client import RawClient, request


def test_absolute_form_authority_ends_at_the_query(target, recorder):
    """``http://evil.example?/app`` names the path ``/`` with the query ``/app``: the
    authority is ``evil.example``, so no route matches. Reading the authority up to the
    first ``/`` instead would put ``evil.example?`` in Host and forward ``/app``."""
    sent = request(target="http://evil.example?/app")
    with RawClient(target.address) as client:
        client.send(sent)
        response = client.read_response()
    assert response.status == 404, describe(sent, response)
    assert_nothing_forwarded(recorder, sent)


@pytest.mark.quirk("nginx", "keeps the client's Host header (the generated config forwards $http_host)")
@pytest.mark.parametrize(
    ("sent_target", "forwarded_target", "host"),
    [
        pytest.param("http://other.test/app/abs?q=1", "/app/abs?q=1", "other.test", id="path-and-query"),
        pytest.param("HTTP://Evil.example/app?q=1", "/app?q=1", "Evil.example", id="upper-case-scheme"),
        pytest.param("http://evil.example:8080/app", "/app", "evil.example:8080", id="port"),
        pytest.param("http://[::1]:8080/app/x", "/app/x", "[::1]:8080", id="ipv6"),
        pytest.param("http://evil.example/app/x/../y?q=/../", "/app/y?q=/../", "evil.example",
                     id="normalised-path"),
        pytest.param("http://evil.example//%61pp/x", "/app/x", "evil.example", id="path-merged-and-decoded"),
    ],
)
def test_absolute_form_is_forwarded_in_origin_form_with_its_host(target, recorder, sent_target, forwarded_target, host):
    sent = request(target=sent_target, host="proxy.test")
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.target == forwarded_target, describe(sent)
    assert forwarded.get_all("host") == [host], forwarded.raw_head


_NGINX_PORT = pytest.mark.quirk("nginx", "does not check the port of an absolute-form target")
_NGINX_RAW = pytest.mark.quirk("nginx", "forwards it as sent (proxy_pass with no URI)")


@pytest.mark.parametrize(
    "sent_target",
    [
        pytest.param("http://evil.example:99999/app", id="port-above-65535", marks=_NGINX_PORT),
        pytest.param("http://evil.example:/app", id="empty-port", marks=_NGINX_PORT),
        pytest.param("http://[::1/app", id="unclosed-ipv6"),
        pytest.param("http://evil.example#/app", id="fragment-ends-authority"),
    ],
)
def test_bad_absolute_form_is_400(target, recorder, sent_target):
    assert_rejected(target.address, recorder, request(target=sent_target), 400)


@pytest.mark.parametrize(
    "sent_target",
    [
        pytest.param("/app/%2e%2e/%2e%2e/etc/passwd", id="encoded-dot-dot-above-root"),
        pytest.param("/../../x", id="dot-dot-above-root"),
        pytest.param("/app/../../x", id="dot-dot-past-the-route"),
        pytest.param("/app/%2fx", id="encoded-slash", marks=_NGINX_RAW),
        pytest.param("/app%2f..%2fx", id="encoded-slash-dot-dot",
                     marks=pytest.mark.quirk("nginx", "decodes %2f into a separator: 404, no route")),
        pytest.param("/app/%5cx", id="encoded-backslash", marks=_NGINX_RAW),
        pytest.param("/app/%00x", id="encoded-nul"),
        pytest.param("/app/\\x", id="backslash", marks=_NGINX_RAW),
        pytest.param("/app/x#frag", id="fragment", marks=_NGINX_RAW),
        pytest.param("/app/x?a#frag", id="fragment-after-query", marks=_NGINX_RAW),
        pytest.param("/app/..;/x", id="dot-dot-semicolon", marks=_NGINX_RAW),
        pytest.param("/app/.;/x", id="dot-semicolon", marks=_NGINX_RAW),
        pytest.param("/app/%zz", id="malformed-percent"),
        pytest.param("/app/%4", id="truncated-percent"),
    ],
)
def test_ambiguous_path_is_400(target, recorder, sent_target):
    """A path the next hop may read otherwise than the router did is refused, not
    forwarded: the upstream must never resolve a path sluice did not route."""
    assert_rejected(target.address, recorder, request(target=sent_target), 400)


_NGINX_ROUTES_DECODED = pytest.mark.quirk(
    "nginx", "routes on the decoded, merged URI but forwards the raw one (proxy_pass with no URI)")


@pytest.mark.parametrize(
    ("sent_target", "expected"),
    [
        pytest.param("/app/x/../y", "/app/y", id="dot-dot", marks=_NGINX_ROUTES_DECODED),
        pytest.param("/app/./y", "/app/y", id="dot", marks=_NGINX_ROUTES_DECODED),
        pytest.param("/app/x/%2e%2e/y", "/app/y", id="encoded-dot-dot", marks=_NGINX_ROUTES_DECODED),
        pytest.param("/app/y?path=/../z", "/app/y?path=/../z", id="query-with-dot-dot"),
        pytest.param("/app//x", "/app/x", id="double-slash", marks=_NGINX_ROUTES_DECODED),
        pytest.param("//app/x", "/app/x", id="leading-double-slash", marks=_NGINX_ROUTES_DECODED),
        pytest.param("/%61pp/x", "/app/x", id="encoded-letter", marks=_NGINX_ROUTES_DECODED),
        pytest.param("/app/%7e%2D", "/app/~-", id="encoded-unreserved", marks=_NGINX_ROUTES_DECODED),
        pytest.param("/app/%c3%a9", "/app/%C3%A9", id="other-encodings-upper-cased",
                     marks=_NGINX_ROUTES_DECODED),
        pytest.param("/app/%252e%252e/x", "/app/%252e%252e/x", id="decoded-once"),
        pytest.param("/app/x?q=%2f..%2f%zz\\", "/app/x?q=%2f..%2f%zz\\", id="query-untouched"),
    ],
)
def test_the_path_is_forwarded_as_it_was_routed(target, recorder, sent_target, expected):
    sent = request(target=sent_target)
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.target == expected, describe(sent)


def test_unsupported_http_version_is_505(target, recorder):
    assert_rejected(target.address, recorder, request(version="HTTP/2.0"), 505)


@pytest.mark.quirk("nginx", "sends no Host at all (the generated config forwards $http_host, empty here)")
def test_http10_request_without_host_gets_the_upstream_as_host(target, recorder):
    """HTTP/1.0 allows a request without Host; the upstream is spoken to in HTTP/1.1, which
    requires one, so the proxy supplies the upstream's own authority (never a 500)."""
    sent = request(version="HTTP/1.0", host=None)
    forwarded, response = forward(target.address, recorder, sent)
    assert response.status == 200
    assert forwarded.get_all("host") == [f"127.0.0.1:{recorder.port}"], forwarded.raw_head
