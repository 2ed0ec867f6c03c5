"""``sluice new-plugin NAME``: the project it writes works as its author will use it.

The project is written by the real command, installed with ``pip install
-e`` into a fresh venv (``tests/venvs.py``: it sees this venv's packages,
sluice and pytest among them, while the plugin lands in it alone), and its
own tests run there with a real ``python -m pytest`` from its directory: out
of the box they must all pass. Then ``sluice plugins`` and ``sluice check``
in that venv must see the plugin. The bad-input cases run the command in
process (``main``) and, for the exit status and the absence of a traceback,
as a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from sluice.cli import main
from sluice.scaffold import names

from .proc import sluice
from .venvs import fresh_venv, pip_install

NAME = "tag-it"  # with a '-': the module and the filter take '_'
PROJECT_FILES = [".gitignore", "README.md", "pyproject.toml", "sluice_tag_it.py", "tests/test_tag_it.py"]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    where = tmp_path_factory.mktemp("plugins")
    r = sluice("new-plugin", NAME, "--dir", str(where))
    return where / "sluice-tag-it", r


@pytest.fixture(scope="module")
def project(written) -> Path:
    path, r = written
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def python(project, tmp_path_factory) -> Path:
    """The fresh venv's python, with the project installed editable."""
    python = fresh_venv(tmp_path_factory.mktemp("venv") / "venv")
    r = pip_install(python, "-e", str(project))
    assert r.returncode == 0, r.stdout + r.stderr
    return python


def _run(python: Path, *args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_it_writes_a_complete_distribution(written, project):
    _, r = written
    assert r.stdout.startswith(f"sluice: wrote {project}: plugin 'tag_it' in sluice_tag_it.py"), r.stdout
    assert f"cd {project}\n  python -m pip install -e '.[test]'\n  python -m pytest" in r.stdout
    assert _files(project) == PROJECT_FILES
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "sluice-tag-it"
    assert meta["project"]["dependencies"] == ["sluice>=0.1.0"]
    assert meta["project"]["entry-points"]["sluice"] == {"tag_it": "sluice_tag_it"}
    assert sorted(meta["project"]["optional-dependencies"]["test"]) == ["httpx>=0.27", "pytest-trio>=0.8",
                                                                         "pytest>=8"]
    assert meta["tool"]["setuptools"]["py-modules"] == ["sluice_tag_it"]
    assert meta["tool"]["pytest"]["ini_options"]["trio_mode"] is True
    module = (project / "sluice_tag_it.py").read_text()
    assert 'class TagIt(Filter):' in module and 'name = "tag_it"' in module
    tests = (project / "tests" / "test_tag_it.py").read_text()
    assert 'test_contract = contract.battery("tag_it"' in tests
    readme = (project / "README.md").read_text()
    assert "--plugins access_log,tag_it,router,balancer" in readme
    assert "plugins/README.md" in readme
    assert "$" not in module + tests + readme  # every placeholder was filled


def test_its_tests_pass_out_of_the_box(project, python):
    r = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project, timeout=300)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    passed = re.fullmatch(r"(\d+) passed(?:, \d+ warnings?)? in [\d.]+s(?: \(.*\))?", summary)
    assert r.returncode == 0 and passed, r.stdout[-6000:] + r.stderr[-3000:]
    # its own 7 tests, and the battery's scenarios (about 15)
    assert int(passed.group(1)) >= 7 + 10, summary


def test_sluice_plugins_lists_it_with_its_phases(python, project):
    r = _run(python, "-m", "sluice", "plugins", cwd=project)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith("tag_it  ")]
    assert len(found) == 1, r.stdout
    at = found[0]
    assert lines[at] == ("tag_it  (sluice-tag-it, sluice_tag_it): "
                         "Tags each request under a path prefix; the upstream and the client see the same tag.")
    assert lines[at + 1:at + 5] == [
        "  filter tag_it: Sets a header with a fresh tag on the request and on its response.",
        "    phases: request_headers, response_headers",
        "    header: str (default 'x-tag-it')",
        "    prefix: str (default '/')",
    ], r.stdout


def _config(tmp_path: Path, settings: str) -> Path:
    path = tmp_path / "sluice.toml"
    path.write_text(textwrap.dedent("""
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["tag_it", "router"]

        [clusters.app]
        endpoints = ["127.0.0.1:9000"]

        [[routes]]
        match = { prefix = "/" }
        cluster = "app"

        [filters.tag_it]
    """) + settings)
    return path


def test_sluice_check_accepts_a_config_using_it(python, tmp_path):
    path = _config(tmp_path, 'prefix = "/api"\n')
    r = _run(python, "-m", "sluice", "check", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "  1. tag_it [request_headers, response_headers]\n" in r.stdout, r.stdout
    bad = _run(python, "-m", "sluice", "check", str(_config(tmp_path, 'prefx = "/api"\n')), cwd=tmp_path)
    assert bad.returncode == 2
    assert "filters.tag_it.prefx: unknown key" in bad.stderr, bad.stderr
    # This venv has no such plugin: what passed above is the install's doing.
    without = sluice("check", str(path))
    assert without.returncode == 2 and "tag_it" in without.stderr, without.stderr


def test_without_dir_it_writes_into_the_current_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sluice", "new-plugin", "here"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sluice: wrote sluice-here: plugin 'here' in sluice_here.py"), r.stdout
    assert _files(tmp_path / "sluice-here") == [".gitignore", "README.md", "pyproject.toml", "sluice_here.py",
                                                "tests/test_here.py"]


def test_names_take_the_form_each_place_wants():
    for given in ("canary-router", "canary_router"):
        n = names(given)
        assert (n.name, n.module, n.dist, n.cls, n.header) == (
            "canary_router", "sluice_canary_router", "sluice-canary-router", "CanaryRouter", "x-canary-router")
    assert names("v2").cls == "V2"


@pytest.mark.parametrize("bad", ["Tagger", "2fast", "tag it", "tag.it", "tag__it", "tag-_it", "-tag", "tag-",
                                 "_tag", "tàg", "../escape", "tag/it", ""])
def test_a_bad_name_is_refused_saying_what_is_allowed(bad, tmp_path, capsys):
    assert main(["new-plugin", "--dir", str(tmp_path), "--", bad]) == 2  # "--": "-tag" is a name here
    err = capsys.readouterr().err
    assert err == (f"sluice new-plugin: error: plugin name {bad!r} is not allowed: use lowercase letters and "
                   "digits, starting with a letter, words joined by single '_' or '-' "
                   "(e.g. 'tagger', 'rate_limit', 'canary-router')\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("taken", ["router", "auth", "api_key"])  # a plugin, a plugin, a filter of auth's
def test_the_name_of_an_installed_plugin_or_filter_is_refused(taken, tmp_path, capsys):
    assert main(["new-plugin", taken, "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"sluice new-plugin: error: plugin name {taken!r} is taken: the installed "
                                       "distribution sluice has a plugin or filter of that name; choose another\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_an_existing_target_is_never_overwritten(kind, tmp_path, capsys):
    target = tmp_path / "sluice-tag-it"
    if kind == "directory":
        target.mkdir()
        (target / "pyproject.toml").write_text("mine\n")
    else:
        target.write_text("mine\n")
    assert main(["new-plugin", NAME, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"sluice new-plugin: error: {target} already exists; nothing was written (remove it, or give " \
                  "another --dir)\n"
    if kind == "directory":
        assert _files(target) == ["pyproject.toml"]
        assert (target / "pyproject.toml").read_text() == "mine\n"
    else:
        assert target.read_text() == "mine\n"


def test_a_missing_or_unusable_directory_is_a_clear_error(tmp_path, capsys):
    missing, a_file = tmp_path / "nowhere", tmp_path / "a-file"
    a_file.write_text("")
    assert main(["new-plugin", NAME, "--dir", str(missing)]) == 2
    assert capsys.readouterr().err == f"sluice new-plugin: error: {missing}: no such directory\n"
    assert main(["new-plugin", NAME, "--dir", str(a_file)]) == 2
    assert capsys.readouterr().err == f"sluice new-plugin: error: {a_file}: not a directory\n"
    assert not missing.exists()
    # too long a name for the file system: the OS's reason, no traceback
    assert main(["new-plugin", "t" * 300, "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(": File name too long\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create entries in."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if not os.access(locked, os.W_OK):
        return locked
    if Path("/sys").is_dir():  # root ignores modes; sysfs refuses mkdir even to root
        return Path("/sys")
    pytest.skip("no directory here is unwritable to this (root) process")


def test_an_unwritable_directory_is_a_clear_error_with_status_2(tmp_path):
    where = _unwritable(tmp_path)
    r = sluice("new-plugin", NAME, "--dir", str(where))
    assert r.returncode == 2
    assert re.fullmatch(rf"sluice new-plugin: error: {re.escape(str(where))}: cannot create sluice-tag-it there: "
                        r"(Permission denied|Operation not permitted)\n", r.stderr), r.stderr
    assert r.stdout == ""
    assert not (where / "sluice-tag-it").exists()


def test_usage_errors_exit_2_without_a_traceback():
    for args in (["new-plugin"], ["new-plugin", "Bad Name"], ["new-plugin", "x", "--dir"]):
        r = sluice(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "error:" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
