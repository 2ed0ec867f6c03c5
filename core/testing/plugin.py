"""sluice's pytest plugin: the fixtures ``origin``, ``sluice_proxy`` and ``sluice_client``.

pytest loads it in every project whose environment has sluice installed (the
``pytest11`` entry point ``sluice``), so a plugin's tests need no conftest::

    # pyproject.toml of the plugin:  [tool.pytest.ini_options]  trio_mode = true

    import my_plugin

    async def test_adds_header(origin, sluice_proxy):
        proxy = await sluice_proxy(filters=["my_filter", "router"], extra={"my_plugin": my_plugin})
        r = await proxy.client.get("/hello")
        assert r.headers["x-mine"] == "yes"
        assert origin.requests[0].path == "/hello"

    async def test_plain(sluice_client):
        assert (await sluice_client.get("/x")).status_code == 200

The fixtures are trio fixtures: they need pytest-trio (with ``trio_mode =
true``, or tests marked ``@pytest.mark.trio``) and httpx, which ``pip
install sluice[testing]`` brings. Without them a test using a fixture fails
saying so; nothing else changes, since this module registers fixtures and
nothing more, and imports httpx only when a fixture runs. A
fixture of the same name closer to a test (a conftest's, a module's) wins
over these, as pytest always does.
"""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Mapping
from typing import Any

import pytest
import trio

from .origin import Origin
from .proxy import serve

DRAIN_TIMEOUT = 2.0  # server.drain_timeout in tests: what is still in flight at the end is left over
TEARDOWN_TIMEOUT = DRAIN_TIMEOUT + 10.0  # then something hangs: fail rather than wait forever
INSTALL = "pip install sluice[testing]"


@pytest.fixture
def _sluice_kit(request: pytest.FixtureRequest) -> None:
    """Fail a test using the fixtures, clearly, when what they need is missing."""
    missing = [name for name in ("httpx", "pytest_trio") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"sluice's pytest fixtures need {' and '.join(missing)}: {INSTALL}", pytrace=False)
    if not request.config.pluginmanager.has_plugin("trio"):
        pytest.fail(f"sluice's pytest fixtures need the pytest-trio plugin, which is disabled here: {INSTALL}",
                    pytrace=False)
    if request.node.get_closest_marker("trio") is None and not request.config.getini("trio_mode"):
        pytest.fail("sluice's pytest fixtures are trio fixtures: set trio_mode = true under "
                    "[tool.pytest.ini_options], or mark the test @pytest.mark.trio", pytrace=False)


@pytest.fixture
async def origin(_sluice_kit: None):
    """A real upstream serving on 127.0.0.1 (``sluice.testing.Origin``) for one test.

    By default every path gets a 200 echoing the request body (or the
    target). Script it with ``origin.script("/path", Reply(...))``; read what
    it received in ``origin.requests``::

        async def test_refused_upstream(origin, sluice_proxy):
            origin.script("/down", Reply(reset=True))
            proxy = await sluice_proxy()
            assert (await proxy.client.get("/down")).status_code == 502
            assert origin.requests[0].path == "/down"
    """
    served = Origin()
    async with trio.open_nursery() as nursery:
        await nursery.start(served.serve)
        yield served
        served.close()


def default_config(origin: Any, filters: list[str] | None) -> dict[str, Any]:
    """What ``sluice_proxy`` merges a test's config over: one listener on a
    free loopback port with ``filters`` (None: ``["router"]``), cluster
    ``origin`` holding the ``origin`` fixture, a catch-all route to it, and
    a short ``server.drain_timeout`` (``DRAIN_TIMEOUT``) so a test that ends
    with a request in flight is not held for the production default."""
    return {
        "server": {"drain_timeout": DRAIN_TIMEOUT},
        "listeners": [{"address": "127.0.0.1:0", "filters": list(filters if filters is not None else ["router"])}],
        "clusters": {"origin": {"endpoints": [origin.address]}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "origin"}],
    }


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: tables merge key by key, anything else
    (a list such as ``listeners`` or ``routes``) replaces what it overrides."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
async def sluice_proxy(_sluice_kit: None, origin: Any):
    """A factory starting real, in-process proxies in front of ``origin``.

    ``origin`` is whichever ``origin`` fixture is closest to the test: this
    plugin's, or one of your own (anything with an ``address``, "host:port").

    ``proxy = await sluice_proxy(filters=None, config=None, extra=None, plugins=None)``:

    - ``filters``: the listener's chain (None: ``["router"]``);
    - ``config``: a dict or a TOML string merged over ``default_config``
      (tables merge, lists replace): e.g. ``{"filters": {"my_filter":
      {"limit": 3}}}`` for the filter's settings;
    - ``extra``: in-tree plugin modules by name; one named like an installed
      plugin replaces it, so it works whether or not yours is installed;
    - ``plugins``: which installed plugins to load (None: all).

    The config is validated as ``sluice run`` would (a ``ConfigError`` names
    the key path). It returns a ``sluice.testing.Running``: ``proxy.url``,
    ``proxy.app``, and ``proxy.client``, an ``httpx.AsyncClient`` with
    ``base_url=proxy.url``. Each proxy is drained and its client closed at
    the end of the test::

        proxy = await sluice_proxy(filters=["my_filter", "router"], extra={"my_plugin": my_plugin},
                                   config={"filters": {"my_filter": {"limit": 3}}})
        r = await proxy.client.get("/x")
    """
    import httpx

    started: list[tuple[Any, trio.Event]] = []

    async def run(cfg: dict, plugins, extra, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        done = trio.Event()
        async with serve(cfg, plugins=plugins, extra=extra) as running:
            started.append((running, done))
            task_status.started(running)
            await done.wait()  # leaving the block drains the proxy

    async with trio.open_nursery() as nursery:

        async def start(filters: list[str] | None = None, config: Mapping[str, Any] | str | None = None,
                        extra: Mapping[str, Any] | None = None, plugins: list[str] | None = None):
            over = tomllib.loads(config) if isinstance(config, str) else dict(config or {})
            cfg = merged(default_config(origin, filters), over)
            running = await nursery.start(run, cfg, plugins, extra)
            running.client = httpx.AsyncClient(base_url=running.url)
            return running

        yield start
        with trio.fail_after(TEARDOWN_TIMEOUT):
            for running, done in started:
                await running.client.aclose()
                done.set()


@pytest.fixture
async def sluice_client(sluice_proxy: Any):
    """An ``httpx.AsyncClient`` bound to a proxy with the default chain
    (``["router"]``) in front of ``origin``: ``await sluice_client.get("/x")``."""
    proxy = await sluice_proxy()
    return proxy.client
