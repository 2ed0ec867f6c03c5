"""The plugin author kit: an in-process plugin given to ``serve``/``Plugins``
as ``extra`` may share its name with an installed plugin (the plugin under
test is usually installed in its own dev venv) and then replaces it."""

from __future__ import annotations

import httpx

from sluice.control.registry import Plugins
from sluice.plugins import router as installed_router
from sluice.testing import serve

from .conftest import InProcess, config


def test_extra_replaces_installed_plugin_of_same_name():
    # "router" is installed through an entry point; the test's own object
    # takes its place instead of failing with "already registered".
    mine = InProcess()
    plugins = Plugins(["router", "balancer"], extra={"router": mine})
    assert plugins.loaded["router"].module is mine
    assert plugins.loaded["router"].dist == "(in-process)"
    assert plugins.pm.get_plugin("router") is mine


async def test_serve_with_installed_plugin_given_as_extra(start_origin):
    origin = await start_origin()
    cfg = config(origin.address)
    async with serve(cfg, plugins=["router", "balancer"], extra={"router": installed_router}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/hello")
    assert r.status_code == 200
