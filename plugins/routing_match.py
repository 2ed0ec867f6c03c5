"""Route matching for the router: one route's conditions, and the index that
finds the first route whose conditions all hold without trying every route.

No I/O and no config parsing here (``router.py`` validates and builds);
this module holds what runs per request.

A route's conditions are split in two. Host and path (``prefix`` or exact
``path``) are *indexed*; everything else (methods, regex, headers, query,
source, port, SNI, a host that must name a cluster) is a list of *residual*
tests, ``test(request, ctx) -> bool``, run only on the routes the index
proposes. The index answers exactly what a linear scan would, first match
wins (``RouteIndex.first`` against ``linear_first``; the differential test
is ``tests/test_routing_index.py``):

- host: a dict of exact hosts, a dict of ``*.suffix`` suffixes (a request
  host is looked up once per dot in it), and the routes for any host;
- within each of those groups, path: a dict of exact paths, a radix trie of
  prefixes (a walk visits one node per branch point on the target, however
  many routes share it), and the routes with no indexed path rule;
- the candidate lists found are each in route order; the lowest-numbered
  candidate whose residual tests pass wins.

So a request costs a few dict look-ups, a short trie walk and the residual
tests of the routes that could match it, at 10 routes as at 10,000
(``benchmarks/route_scale.py``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["RouteIndex", "RouteMatch", "host_pattern", "linear_first"]

Test = Callable[[Any, Any], bool]  # (request, ctx) -> bool


# -- the facts a condition reads beyond the request ----------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a v4 client on a dual-stack socket
        return ip.ipv4_mapped
    return ip


# -- residual tests --------------------------------------------------------------


def host_pattern(pattern: str) -> tuple[str, str] | None:
    """``("exact", "a.test")``, ``("suffix", ".a.test")`` for ``*.a.test``, None for ``*``."""
    pattern = pattern.lower()
    if pattern == "*":
        return None
    if pattern.startswith("*."):
        return ("suffix", pattern[1:])
    return ("exact", pattern)


def _name_test(kind: str, value: str) -> Callable[[str], bool]:
    if kind == "suffix":
        return lambda name: name.endswith(value) and len(name) > len(value)
    return lambda name: name == value


def methods_test(methods: Sequence[str]) -> Test:
    allowed = frozenset(m.upper() for m in methods)
    return lambda req, ctx: req.method in allowed


def regex_test(pattern: str) -> Test:
    rx = re.compile(pattern)
    return lambda req, ctx: rx.fullmatch(req.path) is not None


def header_test(name: str, exact: str | None, regex: str | None, present: bool | None) -> Test:
    key = name.lower().encode("latin-1")
    if present is not None:
        return lambda req, ctx: (req.headers.get_raw(key) is not None) == present
    if exact is not None:
        value = exact.encode("latin-1")
        return lambda req, ctx: req.headers.get_raw(key) == value
    rx = re.compile(regex.encode("latin-1"))
    return lambda req, ctx: (v := req.headers.get_raw(key)) is not None and rx.fullmatch(v) is not None


def _query_value(target: str, name: str) -> str | None:
    """The first value of query parameter ``name`` (percent-decoded, ``+`` a space)."""
    _, sep, query = target.partition("?")
    if not sep:
        return None
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == name:
            return v
    return None


def query_test(name: str, exact: str | None, regex: str | None, present: bool | None) -> Test:
    if present is not None:
        return lambda req, ctx: (_query_value(req.target, name) is not None) == present
    if exact is not None:
        return lambda req, ctx: _query_value(req.target, name) == exact
    rx = re.compile(regex)
    return lambda req, ctx: (v := _query_value(req.target, name)) is not None and rx.fullmatch(v) is not None


def source_test(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Test:
    nets = tuple(networks)

    def test(req, ctx) -> bool:
        ip = _ip(ctx.client_ip)
        return ip is not None and any(ip in net for net in nets)  # a v4 address is in no v6 net

    return test


def port_test(ports: Sequence[int]) -> Test:
    wanted = frozenset(ports)
    return lambda req, ctx: ctx.local[1] in wanted  # the port the connection reached


def sni_test(pattern: str) -> Test:
    kind_value = host_pattern(pattern)
    if kind_value is None:  # "*": any TLS connection that sent a name
        return lambda req, ctx: bool(ctx.tls_peer and ctx.tls_peer.get("server_name"))
    name_ok = _name_test(*kind_value)

    def test(req, ctx) -> bool:
        peer = ctx.tls_peer
        name = peer.get("server_name") if peer else None
        return name is not None and name_ok(name.lower())

    return test


# -- one route, and the index ---------------------------------------------------------


@dataclass(slots=True)
class RouteMatch:
    """One route's conditions: the indexed ones (host, prefix or exact path)
    and the residual tests, cheapest first."""

    host: tuple[str, str] | None = None  # host_pattern(); None: any host
    prefix: str | None = None
    path: str | None = None
    tests: tuple[Test, ...] = ()

    def holds(self, request, ctx) -> bool:
        """Every condition, tested directly (the linear scan's way)."""
        if self.host is not None and not _name_test(*self.host)(request.host):
            return False
        if self.prefix is not None and not request.target.startswith(self.prefix):
            return False
        if self.path is not None and request.path != self.path:
            return False
        return all(test(request, ctx) for test in self.tests)


def linear_first(matches: Sequence[RouteMatch], request, ctx) -> int | None:
    """The first route whose conditions hold, by trying each in turn: the
    specification ``RouteIndex.first`` must agree with."""
    for i, m in enumerate(matches):
        if m.holds(request, ctx):
            return i
    return None


@dataclass(slots=True, eq=False)
class _Node:
    """A radix-trie node: ``label`` is the edge from its parent; ``routes``
    the prefix routes whose prefix ends here, in route order."""

    label: str = ""
    children: dict[str, _Node] = field(default_factory=dict)
    routes: list[int] = field(default_factory=list)


def _insert(root: _Node, prefix: str, index: int) -> None:
    node, pos = root, 0
    while pos < len(prefix):
        child = node.children.get(prefix[pos])
        if child is None:
            node.children[prefix[pos]] = _Node(prefix[pos:], {}, [index])
            return
        label, rest = child.label, prefix[pos:]
        k = 0
        while k < len(label) and k < len(rest) and label[k] == rest[k]:
            k += 1
        if k < len(label):  # split the edge where the new prefix leaves it
            mid = _Node(label[:k])
            child.label = label[k:]
            mid.children[child.label[0]] = child
            node.children[prefix[pos]] = mid
            child = mid
        node, pos = child, pos + k
    node.routes.append(index)


class _PathIndex:
    """One host group's routes by path rule."""

    __slots__ = ("exact", "trie", "rest")

    def __init__(self, indexes: list[int], matches: Sequence[RouteMatch]) -> None:
        self.exact: dict[str, list[int]] = {}
        self.trie: _Node | None = None
        self.rest: list[int] = []
        for i in indexes:  # ascending, so every list below stays in route order
            m = matches[i]
            if m.prefix is not None:
                if self.trie is None:
                    self.trie = _Node()
                _insert(self.trie, m.prefix, i)
            elif m.path is not None:
                self.exact.setdefault(m.path, []).append(i)
            else:
                self.rest.append(i)

    def collect(self, target: str, out: list[list[int]]) -> None:
        if self.rest:
            out.append(self.rest)
        if self.exact:
            q = target.find("?")
            hit = self.exact.get(target if q < 0 else target[:q])
            if hit is not None:
                out.append(hit)
        node = self.trie
        if node is None:
            return
        if node.routes:
            out.append(node.routes)
        pos, end = 0, len(target)
        while pos < end:
            node = node.children.get(target[pos])
            if node is None or not target.startswith(node.label, pos):
                return
            pos += len(node.label)
            if node.routes:
                out.append(node.routes)


_HOST_CACHE = 4096  # distinct unknown hosts remembered; then the cache starts over


class RouteIndex:
    """The compiled form of a route table: ``first(request, ctx)`` is the
    index of the route a linear scan would pick, or None."""

    def __init__(self, matches: Sequence[RouteMatch]) -> None:
        self.matches = list(matches)
        exact: dict[str, list[int]] = {}
        suffix: dict[str, list[int]] = {}
        anyhost: list[int] = []
        for i, m in enumerate(self.matches):
            if m.host is None:
                anyhost.append(i)
            else:
                (exact if m.host[0] == "exact" else suffix).setdefault(m.host[1], []).append(i)
        self._tests = [m.tests for m in self.matches]
        self._any = _PathIndex(anyhost, self.matches) if anyhost else None
        self._suffix = {s: _PathIndex(ix, self.matches) for s, ix in suffix.items()}
        # An exact host's groups are known now: its own, the suffixes it ends with, any.
        self._exact = {h: (_PathIndex(ix, self.matches), *self._groups(h)) for h, ix in exact.items()}
        self._unknown: dict[str, tuple[_PathIndex, ...]] = {}
        # No route names a host: skip reading it (most single-site configs).
        self._hostless = () if exact or suffix else self._groups("")

    def _groups(self, host: str) -> tuple[_PathIndex, ...]:
        """The groups of routes (beyond its exact ones) a host may match."""
        groups = []
        if self._suffix:
            i = host.find(".", 1)  # "*.a.test" needs something before ".a.test"
            while i != -1:
                group = self._suffix.get(host[i:])
                if group is not None:
                    groups.append(group)
                i = host.find(".", i + 1)
        if self._any is not None:
            groups.append(self._any)
        return tuple(groups)

    def first(self, request, ctx) -> int | None:
        groups = self._hostless
        if not groups:
            host = request.host
            groups = self._exact.get(host)
            if groups is None:
                groups = self._unknown.get(host)
                if groups is None:
                    if len(self._unknown) >= _HOST_CACHE:
                        self._unknown.clear()
                    groups = self._unknown[host] = self._groups(host)
        target = request.target
        found: list[list[int]] = []
        for group in groups:
            group.collect(target, found)
        if not found:
            return None
        candidates = found[0] if len(found) == 1 else sorted([i for ix in found for i in ix])
        tests = self._tests
        for i in candidates:
            for test in tests[i]:
                if not test(request, ctx):
                    break
            else:
                return i
        return None
