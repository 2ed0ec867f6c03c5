"""Route conditions beyond host, path, method and headers: source address
(and trust_forwarded), listener port, TLS SNI, query parameters; through a
real sluice."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest
import trio
import trustme

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config, read_until_closed

PLUGINS = ["router", "balancer", "tls"]


def direct(body: str, **match) -> dict:
    return {"match": match, "direct_response": {"status": 200, "body": body}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_source_matches_the_peer_or_the_forwarded_client_on_a_trusting_listener():
    routes = [
        direct("ten", source=["10.0.0.0/8", "2001:db8::/32"]),
        direct("loopback", source="127.0.0.1"),
        direct("other"),
    ]
    cfg = config("127.0.0.1:9", routes=routes, listener={"name": "plain"})
    cfg["listeners"].append({"name": "behind-lb", "address": "127.0.0.1:0", "filters": ["router"],
                             "trust_forwarded": True})
    cases = [
        # (listener, X-Forwarded-For sent, route)
        (0, None, "loopback"),
        (0, "10.1.2.3", "loopback"),           # not trusted: the peer is the client
        (1, None, "loopback"),                 # trusted, but nothing forwarded
        (1, "10.1.2.3", "ten"),
        (1, "10.9.9.9, 192.0.2.7", "other"),   # the last entry is the trusted peer's
        (1, "192.0.2.7, 10.1.2.3", "ten"),
        (1, "2001:db8::1", "ten"),
        (1, "unknown", "other"),               # not an address: no source matches
    ]
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        for listener, xff, want in cases:
            headers = {"x-forwarded-for": xff} if xff else {}
            r = await client.get(proxy.urls[listener] + "/", headers=headers)
            assert r.text == want, (listener, xff)


async def test_port_matches_the_listener_the_request_came_in_on():
    port = free_port()
    routes = [direct("admin", port=port), direct("public", port=[1, 2])]
    cfg = config("127.0.0.1:9", routes=routes, listener={"name": "public"})
    cfg["listeners"].append({"name": "admin", "address": f"127.0.0.1:{port}", "filters": ["router"]})
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        admin = await client.get(f"http://127.0.0.1:{port}/")
        public = await client.get(proxy.urls[0] + "/", headers={"host": f"127.0.0.1:{port}"})
    assert admin.text == "admin"
    assert public.status_code == 404  # the Host's port is not the listener's


async def test_port_0_matches_the_bound_port():
    # A listener on port 0 matches on the port it got (the connection's
    # local port, ctx.local), never on 0; none of 1..2 is it.
    routes = [direct("never", port=[1, 2]), direct("fallback")]
    async with serve(config("127.0.0.1:9", routes=routes), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/")).text == "fallback"
        bound = proxy.address[1]
        routes = [direct("bound", port=[bound]), direct("fallback")]
    async with serve(config("127.0.0.1:9", routes=routes, listener={"address": f"127.0.0.1:{bound}"}),
                     plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        assert (await client.get(proxy.url + "/")).text == "bound"


@pytest.fixture(scope="module")
def sni_cert(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("api.example.com", "www.example.com", "localhost")
    d = tmp_path_factory.mktemp("sni")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d


async def _get_over_tls(address: tuple[str, int], ca: str, server_hostname: str | None) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    if server_hostname is None:
        ctx.check_hostname = False
    stream = await trio.open_tcp_stream(*address)
    tls = trio.SSLStream(stream, ctx, server_hostname=server_hostname, https_compatible=True)
    async with tls:
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: whatever.test\r\nConnection: close\r\n\r\n")
        answer = await read_until_closed(tls)
    return answer.rpartition(b"\r\n\r\n")[2]


async def test_sni_matches_the_server_name_of_the_tls_handshake(sni_cert):
    routes = [direct("api", sni="api.example.com"), direct("wild", sni="*.example.com"),
              direct("any", sni="*"), direct("none")]
    tls = {"cert": str(sni_cert / "cert.pem"), "key": str(sni_cert / "key.pem")}
    cfg = config("127.0.0.1:9", routes=routes, listener={"tls": tls})
    cfg["listeners"].append({"address": "127.0.0.1:0", "filters": ["router"]})
    ca = str(sni_cert / "ca.pem")
    async with serve(cfg, plugins=PLUGINS) as proxy:
        address = proxy.address
        assert await _get_over_tls(address, ca, "api.example.com") == b"api"
        assert await _get_over_tls(address, ca, "WWW.example.com") == b"wild"
        assert await _get_over_tls(address, ca, "localhost") == b"any"
        assert await _get_over_tls(address, ca, None) == b"none"  # no SNI sent
        async with httpx.AsyncClient() as client:  # plain HTTP has no SNI
            assert (await client.get(proxy.urls[1] + "/")).text == "none"


async def test_query_parameters_match_exact_regex_or_presence():
    routes = [
        direct("v2", query={"name": "v", "exact": "2"}),
        direct("beta-item", query=[{"name": "beta", "present": True}, {"name": "id", "regex": "[0-9]+"}]),
        direct("no-debug", prefix="/q", query=[{"name": "debug", "present": False}]),
        direct("rest"),
    ]
    cases = [
        ("/?v=2", "v2"),
        ("/?a=1&v=%32", "v2"),         # percent-decoded
        ("/?v=2&v=3", "v2"),           # the first value counts
        ("/?v=3&v=2", "rest"),
        ("/?beta&id=42", "beta-item"),  # present, even empty
        ("/?beta=1&id=4x", "rest"),     # a full match
        ("/q", "no-debug"),
        ("/q?debug=0", "rest"),
    ]
    async with serve(config("127.0.0.1:9", routes=routes), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for target, want in cases:
                r = await client.get(proxy.url + target)
                assert r.text == want, target


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ({"source": ["10.0.0.0/8", "10.0.0.1/8"]}, "routes[0].match.source[1]: not an address or CIDR block"),
        ({"source": "nonsense"}, "routes[0].match.source[0]: not an address or CIDR block"),
        ({"port": 0}, "routes[0].match.port[0]: Input should be greater than or equal to 1"),
        ({"port": [80, 70000]}, "routes[0].match.port[1]"),
        ({"sni": "a b"}, "routes[0].match.sni: not a server name, *.suffix or *"),
        ({"query": {"name": "v"}}, "routes[0].match.query[0]: give exactly one of exact, regex, present"),
        ({"query": [{"name": "v", "regex": "("}]}, "routes[0].match.query[0].regex: bad regex"),
        ({"query": {"v": "1"}}, "routes[0].match.query[0].v: unknown key"),
        ({"headers": [{"name": "x", "regex": "["}]}, "routes[0].match.headers"),
    ],
)
async def test_bad_conditions_are_config_errors_with_key_paths(match, message):
    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", routes=[direct("x", **match)]), plugins=PLUGINS):
            pass
    assert message in str(info.value)
