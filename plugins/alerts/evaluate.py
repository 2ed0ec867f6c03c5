"""What each rule kind measures, from the metrics scrape and the app.

- ``error_ratio`` and ``latency_p99`` read the **aggregated metrics**: the
  samples ``sluice.metrics.render()`` shows (prometheus_client's
  multiprocess collector over every worker's files, ``engine.scrape``), so
  they cover all workers. A ``route`` rule reads the downstream series of that route, a
  ``cluster`` rule the upstream series of that cluster, a rule with
  neither all downstream traffic. The increase over ``window`` of the 5xx
  count over the increase of all requests is the ratio; the increase of
  each histogram bucket gives the p99 as ``histogram_quantile`` would. No
  traffic in the window: no value (nothing fires, a firing alert resolves).
- ``endpoint_ejected`` and ``no_healthy_endpoint`` read the endpoint
  gauges of the same scrape, over every live worker (each runs its own
  health checks and outlier detection): an endpoint is ejected when any
  worker ejects it (``sluice_upstream_endpoint_ejected``, the number of
  workers, above 0), and healthy when every worker's checks pass
  (``sluice_upstream_endpoint_healthy``, their minimum); a cluster has no
  healthy endpoint when none is both. Only clusters and endpoints of the
  running config count (a gauge of one a reload removed keeps its last
  value). Without metrics (``[metrics] enabled = false``) worker 0's own
  clusters are read instead: the health checks' verdict is the same in
  every worker, a passive ejection is worker 0's alone.
- ``reload_failed`` reads ``app.last_reload``: every worker reloads the
  same file, so worker 0's outcome is the fleet's (Prometheus has it as
  ``sluice_config_last_reload_successful``).
- ``config_store_stale`` reads worker 0's follower of the config store
  (``app.config_store``): the seconds since the store was last known in
  sync, 0 while it is followed; every worker follows the same store, so
  worker 0's is the instance's (Prometheus: the worst of the workers,
  ``sluice_config_store_stale_seconds``).
- ``certificate_expiry`` reads ``sluice_tls_certificate_expiry_timestamp_seconds``
  (each listener's certificates' notAfter, the earliest any worker serves):
  1 for a certificate with fewer than ``days`` days left, else 0, labelled
  by listener and cert (its file). A 0 timestamp is a certificate a reload
  removed, not one that expired in 1970. Without metrics, worker 0's own
  listeners are read.
- ``rate_limit_store_errors`` reads ``sluice_plugin_rate_limit_decisions_total``: the
  increase over ``window`` of its ``error_open`` and ``error_closed`` counts (requests
  decided without the limiter's store: let through, or refused), by filter and outcome,
  over every worker. Any error in the window fires (threshold 0); a window without one
  resolves. Without metrics: no value.

The metric names are ``sluice.metrics``'s; the shipped Prometheus rules
and Grafana dashboard use the same. For a ``cluster`` rule an error is a
try that got no answer below 500 (``outcome`` other than ``success``: a 5xx,
a reset, a timeout, a connect failure, a protocol error), since each of
those ends in a 5xx for the client unless a retry saves it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from .settings import Rule
from .window import Ring, quantile

__all__ = ["Evaluator", "parse"]

DOWNSTREAM_REQUESTS = "sluice_downstream_requests_total"
DOWNSTREAM_DURATION = "sluice_downstream_request_duration_seconds_bucket"
UPSTREAM_REQUESTS = "sluice_upstream_requests_total"
UPSTREAM_DURATION = "sluice_upstream_request_duration_seconds_bucket"
ENDPOINT_HEALTHY = "sluice_upstream_endpoint_healthy"
ENDPOINT_EJECTED = "sluice_upstream_endpoint_ejected"
CERT_EXPIRY = "sluice_tls_certificate_expiry_timestamp_seconds"
RATE_LIMIT_DECISIONS = "sluice_plugin_rate_limit_decisions_total"
STORE_ERRORS = ("error_open", "error_closed")
_WINDOWED = ("error_ratio", "latency_p99", "rate_limit_store_errors")

Sample = tuple[str, dict[str, str], float]
Labels = tuple[tuple[str, str], ...]


def parse(text: str | bytes | tuple) -> list[Sample]:
    """The samples of a Prometheus text exposition (what ``render()`` gives)."""
    from prometheus_client.parser import text_string_to_metric_families

    if isinstance(text, tuple):  # (body, content type)
        text = text[0]
    if isinstance(text, bytes):
        text = text.decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


class Evaluator:
    """Turns a scrape (and the app) into each rule's values by label set."""

    def __init__(self, rules: Iterable[Rule], interval: float) -> None:
        self.rings = {r.name: Ring(r.window, interval) for r in rules if r.kind in _WINDOWED}

    def values(self, rule: Rule, samples: list[Sample] | None, app: Any,
               now: float | None = None) -> dict[Labels, float | None]:
        now = time.monotonic() if now is None else now
        kind = rule.kind
        if kind == "error_ratio":
            return self._measured(rule, samples, now, _totals, _ratio)
        if kind == "latency_p99":
            return self._measured(rule, samples, now, _buckets, lambda inc: quantile(0.99, _floats(inc)))
        if kind == "reload_failed":
            last = app.last_reload
            return {(): 1.0 if last is not None and not last["ok"] else 0.0}
        if kind == "certificate_expiry":
            return _expiring(rule, samples, app)
        if kind == "rate_limit_store_errors":
            return _store_errors(self.rings[rule.name], samples, now)
        if kind == "config_store_stale":
            store = app.config_store
            return {(): store.stale_seconds() if store is not None else None}
        names = [rule.cluster] if rule.cluster else list(app.clusters)
        state = _endpoint_state(app, samples)
        out: dict[Labels, float | None] = {}
        for name in names:
            endpoints = state.get(name, {})
            if kind == "endpoint_ejected":
                for address, (_, ejected) in endpoints.items():
                    out[(("cluster", name), ("endpoint", address))] = 1.0 if ejected else 0.0
            elif endpoints:  # no_healthy_endpoint
                up = any(healthy and not ejected for healthy, ejected in endpoints.values())
                out[(("cluster", name),)] = 0.0 if up else 1.0
        return out

    def _measured(self, rule: Rule, samples, now, collect, compute) -> dict[Labels, float | None]:
        where = _scope(rule)
        if samples is None:  # no metrics in this build: nothing to say
            return {where: None}
        ring = self.rings[rule.name]
        ring.add(now, collect(rule, samples))
        inc = ring.increase()
        return {where: None if inc is None else compute(inc)}


def _endpoint_state(app: Any, samples: list[Sample] | None) -> dict[str, dict[str, tuple[bool, bool]]]:
    """cluster -> endpoint address -> (healthy, ejected), for the running config's endpoints:
    from the gauges when the scrape has them, else from this worker's clusters."""
    running = {name: {e.address: e for e in cluster.endpoints} for name, cluster in app.clusters.items()}
    gauges: dict[tuple[str, str], list[float]] = {}
    for name, labels, value in samples or ():
        if name in (ENDPOINT_HEALTHY, ENDPOINT_EJECTED):
            key = (labels.get("cluster", ""), labels.get("endpoint", ""))
            gauges.setdefault(key, [1.0, 0.0])[name == ENDPOINT_EJECTED] = value
    clock = time.monotonic()
    out: dict[str, dict[str, tuple[bool, bool]]] = {}
    for name, endpoints in running.items():
        out[name] = {}
        for address, e in endpoints.items():
            if (name, address) in gauges:
                healthy, ejected = gauges[(name, address)]
                out[name][address] = (healthy > 0, ejected > 0)
            else:
                out[name][address] = (e.healthy, e.ejected_until > clock)
    return out


def _expiring(rule: Rule, samples: list[Sample] | None, app: Any) -> dict[Labels, float | None]:
    if samples is None:
        expiry = {(listener.name, cert): when for listener in app.listeners if listener.transport is not None
                  for cert, when in listener.transport.expiry().items()}
    else:
        expiry = {(labels.get("listener", ""), labels.get("cert", "")): value
                  for name, labels, value in samples if name == CERT_EXPIRY and value > 0}
    soon = time.time() + rule.days * 86400
    return {(("listener", listener), ("cert", cert)): 1.0 if when < soon else 0.0
            for (listener, cert), when in expiry.items()}


def _store_errors(ring: Ring, samples: list[Sample] | None, now: float) -> dict[Labels, float | None]:
    """(filter, outcome) -> the rate limiter's store errors over the window, summed over workers."""
    if samples is None:
        return {(): None}
    counts: dict[tuple[str, str], float] = {}
    for name, labels, value in samples:
        if name == RATE_LIMIT_DECISIONS and labels.get("outcome") in STORE_ERRORS:
            key = (labels.get("filter", ""), labels["outcome"])
            counts[key] = counts.get(key, 0.0) + value
    ring.add(now, counts)
    inc = ring.increase() or {}
    return {(("filter", f), ("outcome", o)): n for (f, o), n in inc.items()}


def _scope(rule: Rule) -> Labels:
    if rule.route is not None:
        return (("route", rule.route),)
    if rule.cluster is not None:
        return (("cluster", rule.cluster),)
    return ()


def _selected(rule: Rule, samples: list[Sample], downstream: str, upstream: str):
    name, key, want = (upstream, "cluster", rule.cluster) if rule.cluster else (downstream, "route", rule.route)
    for sample_name, labels, value in samples:
        if sample_name == name and (want is None or labels.get(key) == want):
            yield labels, value


def _totals(rule: Rule, samples: list[Sample]) -> dict[str, float]:
    total = errors = 0.0
    for labels, value in _selected(rule, samples, DOWNSTREAM_REQUESTS, UPSTREAM_REQUESTS):
        total += value
        if labels.get("status_class") == "5xx" or labels.get("outcome", "success") != "success":
            errors += value
    return {"total": total, "errors": errors}


def _ratio(inc: dict[str, float]) -> float | None:
    return inc["errors"] / inc["total"] if inc["total"] > 0 else None


def _buckets(rule: Rule, samples: list[Sample]) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in _selected(rule, samples, DOWNSTREAM_DURATION, UPSTREAM_DURATION):
        out[labels["le"]] = out.get(labels["le"], 0.0) + value
    return out


def _floats(inc: dict[str, float]) -> dict[float, float]:
    return {math.inf if le == "+Inf" else float(le): v for le, v in inc.items()}
