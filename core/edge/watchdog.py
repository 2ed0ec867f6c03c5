"""Deadlines for the edge's socket waits, kept by one task per worker.

The usual trio way to bound a wait is a cancel scope with a deadline. On the
hot path that is the single largest cost trio adds: two per proxied request
(the client's next request, the upstream's answer) took 100 us of sluice's
Python per request down to 76 us when removed (``benchmarks/exchange_cost.py``).

A wait here is instead: note its deadline in a bucket of this watchdog, park
on the socket, take the note back. The watchdog wakes every ``TICK`` and
ends each wait found past its deadline with ``trio.lowlevel.notify_closing``
on its socket: the waiter gets ``ClosedResourceError``, sees the wait
``expired`` and knows why. That is sound because every wait that can expire
ends its connection anyway: an idle or slow client is answered (408) and
closed, an upstream that timed out is never reused. Deadlines fire up to one
tick late.

The watchdog also watches the client while an upstream is slow: a wait on
the upstream may name the client's I/O (``watch``); once the wait is older
than ``WATCH_AFTER`` the client's socket is peeked on each tick, and a
client that has closed ends the upstream wait (``expired == "client"``), so
sluice stops waiting for an answer nobody will read.
"""

from __future__ import annotations

import math
from typing import Any

import trio

__all__ = ["TICK", "WATCH_AFTER", "Wait", "Watchdog"]

TICK = 0.05  # seconds between checks: the slack on every deadline
WATCH_AFTER = 0.05  # an upstream slower than this has its client watched


class Wait:
    """One socket's wait slot (a socket has one for reading, one for writing)."""

    __slots__ = ("handle", "slot", "expired", "watch", "since")

    def __init__(self, handle: Any) -> None:
        self.handle = handle  # what notify_closing wakes: a socket or a file descriptor
        self.slot: int | None = None
        self.expired: str | None = None  # None, "timeout", "client" or "interrupted"
        self.watch: Any = None  # the client's I/O, while it is watched
        self.since = 0.0


class Watchdog:
    """Ends socket waits past their deadline; one per worker, ``run`` as a task."""

    def __init__(self) -> None:
        self._buckets: dict[int, set[Wait]] = {}
        self._watched: set[Wait] = set()

    def arm(self, wait: Wait, deadline: float, watch: Any = None) -> None:
        """Start bounding ``wait`` by ``deadline`` (absolute trio time; inf: none)."""
        wait.expired = None
        if deadline != math.inf:
            slot = int(deadline / TICK) + 1
            bucket = self._buckets.get(slot)
            if bucket is None:
                bucket = self._buckets[slot] = set()
            bucket.add(wait)
            wait.slot = slot
        if watch is not None:
            wait.watch = watch
            wait.since = trio.current_time()
            self._watched.add(wait)

    def disarm(self, wait: Wait) -> None:
        """The wait ended (or never began): forget it."""
        slot = wait.slot
        if slot is not None:
            wait.slot = None
            bucket = self._buckets.get(slot)
            if bucket is not None:
                bucket.discard(wait)
        if wait.watch is not None:
            wait.watch = None
            self._watched.discard(wait)

    def expire(self, wait: Wait, reason: str) -> None:
        """End a wait now: its socket is done for."""
        self.disarm(wait)
        wait.expired = reason
        trio.lowlevel.notify_closing(wait.handle)

    async def run(self) -> None:
        while True:
            await trio.sleep(TICK)
            now = trio.current_time()
            due = int(now / TICK)
            buckets = self._buckets
            # Buckets emptied by disarms go too: left until their deadline
            # (an idle timeout away), the small sets pin the memory of the
            # connections that filled them, and RSS stays up a minute after
            # they closed.
            for slot in [s for s, bucket in buckets.items() if s <= due or not bucket]:
                for wait in buckets.pop(slot):
                    wait.slot = None
                    self.expire(wait, "timeout")
            if self._watched:
                for wait in [w for w in self._watched if now - w.since >= WATCH_AFTER]:
                    if wait.watch.peer_closed():
                        self.expire(wait, "client")
