"""The config centre: routes, clusters and filter settings kept in etcd or ZooKeeper.

The bootstrap file's ``[config_store]`` table names the store; the file keeps what an
instance needs to exist at all (listeners, server, admin, metrics), and the store holds
what a fleet changes together.

Layout: one document. The store holds a single TOML text (the same syntax as the file)
with at most the ``routes``, ``clusters`` and ``filters`` sections: in etcd the key
``<prefix>config``, in ZooKeeper the node ``path``. One document rather than a key per
section because a change usually spans sections (a route naming a new cluster): one
write is one revision, so no instance ever sees the route before its cluster, and one
watch per instance follows it. Overlay: the document's ``routes`` replace the file's;
its ``clusters`` and ``filters`` are merged by name over the file's (the store's wins).

Each worker follows the store for itself (``Follower.run`` in its nursery): every
document it sees goes through the reload path (``reload(app)``), so it is validated
whole before anything changes; a document that does not build is refused, the last good
one keeps serving, and the refusal is in ``app.last_reload``, admin ``/config`` and the
metrics. All store I/O is in that task, each call bounded by ``timeout``: a store that
hangs never touches the data path. Lost (``config store lost``), the worker keeps its
config, the backend reconnects (etcd resumes its watch from the last revision, a
compaction forces a full read; ZooKeeper's bridge re-reads after a reconnect or a
session's expiry), and a failing store is retried from here with a backoff from
``backoff_initial`` doubling to ``backoff_max``; ``config store back`` once it answers.
Staleness is the seconds since the store was last known in sync (0 while connected).

Cache: after each document applied, worker 0 writes it to ``cache`` (tmp + rename, so a
crash leaves the old file or the new, never half). At start, the master reads the store
(bounded by ``timeout``); unreachable, it starts from the cache (logged with its age);
with no store and no cache it exits 2 naming both (not waiting: an orchestrator's
restart policy retries better than a process that hangs). A document absent from the
store at start means the file alone (logged); deleted later, it is refused like a bad one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import ConfigError
from .config import Config, ConfigStoreConfig, parse, read_toml

if TYPE_CHECKING:
    from .app import App
    from .registry import Plugins

__all__ = ["ConfigStore", "Document", "Follower", "Lost", "SECTIONS", "StoreUnavailable", "follower", "open_store",
           "overlay", "sections", "unwrap"]

log = structlog.get_logger("sluice")

SECTIONS = ("routes", "clusters", "filters")  # what the store may hold; the rest is the file's


class StoreUnavailable(Exception):
    """The store did not answer (down, unreachable, no answer within ``timeout``)."""


@dataclass(frozen=True, slots=True)
class Document:
    """The store's document as of ``revision`` (etcd's mod revision, ZooKeeper's mzxid);
    ``data`` None: there is none."""

    revision: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Lost:
    """The store can no longer be followed; the last document is all we know."""

    reason: str


class ConfigStore:
    """A config store backend (the ``sluice_config_stores`` hook): one document, read, written, watched."""

    name = ""

    def __init__(self, settings: ConfigStoreConfig) -> None:
        self.settings = settings

    @property
    def where(self) -> str:
        """The store and the document's place, for messages."""
        return f"{self.name} at {self.settings.address}"

    async def read(self) -> Document:
        raise NotImplementedError

    async def write(self, data: bytes) -> int:
        raise NotImplementedError

    async def watch(self, send: trio.MemorySendChannel) -> None:
        raise NotImplementedError


def follower(config: Config, path: str, plugins: Plugins) -> Follower:
    """The follower of ``config``'s ``[config_store]`` (``path``: the bootstrap file)."""
    return Follower(config.config_store, open_store(config.config_store, plugins), path)


def open_store(settings: ConfigStoreConfig, plugins: Plugins) -> ConfigStore:
    entry = plugins.config_stores.get(settings.store)
    if entry is None:
        raise plugins.missing("config_stores", settings.store, "config_store.store")
    return entry[0](settings)


# --- the document ---------------------------------------------------------------------

def sections(data: bytes, where: str) -> dict[str, Any]:
    """A document's sections, checked for shape (TOML, only ``SECTIONS``)."""
    try:
        doc = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    extra = sorted(set(doc) - set(SECTIONS))
    if extra:
        raise ConfigError(f"{where}: {extra[0]}: not allowed in the store (it holds only "
                          f"{', '.join(SECTIONS)}; the rest is the bootstrap file's)")
    return doc


def overlay(base: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """The file's mapping with the document's sections over it (routes replaced; clusters and
    filters merged by name)."""
    out = dict(base)
    if "routes" in doc:
        out["routes"] = doc["routes"]
    for section in ("clusters", "filters"):
        if section in doc:
            base_section = out.get(section)
            if isinstance(doc[section], dict) and isinstance(base_section, dict):
                out[section] = {**base_section, **doc[section]}
            else:
                out[section] = doc[section]  # (not tables: parse names the key)
    return out


# --- the cache ------------------------------------------------------------------------

def save_cache(path: str, store: ConfigStore, doc: Document) -> None:
    """Write the last good document atomically: a crash leaves the old file or the new."""
    body = json.dumps({"store": store.where, "revision": doc.revision, "saved": time.time(),
                       "document": (doc.data or b"").decode()})
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.error("config cache not written", path=path, error=str(exc))
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def load_cache(path: str) -> tuple[Document, float]:
    """The cached document and its age in seconds; ConfigError naming the path if unusable."""
    try:
        cached = json.loads(Path(path).read_text())
        doc = Document(int(cached["revision"]), cached["document"].encode())
        return doc, max(0.0, time.time() - float(cached["saved"]))
    except OSError as exc:
        raise ConfigError(f"config_store.cache: {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"config_store.cache: {path}: not a sluice config cache") from None


# --- following the store --------------------------------------------------------------

class Follower:
    """One worker's view of the store: the document in force, its state, and the watch task."""

    def __init__(self, settings: ConfigStoreConfig, store: ConfigStore, path: str) -> None:
        self.settings = settings
        self.store = store
        self.path = path  # the bootstrap file
        self.good: Document | None = None  # the document applied (None: the file alone)
        self.candidate: Document | None = None  # the one a running reload tries
        self.refused: Document | None = None  # the latest document refused
        self.error: str | None = None  # why it was refused
        self.source = "store"  # where the document in force came from: store | cache | file
        self.connected = False
        self.synced_at = time.time()  # last moment the store was known in sync
        self._down_since: float | None = None
        # What the start found, logged by worker 0 once logging is set up (the master reads
        # the store before it configures logging, as it checks everything else).
        self._notes: list[tuple[str, str, dict]] = []

    # -- building a config ---------------------------------------------------------

    def config(self, doc: Document | None = None) -> Config:
        """The bootstrap file read now, with ``doc`` (default: the candidate, else the good one) over it."""
        doc = doc or self.candidate or self.good
        base = read_toml(self.path)
        if doc is None or doc.data is None:
            return parse(base)
        where = f"the config store's document ({self.store.where}, revision {doc.revision})"
        try:
            return parse(overlay(base, sections(doc.data, where)))
        except ConfigError as exc:
            if str(exc).startswith(where):
                raise
            raise ConfigError(f"{where} over {self.path}:\n{exc}") from None

    def stale_seconds(self) -> float:
        return 0.0 if self.connected else max(0.0, time.time() - self.synced_at)

    def status(self) -> dict[str, Any]:
        """For admin ``/config``."""
        return {"store": self.store.where, "connected": self.connected, "source": self.source,
                "revision": self.good.revision if self.good else None,
                "stale_seconds": round(self.stale_seconds(), 3),
                "refused_revision": self.refused.revision if self.refused else None, "last_error": self.error,
                "cache": self.settings.cache}

    # -- at start (the master, before workers fork) --------------------------------

    def start(self, prepare, plugins: Plugins) -> Config:
        """Read the store (or the cache): the config a start runs on, ``prepare``d (the run's
        overrides) and checked by a whole build, as ``sluice check`` does."""
        from .app import App  # (app imports the modules this one does)

        def build(config: Config) -> Config:
            config = prepare(config)
            App(config, plugins)
            return config

        return self._start(build)

    def _start(self, build) -> Config:
        try:
            doc = trio.run(self._first_read)
        except StoreUnavailable as exc:
            return self._from_cache(build, str(exc))
        self.connected, self.synced_at = True, time.time()
        if doc.data is None:
            self._note("warning", "config store empty; starting from the file alone", store=self.store.where)
            self.source = "file"
            return build(self.config(doc))
        try:
            built = build(self.config(doc))
        except ConfigError as exc:
            if self.settings.cache and Path(self.settings.cache).exists():
                self.refused, self.error = doc, str(exc)
                self._note("error", "config store document refused at start; starting from the cache",
                           error=str(exc))
                return self._from_cache(build, "its document does not build")
            raise
        self.good = doc
        if self.settings.cache:
            save_cache(self.settings.cache, self.store, doc)
        return built

    def _note(self, level: str, event: str, **fields: Any) -> None:
        self._notes.append((level, event, fields))

    async def _first_read(self) -> Document:
        try:
            with trio.fail_after(self.settings.timeout):
                return await self.store.read()
        except trio.TooSlowError:
            raise StoreUnavailable(f"no answer within {self.settings.timeout}s") from None

    def _no_cache(self, why: str) -> str | None:
        """Why a start could not fall back on the cache (None: it can)."""
        cache = self.settings.cache
        if not cache:
            return (f"config_store: the store ({self.store.where}) is unreachable ({why}) and "
                    "config_store.cache is not set, so there is nothing to start from")
        if not Path(cache).exists():
            return (f"config_store: the store ({self.store.where}) is unreachable ({why}) and "
                    f"there is no cache yet at {cache} (config_store.cache)")
        return None

    def _from_cache(self, build, why: str) -> Any:
        refusal = self._no_cache(why)
        if refusal is not None:
            raise ConfigError(refusal)
        cache = self.settings.cache
        doc, age = load_cache(cache)
        self._note("warning", "config store unreachable; starting from the cache", store=self.store.where,
                   error=why, cache=cache, revision=doc.revision, age_seconds=round(age, 1))
        self.connected, self.source = False, "cache"
        self.synced_at = time.time() - age
        built = build(self.config(doc))
        self.good = doc
        return built

    def for_check(self) -> tuple[Config, str, str | None]:
        """For ``sluice check``: the config a start would run on (not built yet), what it is
        (for the report), and why a start would refuse even if it builds (the store unreachable
        and no cache: then the config is the file alone, so its own mistakes are still named).
        The store is read once, bounded by ``timeout``; nothing is written or logged."""
        try:
            doc = trio.run(self._first_read)
        except StoreUnavailable as exc:
            refusal = self._no_cache(str(exc))
            if refusal is not None:
                return parse(read_toml(self.path)), "the file alone", refusal
            doc, age = load_cache(self.settings.cache)
            return self.config(doc), (f"the cache {self.settings.cache} (revision {doc.revision}, saved "
                                      f"{age:.0f}s ago; the config store ({self.store.where}) is unreachable: "
                                      f"{exc})"), None
        if doc.data is None:
            return self.config(doc), f"the file alone (the config store ({self.store.where}) has no document)", None
        return self.config(doc), f"the config store's document ({self.store.where}, revision {doc.revision})", None

    # -- in each worker ------------------------------------------------------------

    async def run(self, app: App) -> None:
        """Follow the store for ``app`` until cancelled; never raises."""
        if app.worker_index == 0:
            for level, event, fields in self._notes:
                getattr(log, level)(event, **fields)
        s = self.settings
        backoff = s.backoff_initial
        while True:
            try:
                send, receive = trio.open_memory_channel(0)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.store.watch, send)
                    async with receive:
                        async for item in receive:
                            if isinstance(item, Lost):
                                self._lost(app, item.reason)
                                continue
                            self._back(app)
                            backoff = s.backoff_initial
                            await self._offer(app, item)
                reason = "the watch ended"
            except Exception as exc:  # noqa: BLE001 - following the store never takes a worker down
                reason = _reason(exc)
                if not isinstance(unwrap(exc), StoreUnavailable | OSError):
                    log.error("config store watch failed", store=self.store.where, worker=app.worker_index,
                              exc_info=exc)
            self._lost(app, reason, retry_in=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, s.backoff_max)

    def _lost(self, app: App, reason: str, retry_in: float | None = None) -> None:
        if self.connected or self._down_since is None:
            self._down_since = time.time()
            log.warning("config store lost", store=self.store.where, worker=app.worker_index, error=reason,
                        retry_in=retry_in, revision=self.good.revision if self.good else None)
        self.connected = False

    def _back(self, app: App) -> None:
        if not self.connected:
            if self._down_since is not None:
                log.info("config store back", store=self.store.where, worker=app.worker_index,
                         down_seconds=round(time.time() - self._down_since, 3))
            self.connected, self._down_since = True, None
        self.synced_at = time.time()

    async def _offer(self, app: App, doc: Document) -> None:
        """Apply ``doc`` through the reload path unless it is what serves (or was refused)."""
        if self.refused is not None and doc == self.refused:
            return
        if self.good is not None and doc.data == self.good.data:  # what serves (a cache's too, or a rollback)
            from_cache = self.source == "cache"
            self.good, self.refused, self.error, self.source = doc, None, None, "store"
            if from_cache and self.settings.cache and app.worker_index == 0:  # (its age: confirmed now)
                await trio.to_thread.run_sync(save_cache, self.settings.cache, self.store, doc)
            return
        if doc.data is None:
            if self.good is None:  # (none yet: the file alone serves, as at start)
                return
            self._refuse(app, doc, f"the document is gone from {self.store.where}; the last one is kept "
                         "(push one with `sluice config push`)")
            return
        from .reload import reload  # (reload imports app, which imports this module's users)

        async with app.reload_lock:
            self.candidate = doc
            try:
                ok = await reload(app)
            finally:
                self.candidate = None
        if not ok:
            self._refuse(app, doc, (app.last_reload or {}).get("error") or "the reload failed")
            return
        self.good, self.refused, self.error, self.source = doc, None, None, "store"
        log.info("config store applied", store=self.store.where, revision=doc.revision, worker=app.worker_index,
                 generation=app.generation)
        if self.settings.cache and app.worker_index == 0:
            await trio.to_thread.run_sync(save_cache, self.settings.cache, self.store, doc)

    def _refuse(self, app: App, doc: Document, error: str) -> None:
        self.refused, self.error = doc, error
        app.last_reload = {"ok": False, "error": error, "time": time.time(), "generation": app.generation}
        log.error("config store document refused", store=self.store.where, revision=doc.revision,
                  worker=app.worker_index, error=error)


def unwrap(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (trio nurseries wrap what they pass on)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _reason(exc: BaseException) -> str:
    leaf = unwrap(exc)
    return str(leaf) or type(leaf).__name__
