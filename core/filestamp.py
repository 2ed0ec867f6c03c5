"""Noticing that files changed: a ``stat`` of each, compared with the last look.

Why a stat and not inotify (watchfiles): a watchfiles thread takes the GIL
back every 50 ms, which cost ~15 us on every request of a busy worker
(``benchmarks/RESULTS.md``), needs a thread per watcher to start and stop,
and a watch on each directory to follow renames. A stat of a few files
once a second costs nothing and sees every way a file is replaced: a write
in place (size, mtime), a rename over it (inode), a symlink swapped
(Kubernetes' secret volumes' ``..data``: ``os.stat`` follows links, so the
target's inode changes), a file removed or come back.

One helper for every file sluice follows (credential files, a JWKS file,
certificates), so they all notice the same changes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

__all__ = ["FileStamp"]

Stamp = tuple[int, int, int, int] | None  # (inode, device, size, mtime_ns); None: cannot stat


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


class FileStamp:
    """Answers "did any of these files change since I last looked?", looking at most every ``every`` s.

    The first look is at construction (call it where the files are read),
    so a change made after that and before the first ``changed()`` counts.
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]], every: float = 0.0) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.every = every
        self.seen = self._look()
        self._looked = time.monotonic()

    def _look(self) -> tuple[Stamp, ...]:
        return tuple(_stamp(p) for p in self.paths)

    def changed(self) -> bool:
        """True when a file's stamp differs from the last look; False without a look when
        the last one is less than ``every`` s old."""
        now = time.monotonic()
        if now - self._looked < self.every:
            return False
        self._looked = now
        stamps = self._look()
        if stamps == self.seen:
            return False
        self.seen = stamps
        return True
