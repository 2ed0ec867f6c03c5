"""A third-party plugin, for real: built by pip, found through its entry point.

tests/example_plugin is a complete distribution ("sluice-hello") declaring
an entry point in the ``sluice`` group. It is installed with pip into a
directory of its own, and the only thing that makes sluice see it is that
directory on PYTHONPATH: no code change, no monkeypatching, the real
``sluice`` command in subprocesses, curl as the client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from .proc import Running, ThreadOrigin, curl, free_port, sluice

EXAMPLE = Path(__file__).resolve().parent / "example_plugin"
# What a build may leave behind in a source tree; never copied, never left.
_BUILD_LITTER = ("build", "*.egg-info", "__pycache__", "dist")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """sluice-hello installed by pip into its own directory (not on sys.path)."""
    before = _tree(EXAMPLE)
    source = tmp_path_factory.mktemp("src") / "example_plugin"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(*_BUILD_LITTER))
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, cwd=source.parent,
    )
    if r.returncode != 0:
        hint = ""
        if "invalid command 'bdist_wheel'" in r.stdout + r.stderr:
            hint = ("\nThe environment's setuptools cannot build wheels without isolation:"
                    " it needs setuptools>=70.1 or the 'wheel' package installed.\n")
        pytest.fail(f"pip install of {EXAMPLE} failed ({r.returncode}):{hint}\n{r.stdout}\n{r.stderr}",
                    pytrace=False)
    assert (target / "sluice_hello.py").is_file(), sorted(_tree(target))
    assert _tree(EXAMPLE) == before, "building the example plugin changed its source tree"
    return target


def with_plugin(plugin_dir: Path) -> dict[str, str]:
    """The environment that makes the plugin importable (and nothing else)."""
    path = [str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


@pytest.fixture(scope="module")
def upstream():
    """sluice's built-in demo origin (answering JSON), as the cluster's endpoint."""
    with Running("--listen", f"127.0.0.1:{free_port()}") as demo:
        yield demo.url.removeprefix("http://")


@pytest.fixture
def config_file(tmp_path, upstream) -> tuple[Path, int]:
    port = free_port()
    path = tmp_path / "sluice.toml"
    path.write_text(textwrap.dedent(f"""
        [[listeners]]
        address = "127.0.0.1:{port}"
        filters = ["hello", "router"]

        [clusters.demo]
        endpoints = ["{upstream}"]

        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "demo"

        [filters.hello]
        greeting = "hi from the test"
    """))
    return path, port


def test_plugins_command_lists_the_installed_plugin(plugin_dir):
    r = sluice("plugins", env=with_plugin(plugin_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = _line(lines, "hello  (sluice-hello, sluice_hello): ")
    assert lines[at].endswith("adds a greeting header to every response, rejects bots with 403."), r.stdout
    assert lines[at + 1:at + 5] == [
        "  filter hello",
        "    phases: request_headers, response_headers",
        "    greeting: str (default 'hello from a plugin')",
        "    blocked_agents: list[str] (default ['BadBot'])",
    ], r.stdout
    assert any(line.startswith("router  (sluice, sluice.plugins.router)") for line in lines)  # built-ins too


def _line(lines: list[str], start: str) -> int:
    """The index of the one line starting with ``start``."""
    found = [i for i, line in enumerate(lines) if line.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_without_the_install_the_plugin_is_absent(plugin_dir):
    r = sluice("plugins")
    assert r.returncode == 0, r.stderr
    assert "router  (sluice, sluice.plugins.router)" in r.stdout
    assert "hello" not in r.stdout
    assert "sluice-hello" not in r.stdout


def test_a_proxy_runs_the_plugin_filter(plugin_dir, config_file):
    path, port = config_file
    url = f"http://127.0.0.1:{port}"
    with Running("-c", str(path), env=with_plugin(plugin_dir)) as proxy:
        assert "hello -> router" in "".join(proxy.stderr)  # the chain, as announced at startup
        ok = curl("-i", f"{url}/greet")
        bot = curl("-i", "-A", "BadBot/1.0", f"{url}/greet")
        assert proxy.stop() == 0
    # (curl() decodes text: CRLF arrives as "\n")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("HTTP/1.1 200 OK\n"), ok.stdout
    assert "\nx-hello: hi from the test\n" in ok.stdout
    assert '"target": "/greet"' in ok.stdout  # it went through to the demo origin
    assert bot.returncode == 0, bot.stderr
    assert bot.stdout.startswith("HTTP/1.1 403 Forbidden\n"), bot.stdout
    assert bot.stdout.endswith("\n\nno bots, please\n"), bot.stdout
    assert "demo upstream" not in bot.stdout  # the upstream never saw it


def test_enabling_the_plugin_explicitly(plugin_dir, config_file):
    path, port = config_file
    with Running("-c", str(path), "--plugins", "hello,router,balancer", env=with_plugin(plugin_dir)) as proxy:
        r = curl("-i", f"http://127.0.0.1:{port}/explicit")
        assert proxy.stop() == 0
    assert r.stdout.startswith("HTTP/1.1 200 OK\n"), r.stdout
    assert "\nx-hello: hi from the test\n" in r.stdout


def test_check_names_the_filter_when_the_plugin_is_not_installed(config_file):
    path, _ = config_file
    r = sluice("check", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "listeners[0].filters[0]: unknown filter 'hello'" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_accepts_the_config_with_the_plugin_installed(plugin_dir, config_file):
    path, _ = config_file
    r = sluice("check", str(path), env=with_plugin(plugin_dir))
    assert r.returncode == 0, r.stderr
    assert "  1. hello [request_headers, response_headers]" in r.stdout
    assert "  2. router [request_headers]" in r.stdout


def test_plugins_command_lists_the_policy_and_its_settings(plugin_dir):
    r = sluice("plugins", env=with_plugin(plugin_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = _line(lines, "fastest  (sluice-hello, sluice_fastest): ")
    assert lines[at + 1:at + 6] == [
        "  policy fastest: The endpoint with the lowest mean latency lately; now and then another.",
        "    window: int (default 10)",
        "    explore: float (default 0.1)",
        "    failure_cost: float (default 1.0)",
        "    seed: int | None (default None)",
    ], r.stdout


def test_the_policy_plugin_balances_a_real_cluster_and_its_settings_are_checked(plugin_dir, tmp_path):
    fast, slow = ThreadOrigin(delay=0.0), ThreadOrigin(delay=0.03)
    port = free_port()
    path = tmp_path / "sluice.toml"
    template = textwrap.dedent(f"""
        [[listeners]]
        address = "127.0.0.1:{port}"
        filters = ["router"]

        [clusters.api]
        endpoints = ["{slow.address}", "{fast.address}"]
        policy = {{ name = "fastest", POLICY }}

        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "api"
    """)
    try:
        path.write_text(template.replace("POLICY", "windw = 5"))
        r = sluice("check", str(path), env=with_plugin(plugin_dir))
        assert r.returncode == 2 and "clusters.api.policy.windw: unknown key" in r.stderr, r.stderr
        path.write_text(template.replace("POLICY", "explore = 0.1, seed = 7"))
        with Running("-c", str(path), env=with_plugin(plugin_dir)) as proxy, \
                httpx.Client(base_url=proxy.url) as client:
            for i in range(60):
                assert client.get(f"/{i}").status_code == 200
            assert proxy.stop() == 0
    finally:
        fast.close()
        slow.close()
    assert len(fast.served) + len(slow.served) == 60
    assert len(fast.served) >= 48, (len(fast.served), len(slow.served))  # >= 80% to the fast one
    assert slow.served  # explored, not starved for good
