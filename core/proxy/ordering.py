"""Ordering constraints between filters, checked against a chain at startup.

A filter class may declare ``before = ("router",)`` (it must run earlier
than those filters when they share its chain), ``after = ("auth",)`` (later
than them), ``first = True`` or ``last = True``. A name that is not in the
chain constrains nothing: a filter says what it needs *if* the other is
there. The core validates and never reorders: the chain is the order the
operator wrote, and an error says which declaration it breaks, by key path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["check_order"]


def _edges(classes: Sequence[Any]) -> list[tuple[str, str, str]]:
    """Each declared "a runs before b" among the chain's filters, with the
    attribute that says so (``a.before`` or ``b.after``)."""
    present = {c.name for c in classes}
    edges = []
    for c in classes:
        edges += [(c.name, other, f"{c.name}.before") for other in c.before if other in present]
        edges += [(other, c.name, f"{c.name}.after") for other in c.after if other in present]
    return edges


def _cycle(edges: list[tuple[str, str, str]]) -> list[str] | None:
    """A cycle among the declarations (names, first repeated last), or None."""
    graph: dict[str, list[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, []).append(b)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in graph.get(node, ()):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for start in graph:
        found = visit(start, [])
        if found:
            return found
    return None


def check_order(classes: Sequence[Any], where: str) -> None:
    """Raise ConfigError if the chain (filter classes in order) breaks a
    declared constraint; ``where`` is the chain's key path."""
    edges = _edges(classes)
    cycle = _cycle(edges)
    if cycle:
        raise ConfigError(f"{where}: ordering cycle: " + " -> ".join(repr(n) for n in cycle)
                          + " (no order satisfies the filters' before/after)")
    position = {c.name: i for i, c in enumerate(classes)}
    errors = []
    for a, b, why in edges:
        if position[a] > position[b]:
            if why.endswith(".before"):
                errors.append(f"{where}: {a!r} must run before {b!r} ({why})")
            else:
                errors.append(f"{where}: {b!r} must run after {a!r} ({why})")
    for i, c in enumerate(classes):
        if c.first and i != 0:
            errors.append(f"{where}: {c.name!r} must be first ({c.name}.first)")
        if c.last and i != len(classes) - 1:
            errors.append(f"{where}: {c.name!r} must be last ({c.name}.last)")
    if errors:  # with the chain as written, to read the reasons against
        chain = ", ".join(c.name for c in classes)
        raise ConfigError("\n".join([*errors, f"{where}: the chain as written: {chain}"]))
