"""Fresh virtual environments for tests that install a distribution with pip.

The scaffold's project and the example plugins are tested as their authors
would use them: ``pip install -e .`` into a new venv, then ``pytest`` there.
Downloading sluice's dependencies again for each would cost minutes, so the
new venv sees this venv's packages through a ``.pth`` line (sluice itself,
trio, pytest, ...), while what the test installs lands in the new venv
only, and never in the venv the rest of the suite runs in.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path


def fresh_venv(where: Path) -> Path:
    """A new venv at ``where`` that also sees this one's packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # An "import" line in a .pth runs at startup: addsitedir also reads that directory's
    # own .pth files, which is how this venv's editable install of sluice is found.
    parents = ", ".join(repr(p) for p in site.getsitepackages())
    Path(purelib, "_sluice_parent.pth").write_text(f"import site; list(map(site.addsitedir, ({parents},)))\n")
    return python


def pip_install(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``pip install ARGS`` into that venv: no index, no build isolation (no network needed)."""
    return subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", *args],
        cwd=cwd, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
