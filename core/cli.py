"""The ``sluice`` command: run, check, plugins.

    sluice run [--listen ADDR]                   the embedded demo (default 127.0.0.1:8080)
    sluice run --listen ADDR --upstream URL ...  a one-line reverse proxy
    sluice run -c FILE [--plugins a,b]           a config file
    sluice check FILE                            validate, print each listener's chain
    sluice plugins                               what is installed and what it offers

Every configuration problem exits with status 2 and one line per problem
naming the key or the plugin.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import trio

from .control.app import App
from .control.config import Config, load, parse
from .control.registry import Plugins
from .edge.workers import run_workers
from .errors import ConfigError
from .logs import configure
from .protocol.http1 import CODECS
from .proxy.filters import PHASES, overrides

__all__ = ["main"]

DEFAULT_PLUGINS = "access_log,router,balancer"
DEFAULT_LISTEN = "127.0.0.1:8080"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="A pluggable L7 proxy.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help="TOML config file")
    run.add_argument("--listen", help=f"one-line mode: listen address (default {DEFAULT_LISTEN})")
    run.add_argument("--upstream", action="append", default=[], metavar="URL",
                     help="one-line mode: an upstream (http://host:port or https://host:port); repeat for more")
    run.add_argument("--plugins", help="comma-separated plugins to enable; in one-line mode also the chain order"
                     f" (default {DEFAULT_PLUGINS})")
    run.add_argument("--workers", type=_positive, help="worker processes sharing the port (SO_REUSEPORT)")
    run.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    run.add_argument("--http2", action="store_true",
                     help="one-line mode: also serve HTTP/2 (h2c with prior knowledge on the plain listener)")
    run.add_argument("--http1-codec", choices=CODECS,
                     help="HTTP/1.1 codec (overrides server.http1_codec; default auto: httptools, else h11)")

    check = sub.add_parser("check", help="validate a config file and print the chains")
    check.add_argument("config")
    check.add_argument("--plugins")
    check.add_argument("--http1-codec", choices=CODECS, help="as for run")

    sub.add_parser("plugins", help="list installed plugins and what they provide")
    return p


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


def one_line_config(listen: str, upstreams: list[str], plugins: Plugins, order: list[str],
                    http2: bool = False) -> Config:
    """The config ``--listen/--upstream/--plugins`` (and ``--http2``) stand for."""
    endpoints = [_upstream_endpoint(u) for u in upstreams]
    if len({tls for _, tls in endpoints}) > 1:
        raise ConfigError("--upstream: mix of http:// and https:// upstreams in one cluster")
    cluster: dict[str, Any] = {"endpoints": [e for e, _ in endpoints]}
    if endpoints and endpoints[0][1]:
        cluster["tls"] = {}
    filters = [f for name in order for f in plugins.loaded[name].filters]
    return parse(
        {
            "listeners": [{"address": listen, "filters": filters, "http2": http2}],
            "clusters": {"default": cluster},
            "routes": [{"match": {"prefix": "/"}, "cluster": "default"}],
        }
    )


def _build_run(args: argparse.Namespace) -> tuple[Any, int, str]:
    """What `run` serves (an App, or the demo to build in each worker), workers, log level."""
    if args.config and (args.listen or args.upstream or args.http2):
        raise ConfigError("-c cannot be combined with --listen/--upstream/--http2 (set http2 in the file)")
    if args.config:
        config = _with_codec(load(args.config), args.http1_codec)
        app = App(config, Plugins(_plugin_list(args.plugins)))
        return app, args.workers or config.server.workers, args.log_level or config.server.log_level
    order = _plugin_list(args.plugins or DEFAULT_PLUGINS)
    plugins = Plugins(order)
    listen = args.listen or DEFAULT_LISTEN
    if args.upstream:
        config = _with_codec(one_line_config(listen, args.upstream, plugins, order, args.http2),
                             args.http1_codec)
        return App(config, plugins), args.workers or 1, args.log_level or "info"
    # The embedded default: validated now with a placeholder endpoint so a
    # plugin problem fails before anything listens; each worker then starts
    # the demo origin and points the cluster at it.
    App(_with_codec(one_line_config(listen, ["127.0.0.1:9"], plugins, order, args.http2), args.http1_codec),
        plugins)
    demo = _Demo(listen, plugins, order, args.http1_codec, args.http2)
    return demo, args.workers or 1, args.log_level or "info"


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


async def _serve(target: App | _Demo, reuse_port: bool, ready, index: int = 0) -> None:
    async with trio.open_nursery() as nursery:
        if isinstance(target, _Demo):
            from .control.demo import serve_demo

            upstream = await nursery.start(serve_demo)
            print(f"sluice: demo upstream on http://{upstream}", file=sys.stderr, flush=True)
            config = one_line_config(target.listen, [upstream], target.plugins, target.order, target.http2)
            target = App(_with_codec(config, target.codec), target.plugins)
        app = target
        app.worker_index = index

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await app.run(reuse_port=reuse_port, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop the demo and the signal watcher

        nursery.start_soon(_signals, app)
        addresses = await nursery.start(run)
        chains = "; ".join(" -> ".join(lst.chain.names()) or "(empty)" for lst in app.listeners)
        print(f"sluice: pid {os.getpid()} listening on {', '.join(addresses)} (chain: {chains}; "
              f"http1 codec: {app.codec.name})", file=sys.stderr, flush=True)
        ready()


async def _signals(app: App) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            app.stop()  # later signals are ignored: the drain timeout bounds the stop


def cmd_run(args: argparse.Namespace) -> int:
    target, workers, level = _build_run(args)
    configure(level)

    def worker(reuse_port: bool, ready, index: int) -> None:
        try:
            trio.run(_serve, target, reuse_port, ready, index)
        except BaseExceptionGroup as group:  # from inside trio.run: find the cause
            config_errors = group.subgroup(ConfigError)
            if config_errors is None:
                raise
            raise _first_leaf(config_errors) from None

    return run_workers(workers, _reporting(worker))


def cmd_check(args: argparse.Namespace) -> int:
    config = _with_codec(load(args.config), args.http1_codec)
    app = App(config, Plugins(_plugin_list(args.plugins)))
    print(f"{args.config}: ok (http1 codec: {app.codec.name})")
    for listener in app.listeners:
        tls = " tls" if listener.transport is not None else ""
        if listener.config.http2.enabled:
            tls += " +h2 (ALPN)" if tls else " +h2c (prior knowledge)"
        print(f"listener {listener.name}{tls}:")
        if not listener.chain.filters:
            print("  (no filters: every request gets 404)")
        for i, f in enumerate(listener.chain.filters, 1):
            phases = [p.removeprefix("on_") for p in PHASES if overrides(f, p)]
            print(f"  {i}. {f.name} [{', '.join(phases)}]")
        if listener.chain.resolver is not None:
            for route in getattr(listener.chain.resolver.__self__, "routes", ()):
                print(f"  route {route.name}: {route.summary}")
    for name, cluster in app.clusters.items():
        eps = ", ".join(f"{e.address}" + (f" w={e.weight}" if e.weight != 1 else "") for e in cluster.endpoints)
        print(f"cluster {name}: {type(cluster.balancer).name} -> {eps}")
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


def _summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    return ": " + doc.strip().splitlines()[0] if doc else ""


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = Plugins()
    for name, info in plugins.loaded.items():
        print(f"{name}  ({info.dist}, {plugins.available[name].value})")
        for cls in info.filters.values():
            print(f"  filter {cls.name}{_summary(cls)}")
            print("\n".join(_describe_model(cls.Config, "    ")))
        for cls in info.balancers.values():
            print(f"  policy {cls.name}{_summary(cls)}")
            print("\n".join(_describe_model(cls.Config, "    ")))
        for cls in info.transports.values():
            print(f"  transport {cls.name}{_summary(cls)}")
            print("    listener settings:")
            print("\n".join(_describe_model(cls.ServerConfig, "      ")))
            print("    cluster settings:")
            print("\n".join(_describe_model(cls.ClientConfig, "      ")))
    return 0


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


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"run": cmd_run, "check": cmd_check, "plugins": cmd_plugins}[args.command]
    return _reporting(command)(args)
