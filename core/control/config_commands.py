"""``sluice config push FILE | get | diff FILE``: the config centre's document, from a shell.

The store is named by ``-c bootstrap.toml`` (its ``[config_store]`` table) or by flags
(``--store etcd --address http://127.0.0.1:2379 --prefix /sluice/prod/``; ``--path`` for
ZooKeeper; ``--ca``/``--cert``/``--key`` for etcd over https, as ``config_store.ca`` etc.).
``push`` validates FILE first, whole, as an instance would build it (over the
bootstrap's listeners with ``-c``, else over one listener running ``router``), so a bad
file never reaches the store: status 2 and the key that is wrong.
``diff`` is a unified diff of the store's document against FILE, with diff's statuses
(0 equal, 1 different). A store that does not answer within ``timeout`` is one line and
status 2, like every other error of the command.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import trio
from pydantic import ValidationError

from ..errors import ConfigError
from .config import ConfigStoreConfig, format_errors, parse, read_toml
from .config_store import ConfigStore, Document, StoreUnavailable, open_store, overlay, sections
from .registry import Plugins

__all__ = ["add_parser", "run"]

_FLAGS = ("store", "address", "prefix", "path", "ca", "cert", "key")
_STUB = {"listeners": [{"address": "127.0.0.1:0", "filters": ["router"]}]}


def add_parser(sub) -> None:
    """``sluice config ...`` in the cli's parser."""
    config = sub.add_parser("config", help="the config centre's document in etcd or ZooKeeper: push, get, diff")
    actions = config.add_subparsers(dest="action", required=True)
    push = actions.add_parser("push", help="validate FILE, then write it to the store")
    push.add_argument("file", metavar="FILE")
    actions.add_parser("get", help="print the store's document")
    diff = actions.add_parser("diff", help="unified diff of the store's document and FILE (exit 1 if they differ)")
    diff.add_argument("file", metavar="FILE")
    for action in actions.choices.values():
        action.add_argument("-c", "--config", metavar="BOOTSTRAP", help="a bootstrap file with [config_store]")
        action.add_argument("--store", help="etcd | zookeeper (instead of -c)")
        action.add_argument("--address", help="etcd's client URL, or ZooKeeper's host:port")
        action.add_argument("--prefix", help="etcd: the document is the key PREFIX + config")
        action.add_argument("--path", help="ZooKeeper: the node holding the document")
        action.add_argument("--ca", help="etcd over https: the CA (PEM) that signed its certificate")
        action.add_argument("--cert", help="etcd over https: the client certificate (PEM)")
        action.add_argument("--key", help="etcd over https: the client certificate's key (PEM)")
        action.add_argument("--timeout", type=float, default=5.0, help="seconds for the store to answer")


def _settings(args) -> ConfigStoreConfig:
    if args.config:
        if any(getattr(args, k) for k in _FLAGS):
            raise ConfigError("-c cannot be combined with " + "/".join(f"--{k}" for k in _FLAGS))
        settings = parse(read_toml(args.config)).config_store
        if settings is None:
            raise ConfigError(f"{args.config}: config_store: the file has no [config_store] table")
        return settings
    given = {k: getattr(args, k) for k in _FLAGS if getattr(args, k)}
    try:
        return ConfigStoreConfig.model_validate({**given, "timeout": args.timeout})
    except ValidationError as exc:
        first = format_errors(exc).splitlines()[0]
        raise ConfigError(f"--{first}" if not first.startswith("(top level)") else first) from None


def _call(store: ConfigStore, call, *args: Any) -> Any:
    async def bounded():
        with trio.fail_after(store.settings.timeout + 1):
            return await call(*args)

    try:
        return trio.run(bounded)
    except (StoreUnavailable, trio.TooSlowError) as exc:
        raise ConfigError(f"the config store ({store.where}) is unreachable: "
                          f"{exc or f'no answer within {store.settings.timeout}s'}") from None


def _check(path: str, data: bytes, bootstrap: str | None, plugins: Plugins) -> None:
    """FILE built as an instance would build it: a bad one is a ConfigError naming the key."""
    from .app import App  # (app is heavy; only push needs it)

    doc = sections(data, path)
    base = read_toml(bootstrap) if bootstrap else _STUB
    base = {k: v for k, v in base.items() if k != "config_store"}
    try:
        App(parse(overlay(base, doc)), plugins)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def run(args) -> int:
    try:
        return _run(args)
    except ConfigError as exc:
        if args.config or "config_store." not in str(exc):
            raise
        # with flags, a setting is the flag that gave it: "config_store.ca" is "--ca"
        raise ConfigError(str(exc).replace("config_store.", "--")) from None


def _run(args) -> int:
    settings = _settings(args)
    plugins = Plugins()
    store = open_store(settings, plugins)
    if args.action == "push":
        data = _read(args.file)
        _check(args.file, data, args.config, plugins)
        revision = _call(store, store.write, data)
        print(f"{args.file}: pushed to {store.where} (revision {revision})")
        return 0
    doc: Document = _call(store, store.read)
    if args.action == "get":
        if doc.data is None:
            print(f"sluice: no document in {store.where}", file=sys.stderr)
            return 1
        sys.stdout.write(doc.data.decode(errors="replace"))
        return 0
    mine = _read(args.file).decode(errors="replace").splitlines(keepends=True)
    theirs = (doc.data or b"").decode(errors="replace").splitlines(keepends=True)
    lines = list(difflib.unified_diff(theirs, mine, f"{store.where} (revision {doc.revision})", args.file))
    sys.stdout.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
    return 1 if lines else 0
