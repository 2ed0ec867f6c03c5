"""``open_zookeeper``: a kazoo client driven from trio, and the session's recovery.

Threads, and who may call whom:

- kazoo runs a connection thread and a callback thread of its own. Every kazoo call made
  from trio goes through ``trio.to_thread.run_sync`` as kazoo's ``*_async`` call followed by
  ``.get(timeout=op_timeout)``, so no call waits longer than ``op_timeout`` (a request
  queued while the connection is down would otherwise wait for the reconnect).
- kazoo's threads never call into trio directly. Its state listener and watch callbacks only
  hand a plain function to ``TrioToken.run_sync_soon``, which never blocks kazoo's thread,
  and that function runs on the trio thread: it sets an event or puts a ``SessionEvent`` on
  an unbounded memory channel (``send_nowait``, so it cannot block either).

Sessions. A disconnect shorter than the session timeout keeps the session: kazoo reconnects,
re-arms the watches, and the ephemeral nodes live on (``suspended``, then ``reconnected``).
If the session expires (the server was away longer than the timeout, or the session was
closed elsewhere), ZooKeeper has deleted the ephemeral nodes and forgotten the watches; kazoo
starts a new session (``expired``, then ``connected``), and this module re-creates every
registration and re-reads every watched path before it says ``recovered``.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError

__all__ = ["Registration", "SessionEvent", "Snapshot", "ZooKeeper", "ZooKeeperError", "ZooKeeperUnavailable",
           "open_zookeeper"]

log = structlog.get_logger("sluice.zookeeper")

_UNAVAILABLE = (ConnectionLoss, SessionExpiredError, ConnectionClosedError, KazooTimeoutError)


class ZooKeeperError(Exception):
    """Anything the bridge raises of its own (kazoo's NoNodeError and NodeExistsError pass through)."""


class ZooKeeperUnavailable(ZooKeeperError):
    """No connection, an expired session, or no answer within ``op_timeout``: try again later."""


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What happened to the session: ``connected`` (a new session), ``suspended`` (the connection
    dropped), ``reconnected`` (same session, watches and ephemeral nodes intact), ``expired``
    (ephemeral nodes and watches gone), ``recovered`` (after an expiry: registrations re-created,
    watches re-read)."""

    kind: str
    session_id: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The children of a watched path and their data, ``{name: data}``; ``exists`` is False when the
    path itself is missing."""

    children: dict[str, bytes] = field(default_factory=dict)
    exists: bool = True


@dataclass(slots=True)
class Registration:
    """An ephemeral node kept for as long as its block runs; ``path`` changes if it is re-created
    (a sequential node gets a new number after a session expiry)."""

    prefix: str
    data: bytes
    sequence: bool
    path: str = ""
    session: int | None = None  # the session that created the node, and whose end deletes it


class ZooKeeper:
    """The trio side of one kazoo client; made by ``open_zookeeper``."""

    def __init__(self, kazoo: KazooClient, *, op_timeout: float) -> None:
        self.kazoo = kazoo
        self.op_timeout = op_timeout
        self._nursery: trio.Nursery | None = None  # open_zookeeper's, once connected
        self._token = trio.lowlevel.current_trio_token()
        self._send_event, self.session_events = trio.open_memory_channel(math.inf)
        self._registrations: list[Registration] = []
        self._watchers: set[_Watcher] = set()
        self._state: str | None = None
        self._expired = False
        self._session: int | None = None

    # --- kazoo's threads -> trio -------------------------------------------------

    def _from_kazoo(self, function: Callable, *args: Any) -> None:
        """Called on a kazoo thread: schedule ``function`` on the trio thread, never blocking."""
        try:
            self._token.run_sync_soon(function, *args)
        except trio.RunFinishedError:
            pass  # trio has exited; kazoo is being stopped

    def _kazoo_listener(self, state: str) -> None:
        self._from_kazoo(self._on_state, state)

    def _on_state(self, state: str) -> None:
        previous, self._state = self._state, state
        if state == KazooState.SUSPENDED:
            self._emit("suspended")
        elif state == KazooState.LOST:
            self._expired = True
            self._emit("expired")
        elif state == KazooState.CONNECTED:
            if previous == KazooState.SUSPENDED and not self._expired:
                self._emit("reconnected")
                self._mark_watchers()  # kazoo re-armed them; a re-read costs little and misses nothing
            else:
                self._emit("connected")
                if self._expired and self._nursery is not None:
                    self._expired = False
                    self._nursery.start_soon(self._recover)

    def _emit(self, kind: str) -> None:
        if self.kazoo.client_id:  # None while disconnected: then say which session was last
            self._session = self.kazoo.client_id[0]
        log.info(f"zookeeper.session.{kind}", session=f"{self._session:x}" if self._session else None)
        self._send_event.send_nowait(SessionEvent(kind, self._session))

    def _mark_watchers(self) -> None:
        for watcher in self._watchers:
            watcher.changed()

    async def _recover(self) -> None:
        """After an expiry: re-create the registrations, re-read the watches, then say so."""
        session = self.kazoo.client_id[0] if self.kazoo.client_id else None
        for registration in list(self._registrations):
            # One made in this session already (register() ran after the reconnect) is alive.
            while registration in self._registrations and registration.session != session:
                try:
                    await self._create_registration(registration)
                    break
                except ZooKeeperUnavailable:
                    if self._expired:
                        return  # expired again: the next new session recovers
                    await trio.sleep(0.2)
        self._mark_watchers()
        self._emit("recovered")

    # --- calls from trio ---------------------------------------------------------

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``kazoo.<method>_async(*args, **kwargs)``'s result, off the trio thread, bounded."""
        function = getattr(self.kazoo, f"{method}_async")

        def blocking():
            return function(*args, **kwargs).get(timeout=self.op_timeout)

        try:
            with trio.fail_after(self.op_timeout + 1):
                return await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise ZooKeeperUnavailable(f"{method}: no answer within {self.op_timeout}s") from None
        except _UNAVAILABLE as error:
            raise ZooKeeperUnavailable(f"{method}: {type(error).__name__} {error}") from error

    async def create(self, path: str, data: bytes = b"", *, ephemeral: bool = False, sequence: bool = False,
                     makepath: bool = True) -> str:
        """Create a node; its path (with the sequence number, for a sequential one)."""
        return await self.call("create", path, data, ephemeral=ephemeral, sequence=sequence, makepath=makepath)

    async def get(self, path: str) -> bytes:
        return (await self.call("get", path))[0]

    async def set(self, path: str, data: bytes) -> None:
        await self.call("set", path, data)

    async def delete(self, path: str) -> None:
        await self.call("delete", path)

    async def children(self, path: str) -> list[str]:
        return await self.call("get_children", path)

    # --- registrations -----------------------------------------------------------

    @asynccontextmanager
    async def register(self, prefix: str, data: bytes, *, sequence: bool = True) -> AsyncIterator[Registration]:
        """An ephemeral node at ``prefix`` (plus a sequence number), re-created after a session
        expiry, deleted when the block ends."""
        registration = Registration(prefix, data, sequence)
        await self._create_registration(registration)
        self._registrations.append(registration)
        try:
            yield registration
        finally:
            self._registrations.remove(registration)
            with trio.CancelScope(shield=True):
                try:
                    await self.delete(registration.path)
                except (ZooKeeperUnavailable, NoNodeError):
                    pass  # gone with its session, or will be when the session ends

    async def _create_registration(self, registration: Registration) -> None:
        try:
            session = self.kazoo.client_id[0] if self.kazoo.client_id else None
            registration.path = await self.create(registration.prefix, registration.data, ephemeral=True,
                                                  sequence=registration.sequence)
            registration.session = session
        except NodeExistsError:
            # Not sequential, and a node of a session that is expiring holds the name: it
            # cannot be ours (ours died with the old session), so wait for it to go.
            raise ZooKeeperUnavailable(f"{registration.prefix} still exists") from None
        log.info("zookeeper.registered", path=registration.path)

    # --- watches -----------------------------------------------------------------

    @asynccontextmanager
    async def watch_children(self, path: str) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """``async with zk.watch_children(path) as snapshots: async for snapshot in snapshots``.

        A ``Snapshot`` comes first, then one whenever a child appears, goes, or changes its
        data (changes close together may come as one). A missing path is an empty snapshot
        with ``exists=False``, watched until it appears.
        """
        async with self._watch(_Watcher(self, path, children=True)) as snapshots:
            yield snapshots

    @asynccontextmanager
    async def watch_data(self, path: str) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """``async with zk.watch_data(path) as values: async for data in values``: the node's data
        (bytes) first, then after each change; None while the node does not exist. For a
        document kept in one node (the config centre's)."""
        async with self._watch(_Watcher(self, path, children=False)) as values:
            yield values

    @asynccontextmanager
    async def _watch(self, watcher: _Watcher) -> AsyncIterator[trio.MemoryReceiveChannel]:
        send, receive = trio.open_memory_channel(0)
        self._watchers.add(watcher)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run, send)
                async with receive:
                    yield receive
                nursery.cancel_scope.cancel()
        finally:
            self._watchers.discard(watcher)


_NOTHING_SENT = object()


class _Watcher:
    """Re-reads a path (its children and their data, or its own data) whenever kazoo says
    something changed, and sends what it read when it differs from what it sent last."""

    def __init__(self, zk: ZooKeeper, path: str, *, children: bool) -> None:
        self._zk = zk
        self._path = path
        self._read = self._read_children if children else self._read_data
        self._changed = trio.Event()

    def changed(self) -> None:  # on the trio thread
        self._changed.set()

    def _kazoo_watch(self, event) -> None:  # on kazoo's callback thread
        # One bound method for every node watched: kazoo keeps its watchers in a set, so a
        # path read many times between changes holds one watcher, not one per read.
        self._zk._from_kazoo(self.changed)

    async def run(self, send: trio.MemorySendChannel) -> None:
        last = _NOTHING_SENT
        async with send:
            while True:
                self._changed = trio.Event()  # before reading: a change during the read re-reads
                try:
                    snapshot = await self._read()
                except ZooKeeperUnavailable as error:
                    log.info("zookeeper.watch.retry", path=self._path, error=str(error))
                    with trio.move_on_after(0.5):
                        await self._changed.wait()  # a reconnect marks us; else try again soon
                    continue
                if snapshot != last:
                    await send.send(snapshot)
                    last = snapshot
                await self._changed.wait()

    async def _read_data(self) -> bytes | None:
        zk, watch = self._zk, self._kazoo_watch
        try:
            return (await zk.call("get", self._path, watch=watch))[0]
        except NoNodeError:
            if await zk.call("exists", self._path, watch=watch) is None:
                return None
            return await self._read_data()  # created between the two calls

    async def _read_children(self) -> Snapshot:
        zk, watch = self._zk, self._kazoo_watch
        try:
            names = await zk.call("get_children", self._path, watch=watch)
        except NoNodeError:
            if await zk.call("exists", self._path, watch=watch) is None:
                return Snapshot({}, exists=False)
            return await self._read_children()  # created between the two calls
        children = {}
        for name in sorted(names):
            try:
                children[name] = (await zk.call("get", posixpath.join(self._path, name), watch=watch))[0]
            except NoNodeError:
                pass  # deleted since the listing: the children watch has fired
        return Snapshot(children)


@asynccontextmanager
async def open_zookeeper(hosts: str, *, session_timeout: float = 10.0, op_timeout: float = 5.0,
                         connect_timeout: float = 10.0) -> AsyncIterator[ZooKeeper]:
    """A connected ``ZooKeeper`` for the block; kazoo reconnects on its own (forever, backing off
    to 1 s) until the block ends, when registrations are deleted and the client is closed."""
    kazoo = KazooClient(hosts=hosts, timeout=session_timeout,
                        connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 1.0})
    zk = ZooKeeper(kazoo, op_timeout=op_timeout)
    kazoo.add_listener(zk._kazoo_listener)
    try:
        with trio.fail_after(connect_timeout + 1):
            await trio.to_thread.run_sync(kazoo.start, connect_timeout, abandon_on_cancel=True)
    except (trio.TooSlowError, KazooTimeoutError):
        await trio.to_thread.run_sync(kazoo.stop)
        raise ZooKeeperUnavailable(f"no connection to {hosts} within {connect_timeout}s") from None
    try:
        async with trio.open_nursery() as nursery:
            zk._nursery = nursery
            yield zk
            nursery.cancel_scope.cancel()
    finally:
        kazoo.remove_listener(zk._kazoo_listener)  # stopping is not an expiry to tell of
        with trio.CancelScope(shield=True), trio.move_on_after(op_timeout):
            await trio.to_thread.run_sync(kazoo.stop, abandon_on_cancel=True)
            await trio.to_thread.run_sync(kazoo.close, abandon_on_cancel=True)
