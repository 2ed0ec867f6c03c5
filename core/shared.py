"""State shared by every worker of one sluice instance: token buckets and counters.

Why: each ``--workers`` process runs its own loop, so a limit kept in a
worker's memory is multiplied by the number of workers. This module keeps
the state in one anonymous ``MAP_SHARED`` mmap (like ``logs``'s level byte)
created when the module is imported, which ``cli`` does before it forks;
every worker, and a replaced one, sees the same table. ``--workers 1`` and
``sluice.testing.serve`` use the same code: one path.

The API is the ``SharedState`` protocol, async although the local backend
never waits, so that a Redis backend (issue 11's global mode) is another
implementation of the same protocol:

- ``take(key, tokens, rate, burst) -> (allowed, retry_after)``: a token bucket
  per key, ``rate`` tokens/s up to ``burst``, refilled lazily from
  ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process);
- ``hit(key, rate, burst, cost=1) -> bool``: ``take`` without the retry time;
- ``incr(key, n=1, window=None) -> int``: a counter, or, with ``window``
  seconds, a fixed-window counter that starts again at 0 each window.

The table is fixed size (``SLOTS``), keyed by a 64-bit hash of the key with
open addressing over ``PROBE`` slots. When those are all taken by other keys
the one used least recently is evicted (``evictions()`` counts them): never
an error on the data path; an evicted bucket starts full again. Two keys
whose 64-bit hashes collide share a slot (probability ~ n²/2⁶⁵).

The table is guarded by a POSIX record lock (``fcntl.lockf``) on a memory
file made before fork, with a thread lock inside each process (record locks
are per process). It is held across a hash probe of at most ``PROBE`` slots
and a few float operations, about a microsecond, so a trio loop waiting for
it is not blocked for long (``benchmarks/RESULTS.md``). A record lock, not a
semaphore: the kernel releases it when its process dies, so a worker killed
while holding it (the OOM killer, SIGKILL) cannot freeze the others.

Other backends: ``open_backend(settings)`` opens the one a ``[shared]`` table
names (``backend = "redis"``, ``sluice.plugins.redis_state``, for limits held
across instances); ``local``, the default, is this table and costs what it
did. A backend is a factory taking the table's other settings and returning
an async context manager that yields a ``SharedState`` (it may hold
connections while open). It is found by ``register_backend`` or, by name, in
the ``sluice.shared`` entry-point group, as a third party's would be.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.metadata import entry_points
from typing import Any, Protocol

from .errors import ConfigError

__all__ = ["LocalState", "SharedState", "local", "open_backend", "register_backend"]

SLOTS = 16384
PROBE = 8
_SLOT = struct.Struct("=Qdd")  # key hash (0: empty), value (tokens or count), last use / window start
_HEADER = struct.Struct("=Q")  # evictions
_BUCKET, _COUNTER = b"b", b"c"


class SharedState(Protocol):
    """What a rate limiter needs; ``LocalState`` here, a Redis backend later."""

    async def take(self, key: str, tokens: float, rate: float, burst: float) -> tuple[bool, float]: ...

    async def hit(self, key: str, rate: float, burst: float, cost: float = 1) -> bool: ...

    async def incr(self, key: str, n: int = 1, window: float | None = None) -> int: ...


def _hash(kind: bytes, key: str) -> int:
    h = int.from_bytes(hashlib.blake2b(kind + key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                       "little")
    return h or 1  # 0 marks an empty slot


class _ProcessLock:
    """Exclusive across processes (a record lock the kernel drops when its
    holder dies) and across the threads of one process."""

    def __init__(self) -> None:
        self._fd = os.memfd_create("sluice-shared-lock", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, 1)
        self._threads = threading.Lock()

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._threads.release()


class LocalState:
    """The table in shared memory; create it before forking (``local()`` is created at import)."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._slots = slots
        self._mem = mmap.mmap(-1, _HEADER.size + slots * _SLOT.size)  # anonymous, MAP_SHARED
        self._lock = _ProcessLock()

    def _slot(self, h: int, now: float) -> tuple[int, bool]:
        """The offset of h's slot (claiming one if new, evicting the least recently used); locked."""
        mem, start = self._mem, h % self._slots
        free = oldest = None
        oldest_last = math.inf
        for i in range(PROBE):
            off = _HEADER.size + ((start + i) % self._slots) * _SLOT.size
            slot_h, _, last = _SLOT.unpack_from(mem, off)
            if slot_h == h:
                return off, False
            if slot_h == 0:
                if free is None:
                    free = off
            elif last < oldest_last:
                oldest, oldest_last = off, last
        if free is None:
            free = oldest
            _HEADER.pack_into(mem, 0, _HEADER.unpack_from(mem, 0)[0] + 1)
        return free, True

    def take_now(self, key: str, tokens: float, rate: float, burst: float) -> tuple[bool, float]:
        """``take`` without the coroutine, for code that is not async (and the benchmark)."""
        h = _hash(_BUCKET, key)
        with self._lock:
            now = time.monotonic()
            off, new = self._slot(h, now)
            if new:
                level = burst
            else:
                _, level, last = _SLOT.unpack_from(self._mem, off)
                level = min(burst, level + max(0.0, now - last) * rate)
            allowed = level >= tokens
            if allowed:
                level -= tokens
            _SLOT.pack_into(self._mem, off, h, level, now)
        if allowed:
            return True, 0.0
        return False, (tokens - level) / rate if rate > 0 and tokens <= burst else math.inf

    def incr_now(self, key: str, n: int = 1, window: float | None = None) -> int:
        h = _hash(_COUNTER, key)
        with self._lock:
            now = time.monotonic()
            off, new = self._slot(h, now)
            start = now - now % window if window else 0.0
            value = 0.0
            if not new:
                _, value, last = _SLOT.unpack_from(self._mem, off)
                if window and last != start:
                    value = 0.0
            value += n
            _SLOT.pack_into(self._mem, off, h, value, start if window else now)
        return int(value)

    async def take(self, key: str, tokens: float, rate: float, burst: float) -> tuple[bool, float]:
        """Take ``tokens`` from key's bucket if it holds them; else (False, seconds until it will)."""
        return self.take_now(key, tokens, rate, burst)

    async def hit(self, key: str, rate: float, burst: float, cost: float = 1) -> bool:
        return self.take_now(key, cost, rate, burst)[0]

    async def incr(self, key: str, n: int = 1, window: float | None = None) -> int:
        """Add n to key's counter and return it; with ``window``, a counter per fixed window of seconds."""
        return self.incr_now(key, n, window)

    def evictions(self) -> int:
        """How many entries were evicted because their probe range was full."""
        return _HEADER.unpack_from(self._mem, 0)[0]


_local = LocalState()


def local() -> LocalState:
    """The instance's table, shared by the master and every worker it forks."""
    return _local


Backend = Callable[[Mapping[str, Any]], AbstractAsyncContextManager[SharedState]]
_backends: dict[str, Backend] = {}


def register_backend(name: str, factory: Backend) -> None:
    """Make ``backend = name`` in ``[shared]`` open ``factory(settings)``."""
    _backends[name] = factory


def _local_backend(settings: Mapping[str, Any]) -> AbstractAsyncContextManager[SharedState]:
    """Refuses settings when called (an app's build), as every factory should, not when entered."""
    if settings:
        raise ConfigError("\n".join(f"shared.{key}: unknown key" for key in settings))
    return _yield_local()


@asynccontextmanager
async def _yield_local() -> AsyncIterator[SharedState]:
    yield _local


def _find(name: str) -> Backend:
    if name == "local":
        return _local_backend
    if name not in _backends:
        for ep in entry_points(group="sluice.shared", name=name):
            _backends[name] = ep.load()
    if name not in _backends:
        known = sorted({"local", *_backends, *(ep.name for ep in entry_points(group="sluice.shared"))})
        raise ConfigError(f"shared.backend: unknown backend {name!r} (known: {', '.join(known)})")
    return _backends[name]


def open_backend(settings: Mapping[str, Any] | None = None) -> AbstractAsyncContextManager[SharedState]:
    """The backend a ``[shared]`` table names, to open with ``async with``; ``local`` when none.

    Unknown backends and settings are ``ConfigError``s naming the key path (``shared.KEY``),
    raised by this call (the built-in factories check before they return), so that the app's
    build refuses them before a socket opens.
    """
    settings = dict(settings or {})
    name = settings.pop("backend", "local")
    if not isinstance(name, str):
        raise ConfigError(f"shared.backend: a backend's name, not {name!r}")
    return _find(name)(settings)
