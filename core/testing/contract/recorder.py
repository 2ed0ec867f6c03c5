"""What a scenario observed: the exchanges, and what the watched filter and
the probes saw of each, keyed by the exchange's number.

The recorder of the running scenario is found through a context variable,
so the watched filter and the probes (built by the proxy, not by the
battery) reach it without holding it.
"""

from __future__ import annotations

import contextvars
import itertools
import traceback
import weakref
from dataclasses import dataclass, field

from ...proxy.context import Context
from ...proxy.filters import Filter

_TOKEN = "sluice.contract"  # ctx.vars key: the exchange's number in the scenario

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


