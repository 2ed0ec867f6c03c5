"""The cors filter through a real proxy, with the requests a browser sends (httpx and curl):
preflights answered locally, actual requests' headers, exact origins and patterns (and what a
pattern must not match), credentials, Vary, the upstream's own CORS headers replaced, refusal
on request, per-route settings, config errors by key path (its contract battery is in test_contract_battery.py)."""

from __future__ import annotations

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.plugins import cors
from sluice.testing import serve

from .authz_support import counted, plugin_counts
from .conftest import config
from .origin import Reply

PLUGINS = ["router", "balancer"]
EXTRA = {"cors": cors}
APP = "https://app.example.com"
SETTINGS = {"allow_origins": [APP, "https://*.corp.example"], "allow_methods": ["GET", "PUT", "DELETE"],
            "allow_headers": ["content-type", "x-token"], "expose_headers": ["x-request-id"], "max_age": 900}


def _config(origin, settings=None, routes=None) -> dict:
    return config(origin.address, filters=["cors", "router"], routes=routes,
                  filter_settings={"cors": settings or SETTINGS})


def _preflight(origin: str, method: str = "PUT", headers: str | None = "content-type, x-token") -> dict:
    h = {"origin": origin, "access-control-request-method": method}
    if headers:
        h["access-control-request-headers"] = headers
    return h


def _cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


async def test_a_preflight_is_answered_locally_for_an_allowed_origin(start_origin):
    origin = await start_origin()
    before = plugin_counts("cors_requests", "kind", "origin")
    async with serve(_config(origin), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.options(proxy.url + "/items/1", headers=_preflight(APP))
    assert r.status_code == 204 and r.content == b""
    assert _cors_headers(r) == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": "GET, PUT, DELETE",
        "access-control-allow-headers": "content-type, x-token",
        "access-control-max-age": "900",
    }
    assert "Origin" in r.headers["vary"] and "Access-Control-Request-Headers" in r.headers["vary"]
    assert origin.requests == []  # never upstream
    assert counted(before, plugin_counts("cors_requests", "kind", "origin")) == {("preflight", "allowed"): 1}


async def test_a_preflight_from_a_disallowed_origin_gets_no_cors_headers(start_origin):
    origin = await start_origin()
    async with serve(_config(origin), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.options(proxy.url + "/items/1", headers=_preflight("https://evil.example"))
    assert r.status_code == 204 and _cors_headers(r) == {}
    assert origin.requests == []


@pytest.mark.parametrize(("candidate", "allowed"), [
    (APP, True),
    ("https://a.corp.example", True),
    ("https://a.b.corp.example", True),
    ("https://corp.example", False),  # the pattern is for subdomains, not the domain itself
    ("http://a.corp.example", False),  # another scheme
    ("https://a.corp.example:8443", False),  # another port
    ("https://a.corp.example.evil.com", False),
    ("https://evilcorp.example", False),  # not a label boundary
    ("https://x@a.corp.example", False),
    ("https://app.example.com.evil.com", False),
    ("https://APP.example.com", False),  # browsers serialise lowercase; anything else is not them
    ("null", False),
])
async def test_origins_match_exactly_or_by_subdomain_pattern(start_origin, candidate, allowed):
    origin = await start_origin()
    async with serve(_config(origin), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.options(proxy.url + "/", headers=_preflight(candidate))
    assert (r.headers.get("access-control-allow-origin") == candidate) is allowed
    assert ("access-control-allow-origin" in r.headers) is allowed


async def test_an_actual_request_gets_allow_origin_vary_and_expose(start_origin):
    async def with_own_cors(request, body):  # the upstream's own CORS headers are replaced: the edge owns them
        return Reply(200, [(b"access-control-allow-origin", b"*"), (b"vary", b"accept-encoding")], b"ok")

    origin = await start_origin(with_own_cors)
    async with serve(_config(origin), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            allowed = await client.get(proxy.url + "/data", headers={"origin": "https://x.corp.example"})
            denied = await client.get(proxy.url + "/data", headers={"origin": "https://evil.example"})
            plain = await client.get(proxy.url + "/data")
    assert allowed.status_code == 200
    assert _cors_headers(allowed) == {"access-control-allow-origin": "https://x.corp.example",
                                      "access-control-expose-headers": "x-request-id"}
    assert allowed.headers.get_list("vary") == ["accept-encoding", "Origin"]
    assert denied.status_code == 200 and _cors_headers(denied) == {}  # the browser withholds it
    assert "Origin" in denied.headers.get_list("vary")
    assert _cors_headers(plain) == {"access-control-allow-origin": "*"}  # no Origin: not ours to touch
    assert len(origin.requests) == 3  # every one went upstream


async def test_options_without_a_request_method_is_an_ordinary_request(start_origin):
    origin = await start_origin()
    async with serve(_config(origin), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.options(proxy.url + "/x", headers={"origin": APP})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    assert len(origin.requests) == 1


async def test_credentials_and_headers_echoed(start_origin):
    origin = await start_origin()
    settings = {"allow_origins": [APP], "allow_credentials": True, "allow_headers": ["*"]}
    async with serve(_config(origin, settings), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            pre = await client.options(proxy.url + "/", headers=_preflight(APP, "GET", "x-custom, x-other"))
            actual = await client.get(proxy.url + "/", headers={"origin": APP, "cookie": "s=1"})
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert pre.headers["access-control-allow-headers"] == "x-custom, x-other"  # "*" means nothing with credentials
    assert actual.headers["access-control-allow-origin"] == APP
    assert actual.headers["access-control-allow-credentials"] == "true"


async def test_wildcard_without_credentials_answers_star(start_origin):
    origin = await start_origin()
    async with serve(_config(origin, {"allow_origins": ["*"], "allow_headers": ["*"]}),
                     plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            pre = await client.options(proxy.url + "/", headers=_preflight("https://any.where"))
            actual = await client.get(proxy.url + "/", headers={"origin": "https://any.where"})
    assert pre.headers["access-control-allow-origin"] == "*"
    assert pre.headers["access-control-allow-headers"] == "*"
    assert actual.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in actual.headers
    assert "Origin" not in actual.headers.get_list("vary")  # the answer is the same for every origin


async def test_refuse_disallowed_answers_403_before_the_upstream(start_origin):
    origin = await start_origin()
    async with serve(_config(origin, {**SETTINGS, "refuse_disallowed": True}), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            denied = await client.post(proxy.url + "/", headers={"origin": "https://evil.example"}, content=b"x")
            allowed = await client.post(proxy.url + "/", headers={"origin": APP}, content=b"x")
    assert denied.status_code == 403 and allowed.status_code == 200
    assert len(origin.requests) == 1


async def test_curl_preflight_and_request(start_origin):
    origin = await start_origin()
    async with serve(_config(origin), plugins=PLUGINS, extra=EXTRA) as proxy:
        with trio.fail_after(10):
            out = await trio.run_process(
                ["curl", "-sS", "-i", "-X", "OPTIONS", proxy.url + "/items",
                 "-H", f"Origin: {APP}", "-H", "Access-Control-Request-Method: DELETE"], capture_stdout=True)
    head = out.stdout.decode().lower()
    assert head.startswith("http/1.1 204")
    assert f"access-control-allow-origin: {APP}" in head
    assert "access-control-allow-methods: get, put, delete" in head


async def test_a_route_brings_its_own_settings_or_opts_out(start_origin):
    origin = await start_origin()
    routes = [
        {"match": {"prefix": "/partner"}, "cluster": "backend",
         "filters": {"cors": {"allow_origins": ["https://partner.example"]}}},
        {"match": {"prefix": "/internal"}, "cluster": "backend", "filters": {"cors": {"disabled": True}}},
        {"match": {"prefix": "/"}, "cluster": "backend"},
    ]
    async with serve(_config(origin, routes=routes), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            partner = await client.options(proxy.url + "/partner/x", headers=_preflight("https://partner.example"))
            partner_app = await client.options(proxy.url + "/partner/x", headers=_preflight(APP))
            internal = await client.options(proxy.url + "/internal/x", headers=_preflight(APP))
            rest = await client.options(proxy.url + "/x", headers=_preflight(APP))
    assert partner.headers["access-control-allow-origin"] == "https://partner.example"
    assert partner.headers["access-control-max-age"] == "900"  # the listener's, kept
    assert "access-control-allow-origin" not in partner_app.headers
    assert internal.status_code == 200 and len(origin.requests) == 1  # no cors there: upstream answers
    assert rest.headers["access-control-allow-origin"] == APP


@pytest.mark.parametrize(("settings", "routes", "path"), [
    ({"allow_origins": ["*"], "allow_credentials": True}, None, "filters.cors"),
    ({"allow_origins": ["https://a.com/path"]}, None, "filters.cors.allow_origins[0]"),
    ({"allow_origins": ["https://*evil.com"]}, None, "filters.cors.allow_origins[0]"),
    ({"allow_origins": ["https://a.*.com"]}, None, "filters.cors.allow_origins[0]"),
    ({"allow_origins": [APP], "allow_methods": ["GET\r\nX: y"]}, None, "filters.cors.allow_methods[0]"),
    ({"allow_origins": []}, None, "filters.cors.allow_origins"),
    ({"allow_origins": ["*"]},
     [{"match": {"prefix": "/"}, "cluster": "backend", "filters": {"cors": {"allow_credentials": True}}}],
     "routes[0].filters.cors"),
])
async def test_bad_settings_are_config_errors_by_key_path(settings, routes, path):
    cfg = config("127.0.0.1:9", filters=["cors", "router"], routes=routes, filter_settings={"cors": settings})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS, extra=EXTRA):
            pass
    assert path in str(info.value)
    if settings.get("allow_credentials") or routes:
        assert "forbids a wildcard origin" in str(info.value)




async def test_cors_must_come_before_the_auth_filters():
    keys = {"ci": "0" * 64}
    cfg = config("127.0.0.1:9", filters=["api_key", "cors", "router"],
                 filter_settings={"cors": SETTINGS, "api_key": {"keys": keys}})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=[*PLUGINS, "auth"], extra=EXTRA):
            pass
    assert "before" in str(info.value) and "api_key" in str(info.value)
