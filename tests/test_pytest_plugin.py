"""sluice's pytest plugin (sluice.testing.plugin): its fixtures, used here
directly (this suite runs with the plugin loaded like any project), then in
a project of its own with no conftest, run by a real ``python -m pytest``,
as a plugin author's tests run: with the plugin under test given in-tree
(``extra=``) and, in a fresh venv, also installed under the same name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sluice import ConfigError, Filter, FilterConfig
from sluice.testing import Reply

from .conftest import InProcess
from .venvs import fresh_venv, pip_install

EXAMPLE = Path(__file__).resolve().parent / "example_plugin"


class Tag(Filter):
    name = "tag"

    class Config(FilterConfig):
        value: str = "default"

    async def on_request_headers(self, ctx, request):
        request.headers.set("x-tag", self.config.value)

    async def on_response_headers(self, ctx, response):
        response.headers.set("x-tagged", self.config.value)


TAG = InProcess(Tag)


async def test_origin_fixture_is_serving(origin):
    import httpx

    origin.script("/made", Reply(status=201, body=b"made"))
    async with httpx.AsyncClient(base_url=origin.url) as client:
        r = await client.post("/made", content=b"x")
    assert (r.status_code, r.content) == (201, b"made")
    assert origin.requests[0].body == b"x" and origin.address == f"127.0.0.1:{origin.port}"


async def test_sluice_proxy_default_chain_routes_to_origin(origin, sluice_proxy):
    proxy = await sluice_proxy()
    assert proxy.app.config.listeners[0].filters == ["router"]
    r = await proxy.client.post("/echo?q=1", content=b"body")
    assert (r.status_code, r.content) == (200, b"body")
    (seen,) = origin.requests
    assert seen.target == "/echo?q=1" and seen.header("x-forwarded-for") == "127.0.0.1"


async def test_sluice_proxy_extra_plugin_with_settings_as_dict_and_as_toml(origin, sluice_proxy):
    as_dict = await sluice_proxy(filters=["tag", "router"], extra={"tag": TAG},
                                 config={"filters": {"tag": {"value": "from-dict"}}})
    as_toml = await sluice_proxy(filters=["tag", "router"], extra={"tag": TAG}, plugins=["router", "balancer"],
                                 config='[filters.tag]\nvalue = "from-toml"\n')
    assert as_dict.url != as_toml.url
    assert (await as_dict.client.get("/a")).headers["x-tagged"] == "from-dict"
    assert (await as_toml.client.get("/b")).headers["x-tagged"] == "from-toml"
    assert [r.header("x-tag") for r in origin.requests] == ["from-dict", "from-toml"]


async def test_sluice_proxy_config_merges_tables_and_replaces_lists(origin, sluice_proxy):
    origin.script("/other/*", Reply(body=b"other"))
    proxy = await sluice_proxy(config={
        "clusters": {"origin": {"connect_timeout": 2.0}},  # merged: the endpoint stays
        "routes": [{"match": {"prefix": "/only"}, "cluster": "origin"}],  # replaced
    })
    assert (await proxy.client.get("/only/x")).status_code == 200
    assert (await proxy.client.get("/other/x")).status_code == 404  # no route any more


async def test_sluice_proxy_bad_settings_raise_by_key_path(sluice_proxy):
    with pytest.raises(ConfigError, match=r"filters\.tag\.valeu"):
        await sluice_proxy(filters=["tag", "router"], extra={"tag": TAG}, config={"filters": {"tag": {"valeu": 1}}})


async def test_sluice_client_goes_through_a_default_proxy(origin, sluice_client):
    r = await sluice_client.get("/through")
    assert (r.status_code, r.content) == (200, b"/through")
    assert r.headers["via"].endswith("sluice") and origin.requests[0].path == "/through"


# -- a project of its own, with no conftest -------------------------------------------

PROJECT_PYPROJECT = """\
[tool.pytest.ini_options]
trio_mode = true
"""

MINI_PLUGIN = '''\
from sluice import Filter, FilterConfig, hookimpl


class Stamp(Filter):
    name = "stamp"

    class Config(FilterConfig):
        mark: str = "stamped"

    async def on_response_headers(self, ctx, response):
        response.headers.set("x-stamp", self.config.mark)


@hookimpl
def sluice_filters():
    return [Stamp]
'''

MINI_TESTS = '''\
import mini_plugin
from sluice.testing import Reply


async def test_stamp(origin, sluice_proxy):
    proxy = await sluice_proxy(filters=["stamp", "router"], extra={"mini": mini_plugin},
                               config={"filters": {"stamp": {"mark": "ok"}}})
    r = await proxy.client.get("/hi")
    assert r.headers["x-stamp"] == "ok" and r.content == b"/hi"
    assert origin.requests[0].path == "/hi"


async def test_scripted_origin(origin, sluice_client):
    origin.script("/gone", Reply(status=410, body=b"gone"))
    r = await sluice_client.get("/gone")
    assert (r.status_code, r.content) == (410, b"gone")


async def test_deliberately_failing(sluice_client):
    r = await sluice_client.get("/x")
    assert r.status_code == 418, "this test must fail"
'''


def summary(output: str) -> dict[str, int]:
    """pytest's last line, ``1 failed, 2 passed in 0.5s``, as {"failed": 1, "passed": 2}."""
    last = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?)", last)}


def run_pytest(python: str | Path, project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=project, capture_output=True, text=True, timeout=120, env=env)


def write_project(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in {"pyproject.toml": PROJECT_PYPROJECT, **files}.items():
        (root / name).write_text(text)
    return root


def test_entry_point_loads_the_fixtures_in_a_project_without_conftest(tmp_path):
    project = write_project(tmp_path / "proj", {"mini_plugin.py": MINI_PLUGIN, "test_mini.py": MINI_TESTS})
    assert not list(project.rglob("conftest.py"))
    r = run_pytest(sys.executable, project)
    out = r.stdout + r.stderr
    assert summary(r.stdout) == {"passed": 2, "failed": 1}, out
    assert "this test must fail" in out and "test_deliberately_failing" in out
    assert r.returncode == 1


def test_fixtures_without_pytest_trio_fail_saying_what_to_install(tmp_path):
    project = write_project(tmp_path / "proj", {"mini_plugin.py": MINI_PLUGIN, "test_mini.py": MINI_TESTS})
    r = run_pytest(sys.executable, project, "-p", "no:trio", "-k", "scripted")
    assert r.returncode == 1 and summary(r.stdout) == {"error": 1}, r.stdout + r.stderr
    assert "pip install sluice[testing]" in r.stdout


HELLO_TESTS = '''\
from importlib.metadata import version

import in_tree_hello


async def test_the_plugin_is_installed(sluice_proxy):
    assert version("sluice-hello") == "1.0.0"
    proxy = await sluice_proxy(filters=["hello", "router"])  # the installed one
    assert (await proxy.client.get("/")).headers["x-hello"] == "hello from a plugin"


async def test_the_in_tree_module_replaces_it(sluice_proxy):
    proxy = await sluice_proxy(filters=["hello", "router"], extra={"hello": in_tree_hello})
    assert (await proxy.client.get("/")).headers["x-hello"] == "from the tree"
'''


def test_extra_works_whether_or_not_the_plugin_is_installed(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    in_tree = (source / "sluice_hello.py").read_text().replace('"hello from a plugin"', '"from the tree"')
    project = write_project(tmp_path / "proj", {"in_tree_hello.py": in_tree, "test_hello.py": HELLO_TESTS})

    # Not installed: the main venv has no sluice-hello; extra= alone provides "hello".
    r = run_pytest(sys.executable, project, "-k", "replaces")
    assert summary(r.stdout) == {"passed": 1}, r.stdout + r.stderr

    python = fresh_venv(tmp_path / "venv")
    installed = pip_install(python, str(source), cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    r = run_pytest(python, project)
    assert summary(r.stdout) == {"passed": 2}, r.stdout + r.stderr


async def test_scripted_failures_as_the_proxy_reports_them(origin, sluice_proxy):
    # What the docstrings of Reply and the origin fixture promise a plugin author.
    import httpx

    origin.script("/down", Reply(reset=True))
    origin.script("/slow", Reply(hang=True))
    origin.script("/flaky", Reply(body=b"x" * 1000, close_after=100))
    proxy = await sluice_proxy(config={"clusters": {"origin": {"response_timeout": 0.3}}})
    assert (await proxy.client.get("/down")).status_code == 502
    assert (await proxy.client.get("/slow")).status_code == 504
    with pytest.raises(httpx.RemoteProtocolError):  # the head went out: the client's response is cut
        await proxy.client.get("/flaky")
