"""Plugin discovery (entry points, group ``sluice``), selection and registries.

Every plugin, built-in or third-party, is an entry point in the ``sluice``
group naming a module (or object) with hook implementations. Discovery
lists them without importing; ``load`` imports the enabled ones, registers
them with pluggy, and collects what each contributes. A name offered by two
plugins is an error naming both; the traffic path only ever sees the
resulting registries, never pluggy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pydantic import BaseModel

from .. import hookspecs
from ..errors import ConfigError
from ..proxy.filters import Filter

__all__ = ["GROUP", "PluginInfo", "Plugins", "discover"]

GROUP = "sluice"


@dataclass
class PluginInfo:
    """One loaded plugin and what it contributes."""

    name: str
    dist: str
    module: Any
    filters: dict[str, type] = field(default_factory=dict)
    balancers: dict[str, type] = field(default_factory=dict)
    transports: dict[str, type] = field(default_factory=dict)
    discovery: dict[str, type] = field(default_factory=dict)
    config_stores: dict[str, type] = field(default_factory=dict)


def discover() -> dict[str, EntryPoint]:
    """Every installed plugin by name, not imported."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(
                f"plugin name {ep.name!r} is declared twice: by {_dist(found[ep.name])} "
                f"({found[ep.name].value}) and by {_dist(ep)} ({ep.value})"
            )
        found[ep.name] = ep
    return found


def _dist(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


_NOUNS = {"filters": "filter", "balancers": "policy", "transports": "transport", "discovery": "discovery source",
          "config_stores": "config store"}
_KINDS = {
    "filters": "sluice_filters",
    "balancers": "sluice_balancers",
    "transports": "sluice_transports",
    "discovery": "sluice_discovery",
    "config_stores": "sluice_config_stores",
}


def _check_filter_class(cls: Any, where: str) -> None:
    """A filter class's contract, checked at load so a plugin's mistake is an
    error naming it rather than a failure on some later request."""
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise ConfigError(f"{where}: filter {cls!r} is not a sluice.Filter subclass")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise ConfigError(f"{where}: filter {cls.name!r}: Config {config!r} is not a pydantic model "
                          "(subclass sluice.FilterConfig)")
    for attr in ("before", "after"):
        value = getattr(cls, attr)
        if not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: filter {cls.name!r}: {attr} must be a tuple of filter names, "
                              f"not {value!r}")


class Plugins:
    """The enabled plugins, their pluggy manager, and the merged registries."""

    def __init__(self, enabled: list[str] | None = None, extra: dict[str, Any] | None = None) -> None:
        """Load the ``enabled`` plugins (all when None), then ``extra`` ones.

        ``extra`` maps names to plugin objects registered in-process, without
        an entry point: for embedding and for tests (``sluice.testing``). An
        extra name that is also installed replaces the installed plugin.
        """
        self.available = discover()
        names = list(self.available) if enabled is None else enabled
        unknown = [n for n in names if n not in self.available]
        if unknown:
            raise ConfigError(
                f"unknown plugin {', '.join(map(repr, unknown))}; "
                f"available: {', '.join(sorted(self.available)) or '(none)'}"
            )
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.loaded: dict[str, PluginInfo] = {}
        extra = extra or {}
        # An in-process object given by the caller replaces the installed
        # plugin of that name (a test of a plugin that is also installed),
        # so the entry point is not loaded and nothing registers twice.
        for name in dict.fromkeys(names):
            if name not in extra:
                self._load(name, self.available[name])
        for name, obj in extra.items():
            self._register(name, obj, "(in-process)")
        # name -> (class, plugin name), merged with clash detection
        self.filters = self._merge("filters")
        self.balancers = self._merge("balancers")
        self.transports = self._merge("transports")
        self.discovery = self._merge("discovery")
        self.config_stores = self._merge("config_stores")

    def _load(self, name: str, ep: EntryPoint) -> None:
        try:
            module = ep.load()
        except Exception as exc:
            raise ConfigError(f"plugin {name!r} ({ep.value}) failed to import: {exc!r}") from exc
        self._register(name, module, _dist(ep))

    def _register(self, name: str, module: Any, dist: str) -> None:
        try:
            self.pm.register(module, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise ConfigError(f"plugin {name!r}: {exc}") from exc
        info = PluginInfo(name=name, dist=dist, module=module)
        for kind, hook in _KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != name:
                    continue
                where = f"plugin {name!r} ({dist})"
                try:
                    provided = list(impl.function() or ())
                except Exception as exc:
                    raise ConfigError(f"{where}: {hook}() failed: {exc!r}") from exc
                for cls in provided:
                    if not getattr(cls, "name", ""):
                        raise ConfigError(f"{where}: {cls!r} has no name")
                    if cls.name in getattr(info, kind):
                        raise ConfigError(f"{where}: it offers two of {hook}() named {cls.name!r}")
                    if kind == "filters":
                        _check_filter_class(cls, where)
                    getattr(info, kind)[cls.name] = cls
        self.loaded[name] = info

    def _merge(self, kind: str) -> dict[str, tuple[type, str]]:
        merged: dict[str, tuple[type, str]] = {}
        for info in self.loaded.values():
            for item, cls in getattr(info, kind).items():
                if item in merged:
                    other = merged[item][1]
                    raise ConfigError(
                        f"{_NOUNS[kind]} {item!r} is provided by both plugin {other!r} "
                        f"({self.loaded[other].dist}) and plugin {info.name!r} ({info.dist})"
                    )
                merged[item] = (cls, info.name)
        return merged

    def provider(self, kind: str, item: str) -> str | None:
        """Which installed plugin (enabled or not) provides ``item`` of ``kind``.

        Imports disabled plugins to find out; only used to write an error.
        """
        for name, ep in self.available.items():
            if name in self.loaded:
                if item in getattr(self.loaded[name], kind):
                    return name
                continue
            try:
                module = ep.load()
            except Exception:
                continue
            hook = getattr(module, _KINDS[kind], None)
            try:
                provided = hook() if callable(hook) else ()
            except Exception:
                continue
            if any(getattr(c, "name", None) == item for c in provided or ()):
                return name
        return None

    def missing(self, kind: str, item: str, where: str) -> ConfigError:
        """The error for a name no enabled plugin provides."""
        provider = self.provider(kind, item)
        noun = _NOUNS[kind]
        if provider is not None:
            return ConfigError(
                f"{where}: {noun} {item!r} is provided by plugin {provider!r}, "
                f"which is not enabled; add {provider!r} to --plugins"
            )
        have = sorted(getattr(self, kind))
        return ConfigError(
            f"{where}: unknown {noun} {item!r}; available: {', '.join(have) or '(none)'}"
        )

    def call_lifecycle(self, hook: str, **kwargs: Any) -> list[Any]:
        return getattr(self.pm.hook, hook)(**kwargs)
