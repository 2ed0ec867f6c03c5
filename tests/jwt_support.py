"""Keys, tokens and JWKS documents for the jwt filter's tests (tests/test_jwt*.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from joserfc import jwk, jwt

__all__ = ["EC", "ED", "ISSUER", "RSA", "RSA2", "claims", "jwks", "sign", "write_jwks"]

ISSUER = "https://issuer.test"
RSA = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
RSA2 = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
EC = jwk.ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
ED = jwk.OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})


def claims(**over: Any) -> dict[str, Any]:
    """A token's claims that the default provider accepts, with ``over`` applied (None removes)."""
    now = int(time.time())
    base = {"iss": ISSUER, "aud": "api", "sub": "alice", "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any = RSA, alg: str | None = None, kid: str | None | bool = True, **over: Any) -> str:
    """A compact JWS of ``claims(**over)`` signed by ``key`` (kid: True = the key's, None = no kid)."""
    alg = alg or {"EC": "ES256", "OKP": "Ed25519", "oct": "HS256"}.get(key.key_type, "RS256")
    header: dict[str, Any] = {"alg": alg}
    if kid is True and key.kid:
        header["kid"] = key.kid
    elif isinstance(kid, str):
        header["kid"] = kid
    return jwt.encode(header, claims(**over), key, algorithms=[alg])


def jwks(*keys: Any) -> dict[str, Any]:
    """The public JWKS of ``keys``."""
    return {"keys": [k.as_dict(private=False) for k in keys]}


def write_jwks(path: Path, *keys: Any) -> str:
    path.write_text(json.dumps(jwks(*keys)))
    return str(path)
