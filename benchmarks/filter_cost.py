#!/usr/bin/env python3
"""What each built-in and example filter adds to one proxied request, in microseconds of Python.

Each filter is measured as ``[filter, router]`` against ``[router]`` alone,
on ``exchange_cost.py``'s memory-backed listener (the production code, no
system calls), with rounds interleaved so that a busy machine slows both
alike; the figure is the median difference. The request carries what the
auth filters want (a valid API key, valid basic credentials), so it is
admitted and proxied: the cost of the happy path. ``basic`` is measured
with its cache warm (bcrypt runs once per user and ``cache_seconds``), as in
production. Metrics are off, so the figure is the filter's own.

The example plugins (``plugins/examples/``, not installed) are loaded from
their directories as in-process plugins, each on its common path:
``token_bucket`` admits (a shared-table take per request), ``canary`` decides
against the canary (header, cookie, sticky hash: the request stays),
``redact`` scans a text body (and the core re-frames it chunked). A filter
declared after the router is measured as ``[router, filter]``.

``jwt_rs256`` and ``jwt_es256`` are the ``jwt`` filter verifying a token
signed with RS256 (2048-bit key) or ES256, its JWKS loaded (a file: the
cached case; a JWKS fetched through a cluster is the same lookup); every
request carries every variant's token, so the router's baseline parses the same bytes.
The token is the same on every request, so after the first it is a hit in
the filter's cache of verified tokens; ``jwt_rs256_nocache`` and
``jwt_es256_nocache`` are the same with ``cache_size = 0`` (every request checks the signature).

``ip_filter`` walks four deny and four allow networks, the client's the last
allowed; ``cors`` matches the request's ``Origin`` by its subdomain pattern
and adds three response headers (the request carries an ``Origin`` for it).

``rbac`` decides with a ten-policy set (``RBAC_POLICIES``: SPIFFE IDs, JWT
claims, scopes, API key names, headers and paths that do not match this
request, then the allow that does, ninth), so it pays for most of its rules.
``ext_authz`` asks a real authorization service on loopback, in a process of
its own (``authz_service``: its CPU is not in the figure, the check's round
trip through sluice's pool is).

    .venv/bin/python benchmarks/filter_cost.py
    .venv/bin/python benchmarks/filter_cost.py --filters api_key --repeats 9
    .venv/bin/python benchmarks/filter_cost.py --filters token_bucket,canary,redact
    .venv/bin/python benchmarks/filter_cost.py --filters jwt_rs256,jwt_es256,jwt_rs256_nocache,jwt_es256_nocache
    .venv/bin/python benchmarks/filter_cost.py --filters rbac,ext_authz
    .venv/bin/python benchmarks/filter_cost.py --filters ip_filter,cors
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bcrypt
import trio

from exchange_cost import REQUEST, _app, _serve

EXAMPLES = Path(__file__).resolve().parent.parent / "plugins" / "examples"
KEY = "bench-key"
USER, PASSWORD = "bench", "bench-password"
ORIGIN = "https://web.example.org"  # what cors checks: an actual (not preflight) cross-origin request


def settings(workdir: Path) -> dict[str, dict]:
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    return {
        "api_key": {"keys": {"bench": hashlib.sha256(KEY.encode()).hexdigest()}},
        "basic": {"htpasswd": str(htpasswd)},
        "token_bucket": {"rate": 1e9, "burst": 1e9},  # always admitted
        "canary": {"cluster": "canary", "percent": 1.0},  # 127.0.0.1 hashes to 31.96: stays
        "rbac": {"policies": RBAC_POLICIES},
        "ext_authz": {"cluster": "authz", "timeout": 5.0},
        # four networks of each kind, the client's in the last allow: the lists are walked
        "ip_filter": {"deny": ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"],
                      "allow": ["10.0.0.0/8", "172.16.0.0/12", "fd00::/8", "127.0.0.0/8"]},
        # an exact origin and a pattern; the request's Origin matches the pattern (the longer path)
        "cors": {"allow_origins": ["https://app.example.com", "https://*.example.org"],
                 "expose_headers": ["x-request-id"]},
    }


def _deny(n: int, principal: dict, permission: dict | None = None) -> dict:
    return {"name": f"p{n}", "action": "deny", "principals": [principal], "permissions": [permission or {"any": True}]}


# Ten policies, the request matching the ninth (an allow by source and method), as a mesh's set might read.
RBAC_POLICIES = [
    _deny(1, {"spiffe_id": {"prefix": "spiffe://mesh/ns/untrusted/"}}),
    _deny(2, {"jwt_claim": {"name": "role", "values": ["suspended"]}}),
    {"name": "p3", "action": "allow", "principals": [{"spiffe_id": "spiffe://mesh/ns/prod/sa/frontend"}],
     "permissions": [{"methods": ["GET", "POST"], "prefix": "/api/"}]},
    {"name": "p4", "action": "allow", "principals": [{"scope": ["orders:read"]}], "permissions": [{"prefix": "/orders"}]},
    {"name": "p5", "action": "allow", "principals": [{"api_key": ["ci", "deploy"]}], "permissions": [{"any": True}]},
    _deny(6, {"any": True}, {"prefix": "/admin"}),
    _deny(7, {"not": {"authenticated": True}}, {"header": {"name": "x-internal", "present": True}}),
    {"name": "p8", "action": "allow", "principals": [{"user": "ops"}], "permissions": [{"regex": "/ops/[a-z]+"}]},
    {"name": "p9", "action": "allow", "principals": [{"source_cidr": ["10.0.0.0/8", "127.0.0.0/8"]}],
     "permissions": [{"methods": ["GET", "HEAD"], "host": "127.0.0.1"}]},
    {"name": "p10", "action": "allow", "principals": [{"tls_san": "metrics.mesh"}], "permissions": [{"path": "/metrics"}]},
]

AUTHZ_SERVICE = """
import sys, trio
from sluice.testing import Origin, Reply
origin = Origin(Reply(200, headers=[("x-user", "bench")], body=b""))
async def main():
    async with trio.open_nursery() as n:
        await n.start(origin.serve)
        print(origin.port, flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


@contextlib.contextmanager
def authz_service():
    """A real authorization service (``sluice.testing.Origin``: 200 to every check) in its own
    process, so its CPU is not counted as the proxy's; yields its address."""
    proc = subprocess.Popen([sys.executable, "-c", AUTHZ_SERVICE], stdout=subprocess.PIPE, text=True)
    try:
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.terminate()
        proc.wait(5)


# the jwt filter, with a token of each (the same on every request: cache hits), and with its cache off
JWT_VARIANTS = {"jwt_rs256": "RS256", "jwt_es256": "ES256", "jwt_rs256_nocache": "RS256", "jwt_es256_nocache": "ES256"}


def jwt_variants(workdir: Path) -> dict[str, tuple[dict, bytes]]:
    """Per variant: the jwt filter's settings (a provider reading its own header) and that header's line."""
    import json

    from joserfc import jwk, jwt

    keys = {"RS256": jwk.RSAKey.generate_key(2048, parameters={"kid": "rs"}),
            "ES256": jwk.ECKey.generate_key("P-256", parameters={"kid": "es"})}
    (workdir / "jwks.json").write_text(json.dumps(jwk.KeySet(list(keys.values())).as_dict(private=False)))
    claims = {"iss": "https://bench", "aud": "api", "sub": "bench", "exp": 4_000_000_000}
    out = {}
    for name, alg in JWT_VARIANTS.items():
        token = jwt.encode({"alg": alg, "kid": keys[alg].kid}, claims, keys[alg], algorithms=[alg])
        header = name.replace("_", "-")
        provider = {"issuer": "https://bench", "audiences": ["api"], "jwks_file": str(workdir / "jwks.json"),
                    "header": header}
        cache = {"cache_size": 0} if name.endswith("_nocache") else {}
        out[name] = {"providers": {"bench": provider}, **cache}, f"{header}: {token}\r\n".encode()
    return out


CLUSTERS = {"canary": {"endpoints": ["127.0.0.1:10"]}}  # canary's cluster (never reached)


def examples(names: list[str]) -> dict:
    """The example plugins among ``names``, imported from plugins/examples/NAME/sluice_NAME.py."""
    found = {}
    for name in names:
        path = EXAMPLES / name / f"sluice_{name}.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"sluice_{name}", path)
            found[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (pydantic looks there)
            spec.loader.exec_module(found[name])
    return found


def chain_for(name: str, extra: dict) -> list[str]:
    """``[name, "router"]``, or ``["router", name]`` for a filter that must follow the router."""
    if name in JWT_VARIANTS:
        return ["jwt", "router"]
    module = extra.get(name)
    after = any("router" in cls.after for cls in module.sluice_filters()) if module else False
    return ["router", name] if after else [name, "router"]


def request(more: bytes = b"") -> bytes:
    """exchange_cost's request, with the credentials both auth filters accept (and ``more`` lines)."""
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    extra = f"X-Api-Key: {KEY}\r\nAuthorization: Basic {basic}\r\nOrigin: {ORIGIN}\r\n".encode() + more
    return REQUEST.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1)


def measure(filters: list[str], repeats: int, n: int, codec: str = "auto") -> dict[str, float]:
    """``{filter: added microseconds per request}``, and ``router`` itself."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tables, plugins = settings(Path(tmp)), examples(filters)
        jwts = jwt_variants(Path(tmp)) if set(filters) & set(JWT_VARIANTS) else {}
        wire = request(b"".join(line for _, line in jwts.values()))
        chains = {"router": ["router"], **{name: chain_for(name, plugins) for name in filters}}
        service = authz_service() if "ext_authz" in filters else contextlib.nullcontext("127.0.0.1:11")
        clusters = {**CLUSTERS, "authz": {"endpoints": [stack.enter_context(service)]}}

        def serve(name: str, count: int) -> float:
            own = {**tables, "jwt": jwts[name][0]} if name in jwts else tables
            app = _app(chains[name], codec, tmp, None, own, plugins, clusters)
            return trio.run(_serve, app, count, wire) * 1e6

        for name in chains:
            serve(name, 2000)  # warm-up (and basic's bcrypt, once)
        samples: dict[str, list[float]] = {name: [] for name in chains}
        for _ in range(repeats):
            for name in chains:
                samples[name].append(serve(name, n))
    base = statistics.median(samples["router"])
    return {"router": base, **{name: statistics.median(samples[name]) - base for name in filters}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", default="access_log,api_key,basic,token_bucket,canary,redact",
                        help="comma-separated filters to measure (default: every built-in traffic filter "
                             "and every example)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("-n", type=int, default=10000, help="requests per round")
    args = parser.parse_args()
    figures = measure(args.filters.split(","), args.repeats, args.n)
    print(f"router alone: {figures.pop('router'):.1f} us per proxied request")
    print(f"{'filter':<17} {'adds, us/request':>17}")
    for name, added in figures.items():
        print(f"{name:<17} {added:>17.1f}")
    print(f"medians of {args.repeats} interleaved rounds of {args.n} requests; metrics off")


if __name__ == "__main__":
    main()
