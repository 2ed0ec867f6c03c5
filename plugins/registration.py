"""Plugin ``registration``: this instance (and what it fronts) registered in etcd or ZooKeeper.

Settings live in ``[filters.registration]``, where every plugin's settings live (the top level
is the core's and strict; ``alerts`` does the same), so errors carry key paths under
``filters.registration`` and ``sluice plugins`` lists them::

    [filters.registration]
    store = "etcd"                        # | "zookeeper"
    address = "http://127.0.0.1:2379"     # etcd's client URL; ZooKeeper: "host:port[,host:port]"
    # etcd at https://...: ca = "ca.pem" (default: the system's CAs), cert/key = client certificate
    prefix = "/services/app/"             # etcd: the key is <prefix><instance_id>
    path = "/services/app"                # ZooKeeper: an ephemeral sequential <path>/instance-
    ttl = 10                              # etcd lease seconds; ZooKeeper session timeout
    instance_id = "edge-1"                # default: <hostname>-<pid>

    [[filters.registration.services]]
    listener = "public"                   # a listener by name: its bound address (port 0 works)
    weight = 1
    zone = "eu-1"
    metadata = { role = "gateway" }

    [[filters.registration.services]]
    address = "10.0.0.7:8080"             # or any address this instance fronts

Each service is one entry, the JSON the etcd and ZooKeeper discovery sources read:
``{"address": "host:port", "weight": 1, "zone": "...", "metadata": {...}}``. With several
services under etcd, the second and later keys are ``<prefix><instance_id>-<n>``.

Who registers: worker 0 only. The master of ``--workers N`` runs no trio loop and serves
nothing, while worker 0 has bound the listeners (so it knows a port 0's real port) and
already holds the instance's other singletons (the admin listener, alerting); ``--workers 2``
makes one registration, not two. If worker 0 dies, its entry goes within the TTL and its
replacement registers again.

When: after the listeners are bound and serving (a registry must not send traffic to a port
that does not accept yet). Graceful stop: the entry is deleted (lease revoked, node deleted)
the moment the stop begins, while the listeners drain, so traffic moves away while in-flight
requests finish. The core has no hook before the drain (``sluice_shutdown`` runs after it),
so this waits on the App's stop event itself. A crash stops the keepalives: etcd deletes the
key when the lease runs out, ZooKeeper the node when the session times out.

A store that is down at start or goes away mid-run never stops the proxy: ``keep_registered``
retries with backoff (0.2 s doubling to 5 s), logging ``registration lost`` and, once it is
back, ``registered``. ``sluice register`` (the cli) runs the same loop for an application that
cannot register itself.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import structlog
import trio
from pydantic import Field, PositiveInt, ValidationError, model_validator

from sluice import ConfigError, FilterConfig, SettingsOnly, hookimpl
from sluice.addresses import parse_hostport
from sluice.control.config import format_errors

__all__ = ["Entry", "RegistrationConfig", "Service", "endpoint_json", "keep_registered", "settings"]

log = structlog.get_logger("sluice.registration")

WHERE = "filters.registration"
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


class Service(FilterConfig):
    """One entry: a listener of this instance by name, or an ``address`` it fronts."""

    listener: str | None = None
    address: str | None = None
    weight: int = Field(1, ge=1, le=1000)  # as a static endpoint's
    zone: str | None = None
    metadata: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_of(self) -> Service:
        if (self.listener is None) == (self.address is None):
            raise ValueError("give exactly one of listener or address")
        if self.address is not None:
            try:
                parse_hostport(self.address, allow_zero=False)
            except ValueError as exc:
                raise ValueError(f"address {self.address!r}: {exc}") from None
        return self


class RegistrationConfig(FilterConfig):
    store: Literal["etcd", "zookeeper"]
    address: str = Field(min_length=1)
    prefix: str | None = None
    path: str | None = None
    ttl: PositiveInt = 10
    ca: str | None = None  # etcd over https: the CA (PEM) that signed its certificate (default: the system's)
    cert: str | None = None  # and the client certificate (PEM) for its --client-cert-auth
    key: str | None = None  # its key (unless it is in cert)
    instance_id: str | None = Field(None, min_length=1)  # None: <hostname>-<pid> of the registering process
    services: list[Service] = Field(min_length=1)

    @model_validator(mode="after")
    def _where(self) -> RegistrationConfig:
        if self.store == "etcd" and not self.prefix:
            raise ValueError("store etcd needs prefix (the keys are <prefix><instance_id>)")
        if self.store == "zookeeper" and not (self.path or "").startswith("/"):
            raise ValueError("store zookeeper needs path, absolute (the nodes are <path>/instance-N)")
        if self.store == "zookeeper" and (self.ca or self.cert or self.key):
            raise ValueError("ca, cert and key are for etcd over https")
        return self

    def tls(self, prefix: str = f"{WHERE}.") -> Any:
        """The ``ssl.SSLContext`` for an https:// etcd (None otherwise); a file that does not
        load is a ConfigError naming the setting (``prefix`` + ca, cert or key)."""
        if self.store != "etcd":
            return None
        from sluice.plugins.etcd import TlsFileError, tls_for

        try:
            return tls_for(etcd_url(self.address), self.ca, self.cert, self.key)
        except TlsFileError as exc:
            raise ConfigError(f"{prefix}{exc.key}: {exc}") from None


def etcd_url(address: str) -> str:
    """etcd's client URL (``http://`` added to a bare host:port)."""
    return address if "://" in address else f"http://{address}"


def settings(config: Any) -> RegistrationConfig | None:
    """``config``'s registration settings, checked (key paths); None when it has none."""
    data = config.filters.get("registration")
    if data is None:
        return None
    try:
        registration = RegistrationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, WHERE)) from None
    names = {listener.name for listener in config.listeners}
    for i, service in enumerate(registration.services):
        if service.listener is not None and service.listener not in names:
            raise ConfigError(f"{WHERE}.services[{i}].listener: {service.listener!r} names no listener "
                              f"(listeners: {', '.join(sorted(n for n in names if n))})")
    registration.tls()  # the TLS files load
    return registration


def endpoint_json(address: str, weight: int = 1, zone: str | None = None, metadata: dict | None = None) -> bytes:
    """The entry a discovery source reads (the schema the etcd and ZooKeeper sources share)."""
    entry: dict[str, Any] = {"address": address, "weight": weight}
    if zone is not None:
        entry["zone"] = zone
    entry["metadata"] = metadata or {}
    return json.dumps(entry, separators=(",", ":")).encode()


Entry = tuple[str, bytes]  # (etcd key or ZooKeeper prefix, JSON)


# --- the stores ------------------------------------------------------------------------
# Each client is imported when its store is used: an instance that registers nowhere (or in
# etcd only) does not load kazoo and its threads. ZooKeeper's ``ttl`` is the session timeout
# asked for; the server grants it within its own minSessionTimeout..maxSessionTimeout.

@asynccontextmanager
async def _etcd(address: str, entries: list[Entry], ttl: int, tls: Any) -> AsyncIterator[None]:
    from sluice.plugins.etcd import EtcdClient

    async with EtcdClient(etcd_url(address), timeout=max(1.0, min(5.0, ttl / 3)), tls=tls) as etcd, \
            etcd.lease(ttl) as lease:
        for key, value in entries:
            await etcd.put(key, value, lease=lease.id)
        yield  # the lease is kept alive; LeaseExpired ends the block; leaving it revokes


@asynccontextmanager
async def _zookeeper(address: str, entries: list[Entry], ttl: int, tls: Any) -> AsyncIterator[None]:
    from sluice.plugins.zookeeper import open_zookeeper

    async with open_zookeeper(address, session_timeout=ttl, connect_timeout=max(1.0, min(5.0, ttl))) as zk, \
            AsyncExitStack() as nodes:
        for prefix, value in entries:
            await nodes.enter_async_context(zk.register(prefix, value))
        # The bridge re-creates the nodes after an expiry; say so, as etcd's side does.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_session_events, zk)
            yield
            nursery.cancel_scope.cancel()


async def _session_events(zk) -> None:
    async for event in zk.session_events:
        if event.kind == "expired":
            log.warning("registration lost", store="zookeeper", error="session expired")
        elif event.kind == "recovered":
            log.info("registered", store="zookeeper", recovered=True)


STORES: dict[str, Callable[[str, list[Entry], int, Any], Any]] = {"etcd": _etcd, "zookeeper": _zookeeper}


def _store_error(exc: BaseException) -> BaseException | None:
    """The store's error in ``exc`` (a trio nursery wraps it in groups), or None if it is not one."""
    from sluice.plugins.etcd import EtcdError
    from sluice.plugins.zookeeper import ZooKeeperError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, EtcdError | ZooKeeperError | OSError) else None


async def keep_registered(store: str, address: str, entries: list[Entry], ttl: int, until: trio.Event, *,
                          tls: Any = None, settings_at: str = f"{WHERE}.") -> None:
    """Hold ``entries`` in ``store`` until ``until`` is set, then delete them.

    ``tls``: the ``ssl.SSLContext`` for an https:// etcd (``RegistrationConfig.tls``); a
    handshake that fails names the setting to check, ``settings_at`` + ca or cert.

    Never raises: a store that is down or drops us is retried with backoff, logging
    ``registration lost``, and ``registered`` once the entries are in again; anything else is
    logged as ``registration failed`` (with its traceback, in sluice's log) and retried alike.
    """
    backoff = BACKOFF_FIRST
    while not until.is_set():
        try:
            async with STORES[store](address, entries, ttl, tls):
                log.info("registered", store=store, entries=[key for key, _ in entries])
                backoff = BACKOFF_FIRST
                await until.wait()
            log.info("deregistered", store=store, entries=[key for key, _ in entries])
            return
        except Exception as exc:  # noqa: BLE001 - registering must never take the proxy down
            error = _store_error(exc)
            if error is None:  # not the store being away: a bug, or an answer we do not expect
                log.error("registration failed", store=store, retry_in=backoff, exc_info=exc)
            else:
                from sluice.plugins.etcd import tls_hint

                log.warning("registration lost", store=store, retry_in=backoff,
                            error=tls_hint(error, settings_at) or type(error).__name__)
        with trio.move_on_after(backoff):
            await until.wait()
        backoff = min(backoff * 2, BACKOFF_MAX)


def entries_for(config: RegistrationConfig, addresses: dict[str, str]) -> list[Entry]:
    """The (key or prefix, JSON) pairs ``config`` registers; ``addresses``: listener name -> host:port."""
    out = []
    instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    for i, service in enumerate(config.services):
        address = service.address if service.address is not None else addresses[service.listener]
        if config.store == "etcd":
            key = f"{config.prefix}{instance_id}" + (f"-{i}" if i else "")
        else:
            key = f"{config.path.rstrip('/')}/instance-"
        out.append((key, endpoint_json(address, service.weight, service.zone, service.metadata)))
    return out


# --- the plugin --------------------------------------------------------------------------

class Registration(SettingsOnly):
    """Self-registration (README, Operating sluice, Self-registration).

    Owns ``[filters.registration]``; it is not a traffic filter and is never in a chain."""

    name = "registration"
    Config = RegistrationConfig

    @classmethod
    def check(cls, config, app):
        settings(app.config)  # listener names against the listeners: `sluice check`, reloads


@hookimpl
def sluice_filters():
    return [Registration]


async def _register_app(app, config: RegistrationConfig) -> None:
    # Registered once every listener serves; deregistered as the stop begins, before the drain.
    await app.listening.wait()
    bound = {listener.name: url.split("://", 1)[1] for listener, url in zip(app.listeners, app.addresses)}
    await keep_registered(config.store, config.address, entries_for(config, bound), config.ttl, app.stopping,
                          tls=config.tls())


_RUNNING: dict[int, RegistrationConfig | None] = {}  # by id(app): what worker 0 registered at start


@hookimpl
def sluice_startup(app):
    config = settings(app.config)  # every worker checks: a bad table refuses to start
    if app.worker_index == 0:
        _RUNNING[id(app)] = config
        if config is not None:
            app.nursery.start_soon(_register_app, app, config)


@hookimpl
def sluice_reload(app):
    """A reload keeps the registration as it started (a bad table was refused by ``check``): the
    entries are the instance's identity in the registry, changed by a restart, which says so."""
    if id(app) in _RUNNING and settings(app.config) != _RUNNING[id(app)]:
        log.warning("registration settings changed; they apply at the next restart", key=WHERE)


@hookimpl
def sluice_shutdown(app):
    _RUNNING.pop(id(app), None)


# --- the sidecar: ``sluice register`` ------------------------------------------------------

async def _healthy(http, url: str) -> bool:
    import httpx

    try:
        answer = await http.get(url)
    except httpx.HTTPError:
        return False
    return answer.status_code < 400


async def _while_healthy(store: str, address: str, entries: list[Entry], ttl: int, stop: trio.Event,
                         check: str, interval: float, tls: dict[str, Any]) -> None:
    """Registered while ``check`` answers 2xx/3xx, deregistered while it does not, until ``stop``."""
    import httpx

    async with httpx.AsyncClient(timeout=max(0.5, min(interval, 5.0))) as http:
        while not stop.is_set():
            if not await _healthy(http, check):
                log.warning("health check failing", check=check)
                with trio.move_on_after(interval):
                    await stop.wait()
                continue
            log.info("health check passing", check=check)
            leave = trio.Event()

            async def watch(leave: trio.Event = leave) -> None:
                while not stop.is_set():
                    with trio.move_on_after(interval):
                        await stop.wait()
                    if not stop.is_set() and not await _healthy(http, check):
                        log.warning("health check failing", check=check)
                        break
                leave.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await keep_registered(store, address, entries, ttl, leave, **tls)
            if not stop.is_set():
                with trio.move_on_after(interval):
                    await stop.wait()


async def sidecar(store: str, address: str, entries: list[Entry], ttl: int, *, check: str | None = None,
                  interval: float = 2.0, tls: Any = None) -> int:
    """Hold ``entries`` until SIGTERM or SIGINT, then deregister; 0. With ``check``, only while it passes.
    ``tls``: an https:// etcd's context, its settings being the command's ``--ca``/``--cert``/``--key``."""
    over = {"tls": tls, "settings_at": "--"}
    import signal

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for signum in received:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    stop.set()
                    return

        nursery.start_soon(on_signal)
        if check is None:
            await keep_registered(store, address, entries, ttl, stop, **over)
        else:
            await _while_healthy(store, address, entries, ttl, stop, check, interval, over)
        nursery.cancel_scope.cancel()
    return 0
