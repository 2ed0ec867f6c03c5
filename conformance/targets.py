"""Proxies under test: each is started as a subprocess in front of the recording upstream.

Every target gets the same deployment, so the suite can compare them:

- a listener on 127.0.0.1 with the limits and timeouts below;
- path prefix "/app" -> the recording upstream (HTTP/1.1, keep-alive);
- path prefix "/dead" -> a port that is bound but never listens (connect is refused);
- anything else matches no route (the suite sends "/nowhere" for the 404 check).

A second listener on its own port speaks HTTP/2 over cleartext with prior knowledge (h2c),
for `http2/`: `http2 = true` for sluice, `listen ... http2` for nginx. It is a port of its
own so that the HTTP/1 listener is the same whatever a proxy does with a client preface.
sluice gets it only when `sluice check` accepts `http2 = true`; until it does,
`Target.h2_port` is None and `h2_missing` says why.

Routing is by path prefix only, so the 404 check does not depend on host matching.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

NAMES = ("sluice", "nginx")

MAX_HEADER_BYTES = 8192  # whole request head; over it -> 431
MAX_HEADER_COUNT = 50  # over it -> 431
MAX_BODY_BYTES = 65536  # request body; over it -> 413
HEADER_READ = 2.0  # seconds to receive a whole request head -> 408, then close
IDLE = 5.0  # keep-alive idle between requests -> close
CONNECT_TIMEOUT = 1.0
RESPONSE_TIMEOUT = 1.5  # waiting for the upstream response head -> 504

_STARTUP_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0


class Target:
    """A running proxy: its name, listening address and process."""

    def __init__(self, name: str, workdir: Path, upstream_port: int, codec: str | None = None):
        self.name = name
        self.codec = codec  # sluice's HTTP/1.1 codec; None for other proxies
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.process: subprocess.Popen | None = None
        self.h2_port: int | None = None
        self.h2_missing: str | None = None  # why there is no h2 listener

    def start(self) -> None:
        """Starts the proxy on a fresh port and waits until it accepts connections."""
        self.port = _free_port()
        self.h2_port, self.h2_missing = _free_port(), None
        # Bound but not listening: connecting is refused, and nobody else can take the port.
        self._dead = socket.socket()
        self._dead.bind(("127.0.0.1", 0))
        dead_port = self._dead.getsockname()[1]
        command = _LAUNCHERS[self.name](
            self.workdir, self.port, self.upstream_port, dead_port, self.h2_port
        )
        if self.codec is not None:
            command += ["--http1-codec", self.codec]
        if self.name == "sluice" and (refusal := _sluice_refuses(self.workdir / "sluice.toml")):
            self.h2_port, self.h2_missing = None, refusal
            command = _sluice(self.workdir, self.port, self.upstream_port, dead_port, None)
            command += ["--http1-codec", self.codec] if self.codec is not None else []
        self._stdout = open(self.workdir / "stdout.log", "wb")
        self._stderr = open(self.workdir / "stderr.log", "wb")
        self.process = subprocess.Popen(
            command,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
        )
        self._wait_listening()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def h2_address(self) -> tuple[str, int] | None:
        return None if self.h2_port is None else ("127.0.0.1", self.h2_port)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self, limit: int = 4000) -> str:
        """The tail of the process's stderr and stdout, for failure messages."""
        parts = []
        for log in ("stderr.log", "stdout.log", "error.log"):
            path = self.workdir / log
            if path.exists() and (text := path.read_text(errors="replace")[-limit:]):
                parts.append(f"--- {log} ---\n{text}")
        return "\n".join(parts) or "(no output)"

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._stdout.close()
            self._stderr.close()
            self._dead.close()
            self.process = None

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.process.returncode
                self.stop()
                pytest.fail(
                    f"{self.name} exited with {code} at startup:\n{self.output()}",
                    pytrace=False,
                )
            try:
                for port in filter(None, (self.port, self.h2_port)):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(
            f"{self.name} not listening on {self.address} after {_STARTUP_TIMEOUT}s:\n"
            f"{self.output()}",
            pytrace=False,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sluice_refuses(config: Path) -> str | None:
    """What `sluice check` says about `config`, if it refuses it."""
    check = [sys.executable, "-m", "sluice", "check", str(config)]
    result = subprocess.run(check, capture_output=True, text=True, timeout=_STARTUP_TIMEOUT)
    if result.returncode == 0:
        return None
    return " ".join((result.stderr or result.stdout).split())[:300]


def _sluice_listener(port: int, http2: bool) -> str:
    return f"""\
[[listeners]]
address = "127.0.0.1:{port}"
filters = ["router"]
{"http2 = true" if http2 else ""}
[listeners.limits]
max_header_bytes = {MAX_HEADER_BYTES}
max_header_count = {MAX_HEADER_COUNT}
max_body_bytes = {MAX_BODY_BYTES}
[listeners.timeouts]
header_read = {HEADER_READ}
idle = {IDLE}
"""


def _sluice(
    workdir: Path, port: int, upstream_port: int, dead_port: int, h2_port: int | None
) -> list[str]:
    config = workdir / "sluice.toml"
    listeners = _sluice_listener(port, http2=False)
    if h2_port is not None:
        listeners += "\n" + _sluice_listener(h2_port, http2=True)
    config.write_text(f"""\
{listeners}

[clusters.backend]
endpoints = ["127.0.0.1:{upstream_port}"]
policy = "round_robin"
connect_timeout = {CONNECT_TIMEOUT}
response_timeout = {RESPONSE_TIMEOUT}

[clusters.dead]
endpoints = ["127.0.0.1:{dead_port}"]

[[routes]]
match = {{ prefix = "/dead" }}
cluster = "dead"

[[routes]]
match = {{ prefix = "/app" }}
cluster = "backend"
""")
    return [sys.executable, "-m", "sluice", "run", "-c", str(config)]


def _nginx(
    workdir: Path, port: int, upstream_port: int, dead_port: int, h2_port: int | None
) -> list[str]:
    """nginx configured to match sluice's promises wherever a directive can express them
    (Via, X-Forwarded-*, request id, hop-by-hop fields), so the remaining differences are
    nginx's own protocol handling. Its h2c server (`listen ... http2` without ssl: prior
    knowledge on nginx 1.22) stops sending to a client whose window stays shut after
    `IDLE`, as sluice's idle timeout does."""
    (workdir / "temp").mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    hop_by_hop = (
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
    )
    clear_request = "\n".join(f'    proxy_set_header {h} "";' for h in hop_by_hop)
    hide_response = "\n".join(f"    proxy_hide_header {h};" for h in hop_by_hop)
    locations = """\
        location /app { proxy_pass http://backend; }
        location /dead { proxy_pass http://dead; }
        location / { return 404; }"""
    config = workdir / "nginx.conf"
    config.write_text(f"""\
{user}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/temp/body;
    proxy_temp_path {workdir}/temp/proxy;
    fastcgi_temp_path {workdir}/temp/fastcgi;
    uwsgi_temp_path {workdir}/temp/uwsgi;
    scgi_temp_path {workdir}/temp/scgi;

    large_client_header_buffers 4 {MAX_HEADER_BYTES // 1024}k;  # no header-count limit exists
    client_max_body_size {MAX_BODY_BYTES};
    client_header_timeout {int(HEADER_READ * 1000)}ms;
    keepalive_timeout {int(IDLE * 1000)}ms;
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_connect_timeout {int(CONNECT_TIMEOUT * 1000)}ms;
    proxy_read_timeout {int(RESPONSE_TIMEOUT * 1000)}ms;

    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 8; }}
    upstream dead {{ server 127.0.0.1:{dead_port}; }}

    map $http_via $request_via {{ "" "1.1 sluice"; default "$http_via, 1.1 sluice"; }}
    map $upstream_http_via $response_via {{
        "" "1.1 sluice";
        default "$upstream_http_via, 1.1 sluice";
    }}
    map $http_x_request_id $request_id_out {{ "" $request_id; default $http_x_request_id; }}

    proxy_set_header Host $http_host;
    proxy_set_header Connection "";
    proxy_set_header Via $request_via;
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $http_host;
    proxy_set_header X-Request-Id $request_id_out;
{clear_request}
{hide_response}
    proxy_hide_header Via;
    add_header Via $response_via always;

    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
    server {{
        listen 127.0.0.1:{h2_port} http2;
        send_timeout {int(IDLE * 1000)}ms;
{locations}
    }}
}}
""")
    return [
        "/usr/sbin/nginx",
        "-p",
        str(workdir),
        "-e",
        str(workdir / "error.log"),
        "-c",
        str(config),
    ]


_LAUNCHERS = {"sluice": _sluice, "nginx": _nginx}
