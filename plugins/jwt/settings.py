"""The jwt filter's settings: ``[filters.jwt]`` with its named providers, and a route's own keys.

Checked at load like every filter's (errors by key path). A provider has
exactly one key source, and its algorithms must fit it: asymmetric ones
(the default) for a JWKS, HS ones for a secret. ``none`` is never
accepted. Together with ``keys.load_jwks`` dropping a JWKS's symmetric
keys, that is what makes HS/RS confusion impossible by construction.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from sluice import FilterConfig
from sluice.secrets import Secret

from .tokens import ASYMMETRIC, SYMMETRIC

__all__ = ["Provider", "RouteSettings", "Settings"]

_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
Seconds = Annotated[float, Field(gt=0, le=86400)]


def _header_name(value: str) -> str:
    if not _HEADER.fullmatch(value):
        raise ValueError(f"{value!r} is not a header name")
    return value.lower()


class Provider(FilterConfig):
    """One token issuer: where its keys come from, what its tokens must say, where they are found."""

    issuer: str | None = None  # the iss every token must carry (None: any)
    audiences: list[str] = []  # one of them in aud (empty: aud not checked)
    # key source: exactly one of jwks_uri (+ cluster), jwks_file, secret
    jwks_uri: str | None = None  # http(s)://host/path: Host and target of the GET sent through `cluster`
    cluster: str | None = None
    jwks_file: str | None = None
    secret: Secret | None = None  # an HMAC secret (inline, { env = "NAME" } or { file = "PATH" }): HS only
    algorithms: list[str] | None = None  # default: every asymmetric one (a secret: HS256/384/512)
    clock_skew: Annotated[float, Field(ge=0, le=3600)] = 60.0  # seconds of leeway on exp and nbf
    require_exp: bool = True  # a token without exp is refused
    header: str = "authorization"  # where the token is
    prefix: str | None = None  # before the token in that header (default: "Bearer " in authorization, else none)
    cookie: str | None = None  # a cookie holding the token, looked at when the header has none
    forward: bool = False  # keep the token on the request upstream (default: removed)
    claims_to_headers: dict[str, str] = {}  # claim -> request header (incoming copies removed)
    cache_ttl: Seconds = 300.0  # a remote JWKS is fetched again this often
    refetch_interval: Seconds = 10.0  # an unknown kid fetches again at most this often
    fetch_timeout: Seconds = 5.0
    file_poll: Seconds = 1.0  # a jwks_file's stat is checked this often

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        return _header_name(value)

    @field_validator("claims_to_headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return {claim: _header_name(header) for claim, header in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> Provider:
        sources = [n for n in ("jwks_uri", "jwks_file", "secret") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one key source: jwks_uri (with cluster), jwks_file or secret "
                             f"(got {', '.join(sources) or 'none'})")
        if (self.jwks_uri is None) != (self.cluster is None):
            raise ValueError("jwks_uri and cluster go together: the JWKS is fetched through that cluster")
        if self.jwks_uri is not None:
            parts = urlsplit(self.jwks_uri)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"jwks_uri {self.jwks_uri!r}: expected http(s)://host/path")
        secret = sources[0] == "secret"
        allowed = SYMMETRIC if secret else ASYMMETRIC
        for alg in self.algorithms or ():
            if alg.lower() == "none":
                raise ValueError("algorithms: 'none' is never accepted")
            if alg not in allowed:
                kind = ("a secret verifies HS256, HS384 or HS512 only" if secret else
                        "a JWKS provider takes asymmetric algorithms only (HS ones need a secret)")
                raise ValueError(f"algorithms: {alg!r} not allowed here: {kind}")
        if self.algorithms is not None and not self.algorithms:
            raise ValueError("algorithms: empty")
        return self

    @property
    def allowed(self) -> frozenset[str]:
        if self.algorithms:
            return frozenset(self.algorithms)
        return frozenset(SYMMETRIC if self.jwks_uri is None and self.jwks_file is None else ASYMMETRIC)


class Settings(FilterConfig):
    providers: Annotated[dict[str, Provider], Field(min_length=1)]
    realm: Annotated[str, Field(pattern=r'^[^"\\]*$')] = "sluice"  # no quotes or backslashes: it is quoted
    max_token_bytes: Annotated[int, Field(ge=64, le=1 << 20)] = 8192  # refused before any parsing
    require: Literal["any", "all"] = "any"  # which of the providers a request must pass (routes may say)
    # verified tokens remembered per provider (0: none), until exp or a key-set change; LRU beyond it
    cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = 10_000


class RouteSettings(FilterConfig):
    providers: Annotated[list[str], Field(min_length=1)] | None = None  # default: all of them
    require: Literal["any", "all"] | None = None
    # every one in the token's scope (or scp) claim, else 403; RFC 6749 3.3's scope-token characters
    scopes: list[Annotated[str, Field(pattern=r"^[\x21\x23-\x5b\x5d-\x7e]+$")]] = []
