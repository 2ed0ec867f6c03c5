"""The compiled route index picks exactly the route a linear scan picks.

Random route tables and requests from small vocabularies, so that hosts,
suffixes, prefixes and paths collide and nest often; a fixed seed, so a
failure is reproducible and the test never flakes.
"""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from sluice import Headers, Request
from sluice.plugins.routing_match import (
    RouteIndex,
    RouteMatch,
    header_test,
    host_pattern,
    linear_first,
    methods_test,
    regex_test,
)

HOSTS = ["a.test", "b.a.test", "x.b.a.test", "c.test", "a.test.evil", "", "[::1]", "test"]
HOST_PATTERNS = ["a.test", "b.a.test", "*.a.test", "*.b.a.test", "*.test", "c.test", "*", "test", "[::1]"]
PREFIXES = ["", "/", "/a", "/a/", "/ab", "/a/b", "/a/b/c", "/b", "/a?x", "/api/v1/", "/api/v2/"]
PATHS = ["/", "/a", "/a/", "/a/b", "/ab", "/b/c", "/api/v1/users", "/api/v2/"]
REGEXES = ["/a.*", "/[ab]/?", "/api/v[0-9]+/.*", ".*"]


def random_route(rng: random.Random) -> RouteMatch:
    host = rng.choice([None, None, *HOST_PATTERNS])
    kind = rng.choice(["prefix", "prefix", "path", "regex", None])
    tests = []
    if kind == "regex":
        tests.append(regex_test(rng.choice(REGEXES)))
    if rng.random() < 0.2:
        tests.append(methods_test(rng.sample(["GET", "POST", "DELETE"], rng.randint(1, 2))))
    if rng.random() < 0.2:
        tests.append(header_test("x-v", rng.choice(["1", "2"]), None, None))
    return RouteMatch(
        host=None if host is None else host_pattern(host),
        prefix=rng.choice(PREFIXES) if kind == "prefix" else None,
        path=rng.choice(PATHS) if kind == "path" else None,
        tests=tuple(tests),
    )


def random_request(rng: random.Random) -> Request:
    target = rng.choice(PATHS) + rng.choice(["", "", "c", "/x", "b/c"]) + rng.choice(["", "?x=1", "?"])
    host = rng.choice(HOSTS)
    fields = [("host", host + rng.choice(["", ":8080"]))] if host else []
    if rng.random() < 0.3:
        fields.append(("x-v", rng.choice(["1", "2"])))
    return Request(rng.choice(["GET", "POST", "DELETE"]), target, Headers(fields))


@pytest.mark.parametrize("seed", range(8))
def test_the_index_agrees_with_a_linear_scan(seed):
    rng = random.Random(seed)
    ctx = SimpleNamespace(client=("127.0.0.1", 1), listener="l", tls_peer=None)
    for _ in range(60):
        matches = [random_route(rng) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.25:  # no host anywhere: the index never reads one
            matches = [replace(m, host=None) for m in matches]
        index = RouteIndex(matches)
        for _ in range(60):
            request = random_request(rng)
            assert index.first(request, ctx) == linear_first(matches, request, ctx), (
                request, [(m.host, m.prefix, m.path, len(m.tests)) for m in matches])


def test_first_match_wins_across_host_groups():
    # A catch-all written first beats a more specific route after it.
    matches = [RouteMatch(prefix="/"), RouteMatch(host=host_pattern("a.test"), path="/x")]
    request = Request("GET", "/x", Headers([("host", "a.test")]))
    ctx = SimpleNamespace(client=("127.0.0.1", 1), listener="l", tls_peer=None)
    assert RouteIndex(matches).first(request, ctx) == 0
    assert RouteIndex(matches[::-1]).first(request, ctx) == 0
