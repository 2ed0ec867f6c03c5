"""A plugin's names, derived from the NAME its author gives, and the writing of its project.

One NAME makes every name the project needs. A '-' separates words in a
distribution's name but cannot appear in a Python name, so either is
accepted between words and each name takes the form its place wants:
``rate-limit`` (or ``rate_limit``) is the plugin, filter and entry point
``rate_limit``, the module ``sluice_rate_limit``, the distribution and its
directory ``sluice-rate-limit`` (the form pip normalises a name to), the
class ``RateLimit``.

Writing never overwrites: the project's directory must not exist, and is
created by this call (every file is rendered before it is), so a failure
part way removes only what this call made.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

__all__ = ["ALLOWED", "Names", "ScaffoldError", "create", "names", "render"]

_NAME = re.compile(r"[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*")
ALLOWED = ("lowercase letters and digits, starting with a letter, words joined by single '_' or '-' "
           "(e.g. 'tagger', 'rate_limit', 'canary-router')")

# template in templates/ -> the file it becomes, relative to the project
_FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "plugin.py.tmpl": "{module}.py",
    "test_plugin.py.tmpl": "tests/test_{name}.py",
    "gitignore.tmpl": ".gitignore",
}


class ScaffoldError(Exception):
    """The project cannot be written; the message says why, and what is allowed."""


@dataclass(frozen=True)
class Names:
    """Every name a new plugin's project uses."""

    name: str  # the plugin's, its filter's and its entry point's: rate_limit
    module: str  # sluice_rate_limit
    dist: str  # sluice-rate-limit, also the project's directory
    cls: str  # RateLimit
    header: str  # x-rate-limit, the header the generated filter sets


def names(text: str, taken: Mapping[str, str] | None = None) -> Names:
    """The names NAME makes; ``taken`` maps the names a new plugin must not
    reuse (installed plugins' and filters': two of one name are a startup
    error for sluice) to the distributions holding them."""
    if not _NAME.fullmatch(text):
        raise ScaffoldError(f"plugin name {text!r} is not allowed: use {ALLOWED}")
    name = text.replace("-", "_")
    if taken and name in taken:
        raise ScaffoldError(f"plugin name {name!r} is taken: the installed distribution {taken[name]} has a plugin "
                            "or filter of that name; choose another")
    words = name.split("_")
    return Names(name=name, module=f"sluice_{name}", dist="sluice-" + "-".join(words),
                 cls="".join(w.capitalize() for w in words), header="x-" + "-".join(words))


def render(n: Names) -> dict[str, str]:
    """The project's files (relative path -> text), none written yet."""
    values = {**asdict(n), "sluice_version": importlib.metadata.version("sluice")}
    templates = files(__package__) / "templates"
    return {path.format(**values): Template(templates.joinpath(tmpl).read_text()).substitute(values)
            for tmpl, path in _FILES.items()}


def create(n: Names, where: str | Path) -> Path:
    """Write the project for ``n`` into a new directory under ``where``; its path."""
    where = Path(where)
    if not where.is_dir():
        raise ScaffoldError(f"{where}: {'not a directory' if where.exists() else 'no such directory'}")
    project = where / n.dist
    contents = render(n)
    try:
        project.mkdir()
    except FileExistsError:
        raise ScaffoldError(f"{project} already exists; nothing was written (remove it, or give another --dir)") \
            from None
    except OSError as exc:
        raise ScaffoldError(f"{where}: cannot create {n.dist} there: {exc.strerror}") from None
    try:
        for path, text in contents.items():
            (project / path).parent.mkdir(exist_ok=True)
            (project / path).write_text(text)
    except OSError as exc:
        shutil.rmtree(project, ignore_errors=True)  # made by this call, above
        raise ScaffoldError(f"{project}: cannot write {path}: {exc.strerror}") from None
    return project
