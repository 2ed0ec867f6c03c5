"""The alerting loop: evaluate every rule each ``interval``, log and send
the transitions, and send firing alerts again every ``repeat_interval``.

It runs as one task in worker 0's nursery. Its only contact with the data
path is reading what the data path already records: the metrics scrape
(read and parsed in a worker thread, so the trio loop serving traffic never
waits on the metrics files) and the clusters' endpoint state.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

import structlog
import trio

from .evaluate import Evaluator, parse
from .settings import AlertsConfig, Rule
from .state import RuleState, Transition, step
from .webhook import Sender, alert_json

__all__ = ["Alerting"]

log = structlog.get_logger("sluice.alerts")

_SUMMARY = {
    "error_ratio": "5xx ratio {value} above {threshold} over {window}s",
    "latency_p99": "p99 latency {value}s above {threshold}s over {window}s",
    "endpoint_ejected": "endpoint ejected by outlier detection",
    "no_healthy_endpoint": "no healthy endpoint in the cluster",
    "reload_failed": "the latest config reload failed",
    "certificate_expiry": "a TLS certificate expires in less than {days:g} days",
    "config_store_stale": "the config store has been out of sync for {value}s (above {threshold}s)",
    "rate_limit_store_errors": "{value} rate limit decisions made without the store in {window}s",
}


async def scrape() -> list | None:
    """The aggregated metrics' samples; None when this build has no metrics.

    This worker's sums are flushed here, on the loop's thread that records
    them; every worker's files are then read in a worker thread, so the
    loop never waits on them. (``render()`` would flush from that thread,
    racing the requests this loop records meanwhile.) Without a
    multiprocess directory (an App run inside a test) the registry is this
    process's and small, and ``render()`` reads it here.
    """
    try:
        metrics = importlib.import_module("sluice.metrics")
    except ImportError:
        return None
    metrics.flush()
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return parse(metrics.render())
    return await trio.to_thread.run_sync(_collect, path)


def _collect(path: str) -> list:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return [(s.name, s.labels, s.value) for family in registry.collect() for s in family.samples]


class Alerting:
    """Rules, their states and the webhook of one running proxy."""

    def __init__(self, config: AlertsConfig, app: Any) -> None:
        self.app = app
        self.config = config
        self.evaluator = Evaluator(config.rules, config.interval)
        self.states = {rule.name: RuleState() for rule in config.rules}
        self.sender = Sender(config.webhook) if config.webhook is not None else None
        self._sending = trio.CancelScope()  # the sender's task
        self._nursery: trio.Nursery | None = None
        self._repeated = time.monotonic()
        self._changed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_sender()
            task_status.started()
            while True:
                try:
                    await self.evaluate()
                except Exception as exc:  # a bug of ours must not end alerting, nor the worker
                    log.error("alert evaluation failed", exc_info=exc)
                with trio.move_on_after(self.config.interval):
                    await self._changed.wait()
                self._changed = trio.Event()

    async def evaluate(self) -> None:
        wanted = any(r.kind not in ("reload_failed", "config_store_stale") for r in self.config.rules)
        samples = await scrape() if wanted else None
        now, clock = time.time(), time.monotonic()
        for rule in self.config.rules:
            values = self.evaluator.values(rule, samples, self.app, clock)
            threshold = rule.threshold if rule.threshold is not None else 0.0
            for t in step(self.states[rule.name], values, now, threshold=threshold,
                          resolve_threshold=rule.resolve_threshold, hold=rule.for_):
                self._announce(rule, t)
        webhook = self.config.webhook
        if webhook is not None and clock - self._repeated >= webhook.repeat_interval:
            self._repeated = clock
            for rule in self.config.rules:
                for inst in self.states[rule.name].firing():
                    self._send(rule, Transition(inst.labels, "firing", inst.value, inst.since, None))

    def _start_sender(self) -> None:
        sender, scope = self.sender, self._sending
        if sender is None:
            return

        async def send() -> None:
            with scope:
                await sender.run()

        self._nursery.start_soon(send)

    def update(self, config: AlertsConfig) -> None:
        """New settings (a reload): unchanged rules keep their state and
        samples; firing alerts of rules removed or changed resolve now. A
        changed webhook takes what the old one had not sent yet."""
        old = self.sender
        if config.webhook != (old.config if old is not None else None):
            self._sending.cancel()
            self._sending = trio.CancelScope()
            self.sender = Sender(config.webhook) if config.webhook is not None else None
            if self.sender is not None and old is not None:
                for alert in old.queue:
                    self.sender.notify(alert)
            if self._nursery is not None:
                self._start_sender()
        kept = {r.name: r for r in self.config.rules if r in config.rules}
        now = time.time()
        for rule in self.config.rules:
            if rule.name not in kept:
                for inst in self.states[rule.name].firing():
                    self._announce(rule, Transition(inst.labels, "resolved", inst.value, inst.since, now))
        states = {r.name: self.states[r.name] if r.name in kept else RuleState() for r in config.rules}
        evaluator = Evaluator(config.rules, config.interval)
        evaluator.rings.update({n: ring for n, ring in self.evaluator.rings.items()
                                if n in kept and self.config.interval == config.interval})
        self.config, self.states, self.evaluator = config, states, evaluator
        self._changed.set()  # evaluate now: a reload may have ended a reload_failed alert

    def _announce(self, rule: Rule, t: Transition) -> None:
        fields = dict(alert=rule.name, kind=rule.kind, severity=rule.severity, labels=dict(t.labels),
                      value=t.value, threshold=rule.threshold, since=t.starts_at)
        if t.state == "firing":
            log.warning("alert firing", **fields)
        else:
            log.info("alert resolved", **fields)
        self._send(rule, t)

    def _send(self, rule: Rule, t: Transition) -> None:
        if self.sender is None:
            return
        labels = {"alertname": rule.name, "severity": rule.severity, **rule.labels, **dict(t.labels)}
        value = "" if t.value is None else f"{t.value:.4g}"
        summary = _SUMMARY[rule.kind].format(value=value, threshold=rule.threshold, window=rule.window,
                                          days=rule.days or 0)
        annotations = {"summary": summary, "value": value, **rule.annotations}
        self.sender.notify(alert_json(labels, annotations, t.starts_at, t.ends_at, self.config.generator_url))
