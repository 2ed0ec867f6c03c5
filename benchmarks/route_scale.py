#!/usr/bin/env python3
"""What matching one request to its route costs at 10, 1,000 and 10,000 routes.

Pure Python, no sockets: the real router plugin is built from generated
``[[routes]]`` (what ``sluice run`` validates and compiles) and its
``resolve_route`` is timed on a fixed mix of requests. Each table is a
realistic mix: per service host, prefix routes with methods, an exact
health path, a regex, a header canary and a query condition; some
``*.suffix`` tenant hosts; catch-alls at the end. The requests hit every
kind, fall through to the catch-alls, or match nothing. Rounds interleave the
sizes so that a busy machine slows them alike; figures are medians. The
issue's goal: 10,000 routes cost at most 2x what 10 do. The linear scan
(every route tried in order) is shown beside it for scale.

    .venv/bin/python benchmarks/route_scale.py
    .venv/bin/python benchmarks/route_scale.py --sizes 10,100,10000 --rounds 9
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

from sluice import FilterConfig, Headers, Request
from sluice.control.config import parse
from sluice.plugins.router import Router
from sluice.plugins.routing_match import linear_first

GOAL = 2.0
SEED = 8


def _split(size: int) -> tuple[int, int, int]:
    """(service routes, services, tenant routes) in a table of ``size``: four
    catch-alls, a sixth of the rest tenants (from 100 routes up), services."""
    body = max(0, size - 4)
    tenants = body // 6 if size >= 100 else 0
    service_routes = body - tenants
    return service_routes, max(1, -(-service_routes // 10)), tenants


def routes_for(size: int) -> list[dict]:
    """``size`` routes: services of ten routes each, tenants, then catch-alls."""
    service_routes, services, tenants = _split(size)
    routes: list[dict] = []
    for k in range(services):
        host = f"svc{k}.example.com"
        routes += [
            {"match": {"host": host, "path": "/healthz"}, "direct_response": {"status": 200}},
            {"match": {"host": host, "prefix": "/api/v1/users", "methods": ["GET"]}, "cluster": "a"},
            {"match": {"host": host, "prefix": "/api/v1/users", "methods": ["POST", "PUT"]}, "cluster": "b"},
            {"match": {"host": host, "prefix": "/api/v1/orders/", "headers": {"x-canary": "1"}},
             "clusters": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}]},
            {"match": {"host": host, "prefix": "/api/v1/orders/"}, "cluster": "a"},
            {"match": {"host": host, "prefix": "/api/v2/", "query": {"name": "beta", "present": True}},
             "cluster": "b"},
            {"match": {"host": host, "prefix": "/api/v2/"}, "cluster": "a", "prefix_rewrite": "/v2/"},
            {"match": {"host": host, "regex": "/items/[0-9]+"}, "cluster": "a"},
            {"match": {"host": host, "prefix": "/static/"}, "cluster": "b"},
            {"match": {"host": host, "prefix": "/old/"}, "redirect": {"prefix_rewrite": "/new/"}},
        ]
    del routes[service_routes:]
    routes += [{"match": {"host": f"*.tenant{t}.example.net", "prefix": "/"}, "cluster": "a"}
               for t in range(tenants)]
    routes += [
        {"match": {"host": "*.example.com", "prefix": "/public/"}, "cluster": "b"},
        {"match": {"path": "/robots.txt"}, "direct_response": {"status": 200, "body": "User-agent: *\n"}},
        {"match": {"prefix": "/", "host": "*.example.com"}, "cluster": "a"},
        {"match": {"prefix": "/", "headers": [{"name": "x-debug", "present": True}]}, "cluster": "b"},
    ]
    assert len(routes) == size, (len(routes), size)
    return routes


def requests_for(size: int, count: int = 200) -> list:
    """A fixed mix of requests against the hosts a table of ``size`` routes has."""
    rng = random.Random(SEED)
    _, services, tenants = _split(size)
    tenants = max(1, tenants)
    shapes = [
        ("GET", "/api/v1/users/42", {}), ("POST", "/api/v1/users", {}),
        ("GET", "/api/v1/orders/7", {"x-canary": "1"}), ("GET", "/api/v1/orders/7", {}),
        ("GET", "/api/v2/things?beta=1", {}), ("GET", "/api/v2/things", {}),
        ("GET", "/items/123", {}), ("GET", "/static/app.js", {}), ("GET", "/healthz", {}),
        ("GET", "/old/page", {}), ("GET", "/public/x", {}), ("GET", "/nothing/here", {}),
    ]
    out = []
    for _ in range(count):
        method, target, extra = rng.choice(shapes)
        pick = rng.random()
        if pick < 0.8:
            host = f"svc{rng.randrange(services)}.example.com"
        elif pick < 0.9:
            host = f"app.tenant{rng.randrange(tenants)}.example.net"
        else:
            host = "unknown.test"
        headers = Headers([("host", host), ("user-agent", "bench"), ("accept", "*/*"), *extra.items()])
        request = Request(method, target, headers)
        out.append(SimpleNamespace(request=request, client=("10.0.0.1", 5000), listener="main", tls_peer=None))
    return out


def build(size: int) -> Router:
    config = parse({
        "listeners": [{"name": "main", "address": "127.0.0.1:8080", "filters": ["router"]}],
        "clusters": {"a": {"endpoints": ["127.0.0.1:9"]}, "b": {"endpoints": ["127.0.0.1:9"]}},
        "routes": routes_for(size),
    })
    app = SimpleNamespace(config=config, clusters={"a": object(), "b": object()}, addresses=[])
    return Router.from_config(FilterConfig(), app)


def per_match_ns(fn, ctxs: list, repeat: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(repeat):
        for ctx in ctxs:
            fn(ctx)
    return (time.perf_counter_ns() - start) / (repeat * len(ctxs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="route counts, comma-separated (%(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (%(default)s)")
    parser.add_argument("--repeat", type=int, default=50, help="passes over the requests per round (%(default)s)")
    args = parser.parse_args()
    print(measure([int(s) for s in args.sizes.split(",")], args.rounds, args.repeat)["table"])


def measure(sizes: list[int], rounds: int = 15, repeat: int = 50) -> dict:
    """Medians per size (ns per match, indexed and linear) and the table to print."""
    setups = {}
    for size in sizes:
        router = build(size)
        ctxs = requests_for(size)
        matches = router._index.matches
        # Both must agree on every request measured.
        for ctx in ctxs:
            i = linear_first(matches, ctx.request, ctx)
            assert router.resolve_route(ctx) is (None if i is None else router.routes[i])
        setups[size] = (router.resolve_route, lambda ctx, m=matches: linear_first(m, ctx.request, ctx), ctxs)
    indexed: dict[int, list[float]] = {s: [] for s in sizes}
    linear: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(rounds):
        for size, (fast, slow, ctxs) in setups.items():
            indexed[size].append(per_match_ns(fast, ctxs, repeat))
            linear[size].append(per_match_ns(slow, ctxs, max(1, repeat * 10 // max(size, 10))))
    base = statistics.median(indexed[sizes[0]])
    rows = {s: {"indexed_ns": statistics.median(indexed[s]), "linear_ns": statistics.median(linear[s])}
            for s in sizes}
    lines = [f"{'routes':>8} {'ns/match':>9} {'x ' + format(sizes[0], ','):>8} {'linear ns':>10}"]
    for s, row in rows.items():
        lines.append(f"{s:>8,} {row['indexed_ns']:>9.0f} {row['indexed_ns'] / base:>8.2f} {row['linear_ns']:>10.0f}")
    worst = max(row["indexed_ns"] for row in rows.values()) / base
    lines.append(f"goal: <= {GOAL:g}x at {sizes[-1]:,} routes vs {sizes[0]:,}: "
                 f"{'met' if rows[sizes[-1]]['indexed_ns'] / base <= GOAL else 'NOT met'} "
                 f"({rows[sizes[-1]]['indexed_ns'] / base:.2f}x; worst {worst:.2f}x); medians of {rounds} rounds")
    return {"rows": rows, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()
