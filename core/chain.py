"""A listener's filter chain, compiled once at load, and its phase runners.

Compiling keeps, for each phase, only the bound methods of filters that
override it, so a filter costs nothing in the phases it leaves alone. Response
phases are stored in reverse chain order with each filter's position, so a
local reply from filter *i* runs back through filters ``0..i-1`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .filters import CONTINUE, Filter, LocalReply, overrides

__all__ = ["Chain", "FilterResultError"]


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

        def forward(phase: str) -> list[tuple[int, Any]]:
            return [(i, getattr(f, phase)) for i, f in indexed if overrides(f, phase)]

        self.request_headers = forward("on_request_headers")
        self.request_body = forward("on_request_body")
        self.request_trailers = forward("on_request_trailers")
        self.response_headers = forward("on_response_headers")[::-1]
        self.response_body = forward("on_response_body")[::-1]
        self.response_trailers = forward("on_response_trailers")[::-1]
        self.complete = [fn for _, fn in forward("on_complete")]
        resolvers = [f.resolve_route for f in self.filters if hasattr(f, "resolve_route")]
        self.resolver = resolvers[0] if resolvers else None
        self._variants: dict[frozenset[str], Chain] = {}

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
        for i, fn in phases:
            if i >= limit:
                continue
            result = await fn(ctx, message)
            if result is None or result is CONTINUE:
                continue
            if type(result) is LocalReply:
                return i, result
            raise _bad_result(fn, result)
        return None

    @staticmethod
    async def run_body(phases, ctx, chunk: bytes, end: bool, limit: int) -> bytes | LocalReply:
        for i, fn in phases:
            if i >= limit:
                continue
            result = await fn(ctx, chunk, end)
            if result is None or result is CONTINUE:
                continue
            if type(result) is bytes:
                chunk = result
            elif type(result) is LocalReply:
                return result
            else:
                raise _bad_result(fn, result)
        return chunk
