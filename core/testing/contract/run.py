"""Running one scenario: its origin, its proxy, its recorder and what it found.

A scenario is real: an ``Origin`` on loopback, an in-process proxy
(``serve``) whose listener's chain is ``[contract_before, the filter,
contract_after, router]`` (the two probes answer locally when a request
asks them to; a filter declared ``first``, ``last`` or after the router
keeps its place), and real clients (``clients``). Each scenario runs in
its own ``trio.run``, with automatic garbage collection off, then
``rules.verdict`` judges what it recorded.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable

import pytest
import trio
from structlog.testing import capture_logs

from ...proxy.filters import Filter, overrides
from ..origin import Origin
from ..plugin import merged
from ..proxy import serve
from .clients import _WAIT, _Answer, _exchange
from .instrument import _HARNESS, _Steps
from .probes import _After, _Before
from .recorder import _RECORDER, _Exchange, _Recorder
from .rules import DESIGNED, ENDED, FRAMING, verdict
from .scenarios import _PREFIX, SCENARIOS
from .spec import _Spec

_RESPONSE_TIMEOUT = 4.0  # the origin cluster's: a request the proxy mis-framed ends in a 504, not a hang


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
    user = dict(spec.options.config or {})
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
        "filters": {spec.name: dict(spec.options.settings)} if spec.options.settings else {},
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
        verdict(run, errors)
    finally:
        if collecting:
            gc.enable()


def _event(entry: dict) -> str:
    exc = entry.get("exc_info")
    if isinstance(exc, BaseException):
        return f"{entry.get('event')!r}: {exc!r}"
    return repr(entry.get("event"))


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
            self.steps = _Steps(self.spec.options.block_threshold, trio.lowlevel.current_task())
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
                async with serve(config, plugins=self.spec.options.plugins, extra=extra) as proxy:
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
        return [("host", "contract.test"), *self.spec.options.request_headers, *more]

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
            await _exchange(self.address, method, target, body, chunked, trailers,
                            self.headers(*headers, ("connection", "close")), answer)
        if waited.cancelled_caught:
            answer.hung = True
            self.violate(ENDED, f"{method} {target}: no complete response within {_WAIT} s")
        elif answer.problem and not cut:
            self.violate(FRAMING, f"{method} {target}: {answer.problem}")
        return answer


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
