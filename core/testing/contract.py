"""The filter-contract battery: one call in a plugin's tests checks a filter
against the contract of ``sluice.proxy.filters`` under every kind of
exchange a proxy meets.

(One module, and a long one: the rules, the watch on the filter, the
clients and the scenarios are read together whenever a scenario fails.)

    # tests/test_contract.py of a plugin
    from sluice.testing import contract
    import sluice_myplugin

    test_contract = contract.battery(
        "my_filter", settings={"limit": 3}, extra={"myplugin": sluice_myplugin},
        request_headers={"x-api-key": "k"},   # added to every request (to pass auth, say)
    )

``battery`` returns a pytest test function parametrised over ``SCENARIOS``
(ids like ``test_contract[chunked-request-body]``); pytest collects it under
the name it is bound to. It is a plain function that runs each scenario in
its own ``trio.run``, so it needs no async plugin and no fixture.
``check(filter, scenario, ...)`` runs one scenario directly and raises
``ContractViolation`` (an AssertionError) naming the filter, the scenario
and every rule broken.

The scenarios (``SCENARIOS``, in order): get, post, empty-body,
chunked-request-body, large-body (3 MiB streamed), request-trailers,
response-trailers, local-reply-before and local-reply-after (a probe
filter answers before or after the filter), upstream-refused (a closed
port), upstream-reset (RST), upstream-timeout (a route timeout of 0.3 s),
upstream-closed-mid-body, client-abort-request-body,
client-abort-response-body, cancellation (the proxy cancelled with three
exchanges in flight: waiting for the upstream, mid-upload, mid-download),
graceful-stop (the proxy stopped, and draining, with one in flight),
upstream-early-answer (the origin answers before reading the request
body), head, keep-alive (5 in turn on one connection) and concurrent (20
at once), each of the last two with its own id per request.

A scenario is real: an ``Origin`` on loopback, an in-process proxy
(``serve``) whose listener's chain is ``[contract_before, the filter,
contract_after, router]`` (the two probes answer locally when a request
asks them to; a filter declared ``first``, ``last`` or after the router
keeps its place), and real clients: httpx for the concurrent exchanges,
an h11 client on a trio socket elsewhere (it sees every byte, so a
response longer than its Content-Length is caught, where httpx would
silently drop the rest), and a bare socket to abort mid-body.

The rules, checked after every scenario (``ContractViolation`` names each
one broken, with the filter and the scenario):

- ``on_complete`` runs exactly once per exchange for the filter, aborted and
  cancelled exchanges included (an exchange is what the first probe's
  request phase or any watched ``on_complete`` saw, tagged in ``ctx.vars``),
  and ``on_response_headers`` at most once, whatever reply the core made;
- no exception escapes a phase: none raised through the battery's wrapper of
  each phase the filter overrides, no error-level sluice log event, no
  ``FE`` flag;
- no step blocks the loop: a ``trio.abc.Instrument`` times every task step
  of the proxy (the battery's own client and origin tasks excepted); one
  longer than ``block_threshold`` fails, naming the task, if it spent that
  long on the CPU or waited of its own accord (a sleep, blocking I/O), not
  when it was merely preempted on a busy machine. Automatic garbage
  collection is off while a scenario runs, so a collector pause is not
  blamed on the filter;
- framing stays correct: each response parses, its body is as long as its
  Content-Length with nothing after it, and each request the origin got
  holds as many bytes as its Content-Length says; with no body phase in
  the filter, the origin's echo comes back byte for byte;
- per-request state is released: once the proxy has stopped and
  ``gc.collect()`` ran, no ``Context`` of the scenario and no weakly
  referenceable ``ctx.state(filter)`` object is alive, and no container held
  by the filter instance grew with the number of requests;
- no state crosses requests: each of the keep-alive and concurrent
  exchanges gets its own response, and the origin gets each request as
  it was sent;
- every exchange ends: every client wait is bounded, and a hang fails;
- the scenario ran as designed: the core gave the answer the scenario
  provokes (a 503 for the closed port, ...) unless a filter answered
  itself, and a plain GET reaches the origin, so a filter refusing every
  request (an auth filter without ``request_headers``) fails instead of
  passing by testing nothing.

How the filter is watched: the plugin that provides it is registered again
(through ``extra``, which replaces an installed plugin of the same name)
with the filter replaced by a subclass that counts ``on_complete`` and
records what each overridden phase raises; nothing else changes, and an
``on_complete`` with no ``await`` stays one (the core runs such phases on a
faster path, and the battery must test that path).
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import itertools
import resource
import socket
import traceback
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter, thread_time
from types import SimpleNamespace
from typing import Any

import h11
import pytest
import trio
from structlog.testing import capture_logs

from ..control.registry import GROUP, Plugins
from ..hookspecs import hookimpl
from ..proxy.chain import never_suspends
from ..proxy.context import Context
from ..proxy.filters import PHASES, Filter, LocalReply, overrides
from .origin import Origin, Reply
from .plugin import merged
from .proxy import serve

__all__ = [
    "BLOCKED", "DESIGNED", "ENDED", "FRAMING", "HEAD_ONCE", "ISOLATED", "ONCE", "RAISED", "RELEASED", "SCENARIOS",
    "ContractViolation", "battery", "check",
]

# The rules, as failure messages name them.
ONCE = "on_complete runs exactly once"
HEAD_ONCE = "on_response_headers runs at most once"
RAISED = "no exception escapes a phase"
BLOCKED = "no step blocks the event loop"
FRAMING = "framing stays correct"
RELEASED = "per-request state is released"
ENDED = "every exchange ends"
ISOLATED = "no state crosses requests"
DESIGNED = "the scenario ran as designed"  # the battery's own check that it tested what it says

_WAIT = 6.0  # seconds any client wait may take before it counts as a hang
_RESPONSE_TIMEOUT = 4.0  # the origin cluster's: a request the proxy mis-framed ends in a 504, not a hang
_PREFIX = "/__contract/"
_ASK = "x-sluice-contract"  # the request header the probe filters answer to
_TOKEN = "sluice.contract"  # ctx.vars key: the exchange's number in the scenario
_HARNESS = "sluice-contract"  # task names of the battery's own clients and origin


class ContractViolation(AssertionError):
    """A filter broke the contract; the message lists every rule broken."""


# -- what a scenario observed ---------------------------------------------------

_RECORDER: contextvars.ContextVar[_Recorder] = contextvars.ContextVar("sluice_contract_recorder")


@dataclass
class _Exchange:
    target: str = "?"
    flags: list[str] = field(default_factory=list)
    error: str = ""
    answered: str = ""  # the filter whose phase returned a LocalReply (whatever its flag)
    buffered: bool = False  # a filter asked for a whole body: the core's buffer limits apply (413, 502)

    def __str__(self) -> str:
        return f"{self.target} (flags {self.flags or '-'}{', error ' + self.error if self.error else ''})"


class _Recorder:
    """What the watched filter and the probes saw, keyed by exchange number.

    Holds no Context (that would be a leak of its own): numbers, ids and
    strings only, and weak references to per-request state."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self._numbers = itertools.count(1)
        self.completes: dict[tuple[str, int], int] = {}
        self.response_heads: dict[int, int] = {}  # exchange -> on_response_headers calls
        self.exchanges: dict[int, _Exchange] = {}
        self.context_ids: set[int] = set()
        self.states: list[tuple[weakref.ref, str]] = []
        self.raised: list[str] = []
        self.instances: list[Filter] = []

    def number(self, ctx: Context) -> int:
        if _TOKEN not in ctx.vars:
            ctx.vars[_TOKEN] = next(self._numbers)
        return ctx.vars[_TOKEN]

    def seen(self, ctx: Context) -> None:
        """An exchange began (the first probe's request phase): it must complete."""
        exchange = self.exchanges.setdefault(self.number(ctx), _Exchange())
        exchange.target = f"{ctx.request.method} {ctx.request.target}"
        self.context_ids.add(id(ctx))

    def complete(self, who: str, ctx: Context) -> None:
        n = self.number(ctx)
        key = (who, n)
        self.completes[key] = self.completes.get(key, 0) + 1
        self.context_ids.add(id(ctx))
        request = ctx.request
        exchange = self.exchanges.setdefault(n, _Exchange())
        exchange.target = f"{request.method} {request.target}" if request is not None else "(no request)"
        exchange.flags = list(ctx.flags)
        exchange.error = repr(ctx.error) if ctx.error is not None else ""
        exchange.buffered = ctx.buffer_request or ctx.buffer_response

    def response_head(self, ctx: Context) -> None:
        n = self.number(ctx)
        self.response_heads[n] = self.response_heads.get(n, 0) + 1

    def answered(self, who: str, ctx: Context) -> None:
        self.exchanges.setdefault(self.number(ctx), _Exchange()).answered = who

    def keep_state(self, filter_: Filter, ctx: Context) -> None:
        # The states dict is the Context's own; reading it (rather than
        # ctx.state(), which would make one) sees only what the filter made.
        state = (ctx._states or {}).get(id(filter_))
        if state is None:
            return
        try:
            self.states.append((weakref.ref(state), type(state).__qualname__))
        except TypeError:
            pass  # a dict or list: it goes with its Context, which is checked

    def exception(self, phase: str, exc: BaseException) -> None:
        where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        at = f" at {where[0].filename}:{where[0].lineno}" if where else ""
        self.raised.append(f"{phase} raised {exc!r}{at}")


def _recorder() -> _Recorder | None:
    return _RECORDER.get(None)


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


# -- the battery -----------------------------------------------------------------

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


def battery(
    filter: str | type[Filter],
    *,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    request_headers: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    block_threshold: float = 0.1,
    plugins: list[str] | None = None,
    xfail: Mapping[str, str] | None = None,
) -> Callable[[str], None]:
    """A pytest test function running every scenario in ``SCENARIOS`` against ``filter``.

    ``filter`` is a filter name (found among the enabled plugins and
    ``extra``) or a class. ``settings`` are its ``[filters.NAME]`` table;
    ``config`` is merged over the battery's (dicts merge, other values
    replace; routes given there go after the battery's own two and replace
    its catch-all). ``plugins``: which installed plugins to load (None:
    all). ``xfail`` maps a scenario to the reason it is expected to fail
    (strictly: it must fail).
    """
    spec = _spec(filter, settings, extra, request_headers, config, block_threshold, plugins)
    unknown = set(xfail or ()) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"xfail names unknown scenarios {sorted(unknown)}; scenarios: {', '.join(SCENARIOS)}")
    params = [
        pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=(xfail or {})[name])]
                     if name in (xfail or {}) else [])
        for name in SCENARIOS
    ]

    @pytest.mark.parametrize("scenario", params)
    def test_contract(scenario: str) -> None:
        __tracebackhide__ = True  # pytest shows the violation's message, not the battery's insides
        _run(spec, scenario)

    test_contract.__doc__ = f"The filter contract, for filter {spec.name!r} (sluice.testing.contract)."
    return test_contract


def check(
    filter: str | type[Filter],
    scenario: str,
    *,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    request_headers: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    block_threshold: float = 0.1,
    plugins: list[str] | None = None,
) -> None:
    """Run one scenario against ``filter``; raise ContractViolation if a rule broke."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; scenarios: {', '.join(SCENARIOS)}")
    _run(_spec(filter, settings, extra, request_headers, config, block_threshold, plugins), scenario)


# -- running a scenario ----------------------------------------------------------

class _Steps(trio.abc.Instrument):
    """Times every task step; keeps the proxy's steps past the threshold.

    A step counts as blocking when it took longer than the threshold and
    either spent that long on the CPU or gave the CPU up of its own accord
    (a sleep, a blocking read: a voluntary context switch). A step that was
    only preempted, on a busy machine running other tests, is not the
    filter's doing and is not blamed on it."""

    def __init__(self, threshold: float, main: Any) -> None:
        self.threshold = threshold
        self.main = main
        self.longest: tuple[float, str] = (0.0, "")
        self.slow: list[tuple[float, float, str]] = []
        self._began: tuple[float, float, int] | None = None

    def before_task_step(self, task) -> None:
        self._began = (perf_counter(), thread_time(), _waits())

    def after_task_step(self, task) -> None:
        began, self._began = self._began, None
        if began is None or task is self.main:
            return
        took = perf_counter() - began[0]
        if took > self.longest[0] and not _harness(task):
            self.longest = (took, task.name)
        if took > self.threshold and not _harness(task):
            cpu = thread_time() - began[1]
            if cpu > self.threshold or _waits() > began[2]:
                self.slow.append((took, cpu, task.name))


def _waits() -> int:
    """Voluntary context switches of this thread so far."""
    return resource.getrusage(_THREAD).ru_nvcsw


_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


def _harness(task) -> bool:
    """Whether ``task`` is one of the battery's own (a client, the origin)."""
    while task is not None:
        if task.name.startswith(_HARNESS):
            return True
        nursery = task.parent_nursery
        task = nursery.parent_task if nursery is not None else None
    return False


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chain(cls: type[Filter]) -> list[str]:
    """The listener's chain: the filter between the probes, before the
    router unless it must come after it; a probe that its ordering leaves
    no room for (a filter declared ``first`` or ``last``) is left out."""
    if cls.name == "router":
        middle = ["router"]
    elif cls.last or "router" in cls.after:
        middle = ["router", cls.name]
    else:
        middle = [cls.name, "router"]
    before = [] if cls.first else [_Before.name]
    after = [] if cls.last else [_After.name]
    i = middle.index(cls.name) + 1
    return [*before, *middle[:i], *after, *middle[i:]]


def _config(spec: _Spec, cls: type[Filter], origin: Origin, refused: int) -> dict:
    user = dict(spec.config or {})
    routes = [
        {"match": {"prefix": _PREFIX + "timeout"}, "cluster": "origin", "timeout": 0.3},
        {"match": {"prefix": _PREFIX + "refused"}, "cluster": "refused"},
        *(user.pop("routes", None) or [{"match": {"prefix": "/"}, "cluster": "origin"}]),
    ]
    base = {
        "listeners": [{"address": "127.0.0.1:0", "filters": _chain(cls)}],
        "clusters": {
            "origin": {"endpoints": [origin.address], "response_timeout": _RESPONSE_TIMEOUT},
            "refused": {"endpoints": [f"127.0.0.1:{refused}"]},
        },
        "routes": routes,
        "filters": {spec.name: dict(spec.settings)} if spec.settings else {},
        "server": {"drain_timeout": 3.0},
    }
    return merged(base, user)


def _run(spec: _Spec, scenario: str) -> None:
    __tracebackhide__ = True
    cls, extra = spec.resolve()
    chain = _chain(cls)
    if scenario == "local-reply-before" and _Before.name not in chain:
        pytest.skip(f"filter {spec.name!r} is declared first: no filter can answer before it")
    if scenario == "local-reply-after" and _After.name not in chain:
        pytest.skip(f"filter {spec.name!r} is declared last: no filter can answer after it")
    run = _Run(spec, cls, scenario)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with capture_logs() as logs:
            trio.run(run.main, extra)
        errors = [_event(e) for e in logs if e.get("log_level") in ("error", "critical")]
        del logs  # their exc_info holds tracebacks, whose frames hold contexts
        run.verdict(errors)
    finally:
        if collecting:
            gc.enable()


def _event(entry: dict) -> str:
    exc = entry.get("exc_info")
    if isinstance(exc, BaseException):
        return f"{entry.get('event')!r}: {exc!r}"
    return repr(entry.get("event"))


@dataclass
class _Answer:
    """A response as the h11 client read it."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False  # its end arrived
    head: bool = False  # the answer to a HEAD: a Content-Length, no body
    problem: str = ""  # why it is not a well-framed response
    hung: bool = False

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class _Run:
    """One scenario: its proxy, origin and recorder, and what it found."""

    def __init__(self, spec: _Spec, cls: type[Filter], scenario: str) -> None:
        self.spec = spec
        self.cls = cls
        self.scenario = scenario
        self.recorder = _Recorder(cls.name)
        self.origin = Origin()
        self.violations: list[tuple[str, str]] = []
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.steps: _Steps | None = None
        self._proxy_scope = trio.CancelScope()
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.baseline: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.exchanges_before = 0
        self.later: list[Callable[[], None]] = []  # checks for after the proxy stopped
        # Does the filter leave bodies alone? Then what comes back is what went.
        self.body_phases = any(overrides(cls, p) for p in ("on_request_body", "on_response_body"))

    def violate(self, rule: str, detail: str) -> None:
        self.violations.append((rule, detail))

    # -- the run ---------------------------------------------------------

    async def main(self, extra: dict) -> None:
        _RECORDER.set(self.recorder)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.origin.serve, name=f"{_HARNESS}-origin")
            config = _config(self.spec, self.cls, self.origin, _closed_port())
            self.address = await nursery.start(self._proxy, config, extra)
            # Imports and first connections happen here, untimed; and a filter
            # refusing this plain GET would make every scenario test nothing.
            warm = await self.request("GET", _PREFIX + "warm-up")

            def warmed() -> None:
                target = f"GET {_PREFIX}warm-up"
                if warm.status != 200 and not warm.hung and not self.failed(target):
                    by = {e.answered for e in self.recorder.exchanges.values() if e.target == target} - {""}
                    self.violate(DESIGNED, f"a plain GET got {warm.status}, not the origin's 200"
                                           f"{' (answered by ' + ', '.join(sorted(by)) + ')' if by else ''}: the "
                                           "scenarios would not test what they mean to (pass request_headers or "
                                           "settings that let a plain GET through)")
            self.later.append(warmed)
            self.baseline = self._sizes()
            self.exchanges_before = len(self.recorder.exchanges)
            self.steps = _Steps(self.spec.block_threshold, trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(self.steps)
            try:
                await SCENARIOS[self.scenario](self)
                self._stop.set()
                with trio.move_on_after(_WAIT) as waited:
                    await self._stopped.wait()
                if waited.cancelled_caught:
                    self.violate(ENDED, f"the proxy did not drain within {_WAIT} s of being stopped")
                    self._proxy_scope.cancel()
            finally:
                trio.lowlevel.remove_instrument(self.steps)
            self.sizes = self._sizes()
            self.origin.close()

    async def _proxy(self, config: dict, extra: dict, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._proxy_scope:
                async with serve(config, plugins=self.spec.plugins, extra=extra) as proxy:
                    task_status.started(proxy.address)
                    await self._stop.wait()
        finally:
            self._stopped.set()

    def stop_proxy(self) -> None:
        """Stop the proxy gracefully: it drains what is in flight."""
        self._stop.set()

    def cancel_proxy(self) -> None:
        """Cancel the proxy with whatever is in flight (not a graceful stop)."""
        self._proxy_scope.cancel()

    def _sizes(self) -> dict[str, int]:
        sizes = {}
        for instance in self.recorder.instances:
            for attr, value in getattr(instance, "__dict__", {}).items():
                if isinstance(value, (list, dict, set, frozenset, bytearray)) or (
                        hasattr(value, "__len__") and type(value).__name__ == "deque"):
                    sizes[f"{type(instance).__name__}.{attr}"] = len(value)
        return sizes

    # -- clients ---------------------------------------------------------

    def headers(self, *more: tuple[str, str]) -> list[tuple[str, str]]:
        return [("host", "contract.test"), *self.spec.request_headers, *more]

    async def request(
        self, method: str, target: str, body: bytes | list[bytes] = b"", *,
        chunked: bool = False, trailers: list[tuple[str, str]] | None = None,
        headers: list[tuple[str, str]] = (), cut: bool = False,
    ) -> _Answer:
        """One exchange on its own connection (``connection: close``), read
        byte-exactly; unless ``cut`` (the scenario cuts the response), a
        response that is not well framed is a violation."""
        answer = _Answer(head=method == "HEAD")
        with trio.move_on_after(_WAIT) as waited:
            await self._exchange(method, target, body, chunked, trailers, list(headers), answer)
        if waited.cancelled_caught:
            answer.hung = True
            self.violate(ENDED, f"{method} {target}: no complete response within {_WAIT} s")
        elif answer.problem and not cut:
            self.violate(FRAMING, f"{method} {target}: {answer.problem}")
        return answer

    async def _exchange(self, method, target, body, chunked, trailers, headers, answer: _Answer) -> None:
        chunks = body if isinstance(body, list) else [body]
        fields = self.headers(*headers, ("connection", "close"))
        if chunked or trailers:
            fields.append(("transfer-encoding", "chunked"))
        elif method not in ("GET", "HEAD") or any(chunks):
            fields.append(("content-length", str(sum(map(len, chunks)))))
        conn = h11.Connection(h11.CLIENT)
        stream = await trio.open_tcp_stream(*self.address)
        async with stream:
            try:
                await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=fields)))
                for chunk in chunks:
                    if chunk:
                        await stream.send_all(conn.send(h11.Data(data=chunk)))
                await stream.send_all(conn.send(h11.EndOfMessage(headers=trailers or [])))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # answered (and closed) before the body went: read what came
            await _read_answer(stream, conn, answer)

    # -- checks ----------------------------------------------------------

    def check_echo(self, answer: _Answer, sent: bytes, what: str) -> None:
        """The origin echoes: with no body phase in the filter, the body must come back whole."""
        if not self.body_phases and answer.status == 200 and answer.complete and answer.body != sent:
            self.violate(FRAMING, f"{what}: sent {len(sent)} bytes, the echo came back as "
                                  f"{len(answer.body)} though the filter has no body phase")

    def failed(self, target: str) -> bool:
        """Whether the exchange for ``target`` failed with FE (reported as such)."""
        return any("FE" in e.flags for e in self.recorder.exchanges.values() if e.target == target)

    def answered(self, target: str) -> bool:
        """Whether a filter answered the exchange for ``target`` itself."""
        return any(e.answered for e in self.recorder.exchanges.values() if e.target == target)

    def expect(self, answer: _Answer, status: int, target: str) -> None:
        """Once the proxy has stopped: the client got the core's ``status``
        for ``target``, unless a filter answered it; else the battery did not
        test what it says it did, most often because the filter refused its
        requests (give it the ``request_headers`` that pass it)."""
        def check() -> None:
            if answer.status == status or answer.hung or self.answered(target) or self.failed(target):
                return
            if self.buffered(target) and answer.status in (413, 502):
                return  # a body over the buffer limit, or an upstream failing before the buffered answer went
            hint = " (does the filter refuse the battery's requests? see request_headers)" \
                if answer.status is not None and 400 <= answer.status < 500 else ""
            self.violate(DESIGNED, f"{target}: expected a {status} from the core, got {answer.status}{hint}")
        self.later.append(check)

    def expect_ending(self, target: str, how: Callable[[_Exchange], bool], what: str) -> None:
        """Once the proxy has stopped: the exchange for ``target`` ended as the
        scenario meant (``how``), unless a filter answered it."""
        def check() -> None:
            ended = [e for e in self.recorder.exchanges.values() if e.target == target]
            if not ended:
                self.violate(DESIGNED, f"{target}: no exchange for it completed")
            elif not any(how(e) or e.answered for e in ended):
                self.violate(DESIGNED, f"{target}: meant to end {what}, it ended {ended[0]}")
        self.later.append(check)

    def check_origin(self, path: str) -> None:
        """Once the proxy has stopped: each request the origin got on ``path``
        (or under it, for one ending in ``/``) arrived whole, as its framing
        declared, unless a filter answered it or it failed (the core then
        abandons what it had begun to send)."""
        def check() -> None:
            for r in self.origin.requests:
                if r.path != path and not (path.endswith("/") and r.path.startswith(path)):
                    continue
                target = f"{r.method} {r.target}"
                if r.complete or self.answered(target) or self.failed(target):
                    continue
                framing = r.header("content-length") or r.header("transfer-encoding")
                self.violate(FRAMING, f"the origin got {target} cut short: {len(r.body)} body bytes, "
                                      f"framed as {framing!r}")
        self.later.append(check)

    def plain(self, target: str, phase: str) -> bool:
        """Whether the exchange for ``target`` went through untouched where
        ``phase`` is concerned: the filter does not override it, answered
        nothing and buffered nothing (a whole body carries no trailers)."""
        return not (overrides(self.cls, phase) or self.answered(target) or self.failed(target)
                    or self.buffered(target))

    def buffered(self, target: str) -> bool:
        """Whether a filter asked for a whole body of the exchange for ``target``."""
        return any(e.buffered for e in self.recorder.exchanges.values() if e.target == target)

    def verdict(self, errors: list[str]) -> None:
        __tracebackhide__ = True
        rec = self.recorder
        name = self.cls.name
        for check in self.later:
            check()
        if not rec.instances:
            self.violate(ONCE, f"the proxy never built filter {name!r} through the battery's watch "
                               "(does its from_config build another class without calling the base?)")
        for n, exchange in sorted(rec.exchanges.items()):
            times = rec.completes.get((name, n), 0)
            if times != 1:
                self.violate(ONCE, f"on_complete ran {times} times for exchange #{n}: {exchange}")
            heads = rec.response_heads.get(n, 0)
            if heads > 1:
                self.violate(HEAD_ONCE, f"on_response_headers ran {heads} times for exchange #{n}: {exchange}")
            if "FE" in exchange.flags:
                self.violate(RAISED, f"exchange #{n} failed with flag FE (a filter raised, or broke the "
                                     f"framing): {exchange}")
                if "content-length" in exchange.error.lower():  # the core refused to send a mis-framed body
                    self.violate(FRAMING, f"exchange #{n}: a body phase changed the body's size but not its "
                                          f"Content-Length: {exchange}")
        for raised in dict.fromkeys(rec.raised):
            self.violate(RAISED, raised)
        for event in dict.fromkeys(errors):
            self.violate(RAISED, f"sluice logged the error {event}")
        if self.steps is not None:
            for took, cpu, task in self.steps.slow[:3]:
                self.violate(BLOCKED, f"a step of task {task!r} took {took * 1000:.0f} ms, {cpu * 1000:.0f} ms "
                                      f"of it on the CPU (block_threshold {self.spec.block_threshold * 1000:.0f} ms)")
        exchanges = len(rec.exchanges) - self.exchanges_before
        if exchanges >= 10:
            for attr, size in self.sizes.items():
                grew = size - self.baseline.get(attr, 0)
                if grew >= exchanges // 2:
                    self.violate(RELEASED, f"{attr} grew by {grew} over {exchanges} exchanges "
                                           "(and stayed so after the proxy stopped)")
        self.recorder = None  # nothing of ours holds the scenario's objects now
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if type(o) is Context and id(o) in rec.context_ids)
        if alive:
            self.violate(RELEASED, f"{alive} of the scenario's {len(rec.context_ids)} request contexts are still "
                                   "alive after the proxy stopped (held by the filter?)")
        kept = [kind for ref, kind in rec.states if ref() is not None]
        if kept:
            self.violate(RELEASED, f"{len(kept)} per-request state objects ({kept[0]}) are still alive "
                                   "after their exchanges ended")
        if self.violations:
            order = [ONCE, HEAD_ONCE, RAISED, BLOCKED, FRAMING, RELEASED, ISOLATED, ENDED, DESIGNED]
            ranked = sorted(self.violations, key=lambda v: order.index(v[0]) if v[0] in order else len(order))
            lines = [f"  - {rule}: {detail}" for rule, detail in ranked]
            steps = self.steps.longest if self.steps is not None else (0.0, "")
            raise ContractViolation(
                f"filter {name!r} broke the contract in scenario {self.scenario!r}:\n" + "\n".join(lines)
                + f"\n  (longest proxy step: {steps[0] * 1000:.1f} ms in task {steps[1]!r})")


async def _read_answer(stream: trio.SocketStream, conn: h11.Connection, answer: _Answer) -> None:
    """Read one response into ``answer``: its parts, and what is wrong with its framing."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    answer.problem = f"the connection broke before the response ended ({exc!r})"
                    return
                if not data and answer.status is None:
                    answer.problem = "the proxy closed the connection without a response"
                    return
                conn.receive_data(data)
            elif type(event) is h11.Response:
                answer.status = event.status_code
                answer.headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
            elif type(event) is h11.Data:
                answer.body += event.data
            elif type(event) is h11.EndOfMessage:
                answer.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                answer.complete = True
                break
            elif type(event) is h11.ConnectionClosed:
                answer.problem = "the connection closed before any response"
                return
    except h11.RemoteProtocolError as exc:
        if answer.status is None:
            answer.problem = f"the response head does not parse ({exc})"
        else:
            length = answer.header("content-length")
            answer.problem = (f"the connection closed {len(answer.body)} body bytes into a {answer.status} "
                              f"response whose Content-Length is {length}" if length is not None else
                              f"the {answer.status} response's body does not parse or ended early ({exc})")
        return
    rest = bytearray(conn.trailing_data[0])
    try:
        while data := await stream.receive_some(65536):
            rest += data
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    length = answer.header("content-length")
    if rest:
        answer.problem = (f"{len(rest)} bytes followed the end of the response ({bytes(rest[:40])!r}); "
                          f"its Content-Length is {length}, {len(answer.body)} body bytes before them")
    elif length is not None and length.isdigit() and int(length) != len(answer.body) and not answer.head:
        answer.problem = f"Content-Length {length} but {len(answer.body)} body bytes"


# -- the scenarios -------------------------------------------------------------

Scenario = Callable[[_Run], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def _scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn
    return register


async def _until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return True
    return False


@_scenario("get")
async def _get(run: _Run) -> None:
    run.expect(await run.request("GET", _PREFIX + "get?q=1"), 200, "GET /__contract/get?q=1")


@_scenario("post")
async def _post(run: _Run) -> None:
    body = b"a request body, framed by its length\n" * 20
    answer = await run.request("POST", _PREFIX + "post", body)
    run.expect(answer, 200, "POST /__contract/post")
    run.check_echo(answer, body, "POST /__contract/post")
    run.check_origin(_PREFIX + "post")


@_scenario("empty-body")
async def _empty(run: _Run) -> None:
    run.expect(await run.request("POST", _PREFIX + "empty", b""), 200, "POST /__contract/empty")
    run.check_origin(_PREFIX + "empty")


@_scenario("chunked-request-body")
async def _chunked(run: _Run) -> None:
    chunks = [b"chunk %d of a chunked body\n" % i for i in range(8)]
    answer = await run.request("POST", _PREFIX + "chunked", chunks, chunked=True)
    run.expect(answer, 200, "POST /__contract/chunked")
    run.check_echo(answer, b"".join(chunks), "POST /__contract/chunked")
    run.check_origin(_PREFIX + "chunked")


@_scenario("large-body")
async def _large(run: _Run) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    chunks = [piece] * 48  # 3 MiB, written as it streams
    answer = await run.request("PUT", _PREFIX + "large", chunks)
    run.expect(answer, 200, "PUT /__contract/large")
    run.check_echo(answer, b"".join(chunks), "PUT /__contract/large (3 MiB)")
    run.check_origin(_PREFIX + "large")


@_scenario("request-trailers")
async def _request_trailers(run: _Run) -> None:
    answer = await run.request("POST", _PREFIX + "request-trailers", [b"with ", b"trailers\n"],
                               trailers=[("x-contract-trailer", "sent")])
    target = "POST /__contract/request-trailers"
    run.expect(answer, 200, target)
    run.check_origin(_PREFIX + "request-trailers")

    def check() -> None:
        got = [r.trailers for r in run.origin.requests if f"{r.method} {r.target}" == target]
        if got and ("x-contract-trailer", "sent") not in got[0] and run.plain(target, "on_request_trailers"):
            run.violate(FRAMING, f"{target}: the origin got trailers {got[0]}, not the client's")
    run.later.append(check)


@_scenario("response-trailers")
async def _response_trailers(run: _Run) -> None:
    run.origin.script(_PREFIX + "response-trailers",
                      Reply(body=[b"answered ", b"with trailers\n"], trailers=[("x-contract-trailer", "answered")]))
    answer = await run.request("GET", _PREFIX + "response-trailers", headers=[("te", "trailers")])
    target = "GET /__contract/response-trailers"
    run.expect(answer, 200, target)

    def check() -> None:
        if answer.complete and answer.status == 200 and ("x-contract-trailer", "answered") not in answer.trailers \
                and run.plain(target, "on_response_trailers"):
            run.violate(FRAMING, f"{target}: the client got trailers {answer.trailers}, not the origin's")
    run.later.append(check)


async def _local_reply(run: _Run, ask: str, probe: str) -> None:
    path = _PREFIX + ask
    await run.request("POST", path, b"never forwarded\n", headers=[(_ASK, ask)])

    def check() -> None:
        who = {e.answered for e in run.recorder.exchanges.values() if e.target == f"POST {path}"} - {""}
        if not who & {probe, run.cls.name}:
            run.violate(DESIGNED, f"POST {path}: meant to be answered by {probe}, "
                                  f"answered by {', '.join(sorted(who)) or 'no filter'}")
    run.later.append(check)
    if any(r.path == path for r in run.origin.requests):
        run.violate(DESIGNED, f"POST {path}: answered locally by a filter, it still reached the origin")


@_scenario("local-reply-before")
async def _reply_before(run: _Run) -> None:
    await _local_reply(run, "reply-before", _Before.name)


@_scenario("local-reply-after")
async def _reply_after(run: _Run) -> None:
    await _local_reply(run, "reply-after", _After.name)


@_scenario("upstream-refused")
async def _refused(run: _Run) -> None:
    run.expect(await run.request("GET", _PREFIX + "refused"), 503, "GET /__contract/refused")


@_scenario("upstream-reset")
async def _reset(run: _Run) -> None:
    run.origin.script(_PREFIX + "reset", Reply(reset=True))
    run.expect(await run.request("POST", _PREFIX + "reset", b"reset me\n"), 502, "POST /__contract/reset")


@_scenario("upstream-timeout")
async def _timeout(run: _Run) -> None:
    run.origin.script(_PREFIX + "timeout", Reply(hang=True))
    run.expect(await run.request("GET", _PREFIX + "timeout"), 504, "GET /__contract/timeout")


@_scenario("upstream-closed-mid-body")
async def _closed_mid_body(run: _Run) -> None:
    run.origin.script(_PREFIX + "cut", Reply(body=[b"z" * 8192] * 8, close_after=10_000))
    answer = await run.request("GET", _PREFIX + "cut", cut=True)
    run.expect(answer, 200, "GET /__contract/cut")

    def check() -> None:
        if answer.complete and not run.answered("GET /__contract/cut") and not run.buffered("GET /__contract/cut"):
            run.violate(DESIGNED, "GET /__contract/cut: the origin closed mid-body, yet the client got it whole")
    run.later.append(check)


@_scenario("client-abort-request-body")
async def _abort_upload(run: _Run) -> None:
    path = _PREFIX + "abort-upload"
    head = _head("POST", path, run.headers(("content-length", "1000000")))
    stream = await trio.open_tcp_stream(*run.address)
    async with stream:
        await stream.send_all(head + b"u" * 65536)
        # Until the origin sees body bytes (or a filter answered, or a second
        # passes: a filter holds them), then leave.
        await _until(lambda: any(r.path == path and r.body for r in run.origin.requests)
                     or run.answered(f"POST {path}"), 1.0)
    run.expect_ending(f"POST {path}", lambda e: "DC" in e.flags, "with flag DC (the client went away)")


@_scenario("client-abort-response-body")
async def _abort_download(run: _Run) -> None:
    path = _PREFIX + "abort-download"
    run.origin.script(path, Reply(body=[b"d" * 16384] * 64, chunk_delay=0.005))
    stream = await trio.open_tcp_stream(*run.address)
    async with stream:
        await stream.send_all(_head("GET", path, run.headers(("connection", "close"))))
        received = b""
        with trio.move_on_after(_WAIT) as waited:
            while b"\r\n\r\n" not in received or len(received) < 20_000:
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
        if waited.cancelled_caught:
            run.violate(ENDED, f"GET {path}: no response body within {_WAIT} s")
    run.expect_ending(f"GET {path}", lambda e: "DC" in e.flags, "with flag DC (the client went away)")


@_scenario("cancellation")
async def _cancellation(run: _Run) -> None:
    """Three exchanges in flight when the proxy is cancelled: one waiting for
    the upstream's answer, one mid-upload, one mid-download."""
    waiting, upload, download = (_PREFIX + p for p in ("in-flight", "in-flight-upload", "in-flight-download"))
    run.origin.script(waiting, Reply(hang=True))
    # 480 KiB over 1.2 s: still streaming when cancelled, and within a buffering filter's limit.
    run.origin.script(download, Reply(body=[b"d" * 8192] * 60, chunk_delay=0.02))
    received = bytearray()

    async def downloading() -> None:
        with trio.move_on_after(_WAIT):
            async with await trio.open_tcp_stream(*run.address) as stream:
                await stream.send_all(_head("GET", download, run.headers()))
                with contextlib.suppress(trio.BrokenResourceError):
                    while data := await stream.receive_some(65536):  # until the proxy goes away
                        received.extend(data)

    def reached(path: str, body: bool = False) -> bool:
        return any(r.path == path and (r.body or not body) for r in run.origin.requests)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run.request, "POST", waiting, b"in flight\n", cut=True), name=f"{_HARNESS}-client")
        nursery.start_soon(downloading, name=f"{_HARNESS}-client-download")
        async with await trio.open_tcp_stream(*run.address) as up:
            await up.send_all(_head("POST", upload, run.headers(("content-length", "1000000"))) + b"u" * 65536)
            if not await _until(lambda: (reached(waiting) or run.answered(f"POST {waiting}"))
                                and (reached(download) or run.answered(f"GET {download}"))):
                run.violate(ENDED, f"{waiting} and {download} did not both reach the origin within 2 s")
            # Until the upload's body reaches the origin and the download's the
            # client; a filter buffering either holds it in the proxy: in flight too.
            await _until(lambda: reached(upload, body=True) or run.answered(f"POST {upload}"), 0.5)
            await _until(lambda: len(received) > 20_000, 0.5)
            run.cancel_proxy()
            with trio.move_on_after(_WAIT), contextlib.suppress(trio.BrokenResourceError):
                await up.receive_some(65536)  # until the proxy going away closes it
    cancelled = "cancelled (ctx.error a trio.Cancelled)"
    for target in (f"POST {waiting}", f"POST {upload}", f"GET {download}"):
        run.expect_ending(target, lambda e: "Cancelled" in e.error, cancelled)


@_scenario("graceful-stop")
async def _graceful_stop(run: _Run) -> None:
    """The proxy told to stop while an exchange waits for a slow upstream: it drains, the client gets its answer."""
    path = _PREFIX + "draining"
    run.origin.script(path, Reply(delay=0.2))
    answers: list[_Answer] = []

    async def client() -> None:
        answers.append(await run.request("GET", path))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, name=f"{_HARNESS}-client")
        if await _until(lambda: any(r.path == path for r in run.origin.requests) or run.answered(f"GET {path}")):
            run.stop_proxy()
        else:
            run.violate(ENDED, f"GET {path} never reached the origin")
    if answers:
        run.expect(answers[0], 200, f"GET {path}")


@_scenario("upstream-early-answer")
async def _early(run: _Run) -> None:
    path = _PREFIX + "early"
    run.origin.script(path, Reply(early=True, body=b"answered before the body\n"))
    body = b"e" * 16384  # under the core's drain limit: the connection may even stay open
    run.expect(await run.request("POST", path, body), 200, f"POST {path}")


@_scenario("head")
async def _head_request(run: _Run) -> None:
    run.origin.script(_PREFIX + "head", Reply(body=b"a body a HEAD does not get\n"))
    run.expect(await run.request("HEAD", _PREFIX + "head"), 200, "HEAD /__contract/head")


async def _numbered(run: _Run, kind: str, count: int, limits: Any = None) -> None:
    """``count`` POSTs to ``/__contract/KIND/i`` through one httpx client, all at
    once or (``limits``: one connection) one after another on a kept-alive
    connection; each response must be its own request's."""
    import httpx  # the kit's test extra; imported here so the battery module loads without it

    prefix = f"{_PREFIX}{kind}/"
    for i in range(count):
        run.origin.script(f"{prefix}{i}", Reply(headers=[("x-contract-id", str(i))]))
    answers: dict[int, httpx.Response | BaseException] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        try:
            answers[i] = await client.post(f"{prefix}{i}", content=f"exchange {i}\n".encode(),
                                           headers={**dict(run.spec.request_headers), "x-contract-id": str(i)})
        except httpx.HTTPError as exc:
            answers[i] = exc

    host, port = run.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=_WAIT,
                                 limits=limits or httpx.Limits()) as client:
        if limits is None:
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, client, i, name=f"{_HARNESS}-client-{i}")
        else:
            for i in range(count):
                await one(client, i)
    for i in range(count):
        answer = answers.get(i)
        if not isinstance(answer, httpx.Response):
            run.violate(ENDED, f"{kind} exchange {i} failed: {answer!r}")
            continue
        got = answer.headers.get("x-contract-id")
        if answer.status_code == 200 and got != str(i):
            run.violate(ISOLATED, f"{kind} exchange {i} got the response of exchange {got}")
        sent = f"exchange {i}\n".encode()
        if answer.status_code == 200 and not run.body_phases and answer.content != sent:
            run.violate(ISOLATED, f"{kind} exchange {i} got the body {answer.content[:40]!r}")
    for r in run.origin.requests:
        if r.path.startswith(prefix) and r.header("x-contract-id") != r.path.rsplit("/", 1)[1]:
            run.violate(ISOLATED, f"the origin got {r.path} with x-contract-id {r.header('x-contract-id')}")
    run.check_origin(prefix)


@_scenario("keep-alive")
async def _keep_alive(run: _Run) -> None:
    import httpx

    await _numbered(run, "keep-alive", 5, httpx.Limits(max_connections=1, max_keepalive_connections=1))


@_scenario("concurrent")
async def _concurrent(run: _Run) -> None:
    await _numbered(run, "concurrent", 20)


def _head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
