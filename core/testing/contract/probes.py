"""The filters the battery puts in the chain: the filter under test, watched,
and the two probes around it.

How the filter is watched: the plugin that provides it is registered again
(through ``extra``, which replaces an installed plugin of the same name)
with the filter replaced by a subclass that counts ``on_complete`` and
records what each overridden phase raises; nothing else changes, and an
``on_complete`` with no ``await`` stays one (the core runs such phases on a
faster path, and the battery must test that path).

The probes, ``contract_before`` and ``contract_after``, answer locally when
a request asks them to, so a scenario has a filter's local reply before and
after the one under test; the first one sees every exchange begin.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from ...control.registry import GROUP
from ...hookspecs import hookimpl
from ...proxy.chain import never_suspends
from ...proxy.filters import PHASES, Filter, LocalReply, overrides
from .recorder import _recorder

_ASK = "x-sluice-contract"  # the request header the probe filters answer to

# -- the watched filter ----------------------------------------------------------

class _Watched:
    """Marks a class made by ``_watch``."""


_watched: dict[type, type] = {}


def _phase_wrapper(phase: str, original: Callable) -> Callable:
    async def phase_(self, ctx, *args):
        if phase == "on_response_headers" and (rec := _recorder()) is not None:
            rec.response_head(ctx)
        try:
            result = await original(self, ctx, *args)
        except Exception as exc:
            rec = _recorder()
            if rec is not None:
                rec.exception(phase, exc)
            raise
        if type(result) is LocalReply and (rec := _recorder()) is not None:
            rec.answered(self.name, ctx)
        return result

    phase_.__name__ = phase
    return phase_


def _complete_wrapper(original: Callable) -> Callable:
    if never_suspends(original):
        # No await here either, so the core keeps its unshielded fast path.
        async def on_complete(self, ctx):
            rec = _recorder()
            if rec is not None:
                rec.complete(rec.subject, ctx)
            coro = original(self, ctx)
            try:
                coro.send(None)
            except StopIteration:
                pass
            except Exception as exc:
                if rec is not None:
                    rec.exception("on_complete", exc)
                raise
            else:  # never_suspends said it could not: do as the core would
                coro.close()
                raise RuntimeError("on_complete suspended")
            finally:
                if rec is not None:
                    rec.keep_state(self, ctx)
    else:
        async def on_complete(self, ctx):
            rec = _recorder()
            if rec is not None:
                rec.complete(rec.subject, ctx)
            try:
                await original(self, ctx)
            except Exception as exc:
                if rec is not None:
                    rec.exception("on_complete", exc)
                raise
            finally:
                if rec is not None:
                    rec.keep_state(self, ctx)
    return on_complete


def _watch(cls: type[Filter]) -> type[Filter]:
    """``cls`` with ``on_complete`` counted and each overridden phase's
    exceptions recorded; same name, settings and ordering."""
    if issubclass(cls, _Watched):
        return cls
    if cls in _watched:
        return _watched[cls]
    body: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    for phase in PHASES[:-1]:
        if overrides(cls, phase):
            body[phase] = _phase_wrapper(phase, getattr(cls, phase))
    body["on_complete"] = _complete_wrapper(cls.on_complete)

    def from_config(kind, config, app):
        instance = super(watched, kind).from_config(config, app)
        if not isinstance(instance, _Watched):  # the filter built another class (a variant of itself)
            instance.__class__ = _watch(type(instance))
        rec = _recorder()
        if rec is not None:
            rec.instances.append(instance)
        return instance

    body["from_config"] = classmethod(from_config)
    watched = type(cls.__name__, (cls, _Watched), body)
    _watched[cls] = watched
    return watched


def _provides(filters: list[type[Filter]]) -> SimpleNamespace:
    """A plugin object offering ``filters``."""

    @hookimpl
    def sluice_filters():
        return list(filters)

    return SimpleNamespace(sluice_filters=sluice_filters)


def _swapped(module: Any, cls: type[Filter], watched: type[Filter]) -> SimpleNamespace:
    """The plugin ``module`` again, with ``cls`` replaced by ``watched`` in
    what it offers; its other hooks unchanged."""
    marker = f"{GROUP}_impl"
    hooks = {}
    for name in dir(module):
        value = getattr(module, name, None)
        if callable(value) and getattr(value, marker, None) is not None:
            hooks[name] = value
    offered = hooks.get("sluice_filters")

    @hookimpl
    def sluice_filters():
        return [watched if c is cls else c for c in (offered() if offered else ())]

    hooks["sluice_filters"] = sluice_filters
    return SimpleNamespace(**hooks)


# -- the probes: local replies before and after the filter -----------------------

class _Probe(Filter):
    """Answers 418 when the request's ``x-sluice-contract`` header asks it;
    counts every exchange's ``on_complete`` (no await: the fast path)."""

    ask = ""

    async def on_request_headers(self, ctx, request):
        rec = _recorder()
        if rec is not None:
            rec.seen(ctx)
        if request.headers.get(_ASK) == self.ask:
            if rec is not None:
                rec.answered(self.name, ctx)
            return LocalReply(418, f"{self.name} answered\n", [(_ASK, self.name)])
        return None

    async def on_complete(self, ctx):
        rec = _recorder()
        if rec is not None:
            rec.complete(self.name, ctx)


class _Before(_Probe):
    name = "contract_before"
    ask = "reply-before"


class _After(_Probe):
    name = "contract_after"
    ask = "reply-after"
