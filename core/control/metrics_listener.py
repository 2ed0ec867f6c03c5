"""The read-only metrics listener (``[metrics] address``): what a fleet is
scraped and probed through.

The admin listener binds loopback unless a token is set, because it can
reload and drain; so neither Prometheus nor a kubelet could reach its
``/metrics``, ``/live`` and ``/ready``. This listener serves those three
only (GET and HEAD, with the admin's own handlers: ``admin.READ_ONLY``),
needs no token since none of them changes state or shows config, and keeps
the admin's limits (``MAX_CONNECTIONS``, ``MAX_HEAD``, ``READ_TIMEOUT``).
Any other method is 405, any other path 404.

It runs where the admin does, in worker 0 (the one process without
``--workers``): ``/metrics`` there covers every worker (prometheus_client's
multiprocess files); ``/ready`` is worker 0's view, 503 once it drains. A
reload leaves it as it was; its address is read at startup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from .admin import Admin, listen

if TYPE_CHECKING:
    from .app import App

__all__ = ["serve_metrics_listener"]

log = structlog.get_logger("sluice")


async def serve_metrics_listener(app: App, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app``'s metrics listener until cancelled; reports its URL."""
    sock, url = listen(app.config.metrics.address, "metrics.address")
    server = Admin(app, None, read_only=True, kind="metrics")
    log.info("metrics listening", url=url, worker=app.worker_index)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.connection, [sock])
        task_status.started(url)
