"""What the battery is told: the filter and how to run it, resolved into
the plugins that put the watched filter and the probes in the proxy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...control.registry import Plugins
from ...proxy.filters import Filter
from .probes import _After, _Before, _provides, _swapped, _watch


@dataclass
class _Spec:
    filter: str | type[Filter]
    settings: Mapping[str, Any] | None
    extra: Mapping[str, Any]
    request_headers: list[tuple[str, str]]
    config: Mapping[str, Any] | None
    block_threshold: float
    plugins: list[str] | None
    _resolved: tuple | None = None

    def resolve(self) -> tuple[type[Filter], dict[str, Any]]:
        """The filter's class and the ``extra`` plugins that watch it (once)."""
        if self._resolved is None:
            registry = Plugins(self.plugins, dict(self.extra))
            if isinstance(self.filter, type):
                cls, found = self.filter, registry.filters.get(self.filter.name)
                if found is not None and found[0] is not cls:
                    raise ValueError(f"filter {cls.name!r}: plugin {found[1]!r} provides another class "
                                     f"of that name ({found[0]!r})")
            else:
                found = registry.filters.get(self.filter)
                if found is None:
                    raise ValueError(f"no enabled plugin provides a filter {self.filter!r}; available: "
                                     f"{', '.join(sorted(registry.filters)) or '(none)'}")
                cls = found[0]
            extra = dict(self.extra)
            if found is not None:
                extra[found[1]] = _swapped(registry.loaded[found[1]].module, cls, _watch(cls))
            else:
                extra["sluice-contract-subject"] = _provides([_watch(cls)])
            extra["sluice-contract"] = _provides([_Before, _After])
            self._resolved = (cls, extra)
        return self._resolved

    @property
    def name(self) -> str:
        return self.filter if isinstance(self.filter, str) else self.filter.name


def _spec(filter, settings, extra, request_headers, config, block_threshold, plugins) -> _Spec:
    headers = request_headers or {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return _Spec(filter, settings, dict(extra or {}), [(str(n), str(v)) for n, v in items], config,
                 float(block_threshold), plugins)
