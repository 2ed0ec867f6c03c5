"""Every pluggy hook sluice calls, each with when it is called and what it may return.

Plugins implement these with ``@sluice.hookimpl`` in a module (or class)
named by an entry point in the ``sluice`` group. The hooks are called at
startup and shutdown only: the traffic path never goes through pluggy, it
runs the filter objects these hooks registered.

Values may be returned plain, or as an awaitable (a coroutine) for the
lifecycle hooks; the core awaits those. Contributions are attributed to the
plugin that made them, and two plugins offering the same filter, policy or
transport name is a startup error naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable

    from .control.app import App
    from .control.config_store import ConfigStore
    from .edge.transport import Transport
    from .proxy.filters import Filter
    from .upstream.cluster import Balancer
    from .upstream.discovery import DiscoverySource

hookspec = pluggy.HookspecMarker("sluice")
hookimpl = pluggy.HookimplMarker("sluice")

# ---------------------------------------------------------------------------
# Registration: what a plugin contributes (called once, while loading)
# ---------------------------------------------------------------------------


@hookspec
def sluice_filters() -> Iterable[type[Filter]]:
    """Return the filter classes this plugin provides.

    Called once when plugins are loaded, before the config is validated.
    Each class needs a unique ``name`` (what configs write in a listener's
    ``filters`` list) and may define a ``Config`` model for its settings.

    Example::

        @hookimpl
        def sluice_filters():
            return [AddHeader]
    """


@hookspec
def sluice_balancers() -> Iterable[type[Balancer]]:
    """Return the balancing policy classes this plugin provides.

    Called once when plugins are loaded. Each class (a ``sluice.Balancer``)
    has a unique ``name`` that clusters name in ``policy``, and may have a
    ``Config`` model for its settings (``policy = { name = "mine", k = 1 }``,
    errors by key path); one instance is built per cluster, as
    ``Policy(endpoints, config)``. Per request the core passes ``pick(ctx,
    endpoints)`` the eligible endpoints (healthy, not ejected, not yet tried
    by this request; every one in panic mode) and calls ``feedback(attempt)``
    with each try's outcome, status and latency. The whole contract is in
    ``sluice.upstream.cluster``.

    Example::

        class Fastest(Balancer):
            name = "fastest"

            def __init__(self, endpoints, config=None):
                super().__init__(endpoints, config)
                self.latency = {}

            def pick(self, ctx, endpoints):
                return min(endpoints, key=lambda e: self.latency.get(e.address, 0.0))

            def feedback(self, attempt):
                self.latency[attempt.endpoint.address] = attempt.latency

        @hookimpl
        def sluice_balancers():
            return [Fastest]
    """


@hookspec
def sluice_discovery() -> Iterable[type[DiscoverySource]]:
    """Return the discovery source classes this plugin provides.

    Called once when plugins are loaded. Each class (a
    ``sluice.upstream.discovery.DiscoverySource``) has a unique ``name``
    that clusters name in ``discovery = { source = "name", ... }`` and a
    ``Config`` model for the rest of that table (errors by key path). One
    instance per cluster, ``Source(config, cluster_name)``, runs
    ``await source.run(updates)`` in the worker's nursery and reports FULL
    snapshots, ``updates.update([EndpointSpec(host, port, weight, zone,
    metadata), ...])``, or ``updates.failed(reason)``; the core works out
    what joined and what left, and drains what left. The whole contract is
    in ``sluice.upstream.discovery``.

    Example::

        class FromFile(DiscoverySource):
            name = "file"

            class Config(DiscoveryConfig):
                path: str
                every: float = 5.0

            async def run(self, updates):
                while True:
                    lines = Path(self.config.path).read_text().split()
                    updates.update([EndpointSpec.of(line) for line in lines])
                    await trio.sleep(self.config.every)

        @hookimpl
        def sluice_discovery():
            return [FromFile]
    """


@hookspec
def sluice_config_stores() -> Iterable[type[ConfigStore]]:
    """Return the config store classes this plugin provides (the config centre).

    Called once when plugins are loaded. Each class (a
    ``sluice.control.config_store.ConfigStore``) has a unique ``name`` that
    the bootstrap file's ``[config_store] store = "name"`` selects; it is
    built as ``Store(settings)`` (the checked ``ConfigStoreConfig``) and
    holds one document, the TOML text of the ``routes``, ``clusters`` and
    ``filters`` sections. It implements ``await read()`` (a ``Document``,
    or ``StoreUnavailable``), ``await write(data)`` (the new revision),
    and ``await watch(send)``, which runs until cancelled and sends a
    ``Document`` at once and after each change, and ``Lost(reason)`` when
    it can no longer tell (a Document after that means it is back); it may
    raise ``StoreUnavailable``, and the core retries with backoff. The core
    validates, applies through the reload path, caches and reports; the
    built-ins are ``etcd`` and ``zookeeper`` (``sluice.plugins.config_etcd``,
    ``sluice.plugins.config_zookeeper``).
    """


@hookspec
def sluice_transports() -> Iterable[type[Transport]]:
    """Return the transport classes (e.g. TLS) this plugin provides.

    Called once when plugins are loaded. A listener's or cluster's ``tls``
    table selects the transport named ``tls``.
    """


# ---------------------------------------------------------------------------
# Lifecycle: inside the running trio loop
# ---------------------------------------------------------------------------


@hookspec
def sluice_startup(app: App) -> Awaitable[None] | None:
    """Called once per worker process after the config is built, before listening.

    ``app.nursery`` is open: start long-running tasks there (they are
    cancelled at shutdown). May return an awaitable, which is awaited
    before the listeners accept. Raising aborts startup.
    """


@hookspec
def sluice_shutdown(app: App) -> Awaitable[None] | None:
    """Called once per worker after the listeners drained, before exit.

    May return an awaitable; it runs shielded, under the drain timeout.
    To act when the stop *begins* (deregister from a registry, so traffic
    moves away while the requests in flight finish), wait on
    ``app.stopping`` in a task started from ``sluice_startup``;
    ``app.listening`` is set once every listener accepts.
    """


@hookspec
def sluice_reopen_logs(app: App) -> Awaitable[None] | None:
    """Called in each worker on SIGUSR1, after logrotate renamed the log files.

    Close every file the plugin writes by path and open the path anew, so
    that new lines go to a new file there (what logrotate expects when it
    does not copy and truncate). Lines still buffered belong to the old
    file. May return an awaitable. Raising is logged; the worker serves on.
    """


@hookspec
def sluice_reload(app: App) -> Awaitable[None] | None:
    """Called in each worker after a reload swapped a new config in.

    ``app.config``, ``app.clusters`` and ``app.filters`` are the new ones;
    the filters were built anew (``Filter.from_config``) and opened, and the
    old ones close once their requests finish. Plugins that read the config
    in ``sluice_startup`` read it again here. A reload that failed (a bad
    config) does not call it: nothing changed. May return an awaitable;
    raising is a bug in the plugin (the new config stays).
    """
