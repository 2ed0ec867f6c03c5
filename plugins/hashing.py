"""Consistent-hash policies: ``ring_hash`` (ketama) and ``maglev``.

Both send a request by a key, so that the same key keeps reaching the same
endpoint and removing an endpoint moves only the keys it had. The key comes
from ``ctx.hash_key`` when a filter set one, else from the policy's ``key``
setting:

=================  ==============================================
``key``            hashes
=================  ==============================================
``header:NAME``    the request header NAME (first value)
``cookie:NAME``    the cookie NAME, from the ``cookie`` header
``source_ip``      the client's IP address
``path``           the request path, without its query (default)
=================  ==============================================

A request without its key (no such header or cookie, no ctx) goes to a
random endpoint, in proportion to weight. Both structures are built once,
over every endpoint of the cluster; when the endpoint a key lands on is not
eligible (down, ejected, already tried) the pick walks on to the next one
that is, so keys of an endpoint that is out spread over the others and come
back to it when it returns.

**ring_hash** is libketama's continuum (the memcached clients' "ketama"),
computed as libketama does so that sluice agrees with them on where a key
goes: an endpoint labelled ``host:port`` gets
``floor(weight / total_weight * points_per_weight / 4 * endpoints)`` MD5
digests of ``"host:port-k"``, four points each (bytes 4h..4h+3 of a digest,
little-endian); a key hashes to the first four bytes of its MD5, also
little-endian, and goes to the first point at or above it (wrapping). With
equal weights that is ``points_per_weight`` (160) points per endpoint. The
share is computed exactly where libketama uses a C float, which could differ
by a point for odd weights, never for equal ones.

**maglev** is the lookup table of Google's Maglev paper (Eisenbud et al.,
NSDI 2016, section 3.4): each endpoint has a permutation of the table's
``table_size`` slots (a prime, so every skip reaches every slot), from two
hashes of its address; endpoints take turns claiming their next free slot
until the table is full, weight turns per round, so each owns about its
share of slots and removing one moves little more than its own slots. A key
hashes to a slot; when that slot's endpoint is not eligible, the next slots
are tried in order.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence

from pydantic import Field, field_validator

from sluice import Balancer, BalancerConfig, Endpoint

__all__ = ["Maglev", "RingHash"]

_SOURCES = ("source_ip", "path")
_PREFIXED = ("header:", "cookie:")


def _check_key(value: str) -> str:
    if value in _SOURCES:
        return value
    kind, sep, name = value.partition(":")
    if sep and kind + sep in _PREFIXED and name.strip():
        return f"{kind}:{name.strip()}"
    raise ValueError('should be "header:NAME", "cookie:NAME", "source_ip" or "path"')


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for crumb in header.split(";"):
        key, sep, value = crumb.strip().partition("=")
        if sep and key == name:
            return value
    return None


def key_reader(source: str):
    """A function of ``ctx`` giving the key ``source`` names, or None."""
    if source == "path":
        return lambda ctx: ctx.request.path
    if source == "source_ip":
        return lambda ctx: ctx.client[0] if ctx.client else None
    kind, _, name = source.partition(":")
    if kind == "header":
        return lambda ctx: ctx.request.headers.get(name)
    return lambda ctx: _cookie(ctx.request.headers.get("cookie"), name)


class _HashSettings(BalancerConfig):
    key: str = "path"  # what to hash when no filter set ctx.hash_key

    @field_validator("key")
    @classmethod
    def _source(cls, value: str) -> str:
        return _check_key(value)


class _Hashing(Balancer):
    """What both hash policies share: the key, the walk to an eligible
    endpoint, and the pick without a key. A subclass fills ``_owners`` (per
    position of its ring or table, the index of an endpoint) and says where
    a key lands (``position``)."""

    _owners: list[int]

    def __init__(self, endpoints, config=None, rng: random.Random | None = None) -> None:
        super().__init__(endpoints, config)
        self._read = key_reader(self.config.key)
        self._rng = rng or random.Random()
        self._index = {id(e): i for i, e in enumerate(self.endpoints)}
        self._build()

    def endpoints_changed(self, endpoints) -> None:
        """Discovery changed the endpoints: the ring or table is built again
        over the new list (an endpoint's points come from its address, so
        keys of endpoints that stayed mostly stay with them)."""
        super().endpoints_changed(endpoints)
        self._index = {id(e): i for i, e in enumerate(self.endpoints)}
        self._build()

    def _build(self) -> None:  # pragma: no cover
        """Fill ``_owners`` (and what ``position`` needs) from ``self.endpoints``."""
        raise NotImplementedError

    def position(self, key: str) -> int:  # pragma: no cover
        raise NotImplementedError

    def pick(self, ctx, endpoints) -> Endpoint | None:
        key = self.key(ctx)
        owners = self._owners
        if key is None or not owners:
            return self._keyless(endpoints)
        at = self.position(key)
        eligible = self._eligible(endpoints)
        if eligible is None:
            return self.endpoints[owners[at]]
        if eligible:
            n = len(owners)
            for step in range(n):
                owner = owners[(at + step) % n]
                if owner in eligible:
                    return self.endpoints[owner]
        return self._keyless(endpoints)  # none of the policy's own endpoints is eligible

    def key(self, ctx) -> str | None:
        if ctx is None:
            return None
        key = ctx.hash_key
        return key if key is not None else self._read(ctx)

    def _keyless(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        return self._rng.choices(endpoints, weights=[e.weight for e in endpoints])[0]

    def _eligible(self, endpoints: Sequence[Endpoint]) -> set[int] | None:
        """Indexes of the eligible endpoints; None when every endpoint is."""
        if len(endpoints) == len(self.endpoints):
            return None
        index = self._index
        return {index[id(e)] for e in endpoints if id(e) in index}


# -- ring_hash (ketama) ------------------------------------------------------------------------


def ketama_points(label: str, hashes: int) -> list[int]:
    """The continuum points libketama gives a server labelled ``label``
    with ``hashes`` MD5 digests (four points per digest)."""
    points = []
    for k in range(hashes):
        digest = hashlib.md5(f"{label}-{k}".encode()).digest()
        points += [int.from_bytes(digest[4 * h:4 * h + 4], "little") for h in range(4)]
    return points


def ketama_hash(key: str) -> int:
    """libketama's ``ketama_hashi``: the first four bytes of MD5, little-endian."""
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")


class RingHash(_Hashing):
    """Ketama consistent hashing: ``policy = { name = "ring_hash", key = "header:x-user" }``."""

    name = "ring_hash"

    class Config(_HashSettings):
        points_per_weight: int = Field(160, ge=4, le=10_000)  # points per endpoint of mean weight

    def _build(self) -> None:
        total = sum(e.weight for e in self.endpoints) or 1
        count = len(self.endpoints)
        # An endpoint's points depend only on its label and share: kept from the last
        # build, so a discovery change hashes the endpoints that joined, not all of them.
        known = getattr(self, "_known", {})
        self._known = {}
        # Each entry is point << 32 | index: one int sorts several times faster than a tuple.
        ring: list[int] = []
        for i, endpoint in enumerate(self.endpoints):
            hashes = endpoint.weight * count * self.config.points_per_weight // (4 * total)
            label = (endpoint.address, hashes)
            points = self._known[label] = known.get(label) or ketama_points(endpoint.address, hashes)
            ring += [point << 32 | i for point in points]
        ring.sort()  # libketama's qsort by point; a tie (one in 2**32) goes to the lower index
        self._points = [x >> 32 for x in ring]
        self._owners = [x & 0xFFFFFFFF for x in ring]

    def position(self, key: str) -> int:
        """The ring position a key lands on (libketama's ``ketama_get_server``)."""
        at = bisect.bisect_left(self._points, ketama_hash(key))
        return 0 if at == len(self._points) else at


# -- maglev ------------------------------------------------------------------------------------


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _hash64(data: str) -> int:
    return int.from_bytes(hashlib.md5(data.encode()).digest()[:8], "little")


def maglev_table(labels: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """The lookup table: for each of ``size`` slots, the index of its endpoint.

    The paper's Pseudocode 1, with weight turns per round for each endpoint
    (Envoy's weighted variant does the same by fractions)."""
    if not labels:
        return []
    offsets = [0] * len(labels)
    skips = [0] * len(labels)
    for i, label in enumerate(labels):
        digest = hashlib.md5(label.encode()).digest()
        offsets[i] = int.from_bytes(digest[:8], "little") % size
        skips[i] = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    nexts = [0] * len(labels)
    table = [-1] * size
    filled = 0
    order = [i for i, w in enumerate(weights) if w > 0] or list(range(len(labels)))
    while True:
        for i in order:
            for _ in range(max(1, weights[i])):
                offset, skip, j = offsets[i], skips[i], nexts[i]
                slot = (offset + j * skip) % size
                while table[slot] >= 0:
                    j += 1
                    slot = (offset + j * skip) % size
                table[slot] = i
                nexts[i] = j + 1
                filled += 1
                if filled == size:
                    return table


class Maglev(_Hashing):
    """Maglev hashing: ``policy = { name = "maglev", key = "cookie:session" }``."""

    name = "maglev"

    class Config(_HashSettings):
        # 65537: a prime over 100x the endpoints of a large cluster (the paper's
        # rule of thumb for a table whose shares stay within ~1% of even).
        table_size: int = Field(65537, ge=3, le=5_000_011)

        @field_validator("table_size")
        @classmethod
        def _prime(cls, value: int) -> int:
            if not _is_prime(value):
                raise ValueError(f"should be a prime (e.g. 65537 or 655373), not {value}")
            return value

    def _build(self) -> None:
        self._owners = maglev_table([e.address for e in self.endpoints], [e.weight for e in self.endpoints],
                                    self.config.table_size)

    def position(self, key: str) -> int:
        """The table slot a key lands on."""
        return _hash64(key) % len(self._owners)
