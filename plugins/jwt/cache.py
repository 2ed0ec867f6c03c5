"""Verified tokens remembered per provider, so a client sending the same token pays the signature once.

As Envoy's ``jwt_cache_config``: a token's blake2b-128 hash (never the
token itself) maps to its verified claims and its ``exp``/``nbf``. An
entry is good only while

- the key set that verified it is the provider's current one: each source
  replaces its ``index`` object on every change (a JWKS fetch, a file
  reload), and the first lookup that sees a new one empties the cache, so a
  withdrawn key refuses the tokens it verified at once (a fetch that fails
  keeps the old set, and so the entries);
- the token is in its time window: ``exp`` and ``nbf`` are checked again
  (with the provider's clock skew) on every hit, so a cached token expires
  exactly when an uncached one would.

Everything else a provider checks (algorithm, issuer, audience, the
signature) depends on the token and the keys only, which the entry is
bound to. Refusals are never cached: one may be a key not yet fetched.
Bounded to ``size`` entries, least recently used evicted (O(1)).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from .tokens import Refusal, _number

__all__ = ["TokenCache"]


class TokenCache:
    """Token hash -> (claims, exp, nbf) for one provider, bound to one key set."""

    __slots__ = ("size", "skew", "index", "entries")

    def __init__(self, size: int, skew: float) -> None:
        self.size = size
        self.skew = skew
        self.index: Any = None  # the key set the entries were verified with
        self.entries: OrderedDict[bytes, tuple[dict[str, Any], float | None, float | None]] = OrderedDict()

    @staticmethod
    def digest(token: bytes) -> bytes:
        return hashlib.blake2b(token, digest_size=16).digest()

    def get(self, digest: bytes, index: Any, now: float) -> dict[str, Any] | None:
        """The claims of a token verified with ``index``, None when not cached; Refusal when out of its window."""
        if index is not self.index:
            self.entries.clear()
            self.index = index
            return None
        entry = self.entries.get(digest)
        if entry is None:
            return None
        claims, exp, nbf = entry
        if exp is not None and now > exp + self.skew:
            del self.entries[digest]
            raise Refusal("expired", f"{now - exp:.0f} s ago")
        if nbf is not None and now + self.skew < nbf:  # only if the clock went back
            raise Refusal("not_yet_valid", f"in {nbf - now:.0f} s")
        self.entries.move_to_end(digest)
        return claims

    def put(self, digest: bytes, index: Any, claims: dict[str, Any]) -> None:
        """Remember claims that ``index`` verified (and check_claims accepted: exp and nbf are numbers)."""
        if index is not self.index:
            self.entries.clear()
            self.index = index
        entries = self.entries
        entries[digest] = (claims, _number(claims, "exp"), _number(claims, "nbf"))
        if len(entries) > self.size:
            entries.popitem(last=False)
