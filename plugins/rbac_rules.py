"""The rbac filter's rules: principals and permissions compiled, at load, into
tests ``(request, ctx) -> bool``, so a decision is a few dict and set look-ups.

A principal or a permission is a table. A principal table has exactly one
key, its type; a permission table's keys are conditions that must all hold
(``methods``, ``prefix``/``path``/``regex``, ``host``, ``header``). A policy
matches when any of its principals and any of its permissions do. Path,
method, host and header conditions are the router's own
(``routing_match``), not a copy: a permission matches a request exactly as
a route with the same conditions would. Every mistake is a ``ConfigError``
naming its key path, so ``sluice check`` points at the line to fix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from sluice import ConfigError

from .routing_match import RouteMatch, header_test, host_pattern, methods_test, regex_test, source_test

__all__ = ["PERMISSIONS", "PRINCIPALS", "Test", "permission", "principal"]

Test = Callable[[Any, Any], bool]  # (request, ctx) -> bool


def _strings(value: Any, where: str) -> frozenset[str]:
    """One string or a non-empty list of them."""
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise ConfigError(f"{where}: expected a string or a non-empty list of strings, got {value!r}")


def _name_matcher(value: Any, where: str) -> Callable[[str | None], bool]:
    """``"exact"`` (or a list of them), or ``{ exact = ... }`` / ``{ prefix = ... }``."""
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in ("exact", "prefix"):
            raise ConfigError(f"{where}: expected {{ exact = \"...\" }} or {{ prefix = \"...\" }}, got {value!r}")
        kind, text = next(iter(value.items()))
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{where}.{kind}: expected a non-empty string, got {text!r}")
        if kind == "prefix":
            return lambda name: name is not None and name.startswith(text)
        return lambda name: name == text
    names = _strings(value, where)
    return lambda name: name in names


def _peer(ctx) -> Mapping[str, Any] | None:
    """The TLS client identity, only when its certificate was verified."""
    peer = ctx.tls_peer
    return peer if peer and peer.get("verified") else None


def _spiffe(value: Any, where: str) -> Test:
    match = _name_matcher(value, where)
    return lambda req, ctx: (p := _peer(ctx)) is not None and match(p.get("spiffe_id"))


def _tls_subject(value: Any, where: str) -> Test:
    match = _name_matcher(value, where)
    return lambda req, ctx: (p := _peer(ctx)) is not None and match(p.get("subject"))


def _tls_san(value: Any, where: str) -> Test:
    match = _name_matcher(value, where)

    def test(req, ctx) -> bool:
        p = _peer(ctx)
        return p is not None and any(match(n) for n in (*(p.get("dns_sans") or ()), *(p.get("uri_sans") or ())))

    return test


def _flag(value: Any, where: str) -> None:
    if value is not True:
        raise ConfigError(f"{where}: expected true, got {value!r}")


def _any(value: Any, where: str) -> Test:
    _flag(value, where)
    return lambda req, ctx: True


def _authenticated(value: Any, where: str) -> Test:
    _flag(value, where)
    return lambda req, ctx: ctx.vars.get("auth.user") is not None or _peer(ctx) is not None


def _user_of(method: str) -> Callable[[Any, str], Test]:
    def build(value: Any, where: str) -> Test:
        names = _strings(value, where)
        return lambda req, ctx: ctx.vars.get("auth.method") == method and ctx.vars.get("auth.user") in names
    return build


def _claim(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _jwt_claim(value: Any, where: str) -> Test:
    if not isinstance(value, dict) or set(value) != {"name", "values"}:
        raise ConfigError(f"{where}: expected {{ name = \"claim\", values = [...] }}, got {value!r}")
    if not isinstance(value["name"], str) or not value["name"]:
        raise ConfigError(f"{where}.name: expected a claim name (a.b for a nested one), got {value['name']!r}")
    path = tuple(value["name"].split("."))
    wanted = _strings(value["values"], f"{where}.values")

    def test(req, ctx) -> bool:
        claims = ctx.vars.get("jwt.claims")
        got = _claim(claims, path) if claims else None
        if isinstance(got, str):
            return got in wanted
        if isinstance(got, (list, tuple)):  # a list claim (roles, groups): any of its members
            return any(isinstance(g, str) and g in wanted for g in got)
        return False

    return test


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    """RFC 8693's ``scope`` (space-separated) and the common ``scp`` (a list)."""
    found: set[str] = set()
    scope, scp = claims.get("scope"), claims.get("scp")
    if isinstance(scope, str):
        found.update(scope.split())
    for claim in (scope, scp):
        if isinstance(claim, list):
            found.update(s for s in claim if isinstance(s, str))
    if isinstance(scp, str):
        found.update(scp.split())
    return found


def _scope(value: Any, where: str) -> Test:
    needed = _strings(value, where)  # every one of them

    def test(req, ctx) -> bool:
        claims = ctx.vars.get("jwt.claims")
        return bool(claims) and needed <= _scopes(claims)

    return test


def _source_cidr(value: Any, where: str) -> Test:
    nets = []
    for text in sorted(_strings(value, where)):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return source_test(nets)


def _not(value: Any, where: str) -> Test:
    inner = principal(value, where)
    return lambda req, ctx: not inner(req, ctx)


def _and(value: Any, where: str) -> Test:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of principals, got {value!r}")
    tests = tuple(principal(p, f"{where}[{i}]") for i, p in enumerate(value))
    return lambda req, ctx: all(t(req, ctx) for t in tests)


PRINCIPALS: dict[str, Callable[[Any, str], Test]] = {
    "any": _any,
    "authenticated": _authenticated,
    "spiffe_id": _spiffe,
    "tls_subject": _tls_subject,
    "tls_san": _tls_san,
    "jwt_claim": _jwt_claim,
    "scope": _scope,
    "api_key": _user_of("api_key"),
    "user": _user_of("basic"),
    "source_cidr": _source_cidr,
    "not": _not,
    "and": _and,
}


def principal(table: Any, where: str) -> Test:
    """One principal table (``{ spiffe_id = "spiffe://..." }``) compiled."""
    if not isinstance(table, dict) or len(table) != 1:
        raise ConfigError(f"{where}: expected a table with one principal type ({', '.join(PRINCIPALS)}), "
                          f"got {table!r}")
    kind, value = next(iter(table.items()))
    build = PRINCIPALS.get(kind)
    if build is None:
        raise ConfigError(f"{where}: unknown principal type {kind!r}; known: {', '.join(PRINCIPALS)}")
    return build(value, f"{where}.{kind}")


PERMISSIONS = ("any", "methods", "prefix", "path", "regex", "host", "header")

_HEADER_KEYS = {"exact", "prefix", "regex", "present"}


def _header(value: Any, where: str) -> Test:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ConfigError(f"{where}: expected {{ name = \"...\", exact | prefix | regex | present = ... }}, "
                          f"got {value!r}")
    how = set(value) - {"name"}
    if len(how) != 1 or not how <= _HEADER_KEYS:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(sorted(_HEADER_KEYS))} beside name, "
                          f"got {sorted(how)}")
    kind = how.pop()
    arg = value[kind]
    if kind == "present":
        if not isinstance(arg, bool):
            raise ConfigError(f"{where}.present: expected true or false, got {arg!r}")
        return header_test(value["name"], None, None, arg)
    if not isinstance(arg, str):
        raise ConfigError(f"{where}.{kind}: expected a string, got {arg!r}")
    try:
        if kind == "exact":
            return header_test(value["name"], arg, None, None)
        return header_test(value["name"], None, re.escape(arg) + ".*" if kind == "prefix" else arg, None)
    except (re.error, UnicodeEncodeError) as exc:
        raise ConfigError(f"{where}.{kind}: {exc}") from None


def permission(table: Any, where: str) -> Test:
    """One permission table (``{ methods = ["GET"], prefix = "/api/" }``) compiled:
    its conditions all hold; ``{ any = true }`` always does."""
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{where}: expected a table of conditions ({', '.join(PERMISSIONS)}), got {table!r}")
    for key in table:
        if key not in PERMISSIONS:
            raise ConfigError(f"{where}: unknown permission type {key!r}; known: {', '.join(PERMISSIONS)}")
    if "any" in table:
        if len(table) != 1:
            raise ConfigError(f"{where}.any: any = true takes no other condition")
        return _any(table["any"], f"{where}.any")
    paths = [k for k in ("prefix", "path", "regex") if k in table]
    if len(paths) > 1:
        raise ConfigError(f"{where}: at most one of prefix, path, regex (got {', '.join(paths)})")
    for key in ("prefix", "path", "regex", "host"):
        if key in table and (not isinstance(table[key], str) or not table[key]):
            raise ConfigError(f"{where}.{key}: expected a non-empty string, got {table[key]!r}")
    tests: list[Test] = []
    if "methods" in table:
        tests.append(methods_test(sorted(_strings(table["methods"], f"{where}.methods"))))
    if "regex" in table:
        try:
            tests.append(regex_test(table["regex"]))
        except re.error as exc:
            raise ConfigError(f"{where}.regex: {exc}") from None
    if "header" in table:
        headers = table["header"] if isinstance(table["header"], list) else [table["header"]]
        tests.extend(_header(h, f"{where}.header" + (f"[{i}]" if isinstance(table["header"], list) else ""))
                     for i, h in enumerate(headers))
    match = RouteMatch(host=host_pattern(table["host"]) if "host" in table else None,
                       prefix=table.get("prefix"), path=table.get("path"), tests=tuple(tests))
    return match.holds
