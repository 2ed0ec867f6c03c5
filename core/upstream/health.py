"""Active health checks: each endpoint of a cluster probed on an interval.

A cluster with a ``health_check`` table gets one task per endpoint (in the
app's nursery) that, every ``interval`` seconds plus up to ``jitter``
seconds at random (so a fleet does not probe in step), either opens a TCP
connection (``kind = "tcp"``) or sends ``GET path`` over HTTP/1.1 and reads
the status (``kind = "http"``: healthy when the status is one of
``statuses``), all within ``timeout``. ``unhealthy_threshold`` failures in a
row mark the endpoint down (``Endpoint.healthy = False``: no longer
eligible, see ``cluster.py``), ``healthy_threshold`` successes in a row mark
it up again. Endpoints start healthy, so a restart sends traffic at once.
Transitions are log events (``endpoint unhealthy``, ``endpoint healthy``).

An HTTP check speaks HTTP/1.1 (through the cluster's TLS, if it has one);
an ``h2``/``h2c`` cluster uses ``tcp`` checks (the config refuses ``http``
there).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import h11
import structlog
import trio

from .cluster import Cluster, Endpoint

__all__ = ["HealthCheck", "run_checks"]

log = structlog.get_logger("sluice.health")

_READ = 16 * 1024


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A cluster's active check settings (``clusters.<name>.health_check``)."""

    kind: str = "http"  # "http" or "tcp"
    path: str = "/"
    host: str | None = None  # the Host of an HTTP check; default: the endpoint's address
    statuses: frozenset[int] = frozenset(range(200, 400))
    interval: float = 5.0
    jitter: float = 1.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


async def run_checks(cluster: Cluster, check: HealthCheck, rng: random.Random | None = None) -> None:
    """Check every endpoint of ``cluster`` until cancelled, following its
    endpoint set as discovery changes it: a new endpoint's checks start, a
    departed one's stop (an endpoint that stays keeps its task and counts)."""
    rng = rng or random.Random()
    watching: dict[int, trio.CancelScope] = {}  # id(endpoint) -> its checks
    async with trio.open_nursery() as nursery:
        while True:
            current = {id(e): e for e in cluster.endpoints}
            for key in [k for k in watching if k not in current]:
                watching.pop(key).cancel()
            for key, endpoint in current.items():
                if key not in watching:
                    watching[key] = scope = trio.CancelScope()
                    nursery.start_soon(_scoped, scope, cluster, endpoint, check, rng)
            await cluster.wait_changed()  # (no checkpoint since the list was read)


async def _scoped(scope: trio.CancelScope, *args) -> None:
    with scope:
        await _watch(*args)


async def _watch(cluster: Cluster, endpoint: Endpoint, check: HealthCheck, rng: random.Random) -> None:
    passes = fails = 0
    while True:
        await trio.sleep(check.interval + rng.random() * check.jitter)
        why = await probe(cluster, endpoint, check)
        if why is None:
            passes, fails = passes + 1, 0
            if not endpoint.healthy and passes >= check.healthy_threshold:
                endpoint.healthy = True
                log.info("endpoint healthy", cluster=cluster.name, endpoint=endpoint.address, passes=passes)
        else:
            passes, fails = 0, fails + 1
            if endpoint.healthy and fails >= check.unhealthy_threshold:
                endpoint.healthy = False
                log.warning("endpoint unhealthy", cluster=cluster.name, endpoint=endpoint.address,
                            fails=fails, reason=why)


async def probe(cluster: Cluster, endpoint: Endpoint, check: HealthCheck) -> str | None:
    """One check of ``endpoint``: None when it passed, else why it failed."""
    with trio.move_on_after(check.timeout):
        try:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            return f"connect failed: {exc.strerror or exc}"
        try:
            if check.kind == "tcp":
                return None
            if cluster.transport is not None:
                stream = await cluster.transport.wrap_client(
                    stream, cluster.tls_server_name or endpoint.host)
            return await _http(stream, endpoint, check)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            return f"check failed: {exc!r}"
        finally:
            await trio.aclose_forcefully(stream)
    return f"no answer within {check.timeout}s"


async def _http(stream: trio.abc.Stream, endpoint: Endpoint, check: HealthCheck) -> str | None:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=check.path, headers=[
        ("host", check.host or endpoint.address), ("user-agent", "sluice-health-check"),
        ("connection", "close")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ)
            conn.receive_data(data)
            if not data:
                return "closed before answering"
            continue
        if type(event) is h11.Response:
            if event.status_code in check.statuses:
                return None
            return f"status {event.status_code}"
        if type(event) is h11.ConnectionClosed:
            return "closed before answering"
