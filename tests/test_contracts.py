"""Filter ordering contracts: before/after/first/last validated per chain at build."""

from __future__ import annotations

import pytest

from sluice import ConfigError, Filter
from sluice.control.app import App
from sluice.control.config import parse
from sluice.control.registry import Plugins

from .conftest import InProcess, config


class Cache(Filter):
    name = "cache"
    before = ("router",)


class Audit(Filter):
    name = "audit"
    after = ("cache",)


class Tail(Filter):
    name = "tail"
    last = True


class Head(Filter):
    name = "head"
    first = True


class Loop(Filter):
    name = "loop"
    before = ("cache",)
    after = ("router",)


def build(*chain: str, extra: tuple[type[Filter], ...] = (Cache, Audit, Tail, Head)) -> App:
    plugins = Plugins(["router", "balancer"], extra={"mine": InProcess(*extra)})
    return App(parse(config("127.0.0.1:9", filters=list(chain))), plugins)


def error(*chain: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        build(*chain, **kw)
    return str(info.value)


def test_a_chain_that_keeps_every_declaration_builds():
    app = build("head", "cache", "audit", "router", "tail")
    assert app.listeners[0].chain.names() == ["head", "cache", "audit", "router", "tail"]


def test_a_name_absent_from_the_chain_constrains_nothing():
    assert build("router", "audit").listeners[0].chain.names() == ["router", "audit"]


def test_before_broken_is_named_by_key_path_and_attribute():
    assert error("router", "cache") == "listeners[0].filters: 'cache' must run before 'router' (cache.before)"


def test_after_broken_is_named_by_key_path_and_attribute():
    assert error("audit", "cache", "router") == "listeners[0].filters: 'audit' must run after 'cache' (audit.after)"


def test_first_and_last_are_checked_and_every_error_is_listed():
    message = error("tail", "router", "head")
    assert message.splitlines() == [
        "listeners[0].filters: 'tail' must be last (tail.last)",
        "listeners[0].filters: 'head' must be first (head.first)",
    ]


def test_a_cycle_among_declarations_prints_the_cycle():
    message = error("cache", "loop", "router", extra=(Cache, Loop))
    assert message.startswith("listeners[0].filters: ordering cycle: ")
    cycle = message.split("ordering cycle: ")[1].split(" (")[0].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"'cache'", "'router'", "'loop'"}

