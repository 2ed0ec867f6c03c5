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

**Rebuilds follow discovery off the event loop.** A ring of 1000 endpoints or
a 65537-slot table takes 40-110 ms of pure Python to build: on the loop,
every request of the worker would wait that long at each endpoint change.
So when discovery changes the endpoints (``endpoints_changed``, on the loop)
and the build is larger than ``INLINE_WORK``, the new structure is built in
a thread (``trio.to_thread``) while the old one keeps serving; it is swapped
in whole, in one assignment, when done. Meanwhile a key's pick walks the old
structure and skips what is no longer eligible (an endpoint gone is not in
the eligible list), so picks land on live endpoints only; an endpoint that
joined is picked once the new structure is in. Changes that arrive while a
build runs are coalesced: one build at a time, and a build whose endpoint
list has changed again is dropped for a build of the latest list. Outside a
trio run (scripts, tests of the tables) the build is done at once.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
from collections.abc import Sequence
from typing import Any

import structlog
import trio
from pydantic import Field, field_validator

from sluice import Balancer, BalancerConfig, Endpoint

log = structlog.get_logger("sluice.balancer")

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


class _Table:
    """One built ring or table, with the endpoint list it was built over:
    swapped whole, so a pick never sees owners of one list and endpoints of
    another."""

    __slots__ = ("endpoints", "index", "owners", "extra")

    def __init__(self, endpoints: list[Endpoint], owners: list[int], extra: Any = None) -> None:
        self.endpoints = endpoints
        self.index = {id(e): i for i, e in enumerate(endpoints)}
        self.owners = owners
        self.extra = extra  # what a policy's position() needs besides owners (the ring's points)


class _Hashing(Balancer):
    """What both hash policies share: the key, the walk to an eligible
    endpoint, the pick without a key, and the rebuild off the loop. A
    subclass builds a ``_Table`` from an endpoint list (``_build``, pure: it
    may run in a thread) and says where a key lands (``position``)."""

    # A build bigger than this (ring points, or table slots) runs in a thread; smaller
    # ones (about a millisecond) cost less than the thread hop and are done at once.
    INLINE_WORK = 4096

    def __init__(self, endpoints, config=None, rng: random.Random | None = None) -> None:
        super().__init__(endpoints, config)
        self._read = key_reader(self.config.key)
        self._rng = rng or random.Random()
        self._table = self._build(self.endpoints)
        self._building = False  # a build runs in a thread
        self._built = trio.Event()  # set when the table is over the current endpoint list
        self._built.set()

    @property
    def _owners(self) -> list[int]:
        return self._table.owners

    def endpoints_changed(self, endpoints) -> None:
        """Discovery changed the endpoints: the ring or table is built again
        over the new list (an endpoint's points come from its address, so
        keys of endpoints that stayed mostly stay with them), off the loop
        when it is large (see the module's docstring)."""
        super().endpoints_changed(endpoints)
        if self._work(len(self.endpoints)) <= self.INLINE_WORK or not _in_trio():
            if not self._building:
                self._table = self._build(self.endpoints)
                self._built.set()
            return  # (a build running in a thread sees the list changed and builds again)
        if self._built.is_set():
            self._built = trio.Event()
        if not self._building:
            self._building = True
            trio.lowlevel.spawn_system_task(self._rebuild, name=f"{self.name} rebuild")

    async def _rebuild(self) -> None:
        """Build until the table is over the latest list; a stale build is dropped."""
        try:
            while True:
                wanted = self.endpoints
                table = await trio.to_thread.run_sync(self._build, wanted, abandon_on_cancel=True)
                if self.endpoints is wanted:
                    self._table = table
                    break
        except trio.Cancelled:
            raise  # (the run is ending)
        except Exception as exc:  # a policy's bug: the old table serves on, picks skip what left
            log.error("balancing policy failed to rebuild its table", policy=self.name, exc_info=exc)
        finally:
            self._building = False
            self._built.set()

    async def settled(self) -> None:
        """Until the table is built over the current endpoint list (tests, benchmarks)."""
        await self._built.wait()

    def _work(self, count: int) -> int:  # pragma: no cover
        """How big a build over ``count`` endpoints is (ring points or table slots)."""
        raise NotImplementedError

    def _build(self, endpoints: list[Endpoint]) -> _Table:  # pragma: no cover
        """The ring or table over ``endpoints``; reads only them and the settings."""
        raise NotImplementedError

    def position(self, key: str, table: _Table | None = None) -> int:  # pragma: no cover
        """Where ``key`` lands in ``table`` (default: the one serving)."""
        raise NotImplementedError

    def pick(self, ctx, endpoints) -> Endpoint | None:
        key = self.key(ctx)
        table = self._table  # (read once: a swap between here and the walk changes nothing)
        owners = table.owners
        if key is None or not owners:
            return self._keyless(endpoints)
        at = self.position(key, table)
        eligible = self._eligible(endpoints, table)
        if eligible is None:
            return table.endpoints[owners[at]]
        if eligible:
            n = len(owners)
            for step in range(n):
                owner = owners[(at + step) % n]
                if owner in eligible:
                    return table.endpoints[owner]
        return self._keyless(endpoints)  # none of the table's endpoints is eligible

    def key(self, ctx) -> str | None:
        if ctx is None:
            return None
        key = ctx.hash_key
        return key if key is not None else self._read(ctx)

    def _keyless(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        return self._rng.choices(endpoints, weights=[e.weight for e in endpoints])[0]

    def _eligible(self, endpoints: Sequence[Endpoint], table: _Table) -> set[int] | None:
        """Indexes in ``table`` of the eligible endpoints; None when every endpoint is."""
        if len(endpoints) == len(table.endpoints) and table.endpoints is self.endpoints:
            return None
        index = table.index
        return {index[id(e)] for e in endpoints if id(e) in index}


# -- ring_hash (ketama) ------------------------------------------------------------------------


_RUN = 8192  # ring entries sorted at once (about 1 ms)


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

    def _work(self, count: int) -> int:
        return count * self.config.points_per_weight

    def _build(self, endpoints: list[Endpoint]) -> _Table:
        total = sum(e.weight for e in endpoints) or 1
        count = len(endpoints)
        # An endpoint's points depend only on its label and share: kept from the last
        # build, so a discovery change hashes the endpoints that joined, not all of them.
        # (Read here, maybe in a thread, never written: the new table carries its own.)
        table = getattr(self, "_table", None)
        known = table.extra[1] if table is not None else {}
        kept = {}
        # Each entry is point << 32 | index: one int sorts several times faster than a tuple.
        ring: list[int] = []
        for i, endpoint in enumerate(endpoints):
            hashes = endpoint.weight * count * self.config.points_per_weight // (4 * total)
            label = (endpoint.address, hashes)
            points = kept[label] = known.get(label) or ketama_points(endpoint.address, hashes)
            ring += [point << 32 | i for point in points]
        # libketama's qsort by point; a tie (one in 2**32) goes to the lower index. Sorted in
        # runs, then merged: one sort of 160k ints (1000 endpoints) holds the GIL ~40 ms, a
        # stall of the loop even when this runs in a thread; the merge, Python code, yields
        # the GIL every switch interval.
        runs = [sorted(ring[at:at + _RUN]) for at in range(0, len(ring), _RUN)]
        ring = list(heapq.merge(*runs)) if len(runs) > 1 else ring if not runs else runs[0]
        return _Table(endpoints, [x & 0xFFFFFFFF for x in ring], ([x >> 32 for x in ring], kept))

    @property
    def _points(self) -> list[int]:
        return self._table.extra[0]

    def position(self, key: str, table: _Table | None = None) -> int:
        """The ring position a key lands on (libketama's ``ketama_get_server``)."""
        points = (table or self._table).extra[0]
        at = bisect.bisect_left(points, ketama_hash(key))
        return 0 if at == len(points) else at


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

    def _work(self, count: int) -> int:
        return self.config.table_size if count else 0

    def _build(self, endpoints: list[Endpoint]) -> _Table:
        return _Table(endpoints, maglev_table([e.address for e in endpoints], [e.weight for e in endpoints],
                                              self.config.table_size))

    def position(self, key: str, table: _Table | None = None) -> int:
        """The table slot a key lands on."""
        return _hash64(key) % len((table or self._table).owners)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
