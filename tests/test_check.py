"""sluice check: warnings for what is legal but likely a mistake, and listener address clashes."""

from __future__ import annotations

import textwrap

from .proc import sluice


def check(tmp_path, text: str):
    path = tmp_path / "sluice.toml"
    path.write_text(textwrap.dedent(text))
    return sluice("check", str(path))


def test_a_listener_without_a_router_is_reported(tmp_path):
    r = check(tmp_path, """
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["access_log"]
    """)
    assert r.returncode == 0, r.stderr
    assert "warning: listeners[0]: no router in its chain: every request gets 404" in r.stdout.splitlines()


def test_settings_for_a_filter_no_chain_uses_are_a_warning(tmp_path):
    r = check(tmp_path, """
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["router"]

        [filters.api_key]
        keys = { ci = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" }
    """)
    assert r.returncode == 0, r.stderr
    assert "warning: filters.api_key: settings for a filter that no listener's chain uses" in r.stdout.splitlines()


def test_a_router_chain_with_used_settings_has_no_warning(tmp_path):
    r = check(tmp_path, """
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["router"]
    """)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stdout


def test_two_listeners_on_one_address_is_an_error(tmp_path):
    r = check(tmp_path, """
        [[listeners]]
        name = "a"
        address = "127.0.0.1:8080"

        [[listeners]]
        name = "b"
        address = "127.0.0.1:8080"
    """)
    assert r.returncode == 2
    assert "listeners[1].address: '127.0.0.1:8080' is listeners[0]'s address already" in r.stderr


def test_check_creates_no_files(tmp_path):
    (tmp_path / "logs").mkdir()
    r = check(tmp_path, f"""
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["router", "access_log"]

        [filters.access_log]
        path = "{tmp_path}/logs/access.jsonl"
    """)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs", "sluice.toml"]


def test_check_still_refuses_an_access_log_in_a_missing_directory(tmp_path):
    r = check(tmp_path, f"""
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["router", "access_log"]

        [filters.access_log]
        path = "{tmp_path}/nowhere/access.jsonl"
    """)
    assert r.returncode == 2
    assert f"filters.access_log.path: cannot write {tmp_path}/nowhere/access.jsonl: No such file or directory" in r.stderr


def test_plugins_shows_each_plugin_description_and_each_filter_phases():
    r = sluice("plugins")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "auth  (sluice, sluice.plugins.auth): Plugin ``auth``: the ``api_key`` and ``basic`` filters." in lines
    i = lines.index("  filter api_key: Admits requests that carry a known API key (keys stored as SHA-256).")
    assert lines[i + 1] == "    phases: request_headers"
    j = lines.index("  filter alerts: Alerting rules and their webhook (README, Operating sluice, Alerts).")
    assert lines[j + 1] == "    phases: (none: hooks only)"


# -- one-line mode: --set filters.NAME.KEY=VALUE --------------------------------


def test_set_gives_a_filter_setting_in_one_line_mode(tmp_path):
    from .proc import Running, curl, free_port

    log = tmp_path / "access.log"
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}", "--plugins", "router,balancer,access_log",
                 "--set", f"filters.access_log.path={log}", "--set", "filters.access_log.format=text",
                 "--set", "filters.access_log.flush_interval=0.01") as proxy:
        assert curl(f"http://127.0.0.1:{port}/via-set").returncode == 0
        assert proxy.stop() == 0
    text = log.read_text()
    assert "/via-set" in text and not text.lstrip().startswith("{")  # the text format, not JSON


def test_set_errors_name_the_key_path():
    base = ("run", "--upstream", "127.0.0.1:9", "--plugins", "router,balancer,access_log")
    r = sluice(*base, "--set", "filters.access_log.pathx=1")
    assert r.returncode == 2 and "sluice: error: filters.access_log.pathx: unknown key" in r.stderr
    r = sluice(*base, "--set", "access_log=1")
    assert r.returncode == 2 and "sluice: error: --set access_log=1: expected filters.NAME.KEY=VALUE" in r.stderr


def test_plugins_can_enable_one_filter_of_a_plugin_that_has_several():
    from .proc import Running, curl, free_port

    port = free_port()
    digest = "a" * 64
    with Running("--listen", f"127.0.0.1:{port}", "--plugins", "auth.api_key,router,balancer",
                 "--set", f"filters.api_key.keys.ci={digest}") as proxy:
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/")
        assert proxy.stop() == 0
    assert r.stdout == "401"  # api_key ran; basic (which needs an htpasswd) was not enabled


def test_plugins_naming_a_filter_a_plugin_lacks_is_an_error():
    r = sluice("run", "--upstream", "127.0.0.1:9", "--plugins", "router,balancer,auth.nope")
    assert r.returncode == 2
    assert "sluice: error: --plugins auth.nope: plugin 'auth' has no filter 'nope'; it offers: api_key, basic" in r.stderr
