"""``server.watch_config = true``: reload when the config file changes.

watchfiles (inotify on Linux, through a Rust thread) reports changes to
the file's directory, debounced (1.6 s by default, so that an editor's
write-rename-chmod is one change); each worker watches for itself and
asks its own App to reload, which validates before anything changes, so
a half-written file is a failed reload, and the next write the good one.
The directory is watched, not the file, because editors and config
management replace a file by renaming a new one over it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog
from watchfiles import awatch

__all__ = ["watch_config"]

log = structlog.get_logger("sluice")


async def watch_config(path: str, reload: Callable[[], None]) -> None:
    """Call ``reload()`` each time ``path`` is written, created or replaced."""
    target = Path(path).resolve()
    log.info("watching the config file", path=str(target))
    async for changes in awatch(target.parent, recursive=False):
        if any(Path(changed) == target for _, changed in changes):
            log.info("config file changed", path=str(target))
            reload()
