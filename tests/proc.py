"""Run the real ``sluice`` command as a subprocess, the way users do."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "sluice"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sluice(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a sluice command to completion."""
    return subprocess.run([*SLUICE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


class Running:
    """``sluice run ...`` in the background; ``url`` once it listens."""

    def __init__(self, *args: str, env: dict | None = None, ready_timeout: float = 15) -> None:
        self.proc = subprocess.Popen(
            [*SLUICE, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})}, cwd=ROOT,
        )
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._listening = threading.Event()
        self.urls: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        if not self._listening.wait(ready_timeout):
            self.stop()
            raise AssertionError(f"sluice did not start: {''.join(self.stderr)}")

    def _read(self, pipe, sink: list[str]) -> None:
        for line in pipe:
            sink.append(line)
            if match := re.search(r"listening on (\S+)", line):
                self.urls.append(match.group(1).rstrip(","))
                self._listening.set()

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        """The exit code, once the process has ended and every line it wrote has been read.

        ``proc.wait()`` alone returns before the reader threads reach the end of the pipes,
        so a test that looks for a last log line right after it would race them.
        """
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)  # a worker that outlived the master may hold the pipe: do not wait forever
        return code

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def wait_for_output(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.stdout + self.stderr):
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared: {''.join(self.stderr)}")

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args],
                          capture_output=True, text=True, timeout=timeout + 5)


class ThreadOrigin:
    """A real HTTP/1.1 origin in a thread of the test process, for tests that
    run sluice as a subprocess: answers every GET 200 after ``delay`` seconds
    with ``body``, and records the paths it served."""

    def __init__(self, *, delay: float = 0.0, body: bytes = b"") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        served: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the stdlib's name
                time.sleep(delay)
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                served.append(self.path)

            def log_message(self, *args):
                pass

        self.served = served
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ThreadOrigin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def poll(check, timeout: float = 10, what: str = "condition", proxy: Running | None = None):
    """``check()``'s first truthy value, polled until the deadline (then the proxy's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s" + (f":\n{''.join(proxy.stderr)}" if proxy else ""))
