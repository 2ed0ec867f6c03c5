"""Hot reload: a new config, validated and built whole, then swapped in at once.

``reload(app)`` is what ``App.request_reload()`` (SIGHUP, ``POST /reload``,
``sluice reload``) ends in, in each worker:

1. **Build.** The config is read again (``app.reload_source``) and a whole
   new ``App`` is built from it, with every check a startup makes: a bad
   key, an unknown plugin or a filter that fails to build leaves the
   running config serving, and the error (with its key paths) is logged as
   ``reload failed`` and kept in ``app.last_reload``.
2. **Prepare.** Sockets for new listeners are bound and the new filters
   opened; a failure here also leaves everything as it was.
3. **Swap**, with no checkpoint in between, so no request sees half of it.
   New requests see the new routes, clusters and filters; a request in
   flight finishes on the chain it started with. Listeners are matched by
   address (by name for port 0): a kept one takes its new settings and
   chain in place, so its open connections carry on, and their next
   request uses the new chain; a new one starts accepting; a removed one
   drains (its connections finish, up to ``server.drain_timeout``).
   Clusters whose config is unchanged are the same objects: their health,
   ejections, balancer state and pooled connections carry over. A changed
   or removed cluster's idle connections are closed.
   Before the swap, a cluster with a new discovery source (added, or its
   ``discovery`` table changed) has its source started, and the reload
   waits for its first snapshot, up to its ``initial_timeout`` (then swaps
   anyway, logging ``discovery not ready``), so that no request sees the
   new cluster empty while its registry answers.
4. **Finish.** Health checks and discovery sources start and stop with
   their clusters (an unchanged cluster's go on); the old
   filters are closed once no request runs on the old chains (or at the
   drain timeout); plugins hear ``sluice_reload``.

What a reload cannot change (``server.workers``, ``server.http1_codec``)
is logged as needing a restart, and the rest applies.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..edge.listener import bind
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..edge.listener import Listener
    from ..proxy.chain import Chain
    from ..proxy.filters import Filter
    from .app import App

__all__ = ["reload"]

log = structlog.get_logger("sluice")

_RESTART_ONLY = ("workers", "http1_codec")  # server.* keys a running process keeps


async def reload(app: App) -> bool:
    """Reload ``app`` from its source; True when the new config is in place."""
    from .app import App, maybe_await  # (app imports this module)

    started = time.monotonic()
    try:
        if app.reload_source is None:
            raise ConfigError("nothing to reload from: sluice was started without a config file (-c)")
        new = App(app.reload_source(), app.plugins, previous=app)
    except ConfigError as exc:
        return _failed(app, str(exc))
    except Exception as exc:  # a plugin's bug while building: name it, keep serving
        log.error("reload failed", exc_info=exc)
        return _failed(app, f"building the new config failed: {exc!r}")

    # A cluster with a new discovery source (added, or its discovery table changed) would
    # answer 503 from the swap to the source's first snapshot: its source runs now, and
    # the swap waits for that snapshot up to initial_timeout, as startup does.
    waiting = {name: d for name, d in new.discoveries.items()
               if d is not app.discoveries.get(name) and not d.ready.is_set()}
    early = {name: app.run_discovery(d) for name, d in waiting.items()}
    try:
        await app._discovery_ready(waiting)
    except BaseException:  # (cancelled: the run is ending)
        _stop(early)
        raise

    kept, added, removed = _match(app.listeners, new.listeners)
    sockets: list[tuple[Listener, Any]] = []
    opened: list[Filter] = []
    try:
        for listener in added:
            i = new.listeners.index(listener)
            address = listener.config.address
            try:
                sockets.append((listener, bind(address, reuse_port=app._reuse_port)))
            except OSError as exc:
                raise ConfigError(f"listeners[{i}].address: cannot listen on {address}: "
                                  f"{exc.strerror or exc}") from None
        for f in new.filters.values():
            try:
                await f.open(app.nursery)
            except Exception as exc:
                raise ConfigError(f"filters.{f.name}: the filter failed to open: {exc!r}") from None
            opened.append(f)
    except ConfigError as exc:
        for _, sock in sockets:
            sock.socket.close()
        _stop(early)
        await _close(opened)
        return _failed(app, str(exc))

    # -- the swap: no checkpoint from here to the end of the block -------------
    old_config, old_clusters, old_filters = app.config, app.clusters, app.filters
    old_chains = [listener.chain for listener in app.listeners]
    for old, fresh in kept:
        old.config = fresh.config
        old.chain = fresh.chain
        old.route_overrides = fresh.route_overrides
        old.transport = fresh.transport
    by_new = {id(fresh): old for old, fresh in kept}
    app.listeners = [by_new.get(id(listener), listener) for listener in new.listeners]
    app.config = new.config
    app.clusters = new.clusters
    app.filters = new.filters
    app.health_checks = new.health_checks
    app.discoveries = new.discoveries
    app.generation += 1
    # ---------------------------------------------------------------------------

    app._size_listeners()
    for listener, sock in sockets:
        await app.serve(listener, sock)
    for listener in removed:
        app.retire(listener)
    changed = [name for name, cluster in old_clusters.items() if app.clusters.get(name) is not cluster]
    for name in changed:
        app.stop_checks(name)
        app.stop_discovery(name)
        app.pool.retire([*old_clusters[name].endpoints, *old_clusters[name].draining])
    for name in app.health_checks:
        if name not in app._checks:
            app.start_checks(name)
    app._sources.update(early)  # (after the changed clusters' old sources were stopped)
    for name in app.discoveries:  # (an unchanged cluster's source runs on)
        if name not in app._sources:
            app.start_discovery(name)
    app.nursery.start_soon(_close_when_idle, list(old_filters.values()), old_chains,
                           app.config.server.drain_timeout)
    restart = [f"server.{key}" for key in _RESTART_ONLY
               if getattr(old_config.server, key) != getattr(app.config.server, key)]
    if restart:
        log.warning("reload: these settings need a restart and keep their old values", keys=restart)
    try:
        for result in app.plugins.call_lifecycle("sluice_reload", app=app):
            await maybe_await(result)
    except Exception as exc:  # a plugin's bug: the new config stays
        log.error("a plugin failed in sluice_reload", exc_info=exc)
    app.last_reload = {"ok": True, "error": None, "time": time.time(), "generation": app.generation}
    log.info("config reloaded", generation=app.generation, worker=app.worker_index,
             listeners_added=[x.name for x in added], listeners_removed=[x.name for x in removed],
             clusters_changed=sorted(set(changed) | (set(app.clusters) - set(old_clusters))),
             seconds=round(time.monotonic() - started, 4))
    return True


def _stop(sources: dict[str, trio.CancelScope]) -> None:
    """Stop sources started for a new config that is not swapped in."""
    for scope in sources.values():
        scope.cancel()


def _failed(app: App, error: str) -> bool:
    app.last_reload = {"ok": False, "error": error, "time": time.time(), "generation": app.generation}
    log.error("reload failed", error=error, worker=app.worker_index, generation=app.generation)
    return False


def _key(listener: Listener, i: int) -> tuple:
    """What makes a listener the same one across configs: its address, or
    for port 0 (a port chosen at bind) its name and place."""
    address = listener.config.address
    return (address,) if not address.endswith(":0") else (address, listener.name, i)


def _match(old: list[Listener], new: list[Listener]) -> tuple[list, list, list]:
    """(kept as (old, new) pairs, added, removed)."""
    running = {_key(x, i): x for i, x in enumerate(old) if not x.draining}
    kept, added = [], []
    for i, fresh in enumerate(new):
        match = running.pop(_key(fresh, i), None)
        if match is not None:
            kept.append((match, fresh))
        else:
            added.append(fresh)
    return kept, added, list(running.values())


async def _close(filters: list[Filter]) -> None:
    for f in filters:
        try:
            await f.close()
        except Exception as exc:
            log.error("filter close failed", filter=f.name, exc_info=exc)


async def _close_when_idle(filters: list[Filter], chains: list[Chain], timeout: float) -> None:
    """Close the old generation's filters once no exchange runs on its chains."""
    with trio.move_on_after(timeout):
        while any(chain.active for chain in chains):
            await trio.sleep(0.05)
    with trio.CancelScope(shield=True):
        await _close(filters)
