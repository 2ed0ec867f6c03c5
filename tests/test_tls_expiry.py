"""The certificate expiry alert: the built-in evaluator's ``certificate_expiry`` kind
over a real proxy's gauge (the shipped Prometheus rule is in test_alerts' promtool test)."""

from __future__ import annotations

import pytest
import trio
import trustme
from structlog.testing import capture_logs

from sluice import ConfigError
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
