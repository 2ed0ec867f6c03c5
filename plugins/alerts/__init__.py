"""Plugin ``alerts``: alerting rules evaluated in the proxy, sent as log
events and to an Alertmanager-compatible webhook.

Settings live in ``[filters.alerts]``, where every plugin's settings live
(``sluice.control.config``: ``filters.<name>`` tables belong to plugins,
the top level is the core's and strict). So alerting needs no change to
the core's config model, its errors carry key paths under
``filters.alerts`` (``filters.alerts.rules[2].threshold: ...``) like any
plugin's, and ``sluice plugins`` lists its settings. The ``alerts`` filter
class exists only to own that table: it is not a traffic filter, and
naming it in a listener's chain is a config error.

::

    [filters.alerts]
    interval = 5                      # seconds between evaluations
    generator_url = "https://grafana.example/d/sluice"

    [filters.alerts.webhook]          # Alertmanager's API v2
    url = "http://127.0.0.1:9093/api/v2/alerts"
    timeout = 2                       # per try
    max_retries = 3                   # then the batch is dropped (and logged)

    [[filters.alerts.rules]]
    name = "ApiErrors"
    kind = "error_ratio"              # | latency_p99 | endpoint_ejected | no_healthy_endpoint | reload_failed
                                      # | certificate_expiry (with days = 14 instead of threshold)
                                      # | config_store_stale (threshold: seconds out of sync)
                                      # | rate_limit_store_errors (no threshold: any in window)
    route = "api"                     # or cluster = "..."; neither: all traffic
    threshold = 0.05                  # 5% of answers are 5xx ...
    window = 300                      # ... over 5 minutes
    for = 60                          # for a minute before it fires
    resolve_threshold = 0.02          # resolves at 2% (default: threshold)
    severity = "critical"
    labels = { team = "api" }
    annotations = { runbook = "https://..." }

Rules run in worker 0 only (``app.worker_index``), so that a fleet of
``--workers N`` sends one notification, not N; what each kind reads is in
``sluice.plugins.alerts.evaluate``, the state machine in ``.state``, the
webhook in ``.webhook``. The settings are checked at startup in every
worker (a bad rule refuses to start) and again at each reload; a reload
whose alerting settings are bad keeps the old rules and logs ``alerts
config invalid`` (the core's reload has no hook to refuse it).

Shipped with the package: ``prometheus-rules.yml`` (the same conditions as
Prometheus alerting rules over sluice's metrics) and
``grafana-dashboard.json``; ``files()`` gives their paths.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import structlog
import trio

from sluice import ConfigError, SettingsOnly, hookimpl

from .engine import Alerting
from .settings import AlertsConfig, settings

__all__ = ["Alerting", "AlertsConfig", "files", "running"]

log = structlog.get_logger("sluice.alerts")

_RUNNING: dict[int, tuple[Alerting, trio.CancelScope]] = {}  # by id(app)


class Alerts(SettingsOnly):
    """Alerting rules and their webhook (README, Operating sluice, Alerts).

    Owns ``[filters.alerts]``; it is not a traffic filter and is never in a chain."""

    name = "alerts"
    Config = AlertsConfig

    @classmethod
    def check(cls, config, app):
        settings(app.config)  # the rules against the routes and clusters: `sluice check`, reloads


def files() -> dict[str, Path]:
    """The shipped Prometheus rules and Grafana dashboard."""
    root = resources.files(__name__)
    return {name: Path(str(root / name)) for name in ("prometheus-rules.yml", "grafana-dashboard.json")}


@hookimpl
def sluice_filters():
    return [Alerts]


def _start(app, config: AlertsConfig) -> None:
    alerting = Alerting(config, app)
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await alerting.run()

    metrics = getattr(app.config, "metrics", None)
    if metrics is not None and not metrics.enabled:
        measured = [r.name for r in config.rules if r.kind in ("error_ratio", "latency_p99")]
        if measured:
            log.warning("alerts: these rules read the metrics, and [metrics] is off: they never fire",
                        rules=measured)
    _RUNNING[id(app)] = (alerting, scope)
    app.nursery.start_soon(run)
    log.info("alerts started", worker=app.worker_index, rules=[r.name for r in config.rules],
             webhook=config.webhook.url if config.webhook else None)


def _stop(app) -> None:
    running = _RUNNING.pop(id(app), None)
    if running is not None:
        running[1].cancel()


@hookimpl
def sluice_startup(app):
    config = settings(app.config)  # every worker checks: a bad rule refuses to start
    if config is not None and config.rules and app.worker_index == 0:
        _start(app, config)


@hookimpl
def sluice_reload(app):
    try:
        config = settings(app.config)
    except ConfigError as exc:
        log.error("alerts config invalid; the old rules stay", error=str(exc), worker=app.worker_index)
        return
    if app.worker_index != 0:
        return
    running = _RUNNING.get(id(app))
    if config is None or not config.rules:
        _stop(app)
    elif running is None:
        _start(app, config)
    else:
        running[0].update(config)


@hookimpl
def sluice_shutdown(app):
    _stop(app)


def running(app) -> Alerting | None:
    """The alerting of a running ``app`` (worker 0), for tests and admin."""
    entry = _RUNNING.get(id(app))
    return entry[0] if entry else None
