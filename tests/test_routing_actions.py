"""What a matched route does beyond one cluster: service-name routing,
weighted splits, path and host rewrites, header edits, redirects; through a
real sluice."""

from __future__ import annotations

import httpx
import pytest

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config
from .origin import Reply

PLUGINS = ["router", "balancer"]


def with_clusters(routes: list[dict], **clusters: str) -> dict:
    cfg = config("127.0.0.1:9", routes=routes)
    for name, address in clusters.items():
        cfg["clusters"][name] = {"endpoints": [address]}
    return cfg


async def test_cluster_from_host_maps_a_service_name_to_its_cluster(start_origin):
    users, orders = await start_origin(), await start_origin()
    by_host = {"match": {"prefix": "/"}, "cluster_from_host": {"suffix": ".svc.local"}}
    cases = [
        ("users", users),
        ("users.svc.local", users),
        ("users.svc.local:8080", users),
        ("ORDERS.svc.local", orders),
    ]
    async with serve(with_clusters([by_host], users=users.address, orders=orders.address),
                     plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        for host, origin in cases:
            before = len(origin.requests)
            r = await client.get(proxy.url + "/x", headers={"host": host})
            assert r.status_code == 200 and len(origin.requests) == before + 1, host
        # A host naming no cluster does not match: with no route after, 404 NR.
        for host in ("nope.svc.local", "users.other.test", ".svc.local"):
            r = await client.get(proxy.url + "/x", headers={"host": host})
            assert (r.status_code, r.text) == (404, "no route\n"), host
    # ... and with a route after it, that route answers.
    fallback = {"match": {}, "direct_response": {"status": 200, "body": "fallback\n"}}
    async with serve(with_clusters([by_host, fallback], users=users.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/", headers={"host": "nope.svc.local"})).text == "fallback\n"
            assert (await client.get(proxy.url + "/", headers={"host": "users"})).text == "/"


async def test_weighted_clusters_split_traffic_in_proportion(start_origin):
    v1, v2, v3 = await start_origin(), await start_origin(), await start_origin()
    route = {"match": {"prefix": "/"},
             "clusters": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}, {"name": "v3", "weight": 0}]}
    cfg = with_clusters([route], v1=v1.address, v2=v2.address, v3=v3.address)
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        proxy.app.filters["router"].random.seed(8)  # a fixed draw: never flaky
        for _ in range(1000):
            assert (await client.get(proxy.url + "/")).status_code == 200
    counts = (len(v1.requests), len(v2.requests), len(v3.requests))
    assert sum(counts) == 1000 and counts[2] == 0
    # Binomial(1000, 0.1): mean 100, sd 9.5; the seed fixes one draw within 3 sd.
    assert 70 <= counts[1] <= 130, counts


async def test_path_and_host_rewrites_change_what_goes_upstream(start_origin):
    origin = await start_origin()
    routes = [
        {"match": {"prefix": "/api/"}, "cluster": "backend", "prefix_rewrite": "/v2/"},
        {"match": {"prefix": "/r/"}, "cluster": "backend",
         "regex_rewrite": {"pattern": "^/r/([a-z]+)/([0-9]+)$", "substitution": "/\\2/\\1"}},
        {"match": {"prefix": "/h/"}, "cluster": "backend", "host_rewrite": "backend.internal"},
    ]
    cases = [
        ("/api/users?x=1", "/v2/users?x=1"),
        ("/api/", "/v2/"),
        ("/r/item/42?q=a/b", "/42/item?q=a/b"),  # the query is not rewritten
        ("/r/nomatch", "/r/nomatch"),
        ("/h/x", "/h/x"),
    ]
    cfg = config(origin.address, routes=routes)
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        for target, upstream in cases:
            r = await client.get(proxy.url + target, headers={"host": "public.test"})
            assert r.text == upstream, target
    request = origin.requests[-1][0]
    headers = dict(request.headers)
    assert headers[b"host"] == b"backend.internal"
    assert headers[b"x-forwarded-host"] == b"public.test"


async def test_header_edits_on_request_and_response_with_variables(start_origin):
    async def handler(request, body):
        return Reply(200, [(b"x-secret", b"s3"), (b"x-kept", b"1")], b"ok")

    origin = await start_origin(handler)
    route = {
        "name": "edited",
        "match": {"prefix": "/"},
        "cluster": "backend",
        "request_headers": {
            "remove": ["X-Drop"],
            "set": {"x-env": "prod", "x-who": "client ${client_ip}"},
            "add": {"x-route": "${route}", "x-rid": "${request_id}", "x-cost": "$$5"},
        },
        "response_headers": {"remove": ["x-secret"], "set": {"x-served-by": "${route}"},
                             "add": {"x-kept": "2"}},
    }
    async with serve(config(origin.address, routes=[route]), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/", headers={"x-drop": "1", "x-env": "dev"})
    sent = origin.requests[0][0].headers
    got = {}
    for n, v in sent:
        got.setdefault(n, []).append(v)
    assert b"x-drop" not in got
    assert got[b"x-env"] == [b"prod"]
    assert got[b"x-who"] == [b"client 127.0.0.1"]
    assert got[b"x-route"] == [b"edited"]
    assert got[b"x-rid"] == got[b"x-request-id"]
    assert got[b"x-cost"] == [b"$5"]
    assert "x-secret" not in r.headers
    assert r.headers["x-served-by"] == "edited"
    assert r.headers.get_list("x-kept") == ["1", "2"]


async def test_redirects_build_scheme_host_port_and_path():
    routes = [
        {"match": {"prefix": "/secure"}, "redirect": {"scheme": "https"}},
        {"match": {"prefix": "/port"}, "redirect": {"scheme": "https", "port": 8443, "status": 307}},
        {"match": {"prefix": "/old/"},
         "redirect": {"host": "new.test", "prefix_rewrite": "/new/", "keep_query": False, "status": 308}},
        {"match": {"regex": "/item/([0-9]+)"},
         "redirect": {"regex_rewrite": {"pattern": "^/item/([0-9]+)$", "substitution": "/items/\\1"},
                      "status": 301}},
        {"match": {"prefix": "/same"}, "redirect": {"path": "/here"}},
    ]
    cases = [
        ("/secure/x?q=1", 302, "https://site.test/secure/x?q=1"),  # the old port was http's
        ("/port/x", 307, "https://site.test:8443/port/x"),
        ("/old/a/b?q=1", 308, "http://new.test/new/a/b"),
        ("/item/7?v=1", 301, "http://site.test:8080/items/7?v=1"),
        ("/same?q", 302, "http://site.test:8080/here?q"),
    ]
    async with serve(config("127.0.0.1:9", routes=routes), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for target, status, location in cases:
                r = await client.get(proxy.url + target, headers={"host": "site.test:8080"})
                assert (r.status_code, r.headers["location"]) == (status, location), target


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"clusters": [{"name": "backend", "weight": 0}, {"name": "other", "weight": 0}]},
         "routes[0].clusters: every weight is 0"),
        ({"clusters": [{"name": "backend", "weight": 1}, {"name": "nope", "weight": 1}]},
         "routes[0].clusters[1].name: unknown cluster 'nope'"),
        ({"clusters": [{"name": "backend", "weight": -1}]}, "routes[0].clusters[0].weight"),
        ({"clusters": []}, "routes[0].clusters: name at least one cluster"),
        ({"cluster": "backend", "clusters": [{"name": "backend", "weight": 1}]}, "routes[0]: give exactly one action"),
        ({"cluster_from_host": {"suffix": "svc.local"}}, "routes[0].cluster_from_host.suffix: a suffix starts with '.'"),
        ({"cluster": "backend", "prefix_rewrite": "/v2/"}, "routes[0].prefix_rewrite: needs match.prefix"),
        ({"match": {"prefix": "/"}, "cluster": "backend", "prefix_rewrite": "v2"},
         "routes[0].prefix_rewrite: a path starts with '/'"),
        ({"cluster": "backend", "host_rewrite": "a.test/x"}, "routes[0].host_rewrite: not a host or host:port"),
        ({"direct_response": {}, "host_rewrite": "x"}, "routes[0]: host_rewrite: only for a route that forwards"),
        ({"cluster": "backend", "regex_rewrite": {"pattern": "(a)", "substitution": "/\\2"}},
         "routes[0].regex_rewrite: substitution: no group '2' in pattern"),
        ({"cluster": "backend", "regex_rewrite": {"pattern": "(", "substitution": "/"}},
         "routes[0].regex_rewrite.pattern: bad regex"),
        ({"cluster": "backend", "request_headers": {"set": {"x-a": "${nope}"}}},
         "routes[0].request_headers.set.x-a: unknown variable ${nope}; known: ${client_ip}, ${request_id}, ${route}"),
        ({"cluster": "backend", "response_headers": {"add": {"x-a": "${Route}"}}},
         "routes[0].response_headers.add.x-a: unknown variable ${Route}"),
        ({"cluster": "backend", "request_headers": {"set": {"host": "x"}}},
         "routes[0].request_headers: 'host' is the proxy's to set (use host_rewrite)"),
        ({"cluster": "backend", "response_headers": {"remove": ["Content-Length"]}},
         "routes[0].response_headers: 'content-length' is the proxy's to set"),
        ({"cluster": "backend", "request_headers": {"add": {"bad name": "x"}}},
         "routes[0].request_headers.add.bad name.[key]: not a header name (a token)"),
        ({"cluster": "backend", "request_headers": {"add": {"x-a": " x"}}},
         "routes[0].request_headers.add.x-a: a header value has no CR, LF, NUL"),
        ({"redirect": {"location": "https://a.test/", "host": "b.test"}},
         "routes[0].redirect: location is the whole Location"),
        ({"redirect": {"scheme": "ftp"}}, "routes[0].redirect.scheme"),
        ({"redirect": {"prefix_rewrite": "/x/"}}, "routes[0].redirect.prefix_rewrite: needs match.prefix"),
        ({"redirect": {"path": "/a", "prefix_rewrite": "/x/"}}, "routes[0].redirect: give at most one of path"),
    ],
)
async def test_bad_actions_are_config_errors_with_key_paths(route, message):
    cfg = config("127.0.0.1:9", routes=[route])
    cfg["clusters"]["other"] = {"endpoints": ["127.0.0.1:9"]}
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert message in str(info.value)


async def test_response_edits_reach_sluices_own_answers_on_the_route_but_not_the_routers():
    routes = [
        {"match": {"prefix": "/dead"}, "cluster": "backend", "response_headers": {"set": {"x-route": "${route}"}},
         "name": "dead"},
        {"match": {"prefix": "/moved"}, "redirect": {"path": "/new"}},
    ]
    async with serve(config("127.0.0.1:9", routes=routes), plugins=PLUGINS) as proxy:  # nothing listens on 9
        async with httpx.AsyncClient() as client:
            failed = await client.get(proxy.url + "/dead")
            moved = await client.get(proxy.url + "/moved")
            missing = await client.get(proxy.url + "/nothing")
    assert failed.status_code >= 500 and failed.headers["x-route"] == "dead"
    assert moved.status_code == 302 and "x-route" not in moved.headers
    assert missing.status_code == 404 and "x-route" not in missing.headers


async def test_host_rewrite_to_endpoint_names_the_endpoint_chosen(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, routes=[{"match": {"prefix": "/"}, "cluster": "backend",
                                          "host_rewrite_to_endpoint": True}])
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/h", headers={"host": "public.example"})).status_code == 200
    request, _ = origin.requests[0]
    assert dict(request.headers)[b"host"] == origin.address.encode()
    assert dict(request.headers)[b"x-forwarded-host"] == b"public.example"


async def test_cluster_header_edits_follow_the_cluster_chosen_and_come_after_the_routes(start_origin):
    async def handler(request, body):
        return Reply(200, [(b"x-internal", b"1"), (b"x-version", b"v1")], b"ok")

    blue, green = await start_origin(handler), await start_origin(handler)
    route = {"name": "split", "match": {"prefix": "/"},
             "clusters": [{"name": "blue", "weight": 1}, {"name": "green", "weight": 1}],
             "request_headers": {"set": {"x-color": "route", "x-from-route": "1"}}}
    cfg = with_clusters([route], blue=blue.address, green=green.address)
    for name in ("blue", "green"):
        cfg["clusters"][name]["request_headers"] = {"set": {"x-color": name, "x-rid": "${request_id}"},
                                                    "remove": ["x-debug"]}
        cfg["clusters"][name]["response_headers"] = {"remove": ["x-internal"],
                                                     "set": {"x-cluster": f"{name} ${{route}}"}}
    seen = {"blue": 0, "green": 0}
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        for _ in range(40):
            r = await client.get(proxy.url + "/", headers={"x-debug": "on"})
            assert r.status_code == 200 and "x-internal" not in r.headers
            assert r.headers["x-version"] == "v1"
            name = r.headers["x-cluster"].split()[0]
            assert r.headers["x-cluster"] == f"{name} split"
            seen[name] += 1
    assert seen["blue"] and seen["green"]  # both took some of the split
    for name, origin in (("blue", blue), ("green", green)):
        assert len(origin.requests) == seen[name]
        for request, _ in origin.requests:
            headers = dict(request.headers)
            assert headers[b"x-color"] == name.encode()  # the cluster's edit, after the route's
            assert headers[b"x-from-route"] == b"1"
            assert headers[b"x-rid"] == headers[b"x-request-id"]
            assert b"x-debug" not in headers


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({"request_headers": {"set": {"host": "x"}}}, "clusters.backend.request_headers: 'host' is the proxy's to set"),
        ({"response_headers": {"remove": ["transfer-encoding"]}},
         "clusters.backend.response_headers: 'transfer-encoding' is the proxy's to set"),
        ({"request_headers": {"add": {"x-a": "${who}"}}},
         "clusters.backend.request_headers.add.x-a: unknown variable ${who}"),
        ({"response_headers": {"sett": {}}}, "clusters.backend.response_headers.sett: unknown key"),
    ],
)
async def test_bad_cluster_header_edits_are_config_errors_with_key_paths(cluster, message):
    cfg = config("127.0.0.1:9", routes=[{"match": {"prefix": "/"}, "cluster": "backend"}])
    cfg["clusters"]["backend"].update(cluster)
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert message in str(info.value)
