"""Server processes: started in their own session, checked, stopped by PID, measured.

A server is ready once it answers ``GET /`` with any HTTP response (over h2c
for a port that speaks only HTTP/2). Stopping sends
SIGTERM to its PID, then, if it has not exited after STOP_TIMEOUT_S,
SIGKILL to its process group, so that the workers of a multi-process
server go too (the group is the server's own: it was started in a new
session).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from load import fetch

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class StartError(Exception):
    """A server did not start; the message says why and ends with its output."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Server:
    """A running target (``proc`` None for ``direct``)."""

    name: str
    url: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def says_listening(self) -> str | None:
        """The line where the server says it listens (sluice names its chain and codec there)."""
        return next((line for line in self.output(100_000).splitlines() if "listening on" in line), None)

    def output(self, limit: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]


def stop_process(name: str, proc: subprocess.Popen) -> None:
    """SIGTERM by PID; SIGKILL to its process group (its workers too) if it
    has not exited after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log(f"{name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; sending SIGKILL")
        os.killpg(proc.pid, signal.SIGKILL)  # its leader is alive, so the group is still ours
        proc.wait()


def http1_probe(url: str) -> None:
    fetch(url + "/", timeout=1.0)


def wait_until_ready(server: Server, url: str, probe: Callable[[str], object] = http1_probe) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.exit_code() is not None:
            raise StartError(f"{server.name} exited with code {server.exit_code()} before serving\n"
                             f"--- {server.name} output ---\n{server.output()}")
        with contextlib.suppress(OSError, ValueError):
            probe(url)  # any HTTP answer: whether it is right is checked later
            return
        time.sleep(0.1)
    raise StartError(f"{server.name} did not answer GET / at {url} within "
                     f"{READY_TIMEOUT_S:.0f}s\n--- {server.name} output ---\n{server.output()}")


@contextlib.contextmanager
def running(name: str, command: Command, url: str, log_path: Path,
            probe: Callable[[str], object] = http1_probe) -> Iterator[Server]:
    """Run a command until the block ends; yields once ``probe(url)`` gets an HTTP answer."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command.argv, cwd=REPO, env={**os.environ, **command.env},
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(name, url, proc, log_path)
    try:
        wait_until_ready(server, url, probe)
        log(f"{name} ready at {url} (pid {proc.pid})")
        yield server
    finally:
        stop_process(name, proc)


# ----------------------------------------------------------------------- memory


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants, summed (shared pages count once per process)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total
