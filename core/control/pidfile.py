"""The pid file: where ``sluice reload``, ``sluice stop`` and init scripts find a running sluice.

It holds the pid that takes the signals: the master's with ``--workers N``,
else the one process's. It is written once every listener listens, through
a temporary file and a rename, so a reader sees the whole pid or no file;
it is removed at exit if it still names this process. At startup, a file
that names a live sluice process stops a second start (status 2); one that
names a dead process, or a live process that is not sluice (the pid was
reused), is stale and is replaced.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from ..errors import ConfigError

__all__ = ["check", "read", "remove", "write"]

log = structlog.get_logger("sluice")


def _pid_in(path: Path) -> int | None:
    """The pid the file holds; None when it holds no number."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


def _is_sluice(pid: int) -> bool:
    """A live process that runs sluice (its command line names it)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    try:
        return b"sluice" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # no /proc (not Linux): alive is all we know
        return not Path("/proc/self").exists()
    except OSError:
        return False


def check(path: str, key: str = "--pid-file") -> int | None:
    """Before starting: ConfigError if the file names a live sluice; else the stale pid it
    names (None: no file; 0: no pid in it), and the directory must be writable. ``key``
    names where the path came from in errors (``server.pid_file``)."""
    where = f"{key} {path}"
    file = Path(path)
    directory = file.parent
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise ConfigError(f"{where}: cannot write a file in {directory}")
    try:
        pid = _pid_in(file)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    if pid is not None and _is_sluice(pid):
        raise ConfigError(f"{where}: sluice is already running as pid {pid}")
    return pid if pid is not None else 0


def write(path: str) -> None:
    """This process's pid, atomically (rename over the old file). A failure
    (the disk filled since ``check``) is logged: sluice already serves."""
    file = Path(path)
    temporary = file.with_name(f".{file.name}.{os.getpid()}")
    try:
        temporary.write_text(f"{os.getpid()}\n", encoding="ascii")
        os.replace(temporary, file)
    except OSError as exc:
        log.error("pid file not written", path=path, error=exc.strerror or str(exc))
        with contextlib.suppress(OSError):
            temporary.unlink()


def remove(path: str) -> None:
    """Remove the file if it still names this process (a later sluice may own it now)."""
    file = Path(path)
    try:
        if _pid_in(file) == os.getpid():
            file.unlink()
    except OSError:
        pass


def read(path: str, key: str = "--pid-file") -> int:
    """The pid of the live sluice the file names, for ``sluice reload`` and ``stop``."""
    where = f"{key} {path}"
    try:
        pid = _pid_in(Path(path))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (is sluice running with --pid-file {path}?)") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    if pid is None:
        raise ConfigError(f"{where}: holds no pid")
    if not _is_sluice(pid):
        raise ConfigError(f"{where}: names pid {pid}, which is not a running sluice (a stale file)")
    return pid
