"""Alerting (sluice.plugins.alerts): rules against a real proxy, real
origins and a real webhook receiver (and a real Alertmanager when the
Debian package is there); the window arithmetic against prometheus_client's
own exposition; the shipped Prometheus rules through promtool."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import subprocess
import time
import urllib.request

import httpx
import pytest
import trio
import trustme
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.control.app import App
from sluice.control.config import parse
from sluice.control.registry import Plugins
from sluice.plugins import alerts
from sluice.plugins.alerts.settings import settings
from sluice.plugins.alerts.state import RuleState, step
from sluice.plugins.alerts.window import Ring, quantile
from sluice.testing import serve

from .conftest import config
from .origin import Reply
from .proc import Running, free_port, sluice
from .test_reload import Source

PLUGINS = ["router", "balancer", "alerts"]


# -- a webhook receiver ----------------------------------------------------------


class Receiver:
    """An origin handler that keeps every alert POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.alerts: list[dict] = []
        self._arrived = trio.Event()

    async def __call__(self, request, body):
        assert request.method == b"POST" and request.target == b"/api/v2/alerts"
        self.alerts.extend(json.loads(body))
        self._arrived.set()
        return Reply(self.status, [(b"content-type", b"application/json")], b"")

    async def wait_for(self, predicate, timeout: float = 10.0) -> dict:
        """The first alert ``predicate`` accepts (waiting for it)."""
        with trio.fail_after(timeout):
            while True:
                for alert in self.alerts:
                    if predicate(alert):
                        return alert
                await self._arrived.wait()
                self._arrived = trio.Event()


def firing(name: str):
    return lambda a: a["labels"]["alertname"] == name and "endsAt" not in a


def resolved(name: str):
    return lambda a: a["labels"]["alertname"] == name and "endsAt" in a


def with_alerts(cfg: dict, rules: list[dict], webhook: str | None, **settings_) -> dict:
    table = {"interval": 0.1, "rules": rules, **settings_}
    if webhook is not None:
        table["webhook"] = {"url": webhook, "timeout": 1.0, "max_retries": 2, "backoff": 0.05}
    cfg["filters"]["alerts"] = table
    return cfg


def dead_address() -> str:
    """A loopback port nothing listens on (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


# -- settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"kind": "error_ratio"}, "filters.alerts.rules[1].threshold: required for kind 'error_ratio'"),
        ({"kind": "error_ratio", "threshold": 5}, "filters.alerts.rules[1].threshold: a ratio, between 0 and 1"),
        ({"kind": "latency_p99", "threshold": 0.5, "window": -1}, "filters.alerts.rules[1].window: Input should be"),
        ({"kind": "nope"}, "filters.alerts.rules[1].kind: Input should be"),
        ({"kind": "endpoint_ejected", "cluster": "other"}, "filters.alerts.rules[1].cluster: unknown cluster 'other'"),
        ({"kind": "error_ratio", "threshold": 0.1, "route": "x"}, "filters.alerts.rules[1].route: no route is named 'x'"),
        ({"kind": "reload_failed", "threshold": 1}, "filters.alerts.rules[1].threshold: kind 'reload_failed' has no"),
        ({"kind": "latency_p99", "threshold": 0.5, "resolve_threshold": 0.9},
         "filters.alerts.rules[1].resolve_threshold: must not be above threshold"),
        ({"kind": "reload_failed", "severity": "page", "extra": 1}, "filters.alerts.rules[1].extra: unknown key"),
        ({"kind": "rate_limit_store_errors", "threshold": 1},
         "filters.alerts.rules[1].threshold: kind 'rate_limit_store_errors' has no threshold"),
        ({"kind": "rate_limit_store_errors", "cluster": "backend"},
         "filters.alerts.rules[1].cluster: kind 'rate_limit_store_errors' is not about clusters"),
    ],
)
def test_bad_rules_are_named_by_key_path(rule, message):
    good = {"name": "ok", "kind": "reload_failed"}
    cfg = with_alerts(config("127.0.0.1:1"), [good, {"name": "bad", **rule}], None)
    with pytest.raises(ConfigError) as err:
        settings(parse(cfg))
    assert message in str(err.value)


def test_a_bad_rule_refuses_to_start_with_its_key_path(tmp_path):
    path = tmp_path / "sluice.toml"
    path.write_text(f"""
[[listeners]]
address = "127.0.0.1:{free_port()}"
filters = ["router"]
[clusters.backend]
endpoints = ["127.0.0.1:1"]
[[routes]]
match = {{ prefix = "/" }}
cluster = "backend"
[[filters.alerts.rules]]
name = "errors"
kind = "error_ratio"
window = 60
""")
    r = sluice("run", "-c", str(path), timeout=30)
    assert r.returncode == 2, r.stderr
    assert "filters.alerts.rules[0].threshold: required for kind 'error_ratio'" in r.stderr
    assert "Traceback" not in r.stderr


def test_alerts_is_not_a_traffic_filter():
    cfg = with_alerts(config("127.0.0.1:1", filters=["alerts", "router"]), [], None)
    with pytest.raises(ConfigError, match="alerts is not a traffic filter"):
        App(parse(cfg), Plugins(PLUGINS))


# -- windows and states --------------------------------------------------------------


def test_p99_matches_histogram_quantile_on_prometheus_clients_own_exposition():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from sluice.plugins.alerts.evaluate import parse as parse_text

    registry = CollectorRegistry()
    h = Histogram("t_seconds", "t", buckets=(0.1, 0.5, 1.0), registry=registry)
    for _ in range(90):
        h.observe(0.05)
    for _ in range(10):
        h.observe(0.7)
    buckets = {math.inf if s[1]["le"] == "+Inf" else float(s[1]["le"]): s[2]
               for s in parse_text(generate_latest(registry)) if s[0] == "t_seconds_bucket"}
    # rank 99 of 100 falls in (0.5, 1.0], holding ranks 90..100: 0.5 + 0.5 * 9/10
    assert quantile(0.99, buckets) == pytest.approx(0.95)
    assert quantile(0.5, buckets) == pytest.approx(0.1 * 50 / 90)
    assert quantile(0.99, {0.1: 0, math.inf: 0}) is None  # no observations: no value
    assert quantile(0.99, {0.1: 0, 1.0: 0, math.inf: 5}) == 1.0  # all above the top bound


def test_a_ring_gives_the_increase_over_its_window_and_survives_a_counter_reset():
    ring = Ring(window=10, interval=1)
    assert ring.increase() is None
    for t in range(0, 21):
        ring.add(float(t), {"total": t * 10.0, "errors": float(t)})
    assert ring.increase() == {"total": 100.0, "errors": 10.0}  # t=10 .. t=20
    ring.add(21.0, {"total": 5.0, "errors": 0.0})  # a restart: counters from zero
    assert ring.increase() is None
    ring.add(22.0, {"total": 15.0, "errors": 1.0})
    assert ring.increase() == {"total": 10.0, "errors": 1.0}


def test_an_alert_is_pending_for_its_duration_then_fires_and_resolves_with_hysteresis():
    state, key = RuleState(), (("route", "api"),)

    def at(t, v):
        return [(x.state, x.starts_at) for x in
                step(state, {key: v}, t, threshold=0.5, resolve_threshold=0.2, hold=10)]

    assert at(0, 0.9) == []  # pending
    assert at(5, 0.1) == []  # it stopped holding before `for`: nothing sent
    assert at(6, 0.9) == []  # pending again, from 6
    assert at(15, 0.9) == []
    assert at(16, 0.9) == [("firing", 6)]
    assert at(17, 0.4) == []  # below threshold but above resolve_threshold: still firing
    assert at(18, 0.2) == [("resolved", 6)]
    assert at(19, 0.1) == []
    assert step(state, {}, 20, threshold=0.5, resolve_threshold=None, hold=0) == []
    assert state.instances == {}  # gone and quiet: forgotten


# -- against a real proxy --------------------------------------------------------------


async def test_an_ejected_endpoint_fires_and_resolves_when_it_returns(start_origin):
    receiver = Receiver()
    hook = await start_origin(receiver)
    live = await start_origin()
    dead = dead_address()
    cfg = config(dead, live.address, cluster={
        "policy": {"name": "round_robin"},
        "outlier": {"consecutive_connect_failures": 1, "base_ejection": 1.0}})
    cfg = with_alerts(cfg, [{"name": "Ejected", "kind": "endpoint_ejected", "for": 0, "severity": "page"}],
                      f"http://{hook.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        for _ in range(4):  # round robin reaches the dead endpoint
            await client.get(proxy.url + "/")
        alert = await receiver.wait_for(firing("Ejected"))
        assert alert["labels"] == {"alertname": "Ejected", "severity": "page", "cluster": "backend",
                                   "endpoint": dead}
        assert alert["startsAt"].endswith("Z")
        gone = await receiver.wait_for(resolved("Ejected"))  # its 1 s ejection ran out
        assert gone["labels"] == alert["labels"] and gone["startsAt"] == alert["startsAt"]


async def test_no_healthy_endpoint_fires_for_a_cluster_whose_checks_all_fail(start_origin):
    receiver = Receiver()
    hook = await start_origin(receiver)
    live = await start_origin()
    cfg = config(live.address)
    cfg["clusters"]["down"] = {"endpoints": [dead_address()], "health_check": {
        "kind": "tcp", "interval": 0.2, "jitter": 0.0, "timeout": 0.1, "unhealthy_threshold": 1}}
    cfg = with_alerts(cfg, [{"name": "Down", "kind": "no_healthy_endpoint", "for": 0.3}],
                      f"http://{hook.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS):
        alert = await receiver.wait_for(firing("Down"))
        assert alert["labels"] == {"alertname": "Down", "severity": "warning", "cluster": "down"}
        assert not any(a["labels"].get("cluster") == "backend" for a in receiver.alerts)


async def test_a_failed_reload_fires_and_the_next_good_one_resolves_it(start_origin):
    receiver = Receiver()
    hook = await start_origin(receiver)
    live = await start_origin()
    cfg = with_alerts(config(live.address), [{"name": "ReloadFailed", "kind": "reload_failed", "for": 0}],
                      f"http://{hook.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS) as proxy:
        app = proxy.app
        broken = json.loads(json.dumps(cfg))
        broken["routes"][0]["cluster"] = "nope"
        app.reload_source = Source(broken)
        app.request_reload()
        alert = await receiver.wait_for(firing("ReloadFailed"))
        assert app.last_reload["ok"] is False
        assert alert["annotations"]["summary"] == "the latest config reload failed"
        app.reload_source = Source(cfg)
        app.request_reload()
        await receiver.wait_for(resolved("ReloadFailed"))
        assert app.last_reload["ok"] is True


async def test_a_reload_resolves_a_removed_rules_alert_and_moves_to_a_new_webhook(start_origin):
    first, second = Receiver(), Receiver()
    hook1, hook2 = await start_origin(first), await start_origin(second)
    live = await start_origin()
    cfg = config(live.address)
    cfg["clusters"]["down"] = {"endpoints": [dead_address()], "health_check": {
        "kind": "tcp", "interval": 0.2, "jitter": 0.0, "timeout": 0.1, "unhealthy_threshold": 1}}
    down = {"name": "Down", "kind": "no_healthy_endpoint", "cluster": "down", "for": 0}
    cfg = with_alerts(cfg, [down], f"http://{hook1.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS) as proxy:
        await first.wait_for(firing("Down"))
        new = json.loads(json.dumps(cfg))
        new["filters"]["alerts"]["rules"] = [{**down, "name": "StillDown"}]
        new["filters"]["alerts"]["webhook"]["url"] = f"http://{hook2.address}/api/v2/alerts"
        proxy.app.reload_source = Source(new)
        proxy.app.request_reload()
        gone = await second.wait_for(resolved("Down"))  # the rule is gone: its alert ends
        assert gone["labels"]["cluster"] == "down"
        await second.wait_for(firing("StillDown"))
    assert not any(resolved("Down")(a) for a in first.alerts)


async def test_a_firing_alert_is_sent_again_every_repeat_interval_with_its_first_start(start_origin):
    receiver = Receiver()
    hook = await start_origin(receiver)
    live = await start_origin()
    cfg = with_alerts(config(live.address), [{"name": "ReloadFailed", "kind": "reload_failed", "for": 0}],
                      f"http://{hook.address}/api/v2/alerts")
    cfg["filters"]["alerts"]["webhook"]["repeat_interval"] = 0.3
    async with serve(cfg, plugins=PLUGINS) as proxy:
        broken = json.loads(json.dumps(cfg))
        broken["routes"][0]["cluster"] = "nope"
        proxy.app.reload_source = Source(broken)
        proxy.app.request_reload()
        with trio.fail_after(10):
            while len([a for a in receiver.alerts if firing("ReloadFailed")(a)]) < 3:
                await trio.sleep(0.05)
    sent = [a for a in receiver.alerts if firing("ReloadFailed")(a)]
    assert len({a["startsAt"] for a in sent}) == 1  # the same alert, kept alive in Alertmanager


async def test_a_reload_with_bad_alert_settings_keeps_the_old_rules_and_says_why(start_origin):
    receiver = Receiver()
    hook = await start_origin(receiver)
    live = await start_origin()
    cfg = with_alerts(config(live.address), [{"name": "ReloadFailed", "kind": "reload_failed", "for": 0}],
                      f"http://{hook.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS) as proxy:
        app = proxy.app
        before = alerts.running(app).config
        bad = json.loads(json.dumps(cfg))
        bad["filters"]["alerts"]["rules"].append({"name": "Errors", "kind": "error_ratio"})
        with capture_logs() as logs:
            app.reload_source = Source(bad)
            app.request_reload()
            with trio.fail_after(10):
                while not any(e["event"] == "reload failed" for e in logs):
                    await trio.sleep(0.01)
        # The alerts' settings are checked with the rest of the new config (as
        # `sluice check` checks them): the reload fails, and nothing changes.
        event = next(e for e in logs if e["event"] == "reload failed")
        assert "filters.alerts.rules[1].threshold: required for kind 'error_ratio'" in event["error"]
        assert app.last_reload["ok"] is False
        assert alerts.running(app).config is before


async def hang(stream):
    """A webhook that reads the request and never answers."""
    with trio.move_on_after(30):
        while await stream.receive_some(65536):
            pass


async def timed_gets(client, url: str, n: int = 30) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        assert (await client.get(url)).status_code == 200
        out.append(time.perf_counter() - t)
    return out


@pytest.mark.parametrize("target", ["hangs", "refuses"])
async def test_a_webhook_that_hangs_or_refuses_leaves_traffic_alone_and_is_tried_a_bounded_number_of_times(
        start_origin, target):
    live = await start_origin()
    hook = await start_origin(raw=hang) if target == "hangs" else None
    url = f"http://{hook.address if hook else dead_address()}/api/v2/alerts"
    cfg = with_alerts(config(live.address), [{"name": "ReloadFailed", "kind": "reload_failed", "for": 0}], url)
    cfg["filters"]["alerts"]["webhook"].update(timeout=0.5, max_retries=2, backoff=0.05)
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        app = proxy.app
        sender = alerts.running(app).sender
        before = await timed_gets(client, proxy.url + "/")
        broken = json.loads(json.dumps(cfg))
        broken["routes"][0]["cluster"] = "nope"
        app.reload_source = Source(broken)
        app.request_reload()
        with trio.fail_after(10):
            while sender.attempts == 0:
                await trio.sleep(0.01)
        during = await timed_gets(client, proxy.url + "/")  # while the webhook is being tried
        with trio.fail_after(10):
            while sender.dropped == 0:  # every try failed: the batch is given up
                await trio.sleep(0.01)
        assert sender.attempts == 3  # the first try and max_retries = 2 more
        if hook is not None:
            assert hook.connections == 3
        # Generous: the sender's waits are on its own task; a blocked loop would add 0.5 s per try.
        assert statistics.median(during) < statistics.median(before) * 5 + 0.1


# -- a real Alertmanager ---------------------------------------------------------------


ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@pytest.fixture
def alertmanager(tmp_path):
    if ALERTMANAGER is None:
        pytest.skip("Alertmanager is not installed (Debian: prometheus-alertmanager; make test-deps)")
    port = free_port()
    conf = tmp_path / "alertmanager.yml"
    conf.write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n")
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={conf}", f"--storage.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"alertmanager did not start: {proc.stderr.read1().decode()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_real_alertmanager_takes_the_firing_alert_and_its_resolution(start_origin, alertmanager):
    live = await start_origin()
    cfg = with_alerts(config(live.address), [{"name": "ReloadFailed", "kind": "reload_failed", "for": 0,
                                              "labels": {"team": "edge"}}],
                      f"{alertmanager}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        app = proxy.app
        sender = alerts.running(app).sender

        async def ours() -> list[dict]:
            r = await client.get(f"{alertmanager}/api/v2/alerts")
            assert r.status_code == 200
            return [a for a in r.json() if a["labels"].get("alertname") == "ReloadFailed"]

        broken = json.loads(json.dumps(cfg))
        broken["routes"][0]["cluster"] = "nope"
        app.reload_source = Source(broken)
        app.request_reload()
        with trio.fail_after(10):
            while not (found := await ours()):
                await trio.sleep(0.1)
        assert found[0]["labels"] == {"alertname": "ReloadFailed", "severity": "warning", "team": "edge"}
        assert found[0]["status"]["state"] == "active"
        app.reload_source = Source(cfg)
        app.request_reload()
        with trio.fail_after(10):
            while await ours():  # resolved: Alertmanager no longer lists it
                await trio.sleep(0.1)
        assert sender.dropped == 0 and sender.attempts == 2  # one POST each, both accepted


# -- the shipped Prometheus rules and Grafana dashboard ------------------------------


def test_the_shipped_prometheus_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus; make test-deps)")
    path = alerts.files()["prometheus-rules.yml"]
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


# Series as sluice.metrics names them, 30 minutes of them: route api half 5xx and slow (every
# request in (1, 2.5] s), route web fine; cluster c's one endpoint refused every try, is
# ejected, and so c has no endpoint to use; cluster ok is fine; a reload failed at 2m.
# At 20m promtool's time() is 1200: certificate "soon" ends 5 days later, "later" 30 days
# later, and a certificate a reload removed reads 0 (it must not look expired).
PROMTOOL_TEST = """
rule_files:
  - RULES
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'sluice_downstream_requests_total{job="sluice",listener="l",route="api",status_class="5xx"}'
        values: '0+30x30'
      - series: 'sluice_downstream_requests_total{job="sluice",listener="l",route="api",status_class="2xx"}'
        values: '0+30x30'
      - series: 'sluice_downstream_requests_total{job="sluice",listener="l",route="web",status_class="2xx"}'
        values: '0+60x30'
      - series: 'sluice_upstream_requests_total{job="sluice",cluster="c",endpoint="e:1",outcome="connect_failure"}'
        values: '0+60x30'
      - series: 'sluice_downstream_request_duration_seconds_bucket{job="sluice",listener="l",route="api",status_class="2xx",le="1.0"}'
        values: '0x30'
      - series: 'sluice_downstream_request_duration_seconds_bucket{job="sluice",listener="l",route="api",status_class="2xx",le="2.5"}'
        values: '0+60x30'
      - series: 'sluice_downstream_request_duration_seconds_bucket{job="sluice",listener="l",route="api",status_class="2xx",le="+Inf"}'
        values: '0+60x30'
      - series: 'sluice_upstream_endpoint_ejected{job="sluice",cluster="c",endpoint="e:1"}'
        values: '1x30'
      - series: 'sluice_upstream_endpoint_healthy{job="sluice",cluster="c",endpoint="e:1"}'
        values: '1x30'
      - series: 'sluice_upstream_endpoint_ejected{job="sluice",cluster="ok",endpoint="e:2"}'
        values: '0x30'
      - series: 'sluice_upstream_endpoint_healthy{job="sluice",cluster="ok",endpoint="e:2"}'
        values: '1x30'
      - series: 'sluice_config_last_reload_successful{job="sluice"}'
        values: '1 1 0x28'
      - series: 'sluice_config_store_stale_seconds{job="sluice"}'
        values: '0x10 60+60x20'
      - series: 'sluice_tls_certificate_expiry_timestamp_seconds{job="sluice",listener="edge",cert="/etc/soon.pem"}'
        values: '433200x30'
      - series: 'sluice_tls_certificate_expiry_timestamp_seconds{job="sluice",listener="edge",cert="/etc/later.pem"}'
        values: '2593200x30'
      - series: 'sluice_tls_certificate_expiry_timestamp_seconds{job="sluice",listener="edge",cert="/etc/gone.pem"}'
        values: '0x30'
      - series: 'sluice_plugin_rate_limit_decisions_total{job="sluice",filter="rate_limit",outcome="error_open"}'
        values: '0x10 0+10x5 50x15'
      - series: 'sluice_plugin_rate_limit_decisions_total{job="sluice",filter="rate_limit",outcome="allowed"}'
        values: '0+100x30'
      - series: 'sluice_plugin_rate_limit_decisions_total{job="sluice",filter="api_limit",outcome="error_closed"}'
        values: '0x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: SluiceRouteHighErrorRatio
        exp_alerts:
          - exp_labels: {job: sluice, route: api, severity: critical}
            exp_annotations: {summary: "Route api: 50% of answers are 5xx"}
      - eval_time: 20m
        alertname: SluiceClusterHighErrorRatio
        exp_alerts:
          - exp_labels: {job: sluice, cluster: c, severity: critical}
            exp_annotations: {summary: "Cluster c: 100% of upstream tries failed (5xx, reset, timeout, connect failure)"}
      - eval_time: 20m
        alertname: SluiceRouteHighLatencyP99
        exp_alerts:
          - exp_labels: {job: sluice, route: api, severity: warning}
            exp_annotations: {summary: "Route api: p99 latency 2.485s"}
      - eval_time: 20m
        alertname: SluiceEndpointEjected
        exp_alerts:
          - exp_labels: {job: sluice, cluster: c, endpoint: "e:1", severity: warning}
            exp_annotations: {summary: "Endpoint e:1 of cluster c is ejected"}
      - eval_time: 20m
        alertname: SluiceNoHealthyEndpoint
        exp_alerts:
          - exp_labels: {job: sluice, cluster: c, severity: critical}
            exp_annotations: {summary: "Cluster c has no healthy endpoint"}
      - eval_time: 20m
        alertname: SluiceReloadFailed
        exp_alerts:
          - exp_labels: {job: sluice, severity: warning}
            exp_annotations: {summary: "The latest sluice config reload failed; the previous config is serving"}
      - eval_time: 10m
        alertname: SluiceConfigStoreStale
        exp_alerts: []
      - eval_time: 20m
        alertname: SluiceConfigStoreStale
        exp_alerts:
          - exp_labels: {job: sluice, severity: warning}
            exp_annotations: {summary: "sluice has not been in sync with its config store for 10m 0s; the last good config serves"}
      - eval_time: 20m
        alertname: SluiceCertificateExpiresSoon
        exp_alerts:
          - exp_labels: {job: sluice, listener: edge, cert: /etc/soon.pem, severity: warning}
            exp_annotations: {summary: "Certificate /etc/soon.pem of listener edge expires in 5d 0h 0m 0s"}
      - eval_time: 9m
        alertname: SluiceRateLimitStoreErrors
        exp_alerts: []
      - eval_time: 13m
        alertname: SluiceRateLimitStoreErrors
        exp_alerts:
          - exp_labels: {job: sluice, filter: rate_limit, outcome: error_open, severity: warning}
            exp_annotations: {summary: "Rate limit filter rate_limit: 20 decisions without its store in 5m (error_open)"}
      - eval_time: 25m
        alertname: SluiceRateLimitStoreErrors
        exp_alerts: []

"""


def test_the_shipped_prometheus_rules_fire_on_sluices_series_and_only_there(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus; make test-deps)")
    test = tmp_path / "rules-test.yml"
    test.write_text(PROMTOOL_TEST.replace("RULES", str(alerts.files()["prometheus-rules.yml"])))
    r = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_shipped_files_are_package_data():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["sluice.plugins.alerts"]
    for name, path in alerts.files().items():
        assert path.is_file() and name in shipped


# -- driven by the metrics of a real `sluice run` ----------------------------------------


async def test_a_5xx_ratio_fires_once_for_two_workers_and_resolves_when_the_origin_recovers(start_origin, tmp_path):
    receiver = Receiver()
    hook = await start_origin(receiver)
    status = [500]

    async def flaky(request, body):
        return Reply(status[0], [], b"x")

    origin = await start_origin(flaky)
    path = tmp_path / "sluice.toml"
    path.write_text(f"""
[server]
workers = 2
[[listeners]]
address = "127.0.0.1:{free_port()}"
filters = ["router"]
[clusters.backend]
endpoints = ["{origin.address}"]
outlier = {{ consecutive_5xx = 0 }}
[[routes]]
name = "api"
match = {{ prefix = "/" }}
cluster = "backend"
[filters.alerts]
interval = 0.2
[filters.alerts.webhook]
url = "http://{hook.address}/api/v2/alerts"
[[filters.alerts.rules]]
name = "ApiErrors"
kind = "error_ratio"
route = "api"
threshold = 0.5
window = 2
for = 0.5
severity = "critical"
""")
    proxy = await trio.to_thread.run_sync(lambda: Running("-c", str(path)))
    try:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(20):
                while not any(firing("ApiErrors")(a) for a in receiver.alerts):
                    assert (await client.get(proxy.url + "/")).status_code == 500
                    await trio.sleep(0.02)
            alert = await receiver.wait_for(firing("ApiErrors"))
            assert alert["labels"] == {"alertname": "ApiErrors", "severity": "critical", "route": "api"}
            assert float(alert["annotations"]["value"]) > 0.5
            status[0] = 200
            with trio.fail_after(20):
                while not any(resolved("ApiErrors")(a) for a in receiver.alerts):
                    assert (await client.get(proxy.url + "/")).status_code == 200
                    await trio.sleep(0.02)
        # worker 0 alone evaluates: one notification each way for the fleet, not one per worker
        assert [("endsAt" in a) for a in receiver.alerts if a["labels"]["alertname"] == "ApiErrors"] == [False, True]
    finally:
        await trio.to_thread.run_sync(proxy.stop)
    log = "".join(proxy.stdout + proxy.stderr)
    assert "alert firing" in log and "alert resolved" in log


async def test_a_routes_p99_latency_and_a_clusters_failed_tries_fire_from_the_metrics(start_origin):
    receiver = Receiver()
    hook = await start_origin(receiver)

    async def slow(request, body):
        await trio.sleep(0.3)
        return Reply(200, [], b"slow")

    origin = await start_origin(slow)
    cfg = config(origin.address, routes=[
        {"name": "broken", "match": {"prefix": "/broken"}, "cluster": "down"},
        {"name": "api", "match": {"prefix": "/"}, "cluster": "backend"}])
    cfg["clusters"]["down"] = {"endpoints": [dead_address()], "connect_tries": 1}
    cfg = with_alerts(cfg, [
        {"name": "Slow", "kind": "latency_p99", "route": "api", "threshold": 0.2, "window": 10, "for": 0},
        {"name": "Fast", "kind": "latency_p99", "route": "api", "threshold": 1.0, "window": 10, "for": 0},
        {"name": "DownFails", "kind": "error_ratio", "cluster": "down", "threshold": 0.5, "window": 10, "for": 0},
        {"name": "ApiFails", "kind": "error_ratio", "cluster": "backend", "threshold": 0.5, "window": 10,
         "for": 0}], f"http://{hook.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS) as proxy, httpx.AsyncClient() as client:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(client.get, proxy.url + "/")
            for _ in range(3):
                nursery.start_soon(client.get, proxy.url + "/broken")
        slow = await receiver.wait_for(firing("Slow"))
        # every request took 0.3 s and more: the (0.25, 0.5] bucket, interpolated as Prometheus does
        assert 0.25 < float(slow["annotations"]["value"]) <= 0.5
        assert slow["labels"]["route"] == "api"
        down = await receiver.wait_for(firing("DownFails"))
        assert down["labels"]["cluster"] == "down" and float(down["annotations"]["value"]) == 1.0
    names = {a["labels"]["alertname"] for a in receiver.alerts}
    assert "Fast" not in names and "ApiFails" not in names


async def test_rate_limit_decisions_without_the_store_fire_by_filter_and_outcome_and_resolve(start_origin):
    """A [shared] Redis at a port nobody listens on: every global decision is error_open; the
    rule fires naming the filter and the outcome, and resolves once a window passes without one."""
    receiver = Receiver()
    hook = await start_origin(receiver)
    async def ok(request, body):
        return Reply(200, [], b"ok")

    origin = await start_origin(ok)
    cfg = config(origin.address, filters=["rate_limit", "router"],
                 shared={"backend": "redis", "address": dead_address(), "timeout": 0.5},
                 filter_settings={"rate_limit": {"mode": "global", "on_error": "open",
                                                 "limits": [{"rate": 100, "burst": 100}]}})
    cfg = with_alerts(cfg, [{"name": "StoreDown", "kind": "rate_limit_store_errors", "window": 1, "for": 0},
                            {"name": "Reloads", "kind": "reload_failed", "for": 0}],
                      f"http://{hook.address}/api/v2/alerts")
    async with serve(cfg, plugins=PLUGINS + ["rate_limit"]) as proxy, httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.get(proxy.url + "/")).status_code == 200  # on_error open: admitted
        fired = await receiver.wait_for(firing("StoreDown"))
        assert fired["labels"]["filter"] == "rate_limit" and fired["labels"]["outcome"] == "error_open"
        assert float(fired["annotations"]["value"]) >= 1
        gone = await receiver.wait_for(resolved("StoreDown"))
        assert gone["labels"]["outcome"] == "error_open"
    assert not any(a["labels"]["alertname"] == "StoreDown" and a["labels"]["outcome"] == "error_closed"
                   for a in receiver.alerts)


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(sluice_[a-zA-Z0-9_:]+)", text))


async def test_every_metric_the_dashboard_and_the_rules_use_is_in_a_real_scrape(start_origin, tmp_path):
    import ssl

    from sluice import metrics

    from .tls_support import ca_file, issue
    from sluice.plugins.alerts.evaluate import parse as parse_text

    dashboard = json.loads(alerts.files()["grafana-dashboard.json"].read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = alerts.files()["prometheus-rules.yml"].read_text()
    used = _metric_names("\n".join(exprs)) | _metric_names(rules)
    assert {"sluice_downstream_requests_total", "sluice_downstream_request_duration_seconds_bucket",
            "sluice_upstream_endpoint_ejected", "sluice_config_last_reload_successful"} <= used

    status = [500]

    async def flaky(request, body):
        return Reply(status[0], [], b"x")

    origin = await start_origin(flaky)
    ca = trustme.CA()  # a TLS listener, for the certificate expiry gauge
    pair = issue(ca, tmp_path, "edge", "localhost")
    cfg = config(origin.address, routes=[{"name": "api", "match": {"prefix": "/"}, "cluster": "backend"}],
                 listener={"tls": {"cert": str(pair.cert), "key": str(pair.key)}})
    trusting = ssl.create_default_context(cafile=str(ca_file(ca, tmp_path)))
    async with serve(cfg, plugins=PLUGINS + ["tls"]) as proxy, httpx.AsyncClient(verify=trusting) as client:
        for code in (500, 200):
            status[0] = code
            for _ in range(3):
                assert (await client.get(f"https://localhost:{proxy.address[1]}/")).status_code == code
        with trio.move_on_after(10):
            while True:  # the sums reach the scrape at the next flush
                scraped = {s[0] for s in parse_text(metrics.render())}
                if used <= scraped:
                    break
                await trio.sleep(0.1)
    assert used <= scraped, f"not in a scrape: {sorted(used - scraped)}"


def test_sluice_check_checks_the_alert_rules_against_the_config(tmp_path):
    path = tmp_path / "sluice.toml"
    path.write_text("""
[[listeners]]
address = "127.0.0.1:8080"
filters = ["router"]

[clusters.api]
endpoints = ["127.0.0.1:9000"]

[[routes]]
match = { prefix = "/" }
cluster = "api"

[filters.alerts]
rules = [
  { name = "Errors", kind = "error_ratio" },
  { name = "Down", kind = "no_healthy_endpoint", cluster = "apii" },
]
""")
    r = sluice("check", str(path))
    assert r.returncode == 2, r.stdout
    assert "filters.alerts.rules[0].threshold: required for kind 'error_ratio'" in r.stderr
    assert "filters.alerts.rules[1].cluster: unknown cluster 'apii'" in r.stderr
