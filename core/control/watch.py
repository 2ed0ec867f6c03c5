"""``server.watch_config = true``: reload when the config file changes.

Each worker looks at the file's stat (``sluice.filestamp``: inode, size,
mtime) every half second on its event loop and asks its own App to reload,
which validates before anything changes, so a half-written file is a
failed reload, and the next write the good one. A change is debounced: the
reload waits until the file has stayed the same for ``SETTLE`` seconds,
so that an editor's write-rename-chmod is one reload. The path is
``stat``ed as given, following symlinks, so a file replaced by renaming a
new one over it, or a Kubernetes ConfigMap's ``..data`` symlink swap, is a
change.

Why not watchfiles (inotify), as before: its Rust thread takes the GIL
back every 50 ms, and measured ~15 us more on every request of a busy
worker (``benchmarks/watch_cost.py``, ``benchmarks/RESULTS.md``); a stat
twice a second costs nothing measurable.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from sluice.filestamp import FileStamp

__all__ = ["watch_config"]

log = structlog.get_logger("sluice")

EVERY = 0.5  # seconds between looks at the file
SETTLE = 1.0  # a change reloads once the file has not changed for this long


async def watch_config(path: str, reload: Callable[[], None]) -> None:
    """Call ``reload()`` each time ``path`` is written, created, replaced or removed."""
    stamp = FileStamp([path])
    log.info("watching the config file", path=path)
    while True:
        await trio.sleep(EVERY)
        if not stamp.changed():
            continue
        while True:  # still being written: wait for it to settle
            await trio.sleep(SETTLE)
            if not stamp.changed():
                break
        log.info("config file changed", path=path)
        reload()
