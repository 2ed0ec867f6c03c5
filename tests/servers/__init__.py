"""Real backing servers (etcd, ZooKeeper, Redis, ...) started by the tests themselves.

Each server module builds a :class:`ServerProcess` for its binary: the process runs on free
loopback ports with its data in a temp dir, is ready only when its own readiness check says
so (within a deadline), is stopped by PID (SIGTERM, then SIGKILL), and its log is kept in a
file so that a failure can say what the server said. A server can be stopped and started
again on the same ports and data dir, which is how the clients' reconnect tests cut it off.

A binary that is not installed makes its tests skip, naming the Debian package; ``make
test-deps`` installs them on a fresh machine.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ..proc import free_port

__all__ = ["ServerProcess", "free_port", "require_binary", "running", "unique_name"]


def require_binary(binary: str, package: str) -> str:
    """The binary's path, or skip the test saying which Debian package provides it."""
    path = shutil.which(binary) or (binary if os.access(binary, os.X_OK) else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package}; `make test-deps` installs it)")
    return path


def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Start ``server``, yield it, stop it by PID: the body of a session fixture (``yield from``)."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


_names = itertools.count()


def unique_name(request) -> str:
    """``<n>-<test name>``: a namespace (key prefix, chroot) that no other test of the session uses."""
    return f"{next(_names)}-{request.node.name}"


class ServerProcess:
    """One server process: ``start()`` waits until ``ready()`` is true, ``stop()`` ends it by PID.

    ``argv`` is the whole command line; ``ready`` is a non-blocking check (a TCP probe, a
    status request) polled until ``ready_timeout``. ``started_in`` is the last start's time to
    readiness, in seconds, for the tests to report.
    """

    def __init__(self, name: str, argv: Sequence[str], *, data_dir: Path, ready: Callable[[], bool],
                 ready_timeout: float = 30.0, env: dict | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._ready = ready
        self._ready_timeout = ready_timeout
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.started_in: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> ServerProcess:
        """Start the process (appending to its log) and wait, bounded, until it is ready."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            # Its own session, so that a signal to the test run's group never reaches it and
            # stop() can end the server alone, by its PID.
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self._env, start_new_session=True)
        deadline = began + self._ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                if self._ready():
                    self.started_in = time.monotonic() - began
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {self._ready_timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once: a crash, as far as the server's clients can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} data={self.data_dir}>"
