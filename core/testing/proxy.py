"""Helpers for testing sluice and plugins against a real, in-process proxy.

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
    """Run a proxy for the duration of the block."""
    cfg = config if isinstance(config, Config) else parse(dict(config))
    app = App(cfg, Plugins(plugins, dict(extra or {})))
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(app.run)
        try:
            yield Running(app, urls)
        finally:
            app.stop()
