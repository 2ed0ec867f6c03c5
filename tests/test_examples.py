"""The example plugins (plugins/examples/, issue 10), tested as their authors would.

Each example is a distribution of its own with its own test suite, written
with sluice's plugin author kit. All four are ``pip install -e``'d into one
fresh venv (``venvs.fresh_venv``: it sees this venv's sluice, trio, pytest,
...), and each suite runs there with ``pytest`` from its own directory,
exactly as its README says; this module checks each passed and how many
tests ran, so a suite that quietly collects nothing fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from sluice.testing.contract import SCENARIOS

from .venvs import fresh_venv, pip_install

EXAMPLES = Path(__file__).resolve().parent.parent / "plugins" / "examples"

# Each example's suite: how many tests of its own, and whether it runs the
# filter-contract battery (one test per scenario besides).
SUITES = {"token_bucket": (10, True), "canary": (10, True), "redact": (18, True), "zone_aware": (9, False)}


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    """A fresh venv with the four examples installed (editable) and nothing else of theirs."""
    python = fresh_venv(tmp_path_factory.mktemp("examples") / "venv")
    installs = [arg for name in SUITES for arg in ("-e", str(EXAMPLES / name))]
    r = pip_install(python, *installs)
    assert r.returncode == 0, r.stdout + r.stderr
    return python


def run(python: Path, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leave no __pycache__ in the examples' trees
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", list(SUITES))
def test_the_examples_own_suite_passes_in_a_fresh_venv(python, name):
    r = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=EXAMPLES / name, timeout=300)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    own, battery = SUITES[name]
    assert counts.get("passed") == own + (len(SCENARIOS) if battery else 0), summary
    assert not set(counts) - {"passed", "deselected", "warning", "warnings"}, summary  # none skipped, failed


def test_sluice_plugins_lists_the_examples_with_their_descriptions(python):
    r = run(python, "-m", "sluice", "plugins", cwd=EXAMPLES, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    expected = {
        "token_bucket  (sluice-token-bucket, sluice_token_bucket): ":
            "  filter token_bucket: Answers 429 past ``rate`` requests per second (``burst`` at once) per key, "
            "across every worker.",
        "canary  (sluice-canary, sluice_canary): ":
            "  filter canary: Routes opted-in requests, and a sticky percentage of the rest, to a canary cluster.",
        "redact  (sluice-redact, sluice_redact): ":
            "  filter redact: Replaces card numbers, e-mail addresses (or your patterns) in text response "
            "bodies, as they stream.",
        "zone_aware  (sluice-zone-aware, sluice_zone_aware): ":
            "  policy zone_aware: Picks in the proxy's zone while enough of it is available; spills over "
            "every zone when not.",
    }
    for head, second in expected.items():
        at = [i for i, line in enumerate(lines) if line.startswith(head)]
        assert len(at) == 1, (head, r.stdout)
        assert len(lines[at[0]]) > len(head) + 20, lines[at[0]]  # the plugin's description follows
        assert lines[at[0] + 1] == second, r.stdout
    assert "    per-route settings:" in r.stdout  # token_bucket's and canary's RouteConfig
    assert "    min_local_percent: float (default 50.0)" in r.stdout
