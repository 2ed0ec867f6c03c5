"""A compact JWS token taken apart, checked and verified, with one error code per way it fails.

The parsing here is only what it takes to name a failure precisely (bad
base64 apart from bad JSON, an unknown ``kid`` apart from a bad signature)
and to choose the key: the signature itself is joserfc's
(``jws.deserialize_compact`` with the one algorithm the header names,
already checked against the provider's allowlist). Each failure is a
``Refusal`` whose ``code`` is what the log, the metrics and the
``error_description`` of the 401 say; its text never quotes the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError

__all__ = ["CODES", "Parsed", "Refusal", "check_claims", "key_fits", "parse", "verify"]

# code -> the error_description sent to the client (fixed texts: nothing of the token echoed)
CODES = {
    "missing": "no token",
    "too_large": "token larger than max_token_bytes",
    "malformed": "not a compact JWS (header.payload.signature)",
    "bad_base64": "a part is not base64url",
    "bad_json": "header or payload is not a JSON object",
    "alg_not_allowed": "algorithm not allowed",
    "unknown_kid": "no key with this kid",
    "no_key": "no key for this algorithm",
    "keys_unavailable": "the key set could not be fetched",
    "bad_signature": "signature verification failed",
    "expired": "token expired",
    "not_yet_valid": "token not yet valid",
    "missing_exp": "token has no exp claim",
    "bad_claim": "exp, nbf or iat is not a number",
    "wrong_issuer": "issuer not accepted",
    "wrong_audience": "audience not accepted",
}

_B64URL = re.compile(rb"^[A-Za-z0-9_-]*$")

# The key type (and EC curve) each algorithm verifies with: a key is never used for another.
_KEY_FOR_ALG = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None), "Ed25519": ("OKP", "Ed25519"),
    **{alg: ("oct", None) for alg in ("HS256", "HS384", "HS512")},
}
ASYMMETRIC = tuple(alg for alg, (kty, _) in _KEY_FOR_ALG.items() if kty != "oct")
SYMMETRIC = ("HS256", "HS384", "HS512")


class Refusal(Exception):
    """A token refused, with its error code (a key of ``CODES``) and, for the log only, detail."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


@dataclass(slots=True)
class Parsed:
    """A token's parts, decoded but not yet trusted."""

    token: bytes
    header: dict[str, Any]
    claims: dict[str, Any]
    alg: str
    kid: str | None


def _b64(part: bytes) -> bytes:
    if not _B64URL.match(part):
        raise Refusal("bad_base64")
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError):  # a length no base64 has (4n+1)
        raise Refusal("bad_base64") from None


def _object(part: bytes, which: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64(part))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: [[[[... nested deep
        raise Refusal("bad_json", which) from None
    if not isinstance(value, dict):
        raise Refusal("bad_json", which)
    return value


def parse(token: bytes) -> Parsed:
    """Split and decode ``token`` (size already checked); Refusal when it is not a JWS."""
    parts = token.split(b".")
    if len(parts) != 3 or not parts[0] or not parts[2]:  # an unsigned token has no signature
        raise Refusal("malformed", f"{len(parts)} parts" + (" (an encrypted JWE?)" if len(parts) == 5 else ""))
    _b64(parts[2])  # a signature that is not base64url is named so, not a bad signature
    header = _object(parts[0], "header")
    claims = _object(parts[1], "payload")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str):
        raise Refusal("malformed", "no alg in the header")
    if kid is not None and not isinstance(kid, str):
        raise Refusal("malformed", "kid is not a string")
    if "crit" in header:  # RFC 7515 4.1.11: extensions we do not understand must be refused
        raise Refusal("malformed", "crit header not supported")
    return Parsed(token, header, claims, alg, kid)


def key_fits(key: Any, alg: str) -> bool:
    """Whether ``key`` (a joserfc key) may verify ``alg``: the type (and curve) must match."""
    kty, curve = _KEY_FOR_ALG.get(alg, (None, None))
    if kty is None or key.key_type != kty:
        return False
    if curve is not None and key.get("crv") != curve:
        return False
    declared = key.get("alg")
    return declared is None or declared == alg or (alg == "Ed25519" and declared == "EdDSA")


def verify(parsed: Parsed, key: Any) -> bool:
    """The signature checked by joserfc with ``key`` and ``parsed.alg`` only."""
    try:
        jws.deserialize_compact(parsed.token, key, algorithms=[parsed.alg])
    except BadSignatureError:
        return False
    except (JoseError, ValueError, TypeError, RecursionError):  # a signature of the wrong length, say
        return False
    return True


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refusal("bad_claim", name)
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        raise Refusal("bad_claim", name) from None
    if not math.isfinite(number):  # Python's json reads NaN and Infinity: an exp of NaN never expires
        raise Refusal("bad_claim", name)
    return number


def check_claims(claims: dict[str, Any], now: float, *, skew: float, issuer: str | None,
                 audiences: frozenset[str], require_exp: bool) -> None:
    """exp, nbf (with ``skew`` seconds of leeway), iss and aud; Refusal on the first that fails."""
    exp, nbf = _number(claims, "exp"), _number(claims, "nbf")
    _number(claims, "iat")
    if exp is None and require_exp:
        raise Refusal("missing_exp")
    if exp is not None and now > exp + skew:
        raise Refusal("expired", f"{now - exp:.0f} s ago")
    if nbf is not None and now + skew < nbf:
        raise Refusal("not_yet_valid", f"in {nbf - now:.0f} s")
    if issuer is not None and claims.get("iss") != issuer:
        raise Refusal("wrong_issuer")
    if audiences:
        aud = claims.get("aud")
        given = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in audiences for a in given):
            raise Refusal("wrong_audience")
