"""JWT bearer tokens verified against named providers' keys (JWKS through a cluster, a JWKS file, or a secret).

Filter ``jwt``. A request must carry a token that one of its route's
providers accepts (``require = "any"``, the default) or one per provider
(``"all"``). A token is refused before any parsing past
``max_token_bytes``; then its algorithm must be in the provider's
allowlist, its key found (by ``kid``; an unknown kid fetches a remote JWKS
again, rate limited), its signature verified by joserfc, and its
``iss``, ``aud``, ``exp`` and ``nbf`` (with ``clock_skew``) accepted.
A verified token is remembered (``cache.TokenCache``, ``cache_size`` per
provider) until it expires or its provider's key set changes.

On success: ``ctx.vars["jwt.claims"]`` (the verified claims),
``ctx.vars["jwt.provider"]``, ``ctx.vars["auth.user"]`` (``sub``) and
``ctx.vars["auth.method"] = "jwt"``; ``claims_to_headers`` copies claims
into request headers (incoming copies of those headers are always removed
first, so a client cannot forge them), and the token is removed unless
``forward``. A route's ``scopes`` must all be in the token's ``scope``
(space-separated) or ``scp`` (a list or a string) claim, else 403.

Refusals are 401 with RFC 6750's challenge: ``WWW-Authenticate: Bearer
realm="sluice"`` alone for a missing token (3.1), else with
``error="invalid_token"`` and an ``error_description`` naming the code
(``tokens.CODES``); 403 ``error="insufficient_scope"`` for scopes. Never a
500: a token is data, every way it can be wrong is a code. A provider
whose remote JWKS was never fetched answers 401 ``keys_unavailable``, as
Envoy answers 401 "Jwks remote fetch is failed": the client's token could
not be verified, which is the 401's meaning, and a 503 would invite
retries that cannot succeed until the key server is back; the outage is
the operator's to see, in the log (once) and the fetch metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from sluice import CONTINUE, ConfigError, Filter, LocalReply, hookimpl, metrics

from .cache import TokenCache
from .keys import JwksFile, RemoteJwks, Secret
from .settings import Provider, RouteSettings, Settings
from .tokens import CODES, Parsed, Refusal, check_claims, parse, verify

__all__ = ["Jwt"]


@dataclass(eq=False)
class _Provider:
    """A provider as the filter runs it: its settings, key source, token location and metric children."""

    name: str
    config: Provider
    source: Any
    header: bytes
    prefix: bytes
    cookie: str | None
    allowed: frozenset[str]
    audiences: frozenset[str]
    outcomes: dict[str, Any]
    cache: TokenCache | None = None  # verified tokens (None: cache_size = 0)

    def token(self, request) -> tuple[bytes, str] | None:
        """The token this provider looks for, and where it was found ("header" or "cookie")."""
        value = request.headers.get_raw(self.header)
        if value is not None:
            prefix = self.prefix
            if not prefix:
                return value.strip(), "header"
            if value[:len(prefix)].lower() == prefix:
                return value[len(prefix):].strip(), "header"
        if self.cookie is not None:
            for raw in request.headers.get_all("cookie"):
                for part in raw.split(";"):
                    name, sep, val = part.strip().partition("=")
                    if sep and name == self.cookie:
                        return val.strip().strip('"').encode("latin-1"), "cookie"
        return None

    def count(self, outcome: str) -> None:
        child = self.outcomes.get(outcome)
        if child is None:
            child = self.outcomes[outcome] = _DECISIONS().labels(self.name, outcome)
        child.inc()


def _DECISIONS():  # noqa: N802 - made on use, so a reload asks for the same counter
    return metrics.counter("jwt_decisions", "Requests decided by the jwt filter, by provider and outcome "
                           "(allowed, insufficient_scope, or the refusal's code)", labels=["provider", "outcome"])


def _FETCHES():  # noqa: N802
    return metrics.counter("jwt_jwks_fetches", "Remote JWKS fetches by provider and outcome "
                           "(ok, failed, rate_limited: an unknown kid that did not fetch again)",
                           labels=["provider", "outcome"])


@dataclass(frozen=True)
class _Rule:
    """What a route requires: which providers, any or all of them, and scopes."""

    providers: tuple[_Provider, ...]
    require: str
    scopes: frozenset[str]


def _scopes(claims: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def _header_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(str(v) for v in value)
    return None


class Jwt(Filter):
    """Verifies JWT bearer tokens (joserfc) against named providers; 401/403 with RFC 6750 challenges."""

    name = "jwt"
    Config = Settings
    RouteConfig = RouteSettings

    def __init__(self, config: Settings, app: Any = None) -> None:
        super().__init__(config)
        self._providers: dict[str, _Provider] = {}
        fetches = _FETCHES()
        for name, p in config.providers.items():
            where = f"filters.jwt.providers.{name}"
            self._providers[name] = _Provider(
                name, p, self._source(name, p, app, where, fetches),
                header=p.header.encode("latin-1"),
                prefix=(p.prefix if p.prefix is not None else "Bearer " if p.header == "authorization" else "")
                .lower().encode("latin-1"),
                cookie=p.cookie, allowed=p.allowed, audiences=frozenset(p.audiences), outcomes={},
                cache=TokenCache(config.cache_size, p.clock_skew) if config.cache_size else None)
        self._default = _Rule(tuple(self._providers.values()), config.require, frozenset())
        self._rules: dict[int, _Rule] = {}
        self._sanitise = tuple({h.encode() for p in config.providers.values() for h in p.claims_to_headers.values()})
        realm = f'Bearer realm="{config.realm}"'
        self._missing = [("www-authenticate", realm)]
        self._realm = realm
        self._scope: Any = None

    @classmethod
    def from_config(cls, config: Settings, app: Any) -> Jwt:
        if app is not None:
            for i, route in enumerate(app.config.routes):
                own = (route.get("filters") or {}).get(cls.name) if isinstance(route, dict) else None
                for j, name in enumerate((own or {}).get("providers") or ()):
                    if name not in config.providers:
                        raise ConfigError(f"routes[{i}].filters.jwt.providers[{j}]: unknown provider {name!r} "
                                          f"(filters.jwt.providers has {', '.join(sorted(config.providers))})")
        return cls(config, app)

    @staticmethod
    def _source(name: str, p: Provider, app: Any, where: str, fetches: Any) -> Any:
        try:
            if p.jwks_file is not None:
                return JwksFile(name, p.jwks_file, p.file_poll)
            if p.secret is not None:
                return Secret(p.secret.encode())
        except (OSError, ValueError) as exc:
            key = "jwks_file" if p.jwks_file is not None else "secret"
            raise ConfigError(f"{where}.{key}: {exc}") from None
        if app is None or p.cluster not in app.clusters:
            raise ConfigError(f"{where}.cluster: no cluster {p.cluster!r} (the JWKS is fetched through it)")
        return RemoteJwks(name, app, p.cluster, p.jwks_uri, cache_ttl=p.cache_ttl,
                          refetch_interval=p.refetch_interval, timeout=p.fetch_timeout, fetches=fetches)

    async def open(self, nursery) -> None:
        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as self._scope:
                task_status.started()
                async with trio.open_nursery() as inner:
                    for p in self._providers.values():
                        inner.start_soon(p.source.run)

        await nursery.start(run)

    async def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    # -- per request -------------------------------------------------------------

    def _rule(self, ctx) -> _Rule:
        route = ctx.route
        if route is None:
            return self._default
        rule = self._rules.get(id(route))
        if rule is None:
            data = {k: v for k, v in route.filter_settings(self.name).items() if k != "disabled"}
            own = RouteSettings.model_validate(data)  # checked at load already
            providers = (tuple(self._providers[n] for n in own.providers) if own.providers
                         else self._default.providers)
            rule = _Rule(providers, own.require or self.config.require, frozenset(own.scopes))
            if len(self._rules) > 4096:  # routes of replaced configs
                self._rules.clear()
            self._rules[id(route)] = rule
        return rule

    async def on_request_headers(self, ctx, request):
        if self._sanitise:
            request.headers.remove(*self._sanitise)
        rule = self._rule(ctx)
        found = [(p, t) for p in rule.providers if (t := p.token(request)) is not None]
        if not found or (rule.require == "all" and len(found) < len(rule.providers)):
            first = rule.providers[0]
            first.count("missing")
            self.log(ctx).info("jwt refused", reason="missing", provider=first.name)
            return LocalReply(401, "token required\n", self._missing)
        parsed: dict[bytes, Parsed | Refusal] = {}
        passed: list[tuple[_Provider, dict[str, Any], str]] = []
        refusal: tuple[_Provider, Refusal] | None = None
        for p, (token, where) in found:
            try:
                claims = await self._verify(p, token, parsed)
            except Refusal as exc:
                if rule.require == "all":
                    return self._refuse(ctx, p, exc)
                if refusal is None or (refusal[1].code == "wrong_issuer" and exc.code != "wrong_issuer"):
                    refusal = (p, exc)  # the most telling: a provider that was the token's issuer
                continue
            passed.append((p, claims, where))
            if rule.require == "any":
                break
        if not passed:
            return self._refuse(ctx, *refusal)
        if rule.scopes:
            have = set().union(*(_scopes(c) for _, c, _ in passed))
            lacking = rule.scopes - have
            if lacking:
                p = passed[0][0]
                p.count("insufficient_scope")
                self.log(ctx).info("jwt refused", reason="insufficient_scope", provider=p.name,
                                   lacking=sorted(lacking))
                need = " ".join(sorted(rule.scopes))
                return LocalReply(403, "insufficient scope\n", [("www-authenticate", (
                    f'{self._realm}, error="insufficient_scope", '
                    f'error_description="the token lacks a required scope", scope="{need}"'))])
        for p, claims, where in passed:
            self._admit(ctx, request, p, claims, where)
        first, claims, _ = passed[0]
        ctx.vars["jwt.claims"] = claims
        ctx.vars["jwt.provider"] = first.name
        sub = claims.get("sub")
        if isinstance(sub, str):  # a token without a subject passes, naming no user
            ctx.vars["auth.user"] = sub
        ctx.vars["auth.method"] = "jwt"
        return CONTINUE

    async def _verify(self, p: _Provider, token: bytes, parsed: dict) -> dict[str, Any]:
        """The verified claims of ``token`` for provider ``p``; Refusal otherwise."""
        if len(token) > self.config.max_token_bytes:
            raise Refusal("too_large", f"{len(token)} bytes")
        cache, index = p.cache, getattr(p.source, "index", None)
        if cache is not None and index is not None:
            digest = cache.digest(token)
            claims = cache.get(digest, index, time.time())
            if claims is not None:
                return dict(claims)  # a copy: a filter changing its request's claims changes no other's
        got = parsed.get(token)
        if got is None:
            try:
                got = parsed[token] = parse(token)
            except Refusal as exc:
                got = parsed[token] = exc
        if isinstance(got, Refusal):
            raise got
        if got.alg not in p.allowed:
            raise Refusal("alg_not_allowed", got.alg[:20])
        c = p.config
        if c.issuer is not None and got.claims.get("iss") != c.issuer:
            raise Refusal("wrong_issuer")
        keys = p.source.keys_for(got)
        if keys is None and await p.source.refetch():
            keys = p.source.keys_for(got)
        if keys is None:
            raise Refusal("keys_unavailable" if getattr(p.source, "available", True) is False else "unknown_kid",
                          (got.kid or "")[:64])
        if not keys:
            raise Refusal("no_key", got.alg)
        if not any(verify(got, key) for key in keys):
            raise Refusal("bad_signature")
        check_claims(got.claims, time.time(), skew=c.clock_skew, issuer=None, audiences=p.audiences,
                     require_exp=c.require_exp)
        if cache is not None and index is not None:  # bound to the set the keys came from (no await since)
            cache.put(digest, p.source.index, dict(got.claims))
        return got.claims

    def _refuse(self, ctx, p: _Provider, exc: Refusal) -> LocalReply:
        p.count(exc.code)
        self.log(ctx).info("jwt refused", reason=exc.code, provider=p.name, detail=exc.detail or None)
        challenge = (f'{self._realm}, error="invalid_token", '
                     f'error_description="{exc.code}: {CODES[exc.code]}"')
        return LocalReply(401, f"invalid token: {exc.code}\n", [("www-authenticate", challenge)])

    def _admit(self, ctx, request, p: _Provider, claims: dict[str, Any], where: str) -> None:
        p.count("allowed")
        for claim, header in p.config.claims_to_headers.items():
            value = _header_value(claims.get(claim))
            if value is None:
                continue
            try:
                request.headers.add(header, value.encode("utf-8"))  # UTF-8 as the token had it
            except ValueError:  # CR, LF or NUL in a claim: never split a head for it
                self.log(ctx).info("claim not forwarded", provider=p.name, claim=claim, header=header)
        if not p.config.forward:
            if where == "header":
                request.headers.remove(p.header)
            else:
                self._drop_cookie(request, p.cookie)

    @staticmethod
    def _drop_cookie(request, name: str) -> None:
        kept = []
        for raw in request.headers.get_all("cookie"):
            parts = [part.strip() for part in raw.split(";")]
            rest = [part for part in parts if part and part.partition("=")[0] != name]
            if rest:
                kept.append("; ".join(rest))
        request.headers.remove("cookie")
        for value in kept:
            request.headers.add("cookie", value)


@hookimpl
def sluice_filters():
    return [Jwt]
