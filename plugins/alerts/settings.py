"""The alerting settings (``[filters.alerts]``) and their checks, by key path.

Shape errors come from pydantic (``filters.alerts.rules[2].window: ...``);
what depends on a rule's kind or on the rest of the config (a threshold the
kind needs, a cluster that does not exist) is checked by ``check`` with
the same key paths, so every mistake names the key to fix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError

from sluice import ConfigError, FilterConfig
from sluice.control.config import format_errors

__all__ = ["KINDS", "AlertsConfig", "Rule", "Webhook", "settings"]

WHERE = "filters.alerts"

# What each kind measures and whether it needs a threshold (ratio 0..1, seconds).
KINDS = {
    "error_ratio": "the share of 5xx answers over the window (0..1)",
    "latency_p99": "the 99th percentile of request duration over the window (seconds)",
    "endpoint_ejected": "an endpoint is ejected by outlier detection",
    "no_healthy_endpoint": "no endpoint of a cluster is healthy and not ejected",
    "reload_failed": "the latest config reload failed",
    "certificate_expiry": "a listener's TLS certificate expires in fewer than ``days`` days",
    "config_store_stale": "the config store has not been in sync for more than ``threshold`` seconds",
    "rate_limit_store_errors": "a rate limit filter decided without its store (error_open/error_closed) "
                               "within the window",
}
_MEASURED = ("error_ratio", "latency_p99")
_CLUSTERS = ("endpoint_ejected", "no_healthy_endpoint")  # the kinds a cluster may narrow


class Rule(FilterConfig):
    """One alerting rule. ``for``: how long the condition must hold before
    the alert fires (pending until then); it resolves when the condition
    stops holding, or, with ``resolve_threshold``, when the value falls to
    it or below (hysteresis, so a value hovering at the threshold does not
    flap)."""

    name: str = Field(min_length=1)
    kind: Literal["error_ratio", "latency_p99", "endpoint_ejected", "no_healthy_endpoint", "reload_failed",
                  "certificate_expiry", "config_store_stale", "rate_limit_store_errors"]
    route: str | None = None
    cluster: str | None = None
    threshold: NonNegativeFloat | None = None
    resolve_threshold: NonNegativeFloat | None = None
    window: PositiveFloat = 300.0
    days: PositiveFloat | None = None  # certificate_expiry: how long before notAfter it fires
    for_: NonNegativeFloat = Field(60.0, alias="for")
    severity: str = "warning"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Webhook(FilterConfig):
    """An Alertmanager (API v2) or any receiver of its JSON: ``url`` is the
    full address, e.g. ``http://127.0.0.1:9093/api/v2/alerts``."""

    url: str
    timeout: PositiveFloat = 2.0  # per try: connect, send, and the answer's head
    max_retries: NonNegativeInt = 3  # tries after the first, with backoff doubling from ``backoff``
    backoff: PositiveFloat = 0.5
    max_backoff: PositiveFloat = 10.0
    max_queue: PositiveInt = 1000  # notifications waiting; past it the oldest is dropped (and counted)
    repeat_interval: PositiveFloat = 60.0  # firing alerts are sent again so Alertmanager keeps them
    headers: dict[str, str] = {}  # e.g. authorization


class AlertsConfig(FilterConfig):
    interval: PositiveFloat = 5.0  # seconds between evaluations
    rules: list[Rule] = []
    webhook: Webhook | None = None
    generator_url: str = ""  # each alert's generatorURL (e.g. the Grafana dashboard)


def settings(config: Any) -> AlertsConfig | None:
    """``config``'s alerting settings, checked; None when it has none.
    Raises ConfigError with key paths."""
    data = config.filters.get("alerts")
    if data is None:
        return None
    try:
        alerts = AlertsConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, WHERE)) from None
    errors = check(alerts, config)
    if errors:
        raise ConfigError("\n".join(errors))
    return alerts


def check(alerts: AlertsConfig, config: Any) -> list[str]:
    """What pydantic cannot see: kind-specific keys and names in the config."""
    errors = []
    routes = {r.get("name") for r in config.routes if isinstance(r, dict)}
    seen: dict[str, int] = {}
    for i, rule in enumerate(alerts.rules):
        where = f"{WHERE}.rules[{i}]"
        if rule.name in seen:
            errors.append(f"{where}.name: {rule.name!r} names rules[{seen[rule.name]}] already")
        seen.setdefault(rule.name, i)
        if rule.kind == "config_store_stale":
            if rule.threshold is None:
                errors.append(f"{where}.threshold: required for kind 'config_store_stale' (seconds out of sync)")
            if rule.route is not None or rule.cluster is not None:
                errors.append(f"{where}: kind 'config_store_stale' is about the config store, not routes or "
                              "clusters")
            if getattr(config, "config_store", None) is None:
                errors.append(f"{where}.kind: 'config_store_stale' needs a [config_store] table")
        elif rule.kind in _MEASURED:
            if rule.threshold is None:
                errors.append(f"{where}.threshold: required for kind {rule.kind!r} ({KINDS[rule.kind]})")
            elif rule.kind == "error_ratio" and rule.threshold > 1:
                errors.append(f"{where}.threshold: a ratio, between 0 and 1 (0.05 is 5%)")
            if rule.resolve_threshold is not None and rule.threshold is not None \
                    and rule.resolve_threshold > rule.threshold:
                errors.append(f"{where}.resolve_threshold: must not be above threshold ({rule.threshold})")
            if rule.route is not None and rule.cluster is not None:
                errors.append(f"{where}: give route or cluster, not both")
        else:
            for key in ("threshold", "resolve_threshold"):
                if getattr(rule, key) is not None:
                    errors.append(f"{where}.{key}: kind {rule.kind!r} has no threshold ({KINDS[rule.kind]})")
            if rule.route is not None:
                errors.append(f"{where}.route: kind {rule.kind!r} is " + (
                    "about clusters, not routes" if rule.kind in _CLUSTERS else "not about routes"))
            if rule.kind not in _CLUSTERS and rule.cluster is not None:
                errors.append(f"{where}.cluster: kind {rule.kind!r} is not about clusters")
        if (rule.kind == "certificate_expiry") != (rule.days is not None):
            errors.append(f"{where}.days: " + ("required for kind 'certificate_expiry' (fire this many days "
                                               "before a certificate expires)" if rule.days is None else
                                               f"only for kind 'certificate_expiry', not {rule.kind!r}"))
        if rule.cluster is not None and rule.cluster not in config.clusters:
            errors.append(f"{where}.cluster: unknown cluster {rule.cluster!r}; "
                          f"available: {', '.join(sorted(config.clusters)) or '(none)'}")
        if rule.route is not None and rule.route not in routes:
            named = sorted(n for n in routes if n)
            errors.append(f"{where}.route: no route is named {rule.route!r}; "
                          f"named routes: {', '.join(named) or '(none)'}")
    if alerts.webhook is not None and not alerts.webhook.url.startswith(("http://", "https://")):
        errors.append(f"{WHERE}.webhook.url: expected http://host[:port]/path or https://...")
    return errors
