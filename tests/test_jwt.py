"""The jwt filter: every way a token is refused (401 with RFC 6750's challenge, never a 500),
algorithm confusion, token sources, claims to headers, scopes, per-route settings, and the contract
battery. Remote JWKS through a cluster (rotation, refetch rate limit, outages): test_jwt_jwks.py."""

from __future__ import annotations

import base64
import hmac
import json
import random
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
import trio
from joserfc import jwk, jwt

import sluice.plugins.jwt as jwt_plugin
from sluice import ConfigError
from sluice.plugins.jwt import Jwt
from sluice.plugins.jwt.settings import Provider
from sluice.plugins.jwt.tokens import CODES
from sluice.testing import build_filter, run_filter

from .jwt_support import EC, ED, ISSUER, RSA, RSA2, claims, sign, write_jwks

EXTRA = {"jwt": jwt_plugin}
# The battery's settings are built at import: a JWKS file that lives as long as the test process.
_KEYS_DIR = tempfile.TemporaryDirectory(prefix="sluice-jwt-")
JWKS_FILE = write_jwks(Path(_KEYS_DIR.name) / "jwks.json", RSA, EC, ED)


def provider(**over) -> dict:
    return {"issuer": ISSUER, "audiences": ["api"], "jwks_file": JWKS_FILE, **over}


def settings(**over) -> dict:
    return {"providers": {"main": provider(**over)}}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def refused(token: str | None, headers=None, **over):
    run = await run_filter(Jwt, settings(**over), request=("GET", "/", headers or bearer(token)))
    assert run.local_reply is not None, "admitted"
    events = [e for e in run.log if e["event"] == "jwt refused"]
    assert len(events) == 1 and run.ctx.vars == {}
    return run.local_reply, events[0]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, payload: dict, signature: str = "c2ln") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{signature}"


# -- admitted -------------------------------------------------------------------------

@pytest.mark.parametrize("key, alg", [(RSA, "RS256"), (RSA, "PS256"), (EC, "ES256"), (ED, "Ed25519")],
                         ids=["RS256", "PS256", "ES256", "Ed25519"])
async def test_a_valid_token_is_admitted_and_the_identity_recorded(key, alg):
    run = await run_filter(Jwt, settings(), request=("GET", "/", bearer(sign(key, alg=alg))))
    assert run.local_reply is None
    assert run.ctx.vars["auth.user"] == "alice" and run.ctx.vars["auth.method"] == "jwt"
    assert run.ctx.vars["jwt.provider"] == "main" and run.ctx.vars["jwt.claims"]["aud"] == "api"
    assert run.request.headers.get("authorization") is None  # stripped by default


async def test_a_token_without_kid_is_tried_against_the_keys_of_its_algorithm():
    run = await run_filter(Jwt, settings(), request=("GET", "/", bearer(sign(EC, kid=None))))
    assert run.local_reply is None


async def test_a_token_without_a_subject_passes_naming_no_user():
    run = await run_filter(Jwt, settings(), request=("GET", "/", bearer(sign(sub=None))))
    assert run.local_reply is None and "auth.user" not in run.ctx.vars
    assert run.ctx.vars["auth.method"] == "jwt"


# -- refused: every code ----------------------------------------------------------------

async def test_a_missing_token_gets_the_bare_challenge():
    reply, event = await refused(None, headers=[("authorization", "Basic YTpi")])
    assert reply.status == 401 and reply.headers == [("www-authenticate", 'Bearer realm="sluice"')]
    assert event["reason"] == "missing"


NOT_UTF8 = b'{"alg": "\xff"}'


def _exp_past():
    return sign(exp=1_000)


CASES = {
    "too_large": lambda: sign(pad="x" * 9000),
    "malformed": lambda: "abc.def",
    "jwe-5-parts": lambda: "a.b.c.d.e",
    "bad_base64": lambda: "eyJhbGciOiJSUzI1NiJ9.e30.***",
    "bad_base64-length": lambda: "eyJhbGciOiJSUzI1NiJ9.e30AA.c2ln",
    "bad_json": lambda: f"{b64(b'{not json')}.{b64(b'{}')}.c2ln",
    "bad_json-array": lambda: f"{b64(b'[1]')}.{b64(b'{}')}.c2ln",
    "no-alg": lambda: forged({"kid": "rsa-1"}, claims()),
    "alg-none": lambda: forged({"alg": "none"}, claims(), signature="").rstrip(".") + ".",
    "alg-none-signed": lambda: forged({"alg": "none"}, claims()),
    "alg-unknown": lambda: forged({"alg": "XX999", "kid": "rsa-1"}, claims()),
    "unknown_kid": lambda: sign(RSA2),
    "bad_signature": lambda: sign()[:-6] + ("AAAAAA" if not sign().endswith("AAAAAA") else "BBBBBB"),
    "bad_signature-other-key-same-kid": lambda: sign(RSA2, kid="rsa-1"),
    "bad_signature-truncated": lambda: sign().rsplit(".", 1)[0] + ".c2ln",
    "no_key-ec-kid-for-rs": lambda: sign(RSA, kid="ec-1"),
    "expired": _exp_past,
    "not_yet_valid": lambda: sign(nbf=9_999_999_999),
    "missing_exp": lambda: sign(exp=None),
    "bad_claim": lambda: sign(exp="tomorrow"),
    "bad_claim-huge-int": lambda: sign(exp=10**400),
    "bad_claim-nan": lambda: sign(exp=float("nan")),  # Python's json writes and reads NaN
    "bad_claim-infinity": lambda: sign(exp=float("inf")),
    "bad_json-nested": lambda: f"{b64(b'[' * 5000)}.{b64(b'{}')}.c2ln",
    "bad_json-not-utf8": lambda: f"{b64(NOT_UTF8)}.{b64(b'{}')}.c2ln",
    "wrong_issuer": lambda: sign(iss="https://evil.test"),
    "wrong_audience": lambda: sign(aud=["other", "more"]),
}
EXPECTED = {"jwe-5-parts": "malformed", "bad_base64-length": "bad_base64", "bad_json-array": "bad_json",
            "no-alg": "malformed", "alg-none": "malformed", "alg-none-signed": "alg_not_allowed",
            "alg-unknown": "alg_not_allowed", "bad_signature-other-key-same-kid": "bad_signature",
            "bad_signature-truncated": "bad_signature", "no_key-ec-kid-for-rs": "no_key",
            "bad_claim-huge-int": "bad_claim", "bad_claim-nan": "bad_claim", "bad_claim-infinity": "bad_claim",
            "bad_json-nested": "bad_json", "bad_json-not-utf8": "bad_json"}


@pytest.mark.parametrize("case", CASES)
async def test_each_bad_token_is_a_401_with_its_code(case):
    code = EXPECTED.get(case, case)
    reply, event = await refused(CASES[case]())
    assert reply.status == 401 and event["reason"] == code
    (name, challenge), = reply.headers
    assert name == "www-authenticate"
    assert challenge.startswith('Bearer realm="sluice", error="invalid_token", error_description="')
    assert f'error_description="{code}: ' in challenge


async def test_mutated_tokens_are_refused_never_a_500():
    """Random byte edits, cuts and splices of valid tokens: each is a 401 with a known code."""
    rng = random.Random(12)
    instance = build_filter(Jwt, settings())
    alphabet = b"ABCxyz019-_.=+/ {}[]\"\\\xff"  # (no NUL, CR, LF: the codec refuses a head with them)
    seen = set()
    for i in range(400):
        token = bytearray(sign(rng.choice([RSA, EC, RSA2]), sub=f"u{i}").encode())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(token))
            op = rng.randrange(3)
            if op == 0:
                token[at] = rng.choice(alphabet)
            elif op == 1:
                del token[at:at + rng.randint(1, 40)]
            else:
                token[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        value = bytes(token).strip(b" ") or b"x"
        run = await run_filter(instance, request=("GET", "/", [(b"authorization", b"Bearer " + value)]),
                               raises=True)
        if run.local_reply is None:  # an edit that changed nothing that matters (base64 padding bits)
            continue
        assert run.local_reply.status == 401
        seen.update(e["reason"] for e in run.log if e["event"] == "jwt refused")
    assert seen <= set(CODES) and len(seen) >= 5, seen


async def test_alg_none_is_refused_even_when_the_config_asks_for_it():
    with pytest.raises(ConfigError, match=r"filters.jwt.providers.main.*'none' is never accepted"):
        await run_filter(Jwt, settings(algorithms=["RS256", "none"]))


async def test_hs_rs_confusion_the_public_key_as_an_hmac_secret_is_refused():
    # The classic attack: sign HS256 with the provider's *public* RSA key as the HMAC secret
    # (by hand, as an attacker would: joserfc itself refuses to make such a key).
    public_pem = RSA.as_pem(private=False)
    head = forged({"alg": "HS256", "kid": "rsa-1"}, claims()).rsplit(".", 1)[0]
    token = f"{head}.{b64(hmac.digest(public_pem, head.encode(), 'sha256'))}"
    reply, event = await refused(token)
    assert event["reason"] == "alg_not_allowed"
    # and a JWKS provider cannot be configured to accept HS at all
    with pytest.raises(ConfigError, match=r"filters.jwt.providers.main.*'HS256' not allowed here"):
        await run_filter(Jwt, settings(algorithms=["RS256", "HS256"]))


async def test_a_symmetric_key_in_a_jwks_is_never_used(tmp_path):
    secret = jwk.OctKey.import_key(b"k" * 32, parameters={"kid": "oct"})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"keys": [secret.as_dict(private=True), RSA.as_dict(private=False)]}))
    token = jwt.encode({"alg": "HS256", "kid": "oct"}, claims(), secret, algorithms=["HS256"])
    run = await run_filter(Jwt, settings(jwks_file=str(path)), request=("GET", "/", bearer(token)))
    assert run.local_reply.status == 401
    assert [e["reason"] for e in run.log if e["event"] == "jwt refused"] == ["alg_not_allowed"]


async def test_an_hs_provider_verifies_with_its_secret_only(tmp_path, monkeypatch):
    secret = b"a-long-shared-secret-of-32-bytes!"
    (tmp_path / "secret").write_bytes(secret + b"\n")
    monkeypatch.setenv("JWT_TEST_SECRET", secret.decode())
    hs = jwk.OctKey.import_key(secret)
    sources = ({"secret": {"file": str(tmp_path / "secret")}}, {"secret": {"env": "JWT_TEST_SECRET"}},
               {"secret": secret.decode()})
    for source in sources:
        over = {"jwks_file": None, **source}
        ok = await run_filter(Jwt, settings(**over), request=("GET", "/", bearer(sign(hs, kid=None))))
        assert ok.local_reply is None and ok.ctx.vars["auth.user"] == "alice"
        reply, event = await refused(sign(RSA), **over)  # an RS token for an HS provider
        assert event["reason"] == "alg_not_allowed"
    (tmp_path / "short").write_bytes(b"password")
    with pytest.raises(ConfigError, match=r"providers.main.secret: the secret is 8 bytes: at least 32"):
        await run_filter(Jwt, settings(jwks_file=None, secret={"file": str(tmp_path / "short")}))
    with pytest.raises(ConfigError, match=r"providers.main.*'RS256' not allowed here: a secret"):
        await run_filter(Jwt, settings(jwks_file=None, secret={"env": "JWT_TEST_SECRET"}, algorithms=["RS256"]))
    monkeypatch.delenv("JWT_NO_SUCH_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"providers.main.secret: environment variable JWT_NO_SUCH_SECRET is not set"):
        await run_filter(Jwt, settings(jwks_file=None, secret={"env": "JWT_NO_SUCH_SECRET"}))
    # the secret never shows in the settings' repr (structlog fields, tracebacks' locals)
    assert secret.decode() not in repr(Provider(secret={"env": "JWT_TEST_SECRET"}))


async def test_clock_skew_tolerates_small_differences_only():
    import time
    now = int(time.time())
    ok = await run_filter(Jwt, settings(clock_skew=30), request=("GET", "/", bearer(sign(exp=now - 10))))
    assert ok.local_reply is None
    ok = await run_filter(Jwt, settings(clock_skew=30), request=("GET", "/", bearer(sign(nbf=now + 10))))
    assert ok.local_reply is None
    _, event = await refused(sign(exp=now - 40), clock_skew=30)
    assert event["reason"] == "expired"
    _, event = await refused(sign(nbf=now + 40), clock_skew=30)
    assert event["reason"] == "not_yet_valid"


async def test_config_errors_name_the_key_path(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match=r"filters.jwt.providers.main.jwks_file: no usable signing key"):
        await run_filter(Jwt, settings(jwks_file=str(bad)))
    with pytest.raises(ConfigError, match=r"filters.jwt.providers.main.*exactly one key source"):
        await run_filter(Jwt, settings(secret="X" * 32))
    with pytest.raises(ConfigError, match=r"filters.jwt.providers.main.cluster: no cluster 'keys'"):
        await run_filter(Jwt, settings(jwks_file=None, jwks_uri="http://idp/jwks", cluster="keys"))


# -- sources, forwarding, claims, scopes: through a real proxy ---------------------------

def proxy_config(routes=None, **over) -> dict:
    cfg = {"filters": {"jwt": settings(**over)}}
    if routes is not None:
        cfg["routes"] = routes
    return cfg


async def test_cookie_and_named_header_sources(origin, sluice_proxy):
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config(
        header="x-token", cookie="session"))
    token = sign()
    by_header = await proxy.client.get("/a", headers={"x-token": token})
    by_cookie = await proxy.client.get("/b", headers={"cookie": f"theme=dark; session={token}; lang=en"})
    bearer_ignored = await proxy.client.get("/c", headers={"authorization": f"Bearer {token}"})
    assert (by_header.status_code, by_cookie.status_code, bearer_ignored.status_code) == (200, 200, 401)
    assert origin.requests[0].header("x-token") is None  # stripped
    assert origin.requests[1].header("cookie") == "theme=dark; lang=en"  # the token's cookie alone removed


async def test_forward_keeps_the_token(origin, sluice_proxy):
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config(forward=True))
    token = sign()
    assert (await proxy.client.get("/", headers={"authorization": f"Bearer {token}"})).status_code == 200
    assert origin.requests[0].header("authorization") == f"Bearer {token}"


async def test_claims_become_headers_and_forged_copies_are_removed(origin, sluice_proxy):
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config(
        claims_to_headers={"sub": "x-user", "groups": "x-groups", "tenant": "x-tenant", "nested": "x-nested"}))
    token = sign(groups=["admin", "ops"], nested={"a": 1})
    r = await proxy.client.get("/", headers=[("authorization", f"Bearer {token}"), ("x-user", "mallory"),
                                             ("x-tenant", "forged"), ("x-groups", "root")])
    assert r.status_code == 200
    seen = origin.requests[0]
    assert [v for n, v in seen.headers if n == "x-user"] == ["alice"]
    assert seen.header("x-groups") == "admin,ops"
    assert seen.header("x-tenant") is None  # not a claim of this token: the forged copy is gone all the same
    assert seen.header("x-nested") is None  # an object is not a header value
    odd = sign(sub="zoë", tenant="a\r\nx-injected: 1")
    assert (await proxy.client.get("/", headers={"authorization": f"Bearer {odd}"})).status_code == 200
    seen = origin.requests[1]
    assert [v for n, v in seen.headers if n == "x-user"] == ["zoë".encode().decode("latin-1")]  # UTF-8 bytes
    assert seen.header("x-tenant") is None and seen.header("x-injected") is None  # never a split head


async def test_scopes_per_route_give_403_insufficient_scope(origin, sluice_proxy):
    routes = [
        {"match": {"prefix": "/admin"}, "cluster": "origin", "filters": {"jwt": {"scopes": ["admin", "write"]}}},
        {"match": {"prefix": "/"}, "cluster": "origin"},
    ]
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config(routes))
    reader, admin, scp = sign(scope="read"), sign(scope="read write admin"), sign(scp=["admin", "write"])
    denied = await proxy.client.get("/admin/x", headers={"authorization": f"Bearer {reader}"})
    assert denied.status_code == 403
    assert denied.headers["www-authenticate"] == (
        'Bearer realm="sluice", error="insufficient_scope", '
        'error_description="the token lacks a required scope", scope="admin write"')
    for token in (admin, scp):
        assert (await proxy.client.get("/admin/x", headers={"authorization": f"Bearer {token}"})).status_code == 200
    assert (await proxy.client.get("/other", headers={"authorization": f"Bearer {reader}"})).status_code == 200
    assert [r.path for r in origin.requests] == ["/admin/x", "/admin/x", "/other"]


async def test_per_route_disable_providers_and_all_of(origin, sluice_proxy, tmp_path):
    other = jwk.RSAKey.generate_key(2048, parameters={"kid": "partner-1"})
    cfg = {"filters": {"jwt": {"providers": {
        "main": provider(),
        "partner": {"issuer": "https://partner.test", "jwks_file": write_jwks(tmp_path / "p.json", other),
                    "header": "x-partner-token"},
    }}}, "routes": [
        {"match": {"prefix": "/public"}, "cluster": "origin", "filters": {"jwt": {"disabled": True}}},
        {"match": {"prefix": "/partner"}, "cluster": "origin", "filters": {"jwt": {"providers": ["partner"]}}},
        {"match": {"prefix": "/both"}, "cluster": "origin", "filters": {"jwt": {"require": "all"}}},
        {"match": {"prefix": "/"}, "cluster": "origin"},
    ]}
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=cfg)
    main = {"authorization": f"Bearer {sign()}"}
    partner = {"x-partner-token": sign(other, iss="https://partner.test", aud=None)}
    get = proxy.client.get
    assert (await get("/public/x")).status_code == 200
    assert (await get("/partner", headers=main)).status_code == 401
    assert (await get("/partner", headers=partner)).status_code == 200
    assert (await get("/any", headers=partner)).status_code == 200  # any of the providers
    assert (await get("/any", headers=main)).status_code == 200
    assert (await get("/both", headers=main)).status_code == 401
    assert (await get("/both", headers={**main, **partner})).status_code == 200


async def test_a_route_naming_an_unknown_provider_is_a_config_error(origin, sluice_proxy):
    routes = [{"match": {"prefix": "/"}, "cluster": "origin", "filters": {"jwt": {"providers": ["nope"]}}}]
    with pytest.raises(ConfigError, match=r"routes\[0\].filters.jwt.providers\[0\]: unknown provider 'nope'"):
        await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config(routes))


async def test_decisions_are_counted_by_provider_and_outcome(origin, sluice_proxy):
    counter = jwt_plugin._DECISIONS()
    allowed, expired = counter.labels("main", "allowed"), counter.labels("main", "expired")
    before = allowed._value.get(), expired._value.get()
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config())
    for token in (sign(), sign(), _exp_past()):
        await proxy.client.get("/", headers={"authorization": f"Bearer {token}"})
    assert (allowed._value.get() - before[0], expired._value.get() - before[1]) == (2, 1)


# -- real clients ------------------------------------------------------------------------

async def test_curl_and_httpx_see_the_challenge_and_get_through(origin, sluice_proxy):
    import trio
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=proxy_config())
    token = sign(EC)
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["curl", "-s", "-i", "-H", "Authorization: Bearer " + token + "x", proxy.url + "/curl"],
        capture_output=True, timeout=10).stdout.decode())
    assert out.startswith("HTTP/1.1 401") and 'error_description="bad_signature: ' in out
    ok = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--oauth2-bearer", token, proxy.url + "/curl"],
        capture_output=True, timeout=10).stdout.decode())
    assert ok == "200"
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.get("/httpx", headers={"authorization": f"Bearer {token}"})
        missing = await client.get("/httpx")
    assert r.status_code == 200 and missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="sluice"'
    assert [r.path for r in origin.requests] == ["/curl", "/httpx"]


# The filter contract's battery for jwt is test_contract_battery.py's test_jwt, next to every built-in's.


# -- the cache of verified tokens ------------------------------------------------------

@pytest.fixture
def verified(monkeypatch) -> list[int]:
    """Counts signature checks (the real ``verify``, spied on): a cache hit makes none."""
    calls = [0]
    real = jwt_plugin.verify

    def counting(parsed, key):
        calls[0] += 1
        return real(parsed, key)

    monkeypatch.setattr(jwt_plugin, "verify", counting)
    return calls


OWN = ("x-request-id", "traceparent")


async def test_a_cached_token_is_admitted_with_the_same_identity_and_headers(verified):
    jwt_filter = build_filter(Jwt, {**settings(claims_to_headers={"sub": "x-user"}), "cache_size": 10})
    token = sign(EC, scope="read")
    runs = [await run_filter(jwt_filter, request=("GET", "/", bearer(token) + [("x-user", "mallory")]))
            for _ in range(3)]
    assert verified[0] == 1  # the first request checked the signature, the others hit
    for run in runs:
        assert run.local_reply is None
        assert run.ctx.vars == runs[0].ctx.vars and run.ctx.vars["auth.user"] == "alice"
        same = [(n, v) for n, v in run.request.headers if n not in OWN]  # each request has its own ids
        assert same == [(n, v) for n, v in runs[0].request.headers if n not in OWN]
        assert run.request.headers.get_all("x-user") == ["alice"] and run.request.headers.get("authorization") is None
    runs[1].ctx.vars["jwt.claims"]["sub"] = "mallory"  # a filter changing its request's claims
    again = await run_filter(jwt_filter, request=("GET", "/", bearer(token)))
    assert again.ctx.vars["jwt.claims"]["sub"] == "alice"  # changes no other request's


async def test_a_cached_token_expires_on_time(verified):
    import time
    jwt_filter = build_filter(Jwt, settings(clock_skew=0))
    exp = time.time() + 0.4
    token = sign(exp=exp)
    assert (await run_filter(jwt_filter, request=("GET", "/", bearer(token)))).local_reply is None
    assert (await run_filter(jwt_filter, request=("GET", "/", bearer(token)))).local_reply is None
    assert verified[0] == 1
    await trio.sleep(max(0.0, exp - time.time()) + 0.02)  # the wall clock past exp: what is awaited here
    run = await run_filter(jwt_filter, request=("GET", "/", bearer(token)))
    assert run.local_reply is not None and run.local_reply.status == 401
    assert [e["reason"] for e in run.log if e["event"] == "jwt refused"] == ["expired"]
    assert verified[0] == 1 and run.ctx.vars == {}  # refused from the cache, as an uncached check would


async def test_cache_size_0_verifies_every_request_and_the_bound_holds(verified):
    off = build_filter(Jwt, {**settings(), "cache_size": 0})
    token = sign()
    for _ in range(3):
        assert (await run_filter(off, request=("GET", "/", bearer(token)))).local_reply is None
    assert verified[0] == 3 and off._providers["main"].cache is None
    bounded = build_filter(Jwt, {**settings(), "cache_size": 3})
    tokens = [sign(sub=f"user-{i}") for i in range(5)]
    for token in tokens[:3] + [tokens[0]] + tokens[3:]:  # tokens[0] used again: the least recent is tokens[1]
        assert (await run_filter(bounded, request=("GET", "/", bearer(token)))).local_reply is None
    assert len(bounded._providers["main"].cache.entries) == 3
    verified[0] = 0
    for i in (0, 3, 4):
        await run_filter(bounded, request=("GET", "/", bearer(tokens[i])))
    assert verified[0] == 0  # kept: the most recently used
    await run_filter(bounded, request=("GET", "/", bearer(tokens[1])))
    assert verified[0] == 1  # evicted, verified again


async def test_cache_size_config_errors_name_the_key_path():
    with pytest.raises(ConfigError, match=r"filters.jwt.cache_size"):
        build_filter(Jwt, {**settings(), "cache_size": -1})


async def test_a_routes_scopes_still_apply_to_a_cached_token(origin, sluice_proxy, verified):
    routes = [
        {"match": {"prefix": "/admin"}, "cluster": "origin", "filters": {"jwt": {"scopes": ["admin"]}}},
        {"match": {"prefix": "/"}, "cluster": "origin"},
    ]
    cfg = {"filters": {"jwt": {**settings(), "cache_size": 100}}, "routes": routes}
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=cfg)
    reader = {"authorization": f"Bearer {sign(scope='read')}"}
    assert (await proxy.client.get("/other", headers=reader)).status_code == 200
    assert (await proxy.client.get("/admin/x", headers=reader)).status_code == 403  # a hit, still lacking admin
    assert (await proxy.client.get("/other", headers=reader)).status_code == 200
    assert verified[0] == 1
