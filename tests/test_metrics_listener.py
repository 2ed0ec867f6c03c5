"""The read-only metrics listener (``[metrics] address``,
``sluice.control.metrics_listener``) as a scraper and a kubelet use it: real
``sluice run`` processes, httpx, raw sockets and a real Prometheus."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .proc import Running, ThreadOrigin, free_port, poll, sluice
from .test_admin import TOKEN, bearer, events, raw
from .test_admin import write_config as admin_config


def write_config(path: Path, origin: str, metrics_address: str, *, port: int = 0, admin: str = "",
                 admin_address: str = "127.0.0.1:0") -> Path:
    """test_admin's config (a public listener, one cluster, the admin on loopback) with
    ``[metrics] address``."""
    admin_config(path, [origin], admin=admin, port=port, admin_address=admin_address)
    path.write_text(path.read_text() + f'\n[metrics]\naddress = "{metrics_address}"\n')
    return path


def metrics_url(proxy: Running) -> str:
    proxy.wait_for_output('"metrics listening"')
    (event,) = events(proxy, "metrics listening")
    return event["url"]


def sample(url: str, family: str, name: str) -> float:
    """The sum of ``name``'s samples in ``url``'s /metrics (0 before any)."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return sum(s.value for s in families[family].samples if s.name == name) if family in families else 0


def requests_served(url: str) -> float:
    return sample(url, "sluice_downstream_requests", "sluice_downstream_requests_total")


def test_with_two_workers_it_serves_every_workers_metrics_and_nothing_that_changes_state(tmp_path):
    admin_address = f"127.0.0.1:{free_port()}"
    with ThreadOrigin(body=b"m") as origin:
        path = write_config(tmp_path / "s.toml", origin.address, f"127.0.0.1:{free_port()}", port=free_port(),
                            admin=f'token = "{TOKEN}"', admin_address=admin_address)
        with Running("-c", str(path), "--workers", "2") as proxy:
            url, admin = metrics_url(proxy), f"http://{admin_address}"
            assert len(events(proxy, "metrics listening")) == 1  # worker 0's only
            with httpx.Client() as client:
                for _ in range(10):  # a connection each: the kernel spreads them over both workers,
                    client.get(proxy.url + "/", headers={"connection": "close"})  # (all on one: 1 in 512)
            # Worker 0 alone would count fewer than 10 (each flushes its sums once a second).
            poll(lambda: requests_served(url) == 10, what="10 requests counted across the workers", proxy=proxy)
            r = httpx.get(f"{url}/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")

            live = httpx.get(f"{url}/live")
            assert live.status_code == 200 and live.json()["worker"] == 0
            ready = httpx.get(f"{url}/ready")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            head = httpx.head(f"{url}/ready")
            assert head.status_code == 200 and head.content == b""
            assert int(head.headers["content-length"]) == len(ready.content)

            # Nothing that changes state or shows config: a reload asked here does not happen.
            generation = httpx.get(f"{admin}/config").json()["generation"]
            for method, path_ in (("POST", "/reload"), ("POST", "/drain"), ("POST", "/log-level"),
                                  ("PUT", "/metrics"), ("DELETE", "/live")):
                r = httpx.request(method, f"{url}{path_}", headers=bearer())
                assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", (method, path_)
            for path_ in ("/config", "/clusters", "/routes", "/plugins", "/log-level", "/reload", "/"):
                r = httpx.get(f"{url}{path_}", headers=bearer())
                assert r.status_code == 404, path_
                assert r.json()["endpoints"] == ["/live", "/metrics", "/ready"]
            assert httpx.get(f"{url}/live").status_code == 200  # not drained
            assert httpx.get(f"{admin}/config").json()["generation"] == generation
            assert not events(proxy, "config reloaded")
            # (the check above can fail: the admin's reload is seen by it)
            assert httpx.post(f"{admin}/reload", headers=bearer(), timeout=15).status_code == 200
            assert httpx.get(f"{admin}/config").json()["generation"] == generation + 1

            # Worker 0 dies: its replacement (index 0 again) opens the metrics listener again.
            first = live.json()["pid"]
            os.kill(first, signal.SIGKILL)

            def replaced() -> bool:
                try:
                    return httpx.get(f"{url}/live").json()["pid"] not in (first, proxy.pid)
                except httpx.TransportError:
                    return False

            poll(replaced, what="worker 0's replacement serving the metrics listener", proxy=proxy)
            assert requests_served(url) == 10  # the dead worker's counts stay in the totals


def test_ready_is_503_while_draining_and_live_stays_200(tmp_path):
    with ThreadOrigin(delay=1.5, body=b"slow") as slow:
        path = write_config(tmp_path / "s.toml", slow.address, "127.0.0.1:0")
        with Running("-c", str(path)) as proxy:
            url = metrics_url(proxy)
            answer = {}
            in_flight = threading.Thread(target=lambda: answer.update(r=httpx.get(proxy.url + "/", timeout=10)))
            in_flight.start()
            poll(lambda: sample(url, "sluice_downstream_requests_active", "sluice_downstream_requests_active") == 1,
                 what="the request in flight", proxy=proxy)
            proxy.signal()  # SIGTERM: drain
            r = poll(lambda: (r := httpx.get(f"{url}/ready")).status_code == 503 and r, what="ready 503")
            assert r.json()["draining"] is True
            assert httpx.head(f"{url}/ready").status_code == 503
            assert httpx.get(f"{url}/live").status_code == 200  # the loop runs on while it drains
            in_flight.join(10)
            assert answer["r"].status_code == 200
            assert proxy.wait(10) == 0


def test_it_keeps_the_admins_limits_on_bad_input(tmp_path):
    with ThreadOrigin(body=b"x") as origin:
        path = write_config(tmp_path / "s.toml", origin.address, "127.0.0.1:0")
        with Running("-c", str(path)) as proxy:
            url = metrics_url(proxy)
            assert raw(url, b"GET /live HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n") \
                .startswith(b"HTTP/1.1 431 ")
            assert raw(url, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")
            reply = raw(url, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ") and b"sluice_" in reply
            assert "Traceback" not in "".join(proxy.stderr)


def test_a_bad_or_clashing_address_is_a_config_error_naming_metrics_address(tmp_path):
    origin = "127.0.0.1:9"
    port = free_port()
    cases = {
        "nope": "metrics.address: not a host:port",
        f"127.0.0.1:{port}": f"metrics.address: 127.0.0.1:{port} clashes with listeners[0].address",
        f"0.0.0.0:{port}": f"metrics.address: 0.0.0.0:{port} clashes with listeners[0].address",
        "127.0.0.1:9901": "metrics.address: 127.0.0.1:9901 clashes with admin.address",
    }
    for address, message in cases.items():
        path = write_config(tmp_path / "bad.toml", origin, address, port=port, admin_address="127.0.0.1:9901")
        for command in (["run", "-c", str(path)], ["check", str(path)]):
            r = sluice(*command)
            assert r.returncode == 2, (address, r.stdout, r.stderr)
            assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = sluice("run", "-c", str(write_config(tmp_path / "busy.toml", origin, f"127.0.0.1:{taken}")))
        assert r.returncode == 2 and f"metrics.address: cannot listen on 127.0.0.1:{taken}" in r.stderr, r.stderr


def test_check_shows_it(tmp_path):
    path = write_config(tmp_path / "s.toml", "127.0.0.1:9", "0.0.0.0:9102", port=free_port())
    r = sluice("check", str(path))
    assert r.returncode == 0, r.stderr
    assert "metrics listener 0.0.0.0:9102: GET/HEAD /metrics /live /ready (read-only, no token)" in r.stdout
    admin_config(tmp_path / "none.toml", ["127.0.0.1:9"])
    assert "metrics listener" not in sluice("check", str(tmp_path / "none.toml")).stdout


PROMETHEUS = shutil.which("prometheus")


def test_a_real_prometheus_scrapes_it(tmp_path):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian: prometheus; make test-deps)")
    with ThreadOrigin(body=b"p") as origin:
        metrics_address = f"127.0.0.1:{free_port()}"
        path = write_config(tmp_path / "s.toml", origin.address, metrics_address)
        with Running("-c", str(path)) as proxy:
            metrics_url(proxy)
            httpx.get(proxy.url + "/")
            (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""
                global:
                  scrape_interval: 1s
                scrape_configs:
                  - job_name: sluice
                    static_configs:
                      - targets: ["{metrics_address}"]
            """))
            web = f"127.0.0.1:{free_port()}"
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address={web}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
            try:
                def scraped() -> float | None:
                    try:
                        r = httpx.get(f"http://{web}/api/v1/query",
                                      params={"query": "sluice_downstream_requests_total"})
                    except httpx.TransportError:
                        return None
                    result = r.json()["data"]["result"] if r.status_code == 200 else []
                    return sum(float(x["value"][1]) for x in result) or None

                assert poll(scraped, timeout=30, what="prometheus scraped the metrics listener") == 1
                targets = httpx.get(f"http://{web}/api/v1/targets").json()["data"]["activeTargets"]
                assert [(t["scrapeUrl"], t["health"]) for t in targets] == [(f"http://{metrics_address}/metrics", "up")]
            finally:
                prometheus.terminate()
                prometheus.wait(10)
