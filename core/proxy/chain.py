"""A listener's filter chain, compiled once at load, and its phase runners.

Compiling keeps, for each phase, only the bound methods of filters that
override it, so a filter costs nothing in the phases it leaves alone. Response
phases are stored in reverse chain order with each filter's position, so a
local reply from filter *i* runs back through filters ``0..i-1`` only.

While metrics are on (``sluice.metrics.timing``) the runners time each phase
call and add it to ``ctx.filter_time[(filter name, phase)]``; each phase's
entry carries that key, made once here, so timing costs two clock reads and
a dict update per call, and nothing when metrics are off.
"""

from __future__ import annotations

import dis
import inspect
from collections.abc import Sequence
from time import perf_counter
from typing import Any

from .. import metrics
from .filters import CONTINUE, Filter, LocalReply, overrides

__all__ = ["Chain", "FilterResultError", "filter_time", "never_suspends"]

# What an ``async def`` body compiles to wherever it may give control away.
_SUSPENDING = frozenset({
    "GET_AWAITABLE", "YIELD_VALUE", "SEND", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT",
})


def never_suspends(fn: Any) -> bool:
    """Whether ``fn`` is an ``async def`` whose body has no ``await``, ``async
    for`` or ``async with``: calling it and sending ``None`` runs it to its end.
    Anything else (a wrapper returning another coroutine, say) is assumed to
    suspend."""
    func = getattr(fn, "__func__", fn)
    if not inspect.iscoroutinefunction(func) or not hasattr(func, "__code__"):
        return False
    return not any(op.opname in _SUSPENDING for op in dis.get_instructions(func))


def filter_time(ctx) -> dict[tuple[str, str], float]:
    """The request's time per (filter, phase), made on first use."""
    spent = ctx.filter_time
    if spent is None:
        spent = ctx.filter_time = {}
    return spent


class FilterResultError(TypeError):
    """A phase returned something that is not a flow result."""


def _bad_result(fn: Any, result: Any) -> FilterResultError:
    owner = type(fn.__self__).__name__
    return FilterResultError(
        f"{owner}.{fn.__name__} returned {result!r}; "
        "return sluice.CONTINUE or a sluice.LocalReply"
    )


class Chain:
    """The compiled, ordered filter list of one listener."""

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = list(filters)
        indexed = list(enumerate(self.filters))

        def forward(phase: str) -> list[tuple[int, Any, tuple[str, str]]]:
            # (position, bound method, its key in ctx.filter_time)
            return [(i, getattr(f, phase), (f.name, phase[3:])) for i, f in indexed if overrides(f, phase)]

        self.request_headers = forward("on_request_headers")
        self.request_body = forward("on_request_body")
        self.request_trailers = forward("on_request_trailers")
        self.response_headers = forward("on_response_headers")[::-1]
        self.response_body = forward("on_response_body")[::-1]
        self.response_trailers = forward("on_response_trailers")[::-1]
        completing = forward("on_complete")
        self.complete = [fn for _, fn, _ in completing]
        self.complete_keys = [key for _, _, key in completing]
        # Most on_complete phases (an access log line) have no await at all:
        # then none can suspend, so none can be cancelled, and the exchange
        # runs them without the shielded scope it otherwise needs. That scope
        # cost ~13 us a request, a shield plus its deadline ~23 us: a fifth of
        # the default chain's Python (benchmarks/exchange_cost.py).
        self.complete_never_suspends = all(never_suspends(fn) for fn in self.complete)
        resolvers = [f.resolve_route for f in self.filters if hasattr(f, "resolve_route")]
        self.resolver = resolvers[0] if resolvers else None
        self._variants: dict[frozenset[str], Chain] = {}
        self.active = 0  # exchanges running on it (a reload closes its filters at 0)

    def names(self) -> list[str]:
        return [f.name for f in self.filters]

    def without(self, names: frozenset[str]) -> Chain:
        """This chain minus some filters (a route disabled them); cached."""
        if not names:
            return self
        variant = self._variants.get(names)
        if variant is None:
            variant = Chain([f for f in self.filters if f.name not in names])
            variant.resolver = self.resolver
            self._variants[names] = variant
        return variant

    # -- runners -----------------------------------------------------------
    # Each returns a LocalReply to short-circuit, or None / the chunk to go on.
    # ``limit`` is the position of the filter that answered locally (response
    # path only runs filters before it); len(filters) when nobody did.

    @staticmethod
    async def run_heads(phases, ctx, message, limit: int) -> tuple[int, LocalReply] | None:
        spent = filter_time(ctx) if metrics.timing and phases else None
        for i, fn, key in phases:
            if i >= limit:
                continue
            if spent is None:
                result = await fn(ctx, message)
            else:
                began = perf_counter()
                result = await fn(ctx, message)
                spent[key] = spent.get(key, 0.0) + perf_counter() - began
            if result is None or result is CONTINUE:
                continue
            if type(result) is LocalReply:
                return i, result
            raise _bad_result(fn, result)
        return None

    @staticmethod
    async def run_body(phases, ctx, chunk: bytes, end: bool, limit: int) -> bytes | LocalReply:
        spent = filter_time(ctx) if metrics.timing and phases else None
        for i, fn, key in phases:
            if i >= limit:
                continue
            if spent is None:
                result = await fn(ctx, chunk, end)
            else:
                began = perf_counter()
                result = await fn(ctx, chunk, end)
                spent[key] = spent.get(key, 0.0) + perf_counter() - began
            if result is None or result is CONTINUE:
                continue
            if type(result) is bytes:
                chunk = result
            elif type(result) is LocalReply:
                return result
            else:
                raise _bad_result(fn, result)
        return chunk
