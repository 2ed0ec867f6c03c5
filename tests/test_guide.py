"""The plugin guide (plugins/README.md) holds to the code it describes.

Its Python compiles, its flags table is ``sluice.FLAGS`` (both ways), every
``sluice`` command and option it shows exists, every relative link
resolves, and its zero-to-tested walkthrough runs: the plugin, pyproject and
tests are taken from the guide's own code blocks and their pytest run in a
subprocess, as an author following the page would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sluice

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "plugins" / "README.md"
TEXT = GUIDE.read_text()
SLUICE = Path(sys.executable).with_name("sluice")

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# GitHub's anchors for the guide's headings
ANCHORS = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", _BLOCK.sub("", TEXT), re.M)}


def blocks(lang: str) -> list[str]:
    return [body for kind, body in _BLOCK.findall(TEXT) if kind == lang]


def walkthrough_file(name: str) -> str:
    """The code block whose first line is ``# NAME``: one file of the walkthrough."""
    found = [b for b in blocks("python") + blocks("toml") if b.startswith(f"# {name}\n")]
    assert len(found) == 1, f"the guide has {len(found)} blocks for {name}"
    return found[0]


def test_every_python_block_compiles():
    python = blocks("python")
    assert len(python) >= 5
    for i, code in enumerate(python):
        compile(code, f"{GUIDE}:python block {i}", "exec")


def test_the_flags_table_is_sluice_flags_both_ways():
    section = TEXT.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        code, meaning, set_by, status = (cell.strip() for cell in row.strip("|").split("|"))
        table[code.strip("`")] = (meaning, set_by, status)
    expected = {f.code: (f.meaning, f.set_by, f.status) for f in sluice.FLAGS.values()}
    assert table == expected
    assert list(table) == list(expected)  # and in the module's order


def test_the_testing_section_lists_the_batterys_scenarios_both_ways():
    """The nested list under ``contract.battery`` is ``contract.SCENARIOS``: each id once, no other."""
    contract = pytest.importorskip("sluice.testing.contract", reason="the kit's battery (sluice.testing.contract)")
    section = TEXT.split("\n## Testing\n", 1)[1].split("\n## ", 1)[0]
    battery = section.split("- **`contract.battery(", 1)[1].split("\n- **", 1)[0]
    items = re.findall(r"^  - .*(?:\n    .*)*", battery, re.M)
    listed = [name for item in items for name in re.findall(r"`([^`]+)`", item)]
    missing, other = set(contract.SCENARIOS) - set(listed), set(listed) - set(contract.SCENARIOS)
    assert sorted(listed) == sorted(contract.SCENARIOS), f"not listed: {missing}; not scenarios: {other}"


def _commands() -> list[list[str]]:
    """Every ``sluice ...`` command the guide shows: in shell blocks (with
    their continuation lines) and in inline code."""
    found = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("sluice "):
                found.append(line.split())
    for span in re.findall(r"`(sluice [^`]+)`", TEXT):
        found.append(span.split())
    return found


def _help(*args: str) -> str:
    return subprocess.run([str(SLUICE), *args, "--help"], capture_output=True, text=True, check=True).stdout


def test_every_sluice_command_it_shows_exists():
    commands = _commands()
    assert {c[1] for c in commands} >= {"new-plugin", "plugins", "run", "check"}
    top = _help()
    helps: dict[str, str] = {}
    for words in commands:
        sub = words[1]
        assert re.search(rf"\b{re.escape(sub)}\b", top.split("positional arguments:")[1]), sub
        text = helps.setdefault(sub, _help(sub))
        for option in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
            assert option in text, f"sluice {sub} has no {option}"


def test_every_relative_link_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", TEXT)
    relative = [link for link in links if not link.startswith(("http://", "https://", "#"))]
    assert relative
    for link in relative:
        assert (GUIDE.parent / link.split("#", 1)[0]).exists(), link
    for link in links:
        if link.startswith("#"):
            assert link[1:] in ANCHORS, link


def test_the_readme_sends_plugin_authors_here():
    readme = (ROOT / "README.md").read_text()
    assert "(plugins/README.md)" in readme
    for anchor in re.findall(r"\]\(plugins/README\.md#([^)]+)\)", readme):
        assert anchor in ANCHORS, anchor
    assert "## Write a balancing policy" not in readme  # moved here, not written twice
    section = readme.split("\n## Write a plugin\n", 1)[1].split("\n## ", 1)[0]
    [example] = [body for kind, body in _BLOCK.findall(section) if kind == "python"]
    compile(example, "README.md: Write a plugin", "exec")
    assert len(example.splitlines()) <= 25  # a taste; the guide is the reference


def test_the_walkthrough_works_as_written(tmp_path):
    """The guide's plugin, pyproject and tests, written out and run with the kit."""
    pytest.importorskip("sluice.testing.contract", reason="the kit's battery (sluice.testing.contract)")
    pytest.importorskip("sluice.testing.plugin", reason="the kit's pytest plugin (sluice.testing.plugin)")
    (tmp_path / "tests").mkdir()
    for name in ("sluice_stamp.py", "pyproject.toml", "tests/test_stamp.py"):
        (tmp_path / name).write_text(walkthrough_file(name))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    counts = re.search(r"(\d+) passed", done.stdout)
    assert counts and int(counts.group(1)) >= 3 + 10, done.stdout[-2000:]  # its tests and the battery's
