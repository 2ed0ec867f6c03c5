"""What the battery is told: the filter, and the options ``battery`` and
``check`` both take (``Options``, written once), resolved into the plugins
that put the watched filter and the probes in the proxy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ...control.registry import Plugins
from ...proxy.filters import Filter
from .probes import _After, _Before, _provides, _swapped, _watch


@dataclass(frozen=True)
class Options:
    """How the battery runs a filter; the keywords of ``battery`` and ``check``.

    - ``settings``: the filter's ``[filters.NAME]`` table.
    - ``extra``: plugins by name (a module or object with hooks), found
      besides the installed ones; one replaces an installed plugin of its name.
    - ``request_headers``: added to every request (to pass auth, say); a
      dict or pairs.
    - ``config``: merged over the battery's (dicts merge, other values
      replace; routes given there go after the battery's own two and replace
      its catch-all).
    - ``block_threshold``: seconds a step of the proxy may hold the loop.
    - ``plugins``: which installed plugins to load (None: all).
    """

    settings: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] | None = None
    request_headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None
    config: Mapping[str, Any] | None = None
    block_threshold: float = 0.1
    plugins: list[str] | None = None

    def __post_init__(self) -> None:
        # As the run uses them: a dict of plugins, header pairs of strings, seconds.
        headers = self.request_headers or {}
        items = headers.items() if isinstance(headers, Mapping) else headers
        object.__setattr__(self, "extra", dict(self.extra or {}))
        object.__setattr__(self, "request_headers", [(str(n), str(v)) for n, v in items])
        object.__setattr__(self, "block_threshold", float(self.block_threshold))


@dataclass
class _Spec:
    filter: str | type[Filter]
    options: Options
    _resolved: tuple | None = None

    def resolve(self) -> tuple[type[Filter], dict[str, Any]]:
        """The filter's class and the ``extra`` plugins that watch it (once)."""
        if self._resolved is None:
            registry = Plugins(self.options.plugins, dict(self.options.extra))
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
            extra = dict(self.options.extra)
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
