"""The certificate expiry alert: the built-in evaluator's ``certificate_expiry`` kind
over a real proxy's gauge, and the shipped Prometheus rule through promtool."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio
import trustme
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.plugins import alerts
from sluice.testing import serve

from .conftest import config
from .tls_support import issue

PLUGINS = ["router", "balancer", "tls", "alerts"]


def with_rule(cfg: dict, **rule) -> dict:
    cfg["filters"]["alerts"] = {"interval": 0.1, "rules": [{"name": "CertExpiry", "kind": "certificate_expiry",
                                                            "for": 0, **rule}]}
    return cfg


async def test_a_certificate_near_its_end_fires_and_only_that_one(start_origin, tmp_path):
    origin = await start_origin()
    ca = trustme.CA()
    soon, later = issue(ca, tmp_path, "soon", "soon.test", days=5), issue(ca, tmp_path, "later", "later.test", days=60)
    cfg = with_rule(config(origin.address, listener={"name": "edge", "tls": {
        "cert": str(later.cert), "key": str(later.key),
        "certificates": [{"cert": str(soon.cert), "key": str(soon.key)}]}}), days=14)
    with capture_logs() as logs:
        async with serve(cfg, plugins=PLUGINS):
            with trio.fail_after(10):
                while not any(e["event"] == "alert firing" for e in logs):
                    await trio.sleep(0.05)
    fired = [e for e in logs if e["event"] == "alert firing"]
    assert len(fired) == 1 and fired[0]["labels"] == {"listener": "edge", "cert": str(soon.cert)}
    assert fired[0]["kind"] == "certificate_expiry"


@pytest.mark.parametrize(("rule", "message"), [
    ({}, "filters.alerts.rules[0].days: required for kind 'certificate_expiry'"),
    ({"days": 14, "threshold": 3}, "filters.alerts.rules[0].threshold: kind 'certificate_expiry' has no threshold"),
])
async def test_bad_expiry_rules_name_their_key(rule, message):
    cfg = with_rule(config("127.0.0.1:9"), **rule)
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert message in str(info.value)


def test_days_on_another_kind_is_refused():
    cfg = config("127.0.0.1:9")
    cfg["filters"]["alerts"] = {"rules": [{"name": "R", "kind": "reload_failed", "days": 3}]}

    async def start():
        async with serve(cfg, plugins=PLUGINS):
            pass
    with pytest.raises(ConfigError) as info:
        trio.run(start)
    assert "filters.alerts.rules[0].days: only for kind 'certificate_expiry'" in str(info.value)


# At 20m, promtool's time() is 1200: "soon" ends 5 days later, "later" 30 days later, and a
# certificate a reload removed reads 0 (it must not look expired).
PROMTOOL_TEST = """
rule_files:
  - RULES
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'sluice_tls_certificate_expiry_timestamp_seconds{job="sluice",listener="edge",cert="/etc/soon.pem"}'
        values: '433200x30'
      - series: 'sluice_tls_certificate_expiry_timestamp_seconds{job="sluice",listener="edge",cert="/etc/later.pem"}'
        values: '2593200x30'
      - series: 'sluice_tls_certificate_expiry_timestamp_seconds{job="sluice",listener="edge",cert="/etc/gone.pem"}'
        values: '0x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: SluiceCertificateExpiresSoon
        exp_alerts:
          - exp_labels: {job: sluice, listener: edge, cert: /etc/soon.pem, severity: warning}
            exp_annotations: {summary: "Certificate /etc/soon.pem of listener edge expires in 5d 0h 0m 0s"}
"""


def test_the_shipped_expiry_rule_fires_through_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus; make test-deps)")
    rules = alerts.files()["prometheus-rules.yml"]
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    test = tmp_path / "rules-test.yml"
    test.write_text(PROMTOOL_TEST.replace("RULES", str(rules)))
    r = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
