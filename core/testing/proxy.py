"""A real sluice proxy, in process, for the length of a block: ``serve``.

The ``sluice_proxy`` fixture (``sluice.testing.plugin``) is built on it; use
``serve`` directly for a config the fixture's default does not fit (several
listeners, clusters of your own)::

    from sluice.testing import serve

    async def test_my_filter():
        async with serve(CONFIG, extra={"mine": my_plugin_module}) as proxy:
            ...  # talk to proxy.url with any HTTP client

``serve`` validates the config exactly as ``sluice run`` would, listens on
the addresses given (use ``127.0.0.1:0`` for a free port), and drains the
proxy when the block ends. It must run inside a trio task (pytest-trio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ..control.app import App
from ..control.config import Config, parse
from ..control.registry import Plugins

__all__ = ["Running", "serve"]


@dataclass
class Running:
    """A proxy ``serve`` runs: its ``App``, and the base URL of each listener.

    ``client`` is None from ``serve``; the ``sluice_proxy`` fixture sets it to
    an ``httpx.AsyncClient`` with ``base_url=url``.
    """

    app: App
    urls: list[str]
    client: Any = None

    @property
    def url(self) -> str:
        """The first listener's base URL, e.g. ``http://127.0.0.1:41234``."""
        return self.urls[0]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.rsplit("://", 1)[1].rsplit(":", 1)
        return host.strip("[]"), int(port)


@asynccontextmanager
async def serve(
    config: Mapping[str, Any] | Config,
    *,
    plugins: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AsyncIterator[Running]:
    """Run a proxy for the duration of the block; yield its ``Running``.

    ``config`` is a config dict (as the TOML file would parse) or a parsed
    ``Config``; a bad one raises ``ConfigError`` naming the key path.
    ``plugins`` names the installed plugins to load (None: all); ``extra``
    maps names to in-process plugin modules or objects, and one named like
    an installed plugin replaces it::

        cfg = {"listeners": [{"address": "127.0.0.1:0", "filters": ["mine", "router"]}],
               "clusters": {"app": {"endpoints": [origin.address]}},
               "routes": [{"match": {"prefix": "/"}, "cluster": "app"}]}
        async with serve(cfg, extra={"mine": my_plugin}) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                assert (await client.get("/")).status_code == 200
    """
    cfg = config if isinstance(config, Config) else parse(dict(config))
    app = App(cfg, Plugins(plugins, dict(extra or {})))
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(app.run)
        try:
            yield Running(app, urls)
        finally:
            app.stop()
