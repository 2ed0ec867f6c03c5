"""The admin listener as operators use it: real ``sluice run`` processes,
curl and httpx as clients, real origins (``sluice.control.admin``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sluice.control.admin import REDACTED, admin_token, redact
from sluice.control.config import parse
from sluice.errors import ConfigError

from .proc import Running, ThreadOrigin, curl, free_port, poll, sluice

TOKEN = "t0ken-for-tests"


def write_config(path: Path, origins: list[str], *, admin: str = "", server: str = "",
                 policy: str = "round_robin", port: int = 0, admin_address: str = "127.0.0.1:0") -> Path:
    endpoints = ", ".join(f'"{o}"' for o in origins)
    path.write_text(textwrap.dedent(f"""
        [server]
        drain_timeout = 10
        {server}

        [admin]
        enabled = true
        address = "{admin_address}"
        {admin}

        [[listeners]]
        name = "public"
        address = "127.0.0.1:{port}"
        filters = ["access_log", "router"]

        [clusters.app]
        endpoints = [{endpoints}]
        policy = "{policy}"

        [[routes]]
        name = "all"
        match = {{ prefix = "/" }}
        cluster = "app"
    """))
    return path


def admin_url(proxy: Running) -> str:
    """The admin listener's URL, from its ``admin listening`` event."""
    proxy.wait_for_output("admin listening")
    for line in proxy.stderr:
        if '"admin listening"' in line:
            return json.loads(line)["url"]
    raise AssertionError("no admin listening event")


def events(proxy: Running, name: str) -> list[dict]:
    out = []
    for line in list(proxy.stderr):
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def raw(url: str, data: bytes) -> bytes:
    """Send bytes to the admin listener; what comes back before it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- config: tokens and redaction ---------------------------------------------------


def test_redact_hides_secrets_wherever_they_are_and_keeps_the_rest():
    config = {
        "admin": {"token": "abc", "token_env": None, "token_file": "/run/token", "require_token_for_reads": True},
        "listeners": [{"address": "0.0.0.0:443", "tls": {"cert_file": "c.pem", "key_file": "k.pem",
                                                           "key_password": "pw", "min_version": "1.2"}}],
        "filters": {"auth": {"jwt_secret": "s", "api_keys": ["k1", "k2"], "password": "p",
                             "realm": "x", "passwords": None, "hash_key_header": "x-user"}},
    }
    out = redact(config)
    assert out["admin"] == {"token": REDACTED, "token_env": None, "token_file": "/run/token",
                            "require_token_for_reads": True}
    assert out["listeners"][0]["tls"] == {"cert_file": "c.pem", "key_file": REDACTED,
                                          "key_password": REDACTED, "min_version": "1.2"}
    assert out["listeners"][0]["address"] == "0.0.0.0:443"
    auth = out["filters"]["auth"]
    assert auth["jwt_secret"] == auth["api_keys"] == auth["password"] == REDACTED
    assert auth["realm"] == "x" and auth["passwords"] is None  # unset: shown as unset
    assert auth["hash_key_header"] == "x-user"  # a header's name, not a key
    assert "abc" not in json.dumps(out) and "k1" not in json.dumps(out)


def _admin(**settings) -> object:
    return parse({"listeners": [{"address": "127.0.0.1:0"}],
                  "admin": {"enabled": True, **settings}}).admin


def test_the_token_comes_from_the_file_an_env_var_or_a_file_and_errors_name_the_key(tmp_path, monkeypatch):
    assert admin_token(_admin(token="inline")) == "inline"
    monkeypatch.setenv("SLUICE_TEST_ADMIN_TOKEN", "from-env")
    assert admin_token(_admin(token_env="SLUICE_TEST_ADMIN_TOKEN")) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert admin_token(_admin(token_file=str(tmp_path / "token"))) == "from-file"
    assert admin_token(_admin()) is None  # loopback: reads only, mutations refused

    with pytest.raises(ConfigError, match=r"^admin.token_env: the environment variable NOT_SET_ANYWHERE"):
        admin_token(_admin(token_env="NOT_SET_ANYWHERE"))
    with pytest.raises(ConfigError, match=r"^admin.token_file: cannot read .*missing"):
        admin_token(_admin(token_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"^admin.token_file: .* is empty"):
        admin_token(_admin(token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"^admin.address: 0.0.0.0:9901 is not a loopback address.*needs a token"):
        admin_token(_admin(address="0.0.0.0:9901"))
    assert admin_token(_admin(address="0.0.0.0:9901", token="x")) == "x"
    assert admin_token(_admin(address="[::1]:9901")) is None
    with pytest.raises(ConfigError, match=r"^admin: give the token one way, not token and token_file"):
        _admin(token="a", token_file="b")


def test_startup_refuses_a_public_admin_address_without_a_token_or_a_busy_port(tmp_path):
    path = write_config(tmp_path / "s.toml", ["127.0.0.1:9"], admin_address="0.0.0.0:19901")
    for command in (["run", "-c", str(path)], ["check", str(path)]):
        r = sluice(*command)
        assert r.returncode == 2, r.stderr
        assert "admin.address: 0.0.0.0:19901 is not a loopback address" in r.stderr
        assert "needs a token" in r.stderr and "Traceback" not in r.stderr
    r = sluice("run", "-c", str(write_config(tmp_path / "e.toml", ["127.0.0.1:9"], admin='token_env = "NOT_SET_ANYWHERE"')))
    assert r.returncode == 2 and "admin.token_env" in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(tmp_path / "b.toml", ["127.0.0.1:9"], admin_address=f"127.0.0.1:{port}")
        r = sluice("run", "-c", str(path))
        assert r.returncode == 2, r.stderr
        assert f"admin.address: cannot listen on 127.0.0.1:{port}" in r.stderr


# -- in-process: timeouts --------------------------------------------------------------


async def test_a_stalled_admin_client_gets_408_and_an_idle_one_is_closed(nursery, monkeypatch):
    from sluice.control import admin as admin_module
    from sluice.control.app import App
    from sluice.control.registry import Plugins

    from .conftest import config, raw_request

    monkeypatch.setattr(admin_module, "READ_TIMEOUT", 0.3)
    app = App(parse(config("127.0.0.1:9", admin={"address": "127.0.0.1:0"})), Plugins())
    await nursery.start(app.run)
    url = await nursery.start(admin_module.serve_admin, app)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = trio.current_time()
    answer = await raw_request((host, int(port)), b"GET /live HTTP/1.1\r\nhost: a\r\n")  # no blank line
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in answer
    assert 0.3 <= trio.current_time() - started < 3
    assert await raw_request((host, int(port)), b"") == b""  # said nothing: closed, nothing said
    started = trio.current_time()
    answer = await raw_request((host, int(port)), b"GET /live HTTP/1.1\r\nhost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")  # then idle: closed after the timeout
    assert 0.3 <= trio.current_time() - started < 3
    app.stop()


# -- one process ---------------------------------------------------------------------


def test_read_endpoints_show_the_running_proxy_and_an_ejected_endpoint(tmp_path):
    up, down = ThreadOrigin(body=b"up"), ThreadOrigin(body=b"down")
    path = write_config(tmp_path / "s.toml", [up.address, down.address], admin=f'token = "{TOKEN}"')
    try:
        with Running("-c", str(path)) as proxy:
            admin = admin_url(proxy)
            r = curl("-i", f"{admin}/live")
            assert r.stdout.startswith("HTTP/1.1 200 OK") and "application/json" in r.stdout
            assert json.loads(curl(f"{admin}/live").stdout) == {"live": True, "pid": proxy.pid, "worker": 0}
            assert json.loads(curl(f"{admin}/ready").stdout) == {"ready": True, "draining": False,
                                                                  "listeners": [proxy.url]}

            routes = httpx.get(f"{admin}/routes").json()
            assert routes == {"listeners": {"public": [{
                "name": "all", "summary": "prefix=/ -> cluster app", "cluster": "app", "timeout": None,
                "retry_attempts": 1, "mirror": None, "disabled_filters": []}]}}

            plugins = httpx.get(f"{admin}/plugins").json()
            assert plugins["listeners"] == {"public": [
                {"filter": "access_log", "plugin": "access_log", "phases": ["complete"]},
                {"filter": "router", "plugin": "router", "phases": ["request_headers"]}]}
            assert plugins["plugins"]["balancer"]["balancers"] == sorted(plugins["plugins"]["balancer"]["balancers"])
            assert "ewma" in plugins["plugins"]["balancer"]["balancers"]

            config = httpx.get(f"{admin}/config").json()
            assert config["generation"] == 0
            assert config["config"]["admin"]["token"] == REDACTED
            assert TOKEN not in json.dumps(config)
            assert config["config"]["clusters"]["app"]["endpoints"][1]["address"] == down.address

            clusters = httpx.get(f"{admin}/clusters").json()["clusters"]
            assert [e["ejected"] for e in clusters["app"]["endpoints"]] == [False, False]
            assert [e["score"] for e in clusters["app"]["endpoints"]] == [None, None]  # round_robin has none

            down.close()  # refuses now: the first connect to it fails over and ejects it
            with httpx.Client() as client:
                for _ in range(4):
                    assert client.get(proxy.url + "/", headers={"connection": "close"}).content == b"up"
            app = httpx.get(f"{admin}/clusters").json()["clusters"]["app"]
            assert app["policy"] == "round_robin" and app["available"] == 1 and app["panic"] is False
            alive, dead = app["endpoints"]
            assert alive["address"] == up.address and not alive["ejected"] and alive["ejected_until"] is None
            assert dead["address"] == down.address and dead["ejected"] and dead["ejections"] == 1
            assert time.time() < dead["ejected_until"] <= time.time() + 10.5  # base_ejection 10 s
            assert dead["healthy"] is True and dead["active_requests"] == 0
    finally:
        up.close()


def test_mutations_need_the_token_and_refusals_are_logged(tmp_path):
    path = write_config(tmp_path / "s.toml", ["127.0.0.1:9"], admin=f'token = "{TOKEN}"')
    with Running("-c", str(path)) as proxy:
        admin = admin_url(proxy)
        for path_ in ("/reload", "/drain", "/log-level"):
            r = curl("-i", "-X", "POST", f"{admin}{path_}")
            assert r.stdout.startswith("HTTP/1.1 401"), r.stdout
            assert 'www-authenticate: Bearer realm="sluice admin"' in r.stdout
            r = curl("-i", "-X", "POST", "-H", "Authorization: Bearer wrong-one", f"{admin}{path_}")
            assert r.stdout.startswith("HTTP/1.1 401") and '"wrong token"' in r.stdout
        r = httpx.post(f"{admin}/log-level", json={"level": "debug"}, headers=bearer(TOKEN[:-1] + "X"))
        assert r.status_code == 401
        poll(lambda: len(events(proxy, "admin unauthorized")) == 7, what="7 refusals logged")
        refused = events(proxy, "admin unauthorized")
        assert {e["path"] for e in refused} == {"/reload", "/drain", "/log-level"}
        assert all(e["level"] == "warning" and e["client"].startswith("127.0.0.1:") for e in refused)
        assert [e["reason"] for e in refused[:2]] == ["a bearer token is needed", "wrong token"]
        assert "wrong-one" not in "".join(proxy.stderr)  # what was sent is never logged
        assert proxy.proc.poll() is None and httpx.get(f"{admin}/ready").status_code == 200

        # With the token: the level changes, and reads need no token.
        r = httpx.post(f"{admin}/log-level", json={"level": "warning"}, headers=bearer())
        assert r.status_code == 200 and r.json() == {"level": "warning", "was": "info", "workers": "all"}
        assert httpx.get(f"{admin}/log-level").json() == {"level": "warning"}
        r = httpx.post(f"{admin}/log-level", json={"level": "loud"}, headers=bearer())
        assert r.status_code == 400 and "debug, info, warning, error" in r.json()["error"]

        # Bad input: answered with a status, never a traceback, and the listener lives on.
        r = httpx.get(f"{admin}/drain")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert httpx.get(f"{admin}/nothing").status_code == 404
        assert raw(admin, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(admin, b"GET /live HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n") \
            .startswith(b"HTTP/1.1 431 ")
        assert raw(admin, b"POST /log-level HTTP/1.1\r\nhost: a\r\ncontent-length: 1000000\r\n\r\n{") \
            .startswith(b"HTTP/1.1 413 ")
        r = httpx.post(f"{admin}/log-level", content=b"{not json", headers=bearer())
        assert r.status_code == 400 and r.json() == {"error": "the body is not JSON"}
        # At most 64 connections at once: the next is closed unanswered, until some go.
        host, port = admin.removeprefix("http://").rsplit(":", 1)
        held = [socket.create_connection((host, int(port))) for _ in range(64)]
        try:
            poll(lambda: curl(f"{admin}/live").returncode == 52, what="the 65th connection closed (curl: 52)")
            # The log line is read from the proxy's stderr by a thread: wait for it, never race it.
            poll(lambda: events(proxy, "admin connection refused: too many open"), what="the refusal logged")
        finally:
            for s in held:
                s.close()
        poll(lambda: curl(f"{admin}/live").returncode == 0, what="room again")
        # keep-alive: several requests on one connection
        with httpx.Client() as client:
            assert [client.get(f"{admin}/live").status_code for _ in range(3)] == [200, 200, 200]
        assert not any("Traceback" in line for line in proxy.stderr)


def test_mutations_are_refused_when_no_token_is_configured(tmp_path):
    path = write_config(tmp_path / "s.toml", ["127.0.0.1:9"], admin="require_token_for_reads = false")
    with Running("-c", str(path)) as proxy:
        admin = admin_url(proxy)
        r = httpx.post(f"{admin}/drain", headers=bearer("anything"))
        assert r.status_code == 401 and "no admin token is configured" in r.json()["error"]
        assert httpx.get(f"{admin}/ready").status_code == 200


def test_reads_can_require_the_token_too(tmp_path, monkeypatch):
    path = write_config(tmp_path / "s.toml", ["127.0.0.1:9"],
                        admin='token_env = "SLUICE_ADMIN_TOKEN"\nrequire_token_for_reads = true')
    with Running("-c", str(path), env={"SLUICE_ADMIN_TOKEN": TOKEN}) as proxy:
        admin = admin_url(proxy)
        assert httpx.get(f"{admin}/clusters").status_code == 401
        assert httpx.get(f"{admin}/clusters", headers=bearer()).status_code == 200


def test_reload_answers_with_its_outcome(tmp_path):
    with ThreadOrigin(body=b"one") as one, ThreadOrigin(body=b"two") as two:
        port = free_port()
        path = write_config(tmp_path / "s.toml", [one.address], admin=f'token = "{TOKEN}"', port=port)
        with Running("-c", str(path)) as proxy:
            admin = admin_url(proxy)
            assert httpx.get(proxy.url + "/").content == b"one"
            write_config(path, [two.address], admin=f'token = "{TOKEN}"', port=port)
            r = httpx.post(f"{admin}/reload", headers=bearer(), timeout=15)
            assert r.status_code == 200, r.text
            assert r.json()["outcome"]["ok"] is True and r.json()["outcome"]["generation"] == 1
            assert httpx.get(proxy.url + "/").content == b"two"
            assert httpx.get(f"{admin}/config").json()["generation"] == 1

            path.write_text(path.read_text().replace('cluster = "app"', 'cluster = "nope"'))
            r = httpx.post(f"{admin}/reload", headers=bearer(), timeout=15)
            assert r.status_code == 422, r.text
            outcome = r.json()["outcome"]
            assert outcome["ok"] is False and "routes[0].cluster: unknown cluster 'nope'" in outcome["error"]
            assert httpx.get(proxy.url + "/").content == b"two"  # the last good config serves on


def test_drain_makes_ready_503_lets_the_request_in_flight_finish_and_the_process_exit(tmp_path):
    with ThreadOrigin(delay=1.5, body=b"slow") as slow:
        path = write_config(tmp_path / "s.toml", [slow.address], admin=f'token = "{TOKEN}"', policy="ewma")
        with Running("-c", str(path)) as proxy:
            admin = admin_url(proxy)
            assert httpx.get(proxy.url + "/", timeout=10).content == b"slow"
            (endpoint,) = httpx.get(f"{admin}/clusters").json()["clusters"]["app"]["endpoints"]
            assert 1.4 < endpoint["score"] < 3  # ewma's cost: the latency it saw, about 1.5 s
            answer = {}
            in_flight = threading.Thread(target=lambda: answer.update(r=httpx.get(proxy.url + "/", timeout=10)))
            in_flight.start()
            poll(lambda: httpx.get(f"{admin}/clusters").json()["clusters"]["app"]["endpoints"][0]
                       ["active_requests"] == 1, what="the request in flight")
            r = httpx.post(f"{admin}/drain", headers=bearer())
            assert r.status_code == 202 and r.json()["draining"] is True
            r = httpx.get(f"{admin}/ready")
            assert r.status_code == 503 and r.json()["draining"] is True
            assert httpx.get(f"{admin}/live").status_code == 200  # the loop runs on while it drains
            in_flight.join(10)
            assert answer["r"].status_code == 200 and answer["r"].content == b"slow"
            assert proxy.wait(10) == 0


# -- workers -----------------------------------------------------------------------------


def test_with_workers_the_admin_runs_in_worker_0_and_mutations_reach_every_worker(tmp_path):
    """The level is shared memory: raised to info from error, both workers'
    ``config reloaded`` events (info) appear; at error, only ``reload
    failed`` did. Reload and drain go through the master to both."""
    with ThreadOrigin(body=b"a") as origin:
        path = write_config(tmp_path / "s.toml", [origin.address], admin=f'token = "{TOKEN}"',
                            server='log_level = "error"', port=free_port(), admin_address=f"127.0.0.1:{free_port()}")
        with Running("-c", str(path), "--workers", "2") as proxy:
            admin = "http://" + tomllib.loads(path.read_text())["admin"]["address"]
            poll(lambda: curl(f"{admin}/ready").returncode == 0, what="the admin listener")
            assert httpx.get(f"{admin}/live").json()["worker"] == 0
            path.write_text(path.read_text().replace('cluster = "app"', 'cluster = "nope"'))
            r = httpx.post(f"{admin}/reload", headers=bearer(), timeout=15)
            assert r.status_code == 422
            poll(lambda: len(events(proxy, "reload failed")) == 2, what="both workers failed")

            r = httpx.post(f"{admin}/log-level", json={"level": "info"}, headers=bearer())
            assert r.status_code == 200 and r.json()["was"] == "error"
            path.write_text(path.read_text().replace('cluster = "nope"', 'cluster = "app"'))
            r = httpx.post(f"{admin}/reload", headers=bearer(), timeout=15)
            assert r.status_code == 200 and r.json()["outcome"]["ok"] is True
            poll(lambda: len(events(proxy, "config reloaded")) == 2, what="both workers reloaded")
            assert sorted(e["worker"] for e in events(proxy, "config reloaded")) == [0, 1]

            # Worker 0 dies: its replacement (index 0 again) serves the admin listener.
            first = httpx.get(f"{admin}/live").json()["pid"]
            os.kill(first, signal.SIGKILL)

            def replaced() -> bool:
                r = curl(f"{admin}/live")
                return r.returncode == 0 and json.loads(r.stdout)["pid"] not in (first, proxy.pid)

            poll(replaced, what="worker 0's replacement serving the admin listener")

            assert httpx.post(f"{admin}/drain", headers=bearer()).status_code == 202
            assert proxy.wait(15) == 0
            assert len(events(proxy, "stopped")) == 2


def test_metrics_cover_every_worker_in_the_prometheus_text_format(tmp_path):
    with ThreadOrigin(body=b"m") as origin:
        path = write_config(tmp_path / "s.toml", [origin.address], port=free_port())
        with Running("-c", str(path), "--workers", "2") as proxy:
            admin = admin_url(proxy)
            with httpx.Client() as client:
                for _ in range(10):
                    client.get(proxy.url + "/", headers={"connection": "close"})
            r = httpx.get(f"{admin}/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")

            def served() -> float:  # both workers' counts (each flushes its sums once a second)
                text = httpx.get(f"{admin}/metrics").text
                family = {f.name: f for f in text_string_to_metric_families(text)}["sluice_downstream_requests"]
                return sum(s.value for s in family.samples if s.name == "sluice_downstream_requests_total")

            poll(lambda: served() == 10, what="10 requests counted across the workers")
            pids = {line.split()[2] for line in proxy.stderr if "listening on" in line}
            assert len(pids) == 2  # and two workers served
