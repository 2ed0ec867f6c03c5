"""A listener's connection slots: how many, who gives one up, who is refused.

A listener holds at most ``limit`` connections. When a new client arrives
and every slot is taken, the connection that has waited longest for a
request gives its slot up, as nginx reuses its connections when they run
out: a keep-alive connection between requests, a fresh one still waiting
for its first byte, or one lingering after its answer (``lingering.py``).
A connection with a request in flight is never evicted; if every slot holds
one, the new client is refused (a 503 on a plain listener, a close on TLS).

Rules for the bookkeeping, which sits on the hot path:

- a connection is in ``idle`` exactly while it is parked waiting for the
  client with nothing in flight; it puts itself in before parking and takes
  itself out after (both O(1)); a dict keeps insertion order, so its first
  key is the longest waiting;
- a key of ``idle`` has ``evict()``, which ends its wait; the evicted
  connection then closes as if it had timed out;
- evictions and refusals are counted; the log gets one line per
  ``REPORT_EVERY`` seconds at most, never one per connection.

The default limit comes from the process's descriptor limit
(``connection_budget``), raised to its hard ceiling at startup
(``raise_fd_limit``).
"""

from __future__ import annotations

import resource
from collections import Counter

import structlog
import trio

__all__ = ["REPORT_EVERY", "RESERVED_FDS", "Slots", "Waiting", "connection_budget", "raise_fd_limit"]

log = structlog.get_logger("sluice.server")

REPORT_EVERY = 10.0  # seconds between two log lines about evictions and refusals
# Descriptors kept out of the connection budget: listening sockets, the
# epoll and wake-up descriptors, log files, connects in progress, and the
# clients accepted only to be refused or to evict someone.
RESERVED_FDS = 128
_MIN_CONNECTIONS = 16


class Waiting:
    """An evictable wait that is not a downstream's (a TLS connection before
    its handshake, a lingering close): evicting it cancels its scope."""

    __slots__ = ("scope",)

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope

    def evict(self) -> None:
        self.scope.cancel()


class Slots:
    """One listener's slot count, its evictable connections and its tallies."""

    def __init__(self, limit: int, listener: str = "") -> None:
        self.limit = limit
        self.listener = listener
        self.active = 0  # connections holding a slot
        self.idle: dict[object, None] = {}  # evictable connections, longest waiting first
        self.counts: Counter[str] = Counter()  # since the process started
        self._unreported: Counter[str] = Counter()
        self._next_report = 0.0

    def admit(self) -> bool:
        """Take a slot for a new client, evicting the longest waiting
        connection if need be; False when every slot has a request in flight."""
        if self.active >= self.limit:
            idle = self.idle
            if not idle:
                self.note("refused")
                return False
            victim = next(iter(idle))
            del idle[victim]
            victim.evict()
            self.note("evicted")
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1

    def evict_all(self) -> None:
        """End every evictable wait now (a draining listener)."""
        victims = list(self.idle)
        self.idle.clear()
        for victim in victims:
            victim.evict()

    def note(self, what: str) -> None:
        """Count an event (``evicted``, ``refused``, ``tls_on_plain`` ...) and
        report the tally when the last report is old enough."""
        self.counts[what] += 1
        self._unreported[what] += 1
        if trio.current_time() >= self._next_report:
            self.report()

    def report(self) -> None:
        """Log what was counted since the last report, if anything."""
        if not self._unreported:
            return
        tally = dict(self._unreported)
        self._unreported.clear()
        self._next_report = trio.current_time() + REPORT_EVERY
        level = log.warning if "refused" in tally else log.info
        level("connections evicted or refused", listener=self.listener, limit=self.limit,
              active=self.active, **tally)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns
    (soft before, soft now). Each connection costs a descriptor, and the
    usual soft default (1024) is far below what a proxy needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # not on Linux; macOS caps it anyway
        target = max(soft, 1 << 16) if soft != resource.RLIM_INFINITY else soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def connection_budget(fd_limit: int, listeners: int, pooled: int) -> int:
    """Client connections per listener that ``fd_limit`` descriptors carry.

    A proxied connection can hold two descriptors (the client's and an
    upstream's); ``pooled`` more are idle upstream connections at most
    (the sum of every cluster's ``max_idle`` times its endpoints), and
    ``RESERVED_FDS`` are kept for everything else. Listeners share what is left.
    """
    spare = fd_limit - RESERVED_FDS - pooled
    return max(_MIN_CONNECTIONS, spare // (2 * max(1, listeners)))
