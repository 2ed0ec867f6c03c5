"""Request targets: the one path sluice routes and forwards (``sluice/protocol/targets.py``).

The tables below are the module's rules. Each is read by the pure function and
through both codecs' ServerConnection, which must agree with it byte for byte;
then a real proxy guarding ``/admin`` with an API key is sent every spelling
of ``/admin`` known to slip past a router, on raw sockets (httpx would
normalise some of them itself).
"""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.protocol import targets
from sluice.protocol.events import ProtocolError, RequestHead
from sluice.protocol.targets import normalize_path, request_target
from sluice.testing import serve

from .conftest import config, raw_request

# -- the tables -----------------------------------------------------------------

# Absolute form: (target, forwarded target, Host). The request also carries
# "Host: ignored.test", which the authority replaces.
ABSOLUTE = [
    pytest.param(b"http://evil.example?q=1", b"/?q=1", b"evil.example", id="query-right-after-authority"),
    pytest.param(b"http://a.test/p?q=1", b"/p?q=1", b"a.test", id="path-and-query"),
    pytest.param(b"http://a.test", b"/", b"a.test", id="empty-path"),
    pytest.param(b"http://a.test?", b"/?", b"a.test", id="empty-path-empty-query"),
    pytest.param(b"http://a.test?q=/x/../y", b"/?q=/x/../y", b"a.test", id="query-with-slashes"),
    pytest.param(b"HTTP://A.Test/p", b"/p", b"A.Test", id="upper-case-scheme-host-kept"),
    pytest.param(b"hTtPs://a.test/p", b"/p", b"a.test", id="https-any-case"),
    pytest.param(b"http://a.test:8080/p", b"/p", b"a.test:8080", id="port"),
    pytest.param(b"http://a.test:65535", b"/", b"a.test:65535", id="highest-port"),
    pytest.param(b"http://a.test:0080/", b"/", b"a.test:0080", id="port-leading-zeros"),
    pytest.param(b"http://127.0.0.1:80/p", b"/p", b"127.0.0.1:80", id="ipv4"),
    pytest.param(b"http://[::1]/p", b"/p", b"[::1]", id="ipv6"),
    pytest.param(b"http://[2001:DB8::7]:8443?q", b"/?q", b"[2001:DB8::7]:8443", id="ipv6-port-query"),
    pytest.param(b"http://[::ffff:192.0.2.1]/", b"/", b"[::ffff:192.0.2.1]", id="ipv4-mapped-ipv6"),
    pytest.param(b"http://a-b_c~d.test!$&'()*+,;=/", b"/", b"a-b_c~d.test!$&'()*+,;=", id="sub-delims"),
    pytest.param(b"http://a.test/x/../y?z=/../", b"/y?z=/../", b"a.test", id="path-normalised"),
    pytest.param(b"http://a.test//%61dmin", b"/admin", b"a.test", id="path-merged-and-decoded"),
]

ABSOLUTE_REFUSED = [
    pytest.param(b"http://user@a.test/", id="userinfo"),
    pytest.param(b"http://user:pw@a.test/", id="userinfo-password"),
    pytest.param(b"http://@a.test/", id="empty-userinfo"),
    pytest.param(b"http://a.test@evil.example/", id="userinfo-confusion"),
    pytest.param(b"http:///p", id="empty-host"),
    pytest.param(b"http://?q", id="empty-host-query"),
    pytest.param(b"http://:80/", id="port-without-host"),
    pytest.param(b"http://a.test:/", id="empty-port"),
    pytest.param(b"http://a.test:65536/", id="port-above-65535"),
    pytest.param(b"http://a.test:123456/", id="six-digit-port"),
    pytest.param(b"http://a.test:8x/", id="port-not-digits"),
    pytest.param(b"http://a.test:-1/", id="negative-port"),
    pytest.param(b"http://a.test:80:80/", id="two-ports"),
    pytest.param(b"http://::1/", id="ipv6-without-brackets"),
    pytest.param(b"http://[::1/p", id="unclosed-ipv6"),
    pytest.param(b"http://[::1]x/", id="junk-after-ipv6"),
    pytest.param(b"http://[1:2]/", id="not-an-ipv6-address"),
    pytest.param(b"http://[v1.x]/", id="ipvfuture"),
    pytest.param(b"http://[fe80::1%25eth0]/", id="ipv6-zone-id"),
    pytest.param(b"http://a%2etest/", id="percent-encoded-host"),
    pytest.param(b'http://a"b/', id="host-not-a-reg-name"),
    pytest.param(b"http://a.test#frag", id="fragment-after-authority"),
    pytest.param(b"http://a.test/p#frag", id="fragment-after-path"),
    pytest.param(b"http://a.test/../x", id="path-above-root"),
    pytest.param(b"ftp://a.test/", id="other-scheme"),
    pytest.param(b"http:/a.test/p", id="one-slash"),
    pytest.param(b"http:a.test/p", id="no-slashes"),
    pytest.param(b"a.test:80", id="authority-form"),
    pytest.param(b"a/b", id="relative-path"),
    pytest.param(b"*/", id="not-just-asterisk"),
]

# Origin form: (target, the target routed and forwarded).
NORMAL = [
    pytest.param(b"/", b"/", id="root"),
    pytest.param(b"/a/b?c=d&e", b"/a/b?c=d&e", id="plain"),
    pytest.param(b"*", b"*", id="asterisk"),
    # unreserved characters are decoded, in any case of hex
    pytest.param(b"/%61dmin", b"/admin", id="encoded-letter"),
    pytest.param(b"/%41%5a%30%39%2D%2e%5F%7e", b"/AZ09-._~", id="every-unreserved-class"),
    # other encodings stay, upper-cased
    pytest.param(b"/caf%c3%a9", b"/caf%C3%A9", id="other-encoding-upper-cased"),
    pytest.param(b"/a%3bb%20c%3F", b"/a%3Bb%20c%3F", id="reserved-stays-encoded"),
    pytest.param(b"/%252e%252e/x", b"/%252e%252e/x", id="decoded-once"),
    pytest.param(b"/100%25", b"/100%25", id="encoded-percent"),
    # slashes
    pytest.param(b"//admin", b"/admin", id="leading-double-slash"),
    pytest.param(b"/a///b//", b"/a/b/", id="slash-runs"),
    # dot-segments, however spelt
    pytest.param(b"/public/../admin", b"/admin", id="dot-dot"),
    pytest.param(b"/public/%2e%2e/admin", b"/admin", id="encoded-dot-dot"),
    pytest.param(b"/public/%2E%2e/admin", b"/admin", id="mixed-case-encoded-dot-dot"),
    pytest.param(b"/public/.%2E/admin", b"/admin", id="half-encoded-dot-dot"),
    pytest.param(b"/%2e/admin", b"/admin", id="encoded-dot"),
    pytest.param(b"/a/./b/", b"/a/b/", id="dot"),
    pytest.param(b"/a/b/..", b"/a/", id="trailing-dot-dot"),
    pytest.param(b"/a/b/.", b"/a/b/", id="trailing-dot"),
    pytest.param(b"/a/..", b"/", id="back-to-root"),
    pytest.param(b"/.", b"/", id="root-dot"),
    pytest.param(b"/%2e", b"/", id="root-encoded-dot"),
    pytest.param(b"/x//../y", b"/y", id="slashes-merged-before-dots"),
    pytest.param(b"/a;p=1/../b", b"/b", id="parameters-before-dot-dot"),
    pytest.param(b"/a/..?x", b"/?x", id="dot-dot-before-query"),
    # not dot-segments
    pytest.param(b"/a/.hidden/.../..b/b../", b"/a/.hidden/.../..b/b../", id="dots-in-names"),
    pytest.param(b"/file.tar.gz", b"/file.tar.gz", id="dots-in-a-name"),
    pytest.param(b"/admin;x=1", b"/admin;x=1", id="parameters-kept"),
    pytest.param(b"/a/<b>{c}|^`\"", b"/a/<b>{c}|^`\"", id="unsafe-but-allowed-bytes"),
    # the query is never touched
    pytest.param(b"/a?x=/../%2f%zz%5c%00\\//.", b"/a?x=/../%2f%zz%5c%00\\//.", id="query-untouched"),
    pytest.param(b"/a/%2e?%2e", b"/a/?%2e", id="query-not-decoded"),
]

PATH_REFUSED = [
    # above the root
    pytest.param(b"/a/%2e%2e/%2e%2e/etc/passwd", id="encoded-dot-dot-above-root"),
    pytest.param(b"/../../x", id="dot-dot-above-root"),
    pytest.param(b"/..", id="just-dot-dot"),
    pytest.param(b"/%2E%2E", id="just-encoded-dot-dot"),
    pytest.param(b"/a/../..", id="one-too-many"),
    pytest.param(b"/a/./../../b", id="one-too-many-after-dot"),
    pytest.param(b"//..//x", id="above-root-through-slashes"),
    # encodings the next hop may decode into something sluice did not see
    pytest.param(b"/a%2fb", id="encoded-slash"),
    pytest.param(b"/a%2Fb", id="encoded-slash-upper"),
    pytest.param(b"/public%2f..%2fadmin", id="encoded-slash-dot-dot"),
    pytest.param(b"/a%5cb", id="encoded-backslash"),
    pytest.param(b"/a%5Cb", id="encoded-backslash-upper"),
    pytest.param(b"/a%00b", id="encoded-nul"),
    pytest.param(b"/a\\b", id="backslash"),
    pytest.param(b"/public\\..\\admin", id="backslash-dot-dot"),
    pytest.param(b"/a#f", id="fragment"),
    pytest.param(b"/a?q#f", id="fragment-after-query"),
    pytest.param(b"/a#", id="empty-fragment"),
    # malformed percent-encoding
    pytest.param(b"/a%zz", id="not-hex"),
    pytest.param(b"/a%4", id="one-digit-at-end"),
    pytest.param(b"/a%4/b", id="one-digit"),
    pytest.param(b"/a%", id="percent-at-end"),
    pytest.param(b"/a%%41", id="double-percent"),
    pytest.param(b"/a%g0", id="g-is-not-hex"),
    # dot-segments with parameters (Tomcat's /..;/)
    pytest.param(b"/public/..;/admin", id="dot-dot-semicolon"),
    pytest.param(b"/a/.;/b", id="dot-semicolon"),
    pytest.param(b"/a/..;x=1/b", id="dot-dot-parameter"),
    pytest.param(b"/a/%2e%2e;/b", id="encoded-dot-dot-semicolon"),
    pytest.param(b"/a/..%3b/b", id="dot-dot-encoded-semicolon"),
    pytest.param(b"/a/.%3B/b", id="dot-encoded-semicolon"),
]


# -- the pure functions ---------------------------------------------------------


@pytest.mark.parametrize(("target", "forwarded", "host"), ABSOLUTE)
def test_absolute_form_becomes_origin_form_with_the_authority_as_host(target, forwarded, host):
    fields = [(b"host", b"ignored.test"), (b"accept", b"*/*")]
    assert request_target(target, fields) == forwarded
    assert fields == [(b"host", host), (b"accept", b"*/*")]


@pytest.mark.parametrize("target", ABSOLUTE_REFUSED)
def test_absolute_form_refusals(target):
    with pytest.raises(ProtocolError) as info:
        request_target(target, [(b"host", b"ignored.test")])
    assert info.value.status == 400


@pytest.mark.parametrize(("target", "normal"), NORMAL)
def test_normalisation(target, normal):
    fields = [(b"host", b"a.test")]
    assert request_target(target, fields) == normal
    assert fields == [(b"host", b"a.test")]
    assert request_target(normal, fields) == normal  # a fixed point


@pytest.mark.parametrize("target", PATH_REFUSED)
def test_path_refusals(target):
    with pytest.raises(ProtocolError) as info:
        request_target(target, [(b"host", b"a.test")])
    assert info.value.status == 400


def test_normalize_path_is_request_target_on_origin_form():
    assert normalize_path(b"/a/%2e%2e/b?c=%2e") == b"/b?c=%2e"


_PIECES = [b"/", b"//", b".", b"..", b"%2e", b"%2E", b"a", b"%61", b"%c3", b";", b"b;p", b"~", b"%7E", b"%25"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.sampled_from([b"", b"?x=/../%2f", b"?"]))
def test_normal_form_has_no_dot_segments_no_slash_runs_and_is_a_fixed_point(pieces, query):
    target = b"/" + b"".join(pieces) + query
    try:
        normal = request_target(target, [])
    except ProtocolError as exc:
        assert exc.status == 400
        return
    path, _, rest = normal.partition(b"?")
    assert rest == query[1:]
    assert path.startswith(b"/") and b"//" not in path
    assert not {b".", b".."} & set(path.split(b"/"))
    for escape in re.findall(rb"%..", path):  # upper-case, and never an unreserved character
        assert re.fullmatch(rb"%[0-9A-F]{2}", escape), path
        assert not re.fullmatch(rb"[\w.~-]", bytes.fromhex(escape[1:].decode())), path
    assert request_target(normal, []) == normal


# -- through each codec ---------------------------------------------------------


def _read(codec, target: bytes) -> RequestHead:
    method = b"OPTIONS" if target == b"*" else b"GET"
    conn = codec.server(max_head_bytes=4096, max_header_count=10)
    conn.feed(method + b" " + target + b" HTTP/1.1\r\nHost: ignored.test\r\nAccept: */*\r\n\r\n")
    return conn.next_event()


@pytest.mark.parametrize(("target", "forwarded", "host"), ABSOLUTE)
def test_absolute_form_through_each_codec(codec, target, forwarded, host):
    request = _read(codec, target).request
    assert request.target == forwarded.decode()
    assert request.headers.get_all("host") == [host.decode()]
    assert request.headers.get_all("accept") == ["*/*"]


@pytest.mark.parametrize(("target", "normal"), NORMAL)
def test_normalisation_through_each_codec(codec, target, normal):
    request = _read(codec, target).request
    assert request.target == normal.decode("latin-1")
    assert request.path == normal.partition(b"?")[0].decode("latin-1")


@pytest.mark.parametrize("target", ABSOLUTE_REFUSED + PATH_REFUSED)
def test_refusals_through_each_codec(codec, target):
    with pytest.raises(ProtocolError) as info:
        _read(codec, target)
    assert info.value.status == 400


# -- end to end: an API key on /admin, and every way around it -------------------

KEY = "s3cret-key"

# (raw target, status without the key, target the upstream gets with the key).
# A 400 is refused whoever asks; a 401 reached the key check, and with the key
# the upstream receives exactly the path that was routed to /admin.
BYPASSES = [
    (b"/%61dmin", 401, b"/admin"),
    (b"/%2e/admin", 401, b"/admin"),
    (b"/./admin", 401, b"/admin"),
    (b"/public/../admin", 401, b"/admin"),
    (b"/public/%2e%2e/admin", 401, b"/admin"),
    (b"/public/%2E%2e/admin", 401, b"/admin"),
    (b"/public/%2E%2E/admin/x", 401, b"/admin/x"),
    (b"/public/.%2e/admin", 401, b"/admin"),
    (b"/public/x/../../admin", 401, b"/admin"),
    (b"//admin", 401, b"/admin"),
    (b"/public//..//admin", 401, b"/admin"),
    (b"/admin;x=1", 401, b"/admin;x=1"),
    (b"/admin%3bx=1", 401, b"/admin%3Bx=1"),
    (b"/%61dmin/%2e%2e/admin?next=/public", 401, b"/admin?next=/public"),
    (b"http://a.test/public/../admin", 401, b"/admin"),
    (b"http://a.test//admin", 401, b"/admin"),
    (b"/public%2f..%2fadmin", 400, None),
    (b"/public%2F..%2Fadmin", 400, None),
    (b"/public/..%2fadmin", 400, None),
    (b"/%2fadmin", 400, None),
    (b"/public/..;/admin", 400, None),
    (b"/public/..%3B/admin", 400, None),
    (b"/public\\..\\admin", 400, None),
    (b"/public%5c..%5cadmin", 400, None),
    (b"/public/../../admin", 400, None),
    (b"/public#/../admin", 400, None),
    (b"/public/%2e%2e%2fadmin", 400, None),
    (b"/public/%%32%65%%32%65/admin", 400, None),  # double encoding, the malformed kind
]


def _admin_config(origin_address: str, codec_name: str) -> dict:
    routes = [
        {"match": {"prefix": "/admin"}, "cluster": "backend"},
        {"match": {"prefix": "/"}, "cluster": "backend", "filters": {"api_key": {"disabled": True}}},
    ]
    keys = {"ops": hashlib.sha256(KEY.encode()).hexdigest()}
    return config(origin_address, filters=["api_key", "router"], routes=routes,
                  filter_settings={"api_key": {"keys": keys}}, server={"http1_codec": codec_name})


async def _get(address, target: bytes, key: bool) -> int:
    head = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
    if key:
        head += b"X-Api-Key: " + KEY.encode() + b"\r\n"
    raw = await raw_request(address, head + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 "), raw
    return int(raw[9:12])


async def test_no_spelling_of_admin_reaches_the_upstream_without_the_key(codec, start_origin):
    origin = await start_origin()
    async with serve(_admin_config(origin.address, codec.name), plugins=["router", "balancer", "auth"]) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert (await client.get("/public/x")).status_code == 200
            assert (await client.get("/admin")).status_code == 401
            assert (await client.get("/admin", headers={"x-api-key": KEY})).status_code == 200
        assert [r.target for r, _ in origin.requests] == [b"/public/x", b"/admin"]

        outcomes = {}
        for target, _, _ in BYPASSES:
            before = len(origin.requests)
            without_key = await _get(proxy.address, target, key=False)
            reached = [r.target for r, _ in origin.requests[before:]]
            with_key = await _get(proxy.address, target, key=True)
            forwarded = [r.target for r, _ in origin.requests[before + len(reached):]]
            outcomes[target] = (without_key, reached, with_key, forwarded)

    expected = {
        # stopped at the key check; with the key, routed and forwarded alike
        target: (401, [], 200, [forwarded]) if status == 401 else (400, [], 400, [])
        for target, status, forwarded in BYPASSES
    }
    assert outcomes == expected


def test_the_memo_of_valid_hosts_stays_bounded_and_never_holds_a_bad_one():
    for i in range(3 * targets._HOSTS_KEPT):
        targets.check_host(b"h%d.test" % i)
        assert len(targets._HOSTS_SEEN) <= targets._HOSTS_KEPT
    with pytest.raises(ProtocolError):
        targets.check_host(b"u@h1.test")
    assert b"u@h1.test" not in targets._HOSTS_SEEN
