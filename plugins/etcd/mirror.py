"""A prefix's whole content, kept current: what a registry or a config source consumes.

``watch_prefix`` speaks in changes; a discovery source reports FULL endpoint sets
(``sluice.upstream.discovery``) and a config source applies whole documents, so both want
the prefix as it is now. ``mirror_prefix`` reads it once, watches from the revision after,
applies every change to its copy and hands out a ``PrefixState`` after each::

    async with etcd.mirror_prefix("/services/api/") as states:
        async for state in states:   # PrefixState(revision, kvs, resynced, stale)
            ...

The first state comes once the first read succeeds (retried with backoff while etcd is
unreachable: the caller bounds how long it waits). Given ``start`` (a state read from
another member of the same cluster), there is no first read: ``start`` is the first state,
and the watch resumes from the revision after it, so a client moving to the next member
misses nothing and reads nothing twice (a compaction meanwhile forces a full read). ``resynced`` is true for a state rebuilt
after a compaction; ``stale`` carries the reason while the watch is disconnected (the state
is the last one known), and is None again once it is re-established.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import structlog
import trio

from .codec import KeyValue
from .errors import EtcdError
from .watch import Disconnected, Events, Reconnected, Resync

__all__ = ["PrefixState", "mirror_prefix"]

log = structlog.get_logger("sluice.etcd")


@dataclass(frozen=True, slots=True)
class PrefixState:
    """Every key under the prefix as of ``revision`` (``kvs`` by key)."""

    revision: int
    kvs: dict[bytes, KeyValue] = field(default_factory=dict)
    resynced: bool = False
    stale: str | None = None


@asynccontextmanager
async def mirror_prefix(client, prefix: bytes, *, max_backoff: float = 2.0, start: PrefixState | None = None,
                        **watch_options) -> AsyncIterator[trio.MemoryReceiveChannel]:
    send, receive = trio.open_memory_channel(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_mirror, client, prefix, send, max_backoff, start, watch_options)
        async with receive:
            yield receive
        nursery.cancel_scope.cancel()


async def _mirror(client, prefix: bytes, send, max_backoff: float, start: PrefixState | None,
                  watch_options: dict) -> None:
    async with send:
        backoff = 0.05
        while start is None:
            try:
                revision, kvs = await client.get_prefix(prefix)
                start = PrefixState(revision, {kv.key: kv for kv in kvs})
            except EtcdError as error:
                log.info("etcd.mirror.retry", prefix=prefix.decode(errors="replace"), error=str(error))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
        state = replace(start, resynced=False, stale=None)
        await send.send(state)
        async with client.watch_prefix(prefix, start_revision=state.revision + 1, max_backoff=max_backoff,
                                       **watch_options) as updates:
            async for update in updates:
                if isinstance(update, Events):
                    kvs = dict(state.kvs)
                    for event in update.events:
                        if event.type == "delete":
                            kvs.pop(event.kv.key, None)
                        else:
                            kvs[event.kv.key] = event.kv
                    state = PrefixState(update.revision, kvs, stale=state.stale)
                elif isinstance(update, Resync):
                    state = PrefixState(update.revision, {kv.key: kv for kv in update.kvs}, resynced=True,
                                        stale=state.stale)
                elif isinstance(update, Disconnected):
                    state = replace(state, resynced=False, stale=update.reason)
                elif isinstance(update, Reconnected):
                    state = replace(state, resynced=False, stale=None)
                await send.send(state)
