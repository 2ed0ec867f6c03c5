"""Watching a key prefix, without missing an update across disconnects and compactions.

A watch is a background task feeding a memory channel, so that its timeouts and its
reconnects never straddle the caller's ``async for``::

    async with etcd.watch_prefix("/services/api/", start_revision=rev + 1) as updates:
        async for update in updates:
            ...  # Events(revision, events) or Resync(revision, kvs)

Rules:

- The task remembers the revision after the last event it delivered. When the stream ends
  (etcd restarted, the connection dropped, or nothing came for ``idle_timeout``), it watches
  again from that revision, after a backoff that starts at 50 ms and doubles to
  ``max_backoff``; etcd replays whatever happened meanwhile, so no update is missed and none
  is delivered twice.
- If that revision has been compacted away, the history is gone: the task reads the whole
  prefix and delivers ``Resync(revision, kvs)``, which replaces everything the caller knew,
  then watches on from the revision after it. The caller is told by the type.
- With ``start_revision=None`` the watch starts now (no replay).
- When a watch cannot be established again (etcd is down, or answers garbage), the caller
  gets ``Disconnected(reason)``, once per outage, and ``Reconnected()`` when it is back (the
  changes made meanwhile follow as ``Events``). A stream that ends and is re-established at
  once (an idle timeout, a proxy's cut) is not reported.
- A member can hang with the stream open (a stopped process, a member cut off from its
  cluster's quorum): no event comes, and nothing says why. With ``check_interval``, a
  cheap read goes to the same member every ``check_interval`` seconds while the stream is
  open (``count_prefix``: it needs the quorum, as the watch's news does); one without an
  answer within the client's ``timeout`` ends the stream as a failure, reported as
  ``Disconnected`` at once, so a hung member is found within ``check_interval + timeout``
  rather than ``idle_timeout``. etcd's own progress notifications were the other way, but
  asking for one (``progress_request``) means writing to the stream's request body after
  the create request, and httpx sends a body whole before it reads the answer; unasked,
  etcd sends them every ten minutes by default
  (``--experimental-watch-progress-notify-interval``), a server setting a client cannot rely on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import structlog
import trio

from .codec import KeyValue, b64, integer, key_value, prefix_end, revision_of
from .errors import (EtcdCompacted, EtcdRequestError, EtcdUnavailable, malformed, raise_for_error,
                     transport_reason)

__all__ = ["Disconnected", "Event", "Events", "Reconnected", "Resync", "watch_prefix"]

log = structlog.get_logger("sluice.etcd")


@dataclass(frozen=True, slots=True)
class Event:
    """One change: ``type`` is ``"put"`` or ``"delete"``; a delete's ``kv`` has no value."""

    type: str
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Events:
    """Changes in revision order, up to ``revision`` (the last one's)."""

    revision: int
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Resync:
    """The whole prefix as of ``revision``: the history was compacted, forget what you had."""

    revision: int
    kvs: list[KeyValue] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The watch could not be re-established: the caller's view may be going stale."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The watch is established again after a ``Disconnected``; nothing was missed."""


@asynccontextmanager
async def watch_prefix(client, prefix: bytes, *, start_revision: int | None, idle_timeout: float,
                       max_backoff: float, check_interval: float | None = None
                       ) -> AsyncIterator[trio.MemoryReceiveChannel]:
    send, receive = trio.open_memory_channel(0)
    async with trio.open_nursery() as nursery:
        watcher = _Watcher(client, prefix, start_revision, idle_timeout, max_backoff, check_interval)
        nursery.start_soon(watcher.run, send)
        async with receive:
            yield receive
        nursery.cancel_scope.cancel()


class _Watcher:
    def __init__(self, client, prefix: bytes, start_revision: int | None, idle_timeout: float,
                 max_backoff: float, check_interval: float | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._next = start_revision  # the first revision not yet delivered
        self._idle_timeout = idle_timeout
        self._max_backoff = max_backoff
        self._check_interval = check_interval
        self._created = False  # whether the current attempt's watch was created
        self._down = False  # whether Disconnected was sent and Reconnected not yet

    async def run(self, send: trio.MemorySendChannel) -> None:
        backoff = 0.05
        async with send:
            while True:
                try:
                    await self._watch_once(send)
                    reason = "stream ended"
                except EtcdCompacted:
                    try:
                        revision, kvs = await self._client.get_prefix(self._prefix)
                    except EtcdUnavailable as error:
                        reason = f"resync failed: {error}"
                    else:
                        log.warning("etcd.watch.resync", prefix=self._prefix.decode(errors="replace"),
                                    from_revision=self._next, revision=revision)
                        await send.send(Resync(revision, kvs))
                        self._next = revision + 1
                        continue
                except (EtcdUnavailable, EtcdRequestError) as error:
                    reason = str(error)
                if self._created:
                    backoff = 0.05
                elif not self._down:
                    self._down = True
                    log.warning("etcd.watch.disconnected", prefix=self._prefix.decode(errors="replace"),
                                reason=reason)
                    await send.send(Disconnected(reason))
                # A stream that was up and ended (idle, cut) is routine; a failed attempt is not.
                (log.debug if self._created else log.info)(
                    "etcd.watch.reconnecting", prefix=self._prefix.decode(errors="replace"),
                    from_revision=self._next, reason=reason, backoff=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _watch_once(self, send: trio.MemorySendChannel) -> None:
        """One watch stream, until it ends (``_created`` says whether etcd accepted it)."""
        create = {"key": b64(self._prefix), "range_end": b64(prefix_end(self._prefix))}
        if self._next is not None:
            create["start_revision"] = str(self._next)
        self._created = False
        http: httpx.AsyncClient = self._client._http
        try:
            with trio.fail_after(self._client.timeout):
                stream = http.stream("POST", "/v3/watch", json={"create_request": create},
                                     timeout=httpx.Timeout(self._client.timeout, read=None))
                answer = await stream.__aenter__()
            try:
                if answer.status_code != 200:
                    await answer.aread()
                    raise_for_error(answer.status_code, _json(answer.text))
                hung: list[str] = []
                failure: Exception | None = None
                async with trio.open_nursery() as nursery:
                    if self._check_interval:
                        nursery.start_soon(self._check, hung, nursery.cancel_scope)
                    try:
                        await self._read(answer, send)
                    except Exception as error:  # raised after the nursery, not in its ExceptionGroup
                        failure = error
                    nursery.cancel_scope.cancel()
                if failure is not None:
                    raise failure
                if hung:
                    self._created = False  # not a routine renewal: the caller hears of it at once
                    raise EtcdUnavailable(hung[0])
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.__aexit__(None, None, None)
        except trio.TooSlowError:
            raise EtcdUnavailable(f"{self._client.url}/v3/watch: no answer within {self._client.timeout}s") from None
        except (httpx.TransportError, httpx.StreamError) as error:
            raise EtcdUnavailable(f"{self._client.url}/v3/watch: {transport_reason(error)}") from error

    async def _check(self, hung: list[str], stream: trio.CancelScope) -> None:
        """Ask the member a cheap question every ``check_interval``; when it does not
        answer, say why in ``hung`` and end the stream."""
        while True:
            await trio.sleep(self._check_interval)
            try:
                await self._client.count_prefix(self._prefix)
            except EtcdUnavailable as error:
                hung.append(f"the member stopped answering while watched: {error}")
                stream.cancel()
                return
            except EtcdRequestError as error:  # it answered: not hung (the watch says the rest)
                log.debug("etcd.watch.check", prefix=self._prefix.decode(errors="replace"), error=str(error))

    async def _read(self, answer: httpx.Response, send: trio.MemorySendChannel) -> None:
        """Deliver what the stream says until it ends or is idle ``idle_timeout``."""
        lines = answer.aiter_lines()
        while True:
            with trio.move_on_after(self._idle_timeout) as idle:
                line = await anext(lines, None)
            if idle.cancelled_caught or line is None:
                return
            if not line.strip():
                continue
            message = _json(line)
            if "error" in message:
                raise_for_error(200, message)
            with malformed("/v3/watch"):
                result = message.get("result", {})
                if result.get("compact_revision") and result.get("canceled"):
                    raise EtcdCompacted(integer(result["compact_revision"]))
                if result.get("canceled"):
                    raise EtcdRequestError(result.get("cancel_reason") or "watch canceled by etcd")
                if result.get("created"):
                    self._created = True
                    if self._next is None:
                        self._next = revision_of(result) + 1
                batch = [Event("delete" if e.get("type") == "DELETE" else "put", key_value(e["kv"]))
                         for e in result.get("events") or ()]
            if self._created and self._down:
                self._down = False
                log.info("etcd.watch.reconnected", prefix=self._prefix.decode(errors="replace"))
                await send.send(Reconnected())
            if batch:
                revision = batch[-1].kv.mod_revision
                await send.send(Events(revision, batch))
                self._next = revision + 1


def _json(text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        raise EtcdRequestError(f"/v3/watch: not JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise EtcdRequestError(f"/v3/watch: not a JSON object: {text[:200]!r}")
    return data


