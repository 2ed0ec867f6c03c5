"""Request pseudo-header fields and field syntax (RFC 9113 8.2.1, 8.3.1): a request that
breaks them is malformed (8.1.1): RST_STREAM PROTOCOL_ERROR (a 400 first is allowed), never
forwarded, and the connection goes on. What is valid becomes an HTTP/1.1 request line and
Host upstream.
"""

import pytest

from ..h2client import request_fields
from .checks import assert_malformed

_NGINX_ACCEPTS = pytest.mark.quirk("nginx", "accepts it and forwards the request")

GET = [(":method", "GET"), (":scheme", "http"), (":path", "/app/p"), (":authority", "proxy.test")]


def _without(name):
    return [f for f in GET if f[0] != name]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(_without(":method"), id="no-method"),
        pytest.param(_without(":scheme"), id="no-scheme"),
        pytest.param(_without(":path"), id="no-path"),
        pytest.param([*GET[:3], (":path", "/app/q"), GET[3]], id="two-paths"),
        pytest.param([*GET, (":method", "POST")], id="two-methods"),
        pytest.param([*GET, (":status", "200")], id="response-pseudo-header"),
        pytest.param([*GET, (":foo", "bar")], id="unknown-pseudo-header"),
        pytest.param([*GET[:2], ("x-a", "1"), *GET[2:]], id="pseudo-after-regular",
                     marks=_NGINX_ACCEPTS),
        pytest.param([*_without(":path"), (":path", "")], id="empty-path"),
        pytest.param([*GET, ("X-Upper", "1")], id="uppercase-name"),  # 8.2.1
        pytest.param([*GET, ("x-a", "1\r\nx-injected: 1")], id="crlf-in-value"),  # 8.2.1
        pytest.param([*GET, ("x-a", "1\nx-injected: 1")], id="lf-in-value"),
        pytest.param([*GET, ("x-a", "a\x00b")], id="nul-in-value"),
        pytest.param([*GET, ("x a", "1")], id="space-in-name"),
        pytest.param([*GET, ("x-a:b", "1")], id="colon-in-name"),
        pytest.param([*GET, ("x-a", " padded")], id="leading-space-in-value", marks=_NGINX_ACCEPTS),
        pytest.param([*GET, ("x-a", "padded\t")], id="trailing-tab-in-value", marks=_NGINX_ACCEPTS),
    ],
)
def test_a_malformed_request_is_refused_on_its_stream(client, recorder, fields):
    stream_id = client.new_stream_id()
    client.send(client.headers(stream_id, [(n.encode(), v.encode()) for n, v in fields]))
    assert_malformed(client, stream_id, recorder)


def test_content_length_that_disagrees_with_the_data_is_malformed(client, recorder):
    """RFC 9113 8.1.1: a content-length that is not the sum of the DATA payloads makes the
    request malformed; the upstream never sees a complete request."""
    stream_id = client.request(
        "/app/cl", method="POST", extra=(("content-length", "10"),), body=b"12345"
    )
    stream = client.response(stream_id)
    assert stream.reset is not None or stream.status == 400, client.describe()
    assert not [r for r in recorder.requests if r.complete], recorder.requests


def test_authority_becomes_the_host(client, recorder):
    """RFC 9113 8.3.1: :authority is the target's authority; upstream it is the Host."""
    stream = client.response(client.request("/app/authority"))
    assert stream.status == 200, client.describe()
    [forwarded] = recorder.wait_for(1)
    assert forwarded.line == "GET /app/authority HTTP/1.1"
    assert forwarded.get_all("host") == ["proxy.test"], forwarded.raw_head


def test_a_host_that_differs_from_authority_is_not_forwarded_as_sent(client, recorder):
    """RFC 9113 8.3.1: Host and :authority must identify the same origin; the proxy refuses
    the request or forwards one Host, the :authority's."""
    stream = client.response(
        client.request(fields=request_fields("/app/two-hosts", extra=(("host", "evil.test"),)))
    )
    if stream.status == 200:
        [forwarded] = recorder.wait_for(1)
        assert forwarded.get_all("host") == ["proxy.test"], forwarded.raw_head
    else:
        assert stream.reset is not None or stream.status == 400, client.describe()


def test_cookie_crumbs_are_joined(client, recorder):
    """RFC 9113 8.2.3: several cookie fields become one, joined with "; ", for HTTP/1.1."""
    extra = (("cookie", "a=1"), ("cookie", "b=2"))
    assert client.response(client.request("/app/cookies", extra=extra)).status == 200
    [forwarded] = recorder.wait_for(1)
    assert forwarded.get_all("cookie") == ["a=1; b=2"], forwarded.raw_head
