"""Shared fixtures: scriptable origins, config builders, raw clients."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sluice import Filter, hookimpl
from sluice.protocol.http1 import select

from .origin import Origin, echo
from .servers.etcd import etcd_prefix, etcd_server  # noqa: F401 - a real etcd per session (tests/servers/)
from .servers.zookeeper import zk_chroot, zookeeper_server  # noqa: F401 - a real ZooKeeper, likewise


@pytest.fixture(params=["h11", "httptools"])
def codec(request):
    """Each HTTP/1.1 codec in turn (``sluice.protocol.http1.select``)."""
    return select(request.param)


@pytest.fixture
def start_origin(nursery):
    """``await start_origin(handler=..., raw=...)`` -> a listening Origin."""

    async def start(handler=echo, raw=None) -> Origin:
        return await nursery.start(Origin(handler, raw).serve)

    return start


def config(
    *endpoints: str,
    filters: list[str] = ("router",),
    routes: list[dict] | None = None,
    listener: dict | None = None,
    cluster: dict | None = None,
    filter_settings: dict | None = None,
    **top: Any,
) -> dict:
    """A one-listener, one-cluster ("backend") config on a free port."""
    return {
        "listeners": [{"address": "127.0.0.1:0", "filters": list(filters), **(listener or {})}],
        "clusters": {"backend": {"endpoints": list(endpoints), **(cluster or {})}},
        "routes": routes if routes is not None else [{"match": {"prefix": "/"}, "cluster": "backend"}],
        "filters": filter_settings or {},
        **top,
    }


class InProcess:
    """A plugin object offering some filter classes (no entry point needed)."""

    def __init__(self, *filters: type[Filter]) -> None:
        self._filters = list(filters)

    @hookimpl
    def sluice_filters(self):
        return self._filters


async def read_until_closed(stream: trio.abc.ReceiveStream, *, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or the timeout)."""
    received = bytearray()
    with trio.move_on_after(timeout):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


async def raw_request(address: tuple[str, int], data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the proxy closes (or the timeout), return what came back."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(data)
        return await read_until_closed(stream, timeout=timeout)
