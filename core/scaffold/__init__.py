"""The plugin scaffold: ``sluice new-plugin NAME`` writes a new plugin's distribution.

What it writes (the templates in ``templates/``, filled in by ``project``):

- ``pyproject.toml``: the distribution ``sluice-NAME``, its entry point in the
  ``sluice`` group (the whole registration), a ``test`` extra, pytest in trio mode;
- ``sluice_NAME.py``: a working filter with settings, two phases, per-request
  state and a log event, each explained where it is used;
- ``tests/test_NAME.py``: a unit test (``run_filter``), an end-to-end test
  (``origin``, ``sluice_proxy``), a settings test, and the contract battery;
- ``README.md``: install, run, test; and a ``.gitignore`` for what builds leave.

The project passes its own tests as written (``tests/test_scaffold.py``
installs one into a fresh venv and runs them), so an author starts from green.
"""

from .project import ALLOWED, Names, ScaffoldError, create, names, render

__all__ = ["ALLOWED", "Names", "ScaffoldError", "create", "names", "render"]
