"""The ext_authz filter against a real authorization service on loopback (``authz_support``):
allow with headers added, a denial passed through, a hanging, refusing or failing service
(fail-open and fail-closed, counted, logged once), body forwarding with its cap, per-route
disable; real clients (httpx, curl)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.plugins import ext_authz
from sluice.testing import Reply, serve

from .authz_support import ALLOWED_USER, authz_service, counted, plugin_counts

EXTRA = {"ext_authz": ext_authz}


async def _service(nursery):
    return await nursery.start(authz_service().serve)


def _config(origin, authz_address: str, routes=None, **settings) -> dict:
    return {
        "server": {"drain_timeout": 0.5},
        "listeners": [{"address": "127.0.0.1:0", "filters": ["ext_authz", "router"]}],
        "clusters": {"origin": {"endpoints": [origin.address]}, "authz": {"endpoints": [authz_address]}},
        "routes": routes or [{"match": {"prefix": "/"}, "cluster": "origin"}],
        "filters": {"ext_authz": {"cluster": "authz", "path_prefix": "/authz",
                                  "allowed_upstream_headers": ["x-user"], **settings}},
    }


def _checks() -> dict:
    return plugin_counts("ext_authz_checks", "outcome")


async def test_a_2xx_admits_and_sets_the_headers_it_names(origin, nursery):
    service = await _service(nursery)
    async with serve(_config(origin, service.address), extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            r = await client.get("/ok/x?q=1", headers={"authorization": "Bearer t1", "x-user": "forged",
                                                       "x-secret": "not for authz"})
    assert r.status_code == 200
    check = service.requests[0]
    assert (check.method, check.target) == ("GET", "/authz/ok/x?q=1")
    assert check.header("authorization") == "Bearer t1" and check.header("x-secret") is None
    assert check.header("host") == proxy.url.removeprefix("http://") and check.header("x-request-id")
    upstream = origin.requests[0]
    assert upstream.header("x-user") == ALLOWED_USER  # the client's own x-user replaced
    assert upstream.header("x-other") is None  # not in allowed_upstream_headers
    assert upstream.header("x-secret") == "not for authz" and upstream.header("authorization") == "Bearer t1"


async def test_a_denial_goes_to_the_client_with_its_status_body_and_headers(origin, nursery):
    service = await _service(nursery)
    before = _checks()
    async with serve(_config(origin, service.address), extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            r = await client.get("/deny/x")
            head = await client.head("/deny/x")  # the check is a HEAD too: its answer has no body
            ok = await client.head("/ok/x")
    assert (r.status_code, r.text) == (401, "no ticket, no entry\n")
    assert (head.status_code, head.content, ok.status_code) == (401, b"", 200)
    assert r.headers["www-authenticate"] == 'Bearer realm="authz"' and r.headers["x-deny-reason"] == "no-ticket"
    assert [(r.method, r.path) for r in origin.requests] == [("HEAD", "/ok/x")]
    assert counted(before, _checks()) == {("denied",): 2, ("allowed",): 1}
    # allowed_client_headers narrows what is relayed
    cfg = _config(origin, service.address, allowed_client_headers=["WWW-Authenticate"])
    async with serve(cfg, extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            r = await client.get("/deny/x")
    assert r.status_code == 401 and "www-authenticate" in r.headers and "x-deny-reason" not in r.headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_sees_the_denial_and_the_admission(origin, nursery):
    service = await _service(nursery)
    async with serve(_config(origin, service.address), extra=EXTRA) as proxy:
        denied = await trio.run_process(["curl", "-s", "-i", "--max-time", "5", proxy.url + "/deny/c"],
                                        capture_stdout=True, check=False)
        allowed = await trio.run_process(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                                          proxy.url + "/ok/c"], capture_stdout=True, check=False)
    head, _, body = denied.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 401") and "www-authenticate: bearer" in head.lower()
    assert body == "no ticket, no entry\n"
    assert allowed.stdout == b"200"


async def test_a_hanging_service_costs_at_most_the_timeout_then_fails_closed_or_open(origin, nursery):
    service = await _service(nursery)
    timeout = 0.2
    for allow, expected, outcome in ((False, 403, "failed_closed"), (True, 200, "failed_open")):
        before = _checks()
        cfg = _config(origin, service.address, timeout=timeout, failure_mode_allow=allow)
        with capture_logs() as logs:
            async with serve(cfg, extra=EXTRA) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    took = []
                    for _ in range(3):
                        started = time.monotonic()
                        r = await client.get("/hang/x")
                        took.append(time.monotonic() - started)
                        assert r.status_code == expected
                    assert (await client.get("/ok/x")).status_code == 200
        print(f"failure_mode_allow={allow}: a hanging service cost {[round(t * 1000) for t in took]} ms "
              f"(timeout {timeout * 1000:.0f} ms)")
        assert all(timeout <= t < timeout + 0.25 for t in took), took
        assert counted(before, _checks()) == {(outcome,): 3, ("allowed",): 1}
        events = [e["event"] for e in logs if e["event"].startswith("ext_authz ")]
        assert events == ["ext_authz unavailable", "ext_authz recovered"]  # once per outage, not per request
    assert (await _statuses(origin, service.address, ["/hang/y"], failure_mode_allow=False)) == [403]


async def _statuses(origin, address, paths, **settings) -> list[int]:
    async with serve(_config(origin, address, **settings), extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            return [(await client.get(p)).status_code for p in paths]


async def test_a_refusing_or_failing_service_is_a_failure_with_the_configured_status(origin, nursery):
    service = await _service(nursery)
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    before = _checks()
    assert await _statuses(origin, closed, ["/ok/a", "/ok/b"], status_on_error=503) == [503, 503]
    assert await _statuses(origin, service.address, ["/fail/a"]) == [403]  # its 5xx is its own failure
    assert await _statuses(origin, service.address, ["/fail/a"], failure_mode_allow=True) == [200]
    service.script("/authz/cut*", Reply(body=b"x" * 100, close_after=3)).script("/authz/reset*", Reply(reset=True))
    assert await _statuses(origin, service.address, ["/cut/a", "/reset/a"]) == [403, 403]  # no whole answer: a failure
    assert counted(before, _checks()) == {("failed_closed",): 5, ("failed_open",): 1}
    assert [r.path for r in origin.requests] == ["/fail/a"]


async def test_the_body_goes_to_the_service_up_to_its_cap(origin, nursery):
    service = await _service(nursery)
    async with serve(_config(origin, service.address, with_request_body=True, max_request_bytes=10),
                     extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            small = await client.post("/ok/s", content=b"hello")
            large = await client.post("/ok/l", content=b"x" * 20)
            empty = await client.post("/ok/e", content=b"")
    assert (small.status_code, large.status_code, empty.status_code) == (200, 413, 200)
    assert [(r.path, r.body) for r in service.requests] == [("/authz/ok/s", b"hello"), ("/authz/ok/e", b"")]
    assert [(r.path, r.body) for r in origin.requests] == [("/ok/s", b"hello"), ("/ok/e", b"")]
    service.requests.clear()
    origin.requests.clear()
    async with serve(_config(origin, service.address, with_request_body=True, max_request_bytes=10,
                             allow_partial_message=True), extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            partial = await client.post("/ok/p", content=b"0123456789abcdefghij")
    assert partial.status_code == 200
    assert service.requests[0].body == b"0123456789"
    assert service.requests[0].header("x-envoy-auth-partial-body") == "true"
    assert origin.requests[0].body == b"0123456789abcdefghij"  # the upstream gets all of it
    assert origin.requests[0].header("x-user") == ALLOWED_USER  # headers set after the body was read


async def test_a_route_may_turn_the_check_off(origin, nursery):
    service = await _service(nursery)
    routes = [{"match": {"prefix": "/public"}, "cluster": "origin", "filters": {"ext_authz": {"disabled": True}}},
              {"match": {"prefix": "/"}, "cluster": "origin"}]
    assert await _statuses(origin, service.address, ["/public/deny", "/deny/x"], routes=routes) == [200, 401]
    assert [r.path for r in service.requests] == ["/authz/deny/x"]


async def test_a_route_adds_its_context_to_the_check(origin, nursery):
    service = await _service(nursery)
    routes = [{"match": {"prefix": "/ok/blue"}, "cluster": "origin",
               "filters": {"ext_authz": {"context": {"tenant": "blue", "tier": "gold"}}}},
              {"match": {"prefix": "/"}, "cluster": "origin"}]
    assert await _statuses(origin, service.address, ["/ok/blue", "/ok/other"], routes=routes) == [200, 200]
    blue, other = service.requests
    assert (blue.header("x-ext-authz-context-tenant"), blue.header("x-ext-authz-context-tier")) == ("blue", "gold")
    assert not [n for n, _ in other.headers if n.startswith("x-ext-authz-context-")]
    bad = [{"match": {"prefix": "/"}, "cluster": "origin", "filters": {"ext_authz": {"context": {"a b": "c"}}}}]
    with pytest.raises(ConfigError) as info:
        async with serve(_config(origin, service.address, routes=bad), extra=EXTRA):
            pass
    assert "routes[0].filters.ext_authz.context" in str(info.value) and "invalid header name" in str(info.value)


async def test_an_unknown_cluster_is_a_config_error(origin):
    with pytest.raises(ConfigError) as info:
        async with serve(_config(origin, "127.0.0.1:9", cluster="nope"), extra=EXTRA):
            pass
    assert "filters.ext_authz.cluster: no cluster 'nope'" in str(info.value)
