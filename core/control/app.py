"""A built sluice: plugins + config -> clusters, chains, listeners; and its run loop.

Building does all validation that depends on plugins (filter names and
settings, policies, transports, routes), so a bad config fails before any
socket opens, with the key path and, where a plugin is missing, its name.
"""

from __future__ import annotations

import inspect
from typing import Any

import structlog
import trio
from pydantic import ValidationError

from .. import metrics
from ..edge.listener import Listener, bind
from ..edge.pool import Pool
from ..edge.slots import connection_budget, raise_fd_limit
from ..edge.watchdog import Watchdog
from ..errors import ConfigError
from ..protocol.http1 import select
from ..proxy.chain import Chain
from ..proxy.filters import PHASES, Filter, overrides
from ..proxy.ordering import check_order
from ..proxy.header_edits import HeaderEdits, check_ops
from ..shared import SharedState, open_backend
from ..upstream.cluster import Breaker, Cluster, Endpoint, Outlier
from ..upstream.discovery import Discovery
from ..upstream.health import HealthCheck, run_checks
from .admin import admin_token, serve_admin
from .config import Config, format_errors, parse_hostport
from .metrics_listener import serve_metrics_listener
from .registry import Plugins
from .reload import reload
from .watch import watch_config

__all__ = ["App"]

log = structlog.get_logger("sluice")


def validate(model: type, data: Any, where: str) -> Any:
    """Validate plugin-owned settings, with errors under ``where``."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, where)) from None


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class App:
    """Everything one worker runs. Build (validates), then ``await run()``."""

    def __init__(self, config: Config, plugins: Plugins, *, previous: App | None = None) -> None:
        """Build (and so validate) everything ``config`` describes. With
        ``previous`` (a reload, ``sluice.control.reload``), its unchanged
        clusters are reused, state and pooled connections included, and so
        are its codec, watchdog and pool; nothing of it is changed here."""
        self.config = config
        self.plugins = plugins
        self._previous = previous
        self.nursery: trio.Nursery | None = None
        self.serving: trio.Nursery | None = None
        self.addresses: list[str] = []
        self.worker_index = 0  # which of ``--workers N`` this process is (0..N-1); the cli sets it
        # A callable returning the config to reload (the cli's: the file read
        # again); None: nothing to reload from (one-line mode).
        self.reload_source = previous.reload_source if previous is not None else None
        self.config_path = previous.config_path if previous is not None else None  # the file, if any
        self.generation = previous.generation if previous is not None else 0  # reloads applied
        self.last_reload: dict[str, Any] | None = None  # the latest reload's outcome (admin, metrics)
        # The config centre's follower (``sluice.control.config_store``) when [config_store] is set;
        # its reloads and the others' run one at a time, under reload_lock.
        self.config_store = previous.config_store if previous is not None else None
        self.reload_lock = trio.Lock()
        # The admin listener's token (checked, and read from its env var or file, here: at build).
        self.admin_token = admin_token(config.admin) if config.admin.enabled else None
        self._stop = None
        self.listening: trio.Event | None = None  # set once every listener accepts (run())
        self._reload_wanted: trio.Event | None = None
        self.health_checks: dict[str, HealthCheck] = {}
        self.discoveries: dict[str, Discovery] = {}  # clusters with a discovery source
        # The [shared] backend (sluice.shared): checked here, opened by run() for this worker's
        # life (a rate limit's global mode reads it); a reload keeps the running one.
        self._shared = open_backend(config.shared)
        self.shared: SharedState | None = None
        if previous is not None:
            if config.shared != previous.config.shared:
                log.warning("reload: [shared] needs a restart and keeps its old value", worker=previous.worker_index)
            self._shared, self.shared = previous._shared, previous.shared
        self.clusters = {name: self._cluster(name, c) for name, c in config.clusters.items()}
        self.filters: dict[str, Filter] = {}
        if previous is not None:
            self.codec, self.watchdog, self.pool = previous.codec, previous.watchdog, previous.pool
        else:
            try:
                self.codec = select(config.server.http1_codec)
            except ImportError as exc:
                raise ConfigError(f"server.http1_codec: httptools does not import here: {exc}") from None
            self.watchdog = Watchdog()
            self.pool = Pool(self.codec, self.watchdog)
        self._reuse_port = False
        self._urls: dict[Listener, str] = {}  # a serving listener's URL
        self._serving: dict[Listener, trio.CancelScope] = {}
        self._checks: dict[str, trio.CancelScope] = {}  # a cluster's running health checks
        self._sources: dict[str, trio.CancelScope] = {}  # and its running discovery source
        self.listeners = [self._listener(i, lc) for i, lc in enumerate(config.listeners)]
        for name, settings in config.filters.items():  # settings for a filter no chain uses
            if name not in plugins.filters:
                raise plugins.missing("filters", name, f"filters.{name}")
            if name not in self.filters:  # checked all the same (``sluice check``, a reload)
                cls = plugins.filters[name][0]
                cls.check(validate(cls.Config, settings, f"filters.{name}"), self)
        self._check_route_filters()
        self.warnings = self._warnings()

    # -- building ------------------------------------------------------------

    def _warnings(self) -> list[str]:
        """What is legal but likely a mistake: ``sluice check`` prints these,
        a worker logs them (``config warning``) as it starts."""
        out = []
        for i, listener in enumerate(self.listeners):
            if listener.chain.resolver is None:
                out.append(f"listeners[{i}]: no router in its chain: every request gets 404")
        for name in self.config.filters:
            cls = self.plugins.filters[name][0]
            in_chain = any(overrides(cls, p) for p in PHASES)  # a hooks-only plugin needs no chain
            if name not in self.filters and in_chain:
                out.append(f"filters.{name}: settings for a filter that no listener's chain uses")
        return out

    def _check_route_filters(self) -> None:
        """A route's per-filter settings name a filter some plugin provides and
        pass its ``RouteConfig`` (``disabled`` aside), so a typo fails
        ``sluice check`` instead of being ignored on every request."""
        for i, route in enumerate(self.config.routes):
            settings = route.get("filters") if isinstance(route, dict) else None
            for name, data in (settings if isinstance(settings, dict) else {}).items():
                where = f"routes[{i}].filters.{name}"
                if name not in self.plugins.filters:
                    raise self.plugins.missing("filters", name, where)
                if not isinstance(data, dict):
                    raise ConfigError(f"{where}: expected a table of settings, got {data!r}")
                if not isinstance(data.get("disabled", False), bool):
                    raise ConfigError(f"{where}.disabled: expected true or false, got {data['disabled']!r}")
                cls = self.plugins.filters[name][0]
                validate(cls.RouteConfig, {k: v for k, v in data.items() if k != "disabled"}, where)

    def _cluster(self, name: str, cfg) -> Cluster:
        where = f"clusters.{name}"
        previous = self._previous
        if previous is not None and previous.config.clusters.get(name) == cfg:
            if name in previous.health_checks:
                self.health_checks[name] = previous.health_checks[name]
            if name in previous.discoveries:  # its source runs on
                self.discoveries[name] = previous.discoveries[name]
            return previous.clusters[name]  # unchanged: its health, ejections and pool go on
        policy_name = cfg.policy.name
        if policy_name not in self.plugins.balancers:
            raise self.plugins.missing("balancers", policy_name, f"{where}.policy")
        endpoints = [Endpoint(*parse_hostport(e.address), weight=e.weight) for e in cfg.endpoints]
        carried = self._discovered(name, cfg)
        if carried is not None:
            endpoints = carried
        policy, plugin = self.plugins.balancers[policy_name]
        settings = validate(policy.Config, cfg.policy.settings, f"{where}.policy")
        try:
            balancer = policy(endpoints, settings)
        except ConfigError:
            raise
        except Exception as exc:  # a plugin's bug: name it rather than dump its traceback
            raise ConfigError(f"{where}.policy: policy {policy_name!r} of plugin {plugin!r} failed to "
                              f"build: {exc!r}") from exc
        transport = None if cfg.tls is None else self._transport("client", cfg.tls, f"{where}.tls")
        if cfg.protocol == "h2":
            if transport is None:
                raise ConfigError(f"{where}.protocol: \"h2\" is HTTP/2 over TLS and needs a tls table "
                                  "(\"h2c\" is HTTP/2 without TLS)")
            transport.offer(["h2"])
        elif cfg.protocol == "h2c" and transport is not None:
            raise ConfigError(f"{where}.protocol: \"h2c\" is HTTP/2 without TLS; with a tls table "
                              "use \"h2\"")
        if cfg.health_check is not None:
            if cfg.health_check.kind == "http" and cfg.protocol != "h1":
                raise ConfigError(f"{where}.health_check.kind: \"http\" checks speak HTTP/1.1; "
                                  f"use \"tcp\" for an {cfg.protocol} cluster")
            if cfg.health_check.timeout >= cfg.health_check.interval:
                raise ConfigError(f"{where}.health_check.timeout: must be less than the interval "
                                  f"({cfg.health_check.interval}s)")
            self.health_checks[name] = HealthCheck(**cfg.health_check.model_dump())
        check_ops(cfg.request_headers, f"{where}.request_headers", request=True)
        check_ops(cfg.response_headers, f"{where}.response_headers", request=False)
        cluster = Cluster(
            name=name,
            endpoints=endpoints,
            balancer=balancer,
            connect_timeout=cfg.connect_timeout,
            response_timeout=cfg.response_timeout,
            idle_timeout=cfg.idle_timeout,
            max_idle=cfg.max_idle,
            transport=transport,
            tls_server_name=getattr(transport, "server_name", None),
            protocol=cfg.protocol,
            outlier=Outlier(**cfg.outlier.model_dump()),
            panic_threshold=cfg.panic_threshold,
            connect_tries=cfg.connect_tries,
            max_connection_age=cfg.max_connection_age,
            breaker=Breaker(**cfg.circuit_breakers.model_dump()),
            request_edits=HeaderEdits.of(cfg.request_headers),
            response_edits=HeaderEdits.of(cfg.response_headers),
        )
        if cfg.discovery is not None:
            self.discoveries[name] = self._discovery(cluster, cfg.discovery, f"{where}.discovery")
            if carried is not None:
                self.discoveries[name].ready.set()
        return cluster

    def _discovered(self, name: str, cfg) -> list[Endpoint] | None:
        """For a cluster a reload changed but whose discovery settings it kept: the
        endpoints its source found so far (new objects, as any changed cluster's),
        so that it serves them until the new source's first snapshot rather than
        answering 503 meanwhile. None otherwise."""
        previous = self._previous
        old = previous.config.clusters.get(name) if previous is not None else None
        if cfg.discovery is None or old is None or old.discovery != cfg.discovery:
            return None
        return [Endpoint(e.host, e.port, weight=e.weight, zone=e.zone, metadata=e.metadata)
                for e in previous.clusters[name].endpoints]

    def _discovery(self, cluster: Cluster, cfg, where: str) -> Discovery:
        """The cluster's source, built and validated (``sluice.upstream.discovery``)."""
        if cfg.source not in self.plugins.discovery:
            raise self.plugins.missing("discovery", cfg.source, f"{where}.source")
        cls, plugin = self.plugins.discovery[cfg.source]
        settings = validate(cls.Config, cfg.settings, where)
        try:
            source = cls(settings, cluster.name)
        except ConfigError:
            raise
        except Exception as exc:  # a plugin's bug: name it rather than dump its traceback
            raise ConfigError(f"{where}: discovery source {cfg.source!r} of plugin {plugin!r} failed to "
                              f"build: {exc!r}") from exc
        return Discovery(cluster, source, None, cfg.initial_timeout)  # (the pool: at start_discovery)

    def _transport(self, side: str, settings: dict, where: str) -> Any:
        """A server or client transport from the ``tls`` transport plugin."""
        if "tls" not in self.plugins.transports:
            raise self.plugins.missing("transports", "tls", where)
        cls = self.plugins.transports["tls"][0]
        model = cls.ServerConfig if side == "server" else cls.ClientConfig
        config = validate(model, settings, where)
        try:
            return getattr(cls, side)(config)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"{where}: {exc}") from None

    def filter(self, name: str, where: str) -> Filter:
        """The shared instance of a filter, built on first use."""
        if name in self.filters:
            return self.filters[name]
        if name not in self.plugins.filters:
            raise self.plugins.missing("filters", name, where)
        cls, plugin = self.plugins.filters[name]
        settings = validate(cls.Config, self.config.filters.get(name), f"filters.{name}")
        try:
            instance = cls.from_config(settings, self)
        except ConfigError:
            raise
        except Exception as exc:  # a plugin's bug: name it rather than dump its traceback
            raise ConfigError(f"filters.{name}: filter {name!r} of plugin {plugin!r} failed to build: {exc!r}") from exc
        self.filters[name] = instance
        return instance

    def _listener(self, i: int, cfg) -> Listener:
        where = f"listeners[{i}]"
        # Its name (else its address) labels its log lines and metrics. Unnamed
        # listeners on port 0 (tests) get their ports at bind: let them be.
        name = cfg.name or cfg.address
        for j, other in enumerate(self.config.listeners[:i]):
            if (other.name or other.address) == name and (cfg.name or not name.endswith(":0")):
                raise ConfigError(f"{where}.name: {name!r} names listeners[{j}] already; "
                                  "give each listener a name of its own")
        for j, other in enumerate(self.config.listeners[:i]):
            if other.address == cfg.address and not cfg.address.endswith(":0"):
                raise ConfigError(f"{where}.address: {cfg.address!r} is listeners[{j}]'s address already")
        for j, name in enumerate(cfg.filters):
            if name in cfg.filters[:j]:
                raise ConfigError(f"{where}.filters[{j}]: {name!r} is already in this chain")
        chain = Chain([self.filter(n, f"{where}.filters[{j}]") for j, n in enumerate(cfg.filters)])
        check_order([type(f) for f in chain.filters], f"{where}.filters")
        transport = None if cfg.tls is None else self._transport("server", cfg.tls, f"{where}.tls")
        if transport is not None and cfg.http2.enabled:
            transport.offer(["h2", "http/1.1"])  # ALPN: h2 first (RFC 9113 3.2)
        routes = getattr(chain.resolver.__self__, "routes", ()) if chain.resolver else ()
        return Listener(
            config=cfg,
            chain=chain,
            pool=self.pool,
            codec=self.codec,
            watchdog=self.watchdog,
            route_overrides=any(r.disabled_filters for r in routes),
            transport=transport,
        )

    # -- running ---------------------------------------------------------------

    async def run(self, *, reuse_port: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop()``; then drain and shut down. Reports bound addresses."""
        self._stop = trio.Event()
        self.listening = trio.Event()
        self._reload_wanted = trio.Event()
        self._reuse_port = reuse_port
        self._size_listeners()
        sockets = []
        for i, listener in enumerate(self.listeners):
            address = listener.config.address
            try:
                sockets.append(bind(address, reuse_port=reuse_port))
            except OSError as exc:
                for sock in sockets:
                    sock.socket.close()
                raise ConfigError(
                    f"listeners[{i}].address: cannot listen on {address}: {exc.strerror or exc}"
                ) from None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(metrics.run, self)  # flushes this worker's sums, samples its gauges
            await nursery.start(self._hold_shared)  # (closed when the nursery is, after the filters)
            for result in self.plugins.call_lifecycle("sluice_startup", app=self):
                await maybe_await(result)
            for f in self.filters.values():
                await f.open(nursery)
            nursery.start_soon(self.watchdog.run)
            await nursery.start(self.pool.run)
            nursery.start_soon(self._watch_ejections)
            for name in self.health_checks:
                self.start_checks(name)
            for name in self.discoveries:
                self.start_discovery(name)
            await self._discovery_ready()
            if self.config.admin.enabled and self.worker_index == 0:  # one admin: worker 0's
                await nursery.start(serve_admin, self)
            if self.config.metrics.address is not None and self.worker_index == 0:  # beside it
                await nursery.start(serve_metrics_listener, self)
            async with trio.open_nursery() as serving:
                self.serving = serving
                for listener, sock in zip(self.listeners, sockets, strict=True):
                    await self.serve(listener, sock)
                task_status.started(self.addresses)
                self.listening.set()
                for warning in self.warnings:
                    log.warning("config warning", worker=self.worker_index, warning=warning)
                log.info("started", worker=self.worker_index, codec=self.codec.name,
                         listeners={x.name: self._urls[x] for x in self.listeners},
                         chains={x.name: x.chain.names() for x in self.listeners})
                nursery.start_soon(self._reloader)
                if self.config.server.watch_config and self.config_path is not None:
                    nursery.start_soon(watch_config, self.config_path, self.request_reload)
                if self.config_store is not None:
                    nursery.start_soon(self.config_store.run, self)
                await self._stop.wait()
                await self._drain(serving)
            await self._shutdown()
            log.info("stopped", worker=self.worker_index)
            nursery.cancel_scope.cancel()

    async def _hold_shared(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self._shared as state:
            self.shared = state
            task_status.started()
            await trio.sleep_forever()

    async def serve(self, listener: Listener, sock: trio.SocketListener) -> None:
        """Start serving ``listener`` on ``sock`` (bound) in the serving nursery."""
        host, port = sock.socket.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self._urls[listener] = f"{listener.scheme}://{host}:{port}"
        self.addresses = [self._urls[x] for x in self.listeners if x in self._urls]
        await self.serving.start(self._serve_one, listener, sock)

    async def _serve_one(self, listener: Listener, sock, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:  # cancelled when a reload retires it and its drain runs out
            self._serving[listener] = scope
            try:
                await listener.serve(sock, task_status=task_status)
            finally:
                self._serving.pop(listener, None)
                self._urls.pop(listener, None)

    def retire(self, listener: Listener) -> None:
        """Stop a listener a reload removed: it drains, then is cut off at the drain timeout."""
        listener.drain()

        async def cut_off() -> None:
            with trio.move_on_after(self.config.server.drain_timeout):
                while listener in self._serving and listener.active:
                    await trio.sleep(0.05)
            scope = self._serving.get(listener)
            if scope is not None:
                scope.cancel()

        self.nursery.start_soon(cut_off)

    def start_checks(self, name: str) -> None:
        """Run cluster ``name``'s active health checks (until ``stop_checks``)."""
        scope = self._checks[name] = trio.CancelScope()

        async def checks() -> None:
            with scope:
                await run_checks(self.clusters[name], self.health_checks[name])

        self.nursery.start_soon(checks)

    def stop_checks(self, name: str) -> None:
        scope = self._checks.pop(name, None)
        if scope is not None:
            scope.cancel()

    def start_discovery(self, name: str) -> None:
        """Run cluster ``name``'s discovery source (until ``stop_discovery``)."""
        self._sources[name] = self.run_discovery(self.discoveries[name])

    def run_discovery(self, discovery: Discovery) -> trio.CancelScope:
        """Run a discovery source in this app's nursery, until the scope returned
        is cancelled (a reload runs a new cluster's before the swap)."""
        discovery.pool = self.pool
        scope = trio.CancelScope()

        async def source() -> None:
            with scope:
                await discovery.run()

        self.nursery.start_soon(source)
        return scope

    def stop_discovery(self, name: str) -> None:
        scope = self._sources.pop(name, None)
        if scope is not None:
            scope.cancel()

    async def _discovery_ready(self, discoveries: dict[str, Discovery] | None = None) -> None:
        """Wait for each discovered cluster's first snapshot, up to its
        ``initial_timeout`` (from now); then serve anyway (503 UH until it comes)."""
        start = trio.current_time()
        for name, discovery in (self.discoveries if discoveries is None else discoveries).items():
            with trio.move_on_at(start + discovery.initial_timeout):
                await discovery.ready.wait()
            if not discovery.ready.is_set():
                log.warning("discovery not ready", cluster=name, source=discovery.source.name,
                            waited=discovery.initial_timeout, worker=self.worker_index)

    def request_reload(self) -> None:
        """Ask for a reload (SIGHUP, the admin endpoint; safe from any task of
        this loop). Requests made while one runs are served by one more."""
        if self._reload_wanted is None:
            log.warning("reload requested before the proxy runs; ignored", worker=self.worker_index)
            return
        log.info("reload requested", worker=self.worker_index)
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = trio.Event()
            try:
                async with self.reload_lock:
                    await reload(self)
            except Exception as exc:  # a bug of ours: the old config keeps serving
                log.error("reload failed", exc_info=exc)

    async def _watch_ejections(self, interval: float = 1.0) -> None:
        """Log each endpoint's return from a passive ejection (once)."""
        while True:
            await trio.sleep(interval)
            for cluster in self.clusters.values():
                cluster.returned()

    def _size_listeners(self) -> None:
        """Raise the descriptor limit as far as it goes, and give each
        listener its ``max_connections``: the configured value, else what
        the limit carries (``connection_budget``)."""
        before, fd_limit = raise_fd_limit()
        if fd_limit > before:
            log.info("file descriptor limit raised", soft=fd_limit, was=before)
        else:
            log.info("file descriptor limit", soft=fd_limit)
        pooled = sum(c.max_idle * len(c.endpoints) for c in self.config.clusters.values())
        budget = connection_budget(fd_limit, len(self.listeners), pooled)
        for i, listener in enumerate(self.listeners):
            wanted = listener.config.limits.max_connections
            listener.slots.limit = budget if wanted is None else wanted
            if wanted is not None and wanted > budget:
                log.warning("max_connections is more than the file descriptor limit carries; "
                            "accepts may fail with EMFILE", key=f"listeners[{i}].limits.max_connections",
                            max_connections=wanted, carried=budget, fd_limit=fd_limit)
            log.info("connection slots", listener=listener.name, max_connections=listener.slots.limit,
                     configured=wanted is not None)

    @property
    def stopping(self) -> trio.Event:
        """Set when a graceful stop begins, before the listeners drain.

        For a plugin that must act first, in a task it started from ``sluice_startup``:
        a registry entry deleted here moves traffic away while the requests in flight
        finish (``sluice_shutdown`` runs only after the drain). With ``listening``, set
        once every listener accepts, it brackets the time this worker serves.
        """
        return self._stop

    def stop(self) -> None:
        """Begin a graceful stop (safe to call from a signal handler task)."""
        if self._stop is not None:
            self._stop.set()

    async def _drain(self, serving: trio.Nursery) -> None:
        timeout = self.config.server.drain_timeout
        for listener in self.listeners:
            listener.drain()
        with trio.move_on_after(timeout):
            # (listeners a reload retired are still in _serving while they drain)
            while any(listener.active for listener in [*self.listeners, *self._serving]):
                await trio.sleep(0.05)
        serving.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.config.server.drain_timeout):
            for f in self.filters.values():
                try:
                    await f.close()
                except Exception as exc:
                    log.error("filter close failed", filter=f.name, exc_info=exc)
            for result in self.plugins.call_lifecycle("sluice_shutdown", app=self):
                await maybe_await(result)
            await self.pool.aclose()
