"""The rbac filter: each principal and permission type through a real proxy, order, the default,
shadow mode, per-route policy sets, config errors by key path, and the decision in the access
log and the metrics."""

from __future__ import annotations

import base64
import hashlib
import json

import bcrypt
import httpx
import pytest

from sluice import CONTINUE, ConfigError, Filter
from sluice.plugins import rbac
from sluice.testing import serve

from .authz_support import counted, plugin_counts
from .conftest import InProcess
from .jwt_support import ISSUER, RSA, sign, write_jwks

KEYS = {"ci": "k-ci", "ops": "k-ops"}


class Identity(Filter):
    """Stands in for the mTLS and jwt filters: sets ``ctx.tls_peer`` and ``jwt.claims``
    from test headers, so each principal type meets the context keys it reads."""

    name = "identity"
    before = ("rbac",)

    async def on_request_headers(self, ctx, request):
        peer = request.headers.get("x-test-peer")
        if peer is not None:
            ctx.tls_peer = json.loads(peer)
        claims = request.headers.get("x-test-claims")
        if claims is not None:
            ctx.vars["jwt.claims"] = json.loads(claims)
            ctx.vars["auth.user"] = ctx.vars["jwt.claims"].get("sub")
            ctx.vars["auth.method"] = "jwt"
        return CONTINUE


EXTRA = {"identity": InProcess(Identity), "rbac": rbac}


def _config(origin, policies, *, default="deny", shadow=False, chain=("identity", "rbac", "router"),
            routes=None, filters=None) -> dict:
    return {
        "server": {"drain_timeout": 0.5},
        "listeners": [{"address": "127.0.0.1:0", "filters": list(chain)}],
        "clusters": {"origin": {"endpoints": [origin.address]}},
        "routes": routes or [{"match": {"prefix": "/"}, "cluster": "origin"}],
        "filters": {"rbac": {"policies": policies, "default": default, "shadow": shadow}, **(filters or {})},
    }


async def _statuses(origin, policies, requests, **options) -> list[int]:
    return await _statuses_cfg(_config(origin, policies, **options), requests)


def _peer(**fields) -> dict[str, str]:
    return {"x-test-peer": json.dumps({"verified": True, "subject": None, "dns_sans": [], "uri_sans": [],
                                       "spiffe_id": None, **fields})}


def _claims(**claims) -> dict[str, str]:
    return {"x-test-claims": json.dumps(claims)}


ALLOW = "allow"


@pytest.mark.parametrize(("principal", "admitted", "refused"), [
    ({"any": True}, {}, None),
    ({"spiffe_id": "spiffe://mesh/ns/a/sa/web"}, _peer(spiffe_id="spiffe://mesh/ns/a/sa/web"),
     _peer(spiffe_id="spiffe://mesh/ns/a/sa/other")),
    ({"spiffe_id": {"prefix": "spiffe://mesh/ns/a/"}}, _peer(spiffe_id="spiffe://mesh/ns/a/sa/x"),
     _peer(spiffe_id="spiffe://mesh/ns/b/sa/x")),
    ({"tls_subject": "CN=web,O=mesh"}, _peer(subject="CN=web,O=mesh"), _peer(subject="CN=db,O=mesh")),
    ({"tls_san": ["web.mesh.test"]}, _peer(dns_sans=["x.test", "web.mesh.test"]), _peer(dns_sans=["db.test"])),
    ({"authenticated": True}, _peer(), {}),
    ({"jwt_claim": {"name": "team", "values": ["blue", "red"]}}, _claims(team="red"), _claims(team="green")),
    ({"jwt_claim": {"name": "realm.roles", "values": ["admin"]}}, _claims(realm={"roles": ["user", "admin"]}),
     _claims(realm={"roles": ["user"]})),
    ({"scope": ["read", "write"]}, _claims(scope="read write admin"), _claims(scope="read")),
    ({"source_cidr": ["10.0.0.0/8", "127.0.0.0/24"]}, {}, None),
    ({"source_cidr": "::1/128"}, None, {}),
    ({"not": {"spiffe_id": "spiffe://mesh/bad"}}, _peer(spiffe_id="spiffe://mesh/ok"),
     _peer(spiffe_id="spiffe://mesh/bad")),
    ({"and": [{"authenticated": True}, {"source_cidr": "127.0.0.1/32"}]}, _peer(), {}),
])
async def test_each_principal_type_admits_its_caller_and_no_other(origin, principal, admitted, refused):
    """A certificate that was not verified is no identity (the last request of the mTLS cases)."""
    cases = [(admitted, 200)] if admitted is not None else []
    cases += [(refused, 403)] if refused is not None else []
    if "x-test-peer" in (admitted or {}) and "not" not in principal:  # (not: no identity is "not bad")
        unverified = json.loads(admitted["x-test-peer"]) | {"verified": False}
        cases.append(({"x-test-peer": json.dumps(unverified)}, 403))
    got = await _statuses(origin, [{"action": ALLOW, "principals": [principal]}],
                          [("GET", "/", h) for h, _ in cases])
    assert got == [status for _, status in cases]


async def test_api_key_and_basic_principals_with_the_auth_filters(origin, tmp_path):
    """The identities come from the real auth filters: a key's name, a basic-auth user."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() + "\n")
    policies = [{"action": ALLOW, "principals": [{"api_key": "ops"}]}]
    keys = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in KEYS.items()}
    got = await _statuses(origin, policies, [("GET", "/", {"x-api-key": "k-ops"}), ("GET", "/", {"x-api-key": "k-ci"})],
                          chain=("api_key", "rbac", "router"), filters={"api_key": {"keys": keys}})
    assert got == [200, 403]
    basic = {"authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    got = await _statuses(origin, [{"action": ALLOW, "principals": [{"user": "alice"}]}], [("GET", "/", basic)],
                          chain=("basic", "rbac", "router"), filters={"basic": {"htpasswd": str(htpasswd)}})
    assert got == [200]
    # A key named like the user is not the user: the method is part of the principal.
    got = await _statuses(origin, [{"action": ALLOW, "principals": [{"user": "ops"}]}],
                          [("GET", "/", {"x-api-key": "k-ops"})],
                          chain=("api_key", "rbac", "router"), filters={"api_key": {"keys": keys}})
    assert got == [403]


async def test_each_permission_type(origin):
    anyone = [{"any": True}]
    policies = [
        {"name": "reads", "action": ALLOW, "principals": anyone, "permissions": [{"methods": ["GET", "HEAD"],
                                                                               "prefix": "/api/"}]},
        {"name": "exact", "action": ALLOW, "principals": anyone, "permissions": [{"path": "/health"}]},
        {"name": "versioned", "action": ALLOW, "principals": anyone, "permissions": [{"regex": "/v[0-9]+/items"}]},
        {"name": "host", "action": ALLOW, "principals": anyone, "permissions": [{"host": "*.internal.test"}]},
        {"name": "headers", "action": ALLOW, "principals": anyone, "permissions": [
            {"header": {"name": "x-team", "exact": "blue"}},
            {"header": {"name": "x-trace", "prefix": "ok-"}},
            {"header": {"name": "x-code", "regex": "[0-9]{3}"}},
            {"header": [{"name": "x-a", "present": True}, {"name": "x-b", "present": False}]},
        ]},
    ]
    got = await _statuses(origin, policies, [
        ("GET", "/api/x", {}), ("POST", "/api/x", {}), ("GET", "/apix", {}),
        ("GET", "/health", {}), ("GET", "/health/more", {}),
        ("GET", "/v2/items", {}), ("GET", "/v2/items/3", {}),
        ("GET", "/", {"host": "a.internal.test"}), ("GET", "/", {"host": "internal.test"}),
        ("GET", "/", {"x-team": "blue"}), ("GET", "/", {"x-team": "bluer"}),
        ("GET", "/", {"x-trace": "ok-1"}), ("GET", "/", {"x-trace": "no-1"}),
        ("GET", "/", {"x-code": "123"}), ("GET", "/", {"x-code": "1234"}),
        ("GET", "/", {"x-a": "1"}), ("GET", "/", {"x-a": "1", "x-b": "1"}),
    ])
    assert got == [200, 403, 403, 200, 403, 200, 403, 200, 403, 200, 403, 200, 403, 200, 403, 200, 403]


async def test_first_match_decides_and_the_default_when_none_does(origin):
    policies = [
        {"name": "no-admin", "action": "deny", "permissions": [{"prefix": "/admin"}]},
        {"name": "ops", "action": ALLOW, "principals": [{"jwt_claim": {"name": "team", "values": ["ops"]}}]},
        {"name": "reads", "action": ALLOW, "permissions": [{"methods": ["GET"]}]},
    ]
    ops = _claims(team="ops", sub="o")
    requests = [("GET", "/admin", ops), ("POST", "/x", ops), ("GET", "/x", {}), ("POST", "/x", {})]
    assert await _statuses(origin, policies, requests) == [403, 200, 200, 403]
    assert await _statuses(origin, policies, requests, default="allow") == [403, 200, 200, 200]
    assert await _statuses(origin, [], [("GET", "/", {})]) == [403]  # no policy at all: deny (the default)


async def _run_logged(origin, tmp_path, policies, requests, **options):
    log = tmp_path / "access.log"
    cfg = _config(origin, policies, chain=("access_log", "identity", "rbac", "router"), **options)
    cfg["filters"]["access_log"] = {"path": str(log), "fields": ["path", "status", "flags", "rbac_decision",
                                                                  "rbac_policy", "remote_user"]}
    before = plugin_counts("rbac_decisions", "policy", "decision", "shadow")
    statuses = await _statuses_cfg(cfg, requests)
    delta = counted(before, plugin_counts("rbac_decisions", "policy", "decision", "shadow"))
    return statuses, [json.loads(line) for line in log.read_text().splitlines()], delta


async def _statuses_cfg(cfg, requests):
    async with serve(cfg, extra=EXTRA) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            return [(await client.request(m, p, headers=h)).status_code for m, p, h in requests]


async def test_decisions_are_in_the_access_log_the_metrics_and_the_403(origin, tmp_path):
    policies = [{"name": "team-blue", "action": ALLOW,
                 "principals": [{"jwt_claim": {"name": "team", "values": ["blue"]}}]}]
    requests = [("GET", "/a", _claims(team="blue", sub="bo")), ("GET", "/b", {}), ("GET", "/c", {})]
    statuses, lines, delta = await _run_logged(origin, tmp_path, policies, requests)
    assert statuses == [200, 403, 403]
    assert lines[0] == {"path": "/a", "status": 200, "flags": None, "rbac_decision": "allow",
                        "rbac_policy": "team-blue", "remote_user": "bo"}
    assert lines[1] == {"path": "/b", "status": 403, "flags": "RBAC", "rbac_decision": "deny",
                        "rbac_policy": "default", "remote_user": None}
    assert delta == {("team-blue", "allow", "false"): 1, ("default", "deny", "false"): 2}
    assert [r.path for r in origin.requests] == ["/a"]


async def test_shadow_mode_logs_and_counts_without_enforcing(origin, tmp_path):
    policies = [{"name": "no-posts", "action": "deny", "permissions": [{"methods": ["POST"]}]}]
    statuses, lines, delta = await _run_logged(origin, tmp_path, policies,
                                               [("POST", "/p", {}), ("GET", "/g", {})], default="allow", shadow=True)
    assert statuses == [200, 200]
    assert [(x["rbac_decision"], x["rbac_policy"], x["flags"]) for x in lines] == [
        ("shadow-deny", "no-posts", None), ("shadow-allow", "default", None)]
    assert delta == {("no-posts", "deny", "true"): 1, ("default", "allow", "true"): 1}
    assert len(origin.requests) == 2


async def test_a_route_brings_its_own_policy_set(origin):
    routes = [
        {"name": "admin", "match": {"prefix": "/admin"}, "cluster": "origin",
         "filters": {"rbac": {"policies": [{"name": "ops-only", "action": ALLOW,
                                            "principals": [{"jwt_claim": {"name": "team", "values": ["ops"]}}]}]}}},
        {"name": "open", "match": {"prefix": "/open"}, "cluster": "origin", "filters": {"rbac": {"default": "allow",
                                                                                                  "policies": []}}},
        {"name": "off", "match": {"prefix": "/off"}, "cluster": "origin", "filters": {"rbac": {"disabled": True}}},
        {"match": {"prefix": "/"}, "cluster": "origin"},
    ]
    listener = [{"action": ALLOW, "principals": [{"authenticated": True}]}]
    got = await _statuses(origin, listener, [
        ("GET", "/admin", _claims(team="ops", sub="o")), ("GET", "/admin", _claims(team="dev", sub="d")),
        ("GET", "/open", {}), ("GET", "/off", {}), ("GET", "/x", {}), ("GET", "/x", _claims(team="dev", sub="d")),
    ], routes=routes)
    assert got == [200, 403, 200, 200, 403, 200]


@pytest.mark.parametrize(("policies", "routes", "message"), [
    ([{"action": ALLOW}, {"action": ALLOW}, {"action": ALLOW, "principals": [{"spiffe": "x"}]}], None,
     "filters.rbac.policies[2].principals[0]: unknown principal type 'spiffe'; known: any, authenticated,"),
    ([{"action": ALLOW, "permissions": [{"methods": ["GET"]}, {"paths": "/x"}]}], None,
     "filters.rbac.policies[0].permissions[1]: unknown permission type 'paths'; known: any, methods,"),
    ([{"action": ALLOW, "principals": [{"source_cidr": ["10.0.0.0/33"]}]}], None,
     "filters.rbac.policies[0].principals[0].source_cidr: "),
    ([{"action": ALLOW, "permissions": [{"regex": "(["}]}], None, "filters.rbac.policies[0].permissions[0].regex: "),
    ([{"action": ALLOW, "principals": [{"not": {"and": [{"any": True}, {"users": "a"}]}}]}], None,
     "filters.rbac.policies[0].principals[0].not.and[1]: unknown principal type 'users'"),
    ([{"action": ALLOW, "permissions": [{"header": {"name": "x", "exact": "a", "regex": "b"}}]}], None,
     "filters.rbac.policies[0].permissions[0].header: expected exactly one of"),
    ([{"name": "a", "action": ALLOW}, {"name": "a", "action": "deny"}], None,
     "filters.rbac.policies[1].name: 'a' names another policy already"),
    ([], [{"match": {"prefix": "/"}, "cluster": "origin",
           "filters": {"rbac": {"policies": [{"action": ALLOW, "principals": [{"ip": "1.2.3.4"}]}]}}}],
     "routes[0].filters.rbac.policies[0].principals[0]: unknown principal type 'ip'"),
])
async def test_config_errors_name_their_key_path(origin, policies, routes, message):
    with pytest.raises(ConfigError) as info:
        async with serve(_config(origin, policies, routes=routes), extra=EXTRA):
            pass
    assert message in str(info.value)


async def test_bad_input_never_crashes_a_decision(origin):
    """Odd identities (a claim of the wrong type, no claims, a peer without fields) are no match, not a 500."""
    policies = [{"action": ALLOW, "principals": [{"jwt_claim": {"name": "team.name", "values": ["x"]}},
                                                 {"scope": "read"}, {"tls_san": "a"}]}]
    got = await _statuses(origin, policies, [
        ("GET", "/", _claims(team=["x"], scope=7)), ("GET", "/", _claims(team=None)),
        ("GET", "/", {"x-test-peer": json.dumps({"verified": True})}), ("GET", "/", _claims(scp=["read"])),
    ])
    assert got == [403, 403, 403, 200]


async def test_a_real_token_through_the_jwt_filter(origin, tmp_path):
    """jwt verifies the token and leaves its claims; rbac decides on its scope and a claim."""
    jwt_settings = {"providers": {"corp": {"issuer": ISSUER, "jwks_file": write_jwks(tmp_path / "jwks.json", RSA)}}}
    policies = [{"name": "writers", "action": ALLOW, "principals": [{"and": [
        {"scope": "orders:write"}, {"jwt_claim": {"name": "team", "values": ["orders"]}}]}]},
        {"name": "readers", "action": ALLOW, "principals": [{"scope": "orders:read"}],
         "permissions": [{"methods": ["GET"]}]}]
    writer = sign(scope="orders:read orders:write", team="orders", sub="w")
    reader = sign(scope="orders:read", team="orders", sub="r")
    forged = sign(scope="orders:write", team="orders", sub="x")[:-4] + "AAAA"  # a broken signature
    got = await _statuses(origin, policies, [
        ("POST", "/o", {"authorization": f"Bearer {writer}"}), ("GET", "/o", {"authorization": f"Bearer {reader}"}),
        ("POST", "/o", {"authorization": f"Bearer {reader}"}), ("POST", "/o", {"authorization": f"Bearer {forged}"}),
    ], chain=("jwt", "rbac", "router"), filters={"jwt": jwt_settings})
    assert got == [200, 200, 403, 401]  # the forged token never reaches rbac: jwt refuses it
