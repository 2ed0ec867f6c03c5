"""The ``sluice`` command: run, check, plugins, reload, stop, version.

    sluice run [--listen ADDR]                   the embedded demo (default 127.0.0.1:8080)
    sluice run --listen ADDR --upstream URL ...  a one-line reverse proxy
    sluice run -c FILE [--plugins a,b]           a config file
    sluice check FILE                            validate, print each listener's chain
    sluice plugins                               what is installed and what it offers
    sluice reload --pid-file PATH | -c FILE      SIGHUP to the running sluice the pid file names
    sluice stop --pid-file PATH | -c FILE [--fast]  SIGTERM (drain), or SIGQUIT (--fast)
    sluice version, sluice --version             the installed version
    sluice new-plugin NAME [--dir PATH]          a new plugin's project: PATH/sluice-NAME/
    sluice register --store etcd|zookeeper ...   a sidecar: keep an app registered (plugins/registration.py)
    sluice config push FILE | get | diff FILE    the config centre's document (control/config_commands.py)

The module runs in the order a reader meets it: argument parsing and the
one-line config; ``run`` (build, reserve ports, serve, signals, reload
re-reads); then one ``cmd_*`` per command, each short, calling into the
package that does the work (``sluice.scaffold``, ``sluice.plugins.registration``).

A serving process (the one process, or each worker) takes SIGTERM/SIGINT
as drain and stop, SIGQUIT as stop now, SIGHUP as reload and SIGUSR1 as
reopen log files; with ``--workers N`` the master forwards them all
(``edge/workers.py``).

Every configuration problem exits with status 2 and one line per problem
naming the key or the plugin.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib.metadata
import json
import os
import signal
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import structlog
import trio
from pydantic import ValidationError

from . import metrics, scaffold, shared
from .control import config_commands, config_store, pidfile
from .control.app import App, maybe_await
from .control.config import Config, format_errors, load, parse
from .control.registry import Plugins
from .edge.ports import reserve
from .edge.workers import run_workers
from .errors import ConfigError
from .logs import configure
from .protocol.http1 import CODECS
from .proxy.filters import PHASES, overrides

__all__ = ["main"]

DEFAULT_PLUGINS = "access_log,router,balancer"
DEFAULT_LISTEN = "127.0.0.1:8080"

log = structlog.get_logger("sluice")


def _version() -> str:
    return f"sluice {importlib.metadata.version('sluice')}"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 (below 3600), got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="A pluggable L7 proxy.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help="TOML config file")
    run.add_argument("--listen", help=f"one-line mode: listen address (default {DEFAULT_LISTEN})")
    run.add_argument("--upstream", action="append", default=[], metavar="URL",
                     help="one-line mode: an upstream (http://host:port or https://host:port); repeat for more")
    run.add_argument("--plugins", help="comma-separated plugins to enable; in one-line mode also the chain order"
                     f" (default {DEFAULT_PLUGINS}), where PLUGIN.FILTER is one filter of a plugin")
    run.add_argument("--set", action="append", default=[], metavar="filters.NAME.KEY=VALUE", dest="settings",
                     help="one-line mode: a filter setting (VALUE as TOML, else a string); repeat for more")
    run.add_argument("--workers", type=_positive, help="worker processes sharing the port (SO_REUSEPORT)")
    run.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    run.add_argument("--http2", action="store_true",
                     help="one-line mode: also serve HTTP/2 (h2c with prior knowledge on the plain listener)")
    run.add_argument("--http1-codec", choices=CODECS,
                     help="HTTP/1.1 codec (overrides server.http1_codec; default auto: httptools, else h11)")
    run.add_argument("--pid-file", metavar="PATH",
                     help="write the pid that takes signals here once listening; refuse to start while "
                          "it names a running sluice (overrides server.pid_file)")

    check = sub.add_parser("check", help="validate a config file and print the chains")
    check.add_argument("config")
    check.add_argument("--plugins")
    check.add_argument("--http1-codec", choices=CODECS, help="as for run")
    check.add_argument("--file-only", action="store_true",
                       help="with [config_store]: check the file alone, without reading the store or its cache")

    sub.add_parser("plugins", help="list installed plugins and what they provide")

    reload = sub.add_parser("reload", help="ask the running sluice to reload (SIGHUP)")
    stop = sub.add_parser("stop", help="stop the running sluice: drain (SIGTERM), or --fast (SIGQUIT)")
    stop.add_argument("--fast", action="store_true", help="no drain: close connections now")
    for command in (reload, stop):
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--pid-file", metavar="PATH", help="as given to run")
        which.add_argument("-c", "--config", help="the config file's server.pid_file")
    sub.add_parser("version", help="print the version")

    register = sub.add_parser("register", help="sidecar: register an application in etcd or ZooKeeper while it runs")
    register.error = _one_line_error(register)  # bad args: one line, status 2
    register.add_argument("--store", required=True, choices=["etcd", "zookeeper"])
    register.add_argument("--address", required=True, help="etcd's client URL or host:port; ZooKeeper's host:port")
    register.add_argument("--prefix", help="etcd: the key is PREFIX + --id")
    register.add_argument("--path", help="ZooKeeper: the node is an ephemeral sequential PATH/instance-")
    register.add_argument("--service", required=True, metavar="HOST:PORT", help="the application's address")
    register.add_argument("--weight", type=_positive, default=1)
    register.add_argument("--zone")
    register.add_argument("--metadata", default="{}", metavar="JSON", help="a JSON object")
    register.add_argument("--ttl", type=_positive, default=10, help="etcd lease / ZooKeeper session seconds")
    register.add_argument("--ca", help="etcd over https: the CA (PEM) that signed its certificate")
    register.add_argument("--cert", help="etcd over https: the client certificate (PEM) for --client-cert-auth")
    register.add_argument("--key", help="etcd over https: the client certificate's key (PEM)")
    register.add_argument("--id", dest="instance_id", help="etcd: the key's last part (default: host-pid)")
    register.add_argument("--check", metavar="URL", help="registered only while GET URL answers 2xx/3xx")
    register.add_argument("--check-interval", type=_seconds, default=2.0, metavar="SECONDS")

    config_commands.add_parser(sub)

    new = sub.add_parser("new-plugin", help="write a new filter plugin's project: code, tests, README")
    new.add_argument("name", metavar="NAME", help=f"the plugin's name: {scaffold.ALLOWED}")
    new.add_argument("--dir", default=".", metavar="PATH", help="where to make sluice-NAME/ (default: here)")
    return p


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str):
        print(f"{parser.prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)

    return error


def _plugin_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


def _upstream_endpoint(url: str) -> tuple[str, bool]:
    """``http://h:p`` -> (``h:p``, tls?)."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--upstream {url}: expected http://host:port or https://host:port")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"--upstream {url}: a path or query is not supported")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", tls


def _settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set filters.NAME.KEY=VALUE`` as ``{NAME: {KEY: value}}``; VALUE is
    read as TOML (``5``, ``true``, ``["a"]``), else kept as a string."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 3 or parts[0] != "filters" or not all(parts):
            raise ConfigError(f"--set {item}: expected filters.NAME.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        table = out.setdefault(parts[1], {})
        for part in parts[2:-1]:
            table = table.setdefault(part, {})
        table[parts[-1]] = value
    return out


def one_line_config(listen: str, upstreams: list[str], plugins: Plugins, order: list[str],
                    http2: bool = False, settings: dict[str, Any] | None = None) -> Config:
    """The config ``--listen/--upstream/--plugins`` (and ``--http2``) stand for."""
    endpoints = [_upstream_endpoint(u) for u in upstreams]
    if len({tls for _, tls in endpoints}) > 1:
        raise ConfigError("--upstream: mix of http:// and https:// upstreams in one cluster")
    cluster: dict[str, Any] = {"endpoints": [e for e, _ in endpoints]}
    if endpoints and endpoints[0][1]:
        cluster["tls"] = {}
    filters = []
    for name in order:  # "auth" is every filter of the plugin, "auth.api_key" one of them
        plugin, _, only = name.partition(".")
        offered = list(plugins.loaded[plugin].filters)
        if only and only not in offered:
            raise ConfigError(f"--plugins {name}: plugin {plugin!r} has no filter {only!r}; "
                              f"it offers: {', '.join(offered) or '(none)'}")
        filters += [only] if only else offered
    return parse(
        {
            "listeners": [{"address": listen, "filters": filters, "http2": http2}],
            "clusters": {"default": cluster},
            "routes": [{"match": {"prefix": "/"}, "cluster": "default"}],
            "filters": settings or {},
        }
    )


@dataclass
class _Run:
    """What `run` serves (an App, or the demo to build in each worker) and how."""

    target: Any
    workers: int
    log_level: str
    reserved: list[socket.socket]  # with --workers N: the ports the master holds (edge/ports.py)
    pid_file: str | None = None
    stale_pid: int | None = None  # what a stale pid file named (0: no pid), to log once logging is set
    config_text: bytes | None = None  # the config file as the master read it


def _build_run(args: argparse.Namespace) -> _Run:
    if args.config and (args.listen or args.upstream or args.http2 or args.settings):
        raise ConfigError("-c cannot be combined with --listen/--upstream/--http2/--set (set them in the file)")
    if args.config:
        config = _with_codec(load(args.config), args.http1_codec)
        pid_file = args.pid_file or config.server.pid_file
        key = "--pid-file" if args.pid_file else "server.pid_file"
        stale = pidfile.check(pid_file, key) if pid_file else None  # before anything listens
        workers = args.workers or config.server.workers
        original = config
        plugins = Plugins(_plugin_list(args.plugins))
        read, follower = functools.partial(load, args.config), None
        if config.config_store is not None:  # the config centre: the file overlaid with the store's document
            follower = config_store.follower(config, args.config, plugins)
            read = follower.config
            original = config = follower.start(lambda c: _with_codec(c, args.http1_codec), plugins)
        config, reserved = _reserve(config, workers)
        app = App(config, plugins)
        app.config_path, app.config_store = args.config, follower
        app.reload_source = functools.partial(_reread, read, args.http1_codec, original, config)
        return _Run(app, workers, args.log_level or config.server.log_level, reserved, pid_file, stale,
                    _read_bytes(args.config))
    stale = pidfile.check(args.pid_file) if args.pid_file else None
    order = _plugin_list(args.plugins or DEFAULT_PLUGINS)
    plugins = Plugins(list(dict.fromkeys(n.partition(".")[0] for n in order)))
    listen = args.listen or DEFAULT_LISTEN
    workers = args.workers or 1
    settings = _settings(args.settings)
    if args.upstream:
        config = _with_codec(one_line_config(listen, args.upstream, plugins, order, args.http2, settings),
                             args.http1_codec)
        config, reserved = _reserve(config, workers)
        return _Run(App(config, plugins), workers, args.log_level or "info", reserved, args.pid_file, stale)
    # The embedded default: validated now with a placeholder endpoint so a
    # plugin problem fails before anything listens; each worker then starts
    # the demo origin and points the cluster at it.
    config, reserved = _reserve(one_line_config(listen, ["127.0.0.1:9"], plugins, order, args.http2, settings),
                                workers)
    App(_with_codec(config, args.http1_codec), plugins)
    demo = _Demo(config.listeners[0].address, plugins, order, args.http1_codec, args.http2, settings)
    return _Run(demo, workers, args.log_level or "info", reserved, args.pid_file, stale)


def _reserve(config: Config, workers: int) -> tuple[Config, list[socket.socket]]:
    """With ``--workers N``, hold each listener's port for this master's workers only
    (``edge/ports.py``), port 0 resolved to one port for all; a port another
    process listens on fails here, before any fork. One process binds itself."""
    if workers == 1:
        return config, []
    held: list[socket.socket] = []
    listeners = []
    try:
        for i, listener in enumerate(config.listeners):
            try:
                sock, address = reserve(listener.address)
            except OSError as exc:
                why = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    why += " (another process listens there; only sluice's own workers share a port)"
                raise ConfigError(f"listeners[{i}].address: cannot listen on {listener.address}: {why}") from None
            held.append(sock)
            listeners.append(listener.model_copy(update={"address": address}))
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return config.model_copy(update={"listeners": listeners}), held


def _reread(read, codec: str | None, original: Config, reserved: Config) -> Config:
    """The config read again for a reload (``read()``: the file, or with a config store the
    file overlaid with its document), with the run's overrides: ``--http1-codec``, and the
    ports ``_reserve`` chose for ``:0`` listeners."""
    config = _with_codec(read(), codec)
    moved = {a.address: b.address for a, b in zip(original.listeners, reserved.listeners, strict=True)
             if a.address != b.address}
    if not moved:
        return config
    listeners = [lc.model_copy(update={"address": moved.get(lc.address, lc.address)}) for lc in config.listeners]
    return config.model_copy(update={"listeners": listeners})


def _read_bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _as_reloaded(app: App, loaded: bytes | None) -> App:
    """The App a worker starts with: the master's, unless the config file
    changed since the master read it. A worker that replaces a dead one after
    a reload must serve what its siblings serve, not the config the master
    started with, so it builds from the file as it is now; if that does not
    build, it starts on the master's config and says so."""
    if app.reload_source is None or loaded is None or _read_bytes(app.config_path) == loaded:
        return app
    try:
        fresh = App(app.reload_source(), app.plugins)
    except Exception as exc:  # noqa: BLE001 - a bad file is the running config's business, not this start's
        log.warning("worker starts on the config it was started with; the file does not build now",
                    error=str(exc))
        return app
    fresh.config_path, fresh.reload_source, fresh.config_store = app.config_path, app.reload_source, app.config_store
    return fresh


def _with_codec(config: Config, codec: str | None) -> Config:
    """The config with ``--http1-codec`` applied over ``server.http1_codec``."""
    if codec is None:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update={"http1_codec": codec})})


@dataclass
class _Demo:
    listen: str
    plugins: Plugins
    order: list[str]
    codec: str | None = None
    http2: bool = False
    settings: dict[str, Any] | None = None


async def _serve(target: App | _Demo, reuse_port: bool, ready, index: int = 0) -> None:
    """One serving process: build the demo's App if that is the target, run it
    with the signal watcher, report ``ready()`` once it listens."""
    async with trio.open_nursery() as nursery:
        if isinstance(target, _Demo):
            from .control.demo import serve_demo

            upstream = await nursery.start(serve_demo)
            print(f"sluice: demo upstream on http://{upstream}", file=sys.stderr, flush=True)
            config = one_line_config(target.listen, [upstream], target.plugins, target.order, target.http2,
                                     target.settings)
            target = App(_with_codec(config, target.codec), target.plugins)
        app = target
        app.worker_index = index

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await app.run(reuse_port=reuse_port, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop the demo and the signal watcher

        nursery.start_soon(_signals, app, nursery.cancel_scope.cancel)
        addresses = await nursery.start(run)
        chains = "; ".join(" -> ".join(lst.chain.names()) or "(empty)" for lst in app.listeners)
        print(f"sluice: pid {os.getpid()} listening on {', '.join(addresses)} (chain: {chains}; "
              f"http1 codec: {app.codec.name})", file=sys.stderr, flush=True)
        ready()


async def _signals(app: App, stop_now) -> None:
    """What a serving process does with each signal (with ``--workers N`` the master forwards them).

    SIGTERM, SIGINT: drain, then stop (a later one changes nothing: the
    drain timeout bounds the stop). SIGQUIT: stop now, with no drain and no
    shutdown hooks; connections are closed and the access log's last
    ``flush_interval`` of lines is lost; the status is 0, a stop that was
    asked for. SIGHUP: ``app.request_reload()``. SIGUSR1: the
    ``sluice_reopen_logs`` hook, after logrotate renamed the files.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                                   signal.SIGUSR1) as signals:
        draining = False
        async for signum in signals:
            if signum == signal.SIGHUP:
                app.request_reload()
            elif signum == signal.SIGUSR1:
                await _reopen_logs(app)
            elif signum == signal.SIGQUIT:
                log.info("stopping", mode="fast", signal="SIGQUIT", worker=app.worker_index)
                stop_now()
            elif not draining:
                draining = True
                log.info("stopping", mode="drain", signal=signal.Signals(signum).name, worker=app.worker_index)
                app.stop()


async def _reopen_logs(app: App) -> None:
    try:
        for result in app.plugins.call_lifecycle("sluice_reopen_logs", app=app):
            await maybe_await(result)
    except Exception as exc:  # a plugin's failure is its log's loss, never the worker's death
        log.error("log reopen failed", worker=app.worker_index, exc_info=exc)
        return
    log.info("logs reopened", worker=app.worker_index)


def cmd_run(args: argparse.Namespace) -> int:
    metrics.prepare_multiprocess()  # before a plugin imports prometheus_client, before workers fork
    shared.local()  # its table is mapped at import, before workers fork: they all share it
    run = _build_run(args)
    configure(run.log_level)
    if run.stale_pid is not None:
        log.warning("stale pid file replaced", path=run.pid_file, pid=run.stale_pid or None)
    target = run.target

    def worker(reuse_port: bool, ready, index: int) -> None:
        start = _as_reloaded(target, run.config_text) if isinstance(target, App) else target
        try:
            trio.run(_serve, start, reuse_port, ready, index)
        except BaseExceptionGroup as group:  # from inside trio.run: find the cause
            config_errors = group.subgroup(ConfigError)
            if config_errors is None:
                raise
            raise _first_leaf(config_errors) from None

    pid_file = run.pid_file
    on_ready = (lambda: pidfile.write(pid_file)) if pid_file else None
    try:
        return run_workers(run.workers, _reporting(worker), reserved=run.reserved, on_ready=on_ready)
    finally:
        if pid_file:
            pidfile.remove(pid_file)
        for sock in run.reserved:
            sock.close()


def cmd_signal(args: argparse.Namespace) -> int:
    """``sluice reload`` and ``sluice stop``: a signal to the pid in the pid file."""
    sig = signal.SIGHUP if args.command == "reload" else signal.SIGQUIT if args.fast else signal.SIGTERM
    path, key = args.pid_file, "--pid-file"
    if path is None:
        path, key = load(args.config).server.pid_file, "server.pid_file"
        if path is None:
            raise ConfigError(f"{args.config}: server.pid_file is not set (or give --pid-file)")
    pid = pidfile.read(path, key)
    os.kill(pid, sig)
    print(f"sluice: sent {sig.name} to pid {pid}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(_version())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config, plugins = load(args.config), Plugins(_plugin_list(args.plugins))
    what = refusal = None
    if config.config_store is not None and not args.file_only:  # what a start would run on: the store's over the file
        config, what, refusal = config_store.follower(config, args.config, plugins).for_check()
    config = _with_codec(config, args.http1_codec)
    try:
        app = App(config, plugins)
    except ConfigError as exc:
        if what is None:
            raise
        raise ConfigError(f"{args.config} with {what}:\n{exc}") from None
    if refusal is not None:
        raise ConfigError(refusal)
    print(f"{args.config}: ok" + (f" with {what}" if what else "") + f" (http1 codec: {app.codec.name})")
    for listener in app.listeners:
        tls = " tls" if listener.transport is not None else ""
        if listener.config.http2.enabled:
            tls += " +h2 (ALPN)" if tls else " +h2c (prior knowledge)"
        print(f"listener {listener.name}{tls}:")
        if not listener.chain.filters:
            print("  (no filters: every request gets 404)")
        for i, f in enumerate(listener.chain.filters, 1):
            phases = _phases(f)
            print(f"  {i}. {f.name} [{', '.join(phases)}]")
        if listener.chain.resolver is not None:
            for route in getattr(listener.chain.resolver.__self__, "routes", ()):
                print(f"  route {route.name}: {route.summary}")
    for name, cluster in app.clusters.items():
        eps = ", ".join(f"{e.address}" + (f" w={e.weight}" if e.weight != 1 else "") for e in cluster.endpoints)
        print(f"cluster {name}: {type(cluster.balancer).name} -> {eps}")
    if config.metrics.address is not None:
        print(f"metrics listener {config.metrics.address}: GET/HEAD /metrics /live /ready (read-only, no token)")
    for warning in app.warnings:
        print(f"warning: {warning}")
    return 0


def _type_name(tp: Any) -> str:
    """A type as a reader writes it: ``dict[str, str]``, ``float | None``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _describe_model(model: Any, indent: str) -> list[str]:
    lines = []
    for key, field in getattr(model, "model_fields", {}).items():
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"{indent}{key}: {_type_name(field.annotation)} ({default})")
    if lines:
        return lines
    own_doc = model.__dict__.get("__doc__")
    return [f"{indent}({own_doc.strip() if own_doc else 'no settings'})"]


def _phases(filter_: Any) -> list[str]:
    """The phases a filter (instance or class) implements, short names."""
    return [p.removeprefix("on_") for p in PHASES if overrides(filter_, p)]


def _summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    return ": " + doc.strip().splitlines()[0] if doc else ""


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = Plugins()
    for name, info in plugins.loaded.items():
        print(f"{name}  ({info.dist}, {plugins.available[name].value}){_summary(info.module)}")
        for cls in info.filters.values():
            print(f"  filter {cls.name}{_summary(cls)}")
            print(f"    phases: {', '.join(_phases(cls)) or '(none: hooks only)'}")
            order = [f"{a} {', '.join(getattr(cls, a))}" for a in ("before", "after") if getattr(cls, a)]
            order += [a for a in ("first", "last") if getattr(cls, a)]
            if order:
                print(f"    order: {'; '.join(order)}")
            print("\n".join(_describe_model(cls.Config, "    ")))
            if cls.RouteConfig.model_fields:
                print("    per-route settings:")
                print("\n".join(_describe_model(cls.RouteConfig, "      ")))
        for cls in info.balancers.values():
            print(f"  policy {cls.name}{_summary(cls)}")
            print("\n".join(_describe_model(cls.Config, "    ")))
        for cls in info.discovery.values():
            print(f"  discovery source {cls.name}{_summary(cls)}")
            print("\n".join(_describe_model(cls.Config, "    ")))
        for cls in info.config_stores.values():
            print(f"  config store {cls.name}{_summary(cls)}")
            print("    settings: the [config_store] table (README, Config centre)")
        for cls in info.transports.values():
            print(f"  transport {cls.name}{_summary(cls)}")
            print("    listener settings:")
            print("\n".join(_describe_model(cls.ServerConfig, "      ")))
            print("    cluster settings:")
            print("\n".join(_describe_model(cls.ClientConfig, "      ")))
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """``sluice new-plugin``: a plugin's project that installs and passes its tests as written."""
    try:
        names = scaffold.names(args.name, _taken_names())
        project = scaffold.create(names, args.dir)
    except scaffold.ScaffoldError as exc:
        print(f"sluice new-plugin: error: {exc}", file=sys.stderr)
        return 2
    print(f"sluice: wrote {project}: plugin {names.name!r} in {names.module}.py, its tests in tests/, "
          "pyproject.toml, README.md")
    print(f"next:\n  cd {project}\n  python -m pip install -e '.[test]'\n  python -m pytest")
    return 0


def _taken_names() -> dict[str, str]:
    """The names a new plugin must not take, with the distribution holding
    each: the installed plugins' and their filters' (a second filter of one
    name stops every ``sluice run`` that loads both). An installed plugin
    that does not load is reported as ``sluice run`` would report it."""
    loaded = Plugins().loaded.values()
    taken = {info.name: info.dist for info in loaded}
    for info in loaded:
        taken.update(dict.fromkeys(info.filters, info.dist))
    return taken


def _reporting(fn):
    """Wrap a command or worker: a ConfigError is one clear message and status 2."""

    def run(*args):
        try:
            return fn(*args)
        except ConfigError as exc:
            print(f"sluice: error: {exc}".replace("\n", "\n  "), file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except BrokenPipeError:  # `sluice plugins | head`: the reader left, fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None

    return run


def cmd_register(args: argparse.Namespace) -> int:
    """``sluice register``: the sidecar (``sluice.plugins.registration.sidecar``). Exits 0 once
    deregistered after SIGTERM/SIGINT, 2 for bad arguments (one line), 1 for anything else."""
    from .plugins import registration

    try:
        metadata = json.loads(args.metadata)
        if not isinstance(metadata, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise ConfigError(f"--metadata: expected a JSON object ({exc})") from None
    data = {"store": args.store, "address": args.address, "prefix": args.prefix, "path": args.path, "ttl": args.ttl,
            "ca": args.ca, "cert": args.cert, "key": args.key,
            "services": [{"address": args.service, "weight": args.weight, "zone": args.zone, "metadata": metadata}]}
    if args.instance_id:
        data["instance_id"] = args.instance_id
    try:
        config = registration.RegistrationConfig.model_validate(data)
    except ValidationError as exc:
        first = format_errors(exc).splitlines()[0]  # key paths as the flags that set them
        for key, flag in (("services[0].", "--"), ("services[0]", "--service"), ("(top level)", "--store")):
            first = first.replace(key, flag, 1) if first.startswith(key) else first
        raise ConfigError(first) from None
    if args.check is not None and not args.check.startswith(("http://", "https://")):
        raise ConfigError(f"--check: expected an http:// or https:// URL, got {args.check!r}")
    tls = config.tls(prefix="--")
    configure("info")
    return trio.run(functools.partial(registration.sidecar, config.store, config.address,
                                      registration.entries_for(config, {}), config.ttl,
                                      check=args.check, interval=args.check_interval, tls=tls))


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"run": cmd_run, "check": cmd_check, "plugins": cmd_plugins, "reload": cmd_signal,
               "stop": cmd_signal, "version": cmd_version, "new-plugin": cmd_new_plugin,
               "register": cmd_register, "config": config_commands.run}[args.command]
    return _reporting(command)(args)
