"""A real ``redis-server`` (Debian ``redis-server``) for the tests: loopback, free port, no persistence.

``redis_server`` is one server for the session; tests keep apart by ``redis_prefix``, a key
prefix of their own. A test that kills, pauses or restarts Redis takes ``own_redis``, a server
of its own, so that it cannot disturb the others. Both are stopped by PID (``ServerProcess``).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from . import ServerProcess, free_port, require_binary

__all__ = ["own_redis", "ping", "redis_prefix", "redis_server", "start_redis"]


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether Redis on 127.0.0.1:port answers PING (its own readiness: it loaded and serves)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # -NOAUTH: serving, with a password


def start_redis(tmp: Path, *options: str) -> ServerProcess:
    """redis-server on a free loopback port, its dir in ``tmp``, nothing saved to disk, with
    more ``options`` (``"--requirepass", "x"``); started."""
    binary = require_binary("redis-server", "redis-server")
    port = free_port()
    data = tmp / f"redis-{port}"
    server = ServerProcess(
        "redis-server",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data), "--daemonize", "no", *options],
        data_dir=data, ready=lambda: ping(port), ready_timeout=10.0,
    )
    server.port = port  # type: ignore[attr-defined]
    server.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis for one test, which it may kill, stop (SIGSTOP) or restart on the same port."""
    server = start_redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses, so tests can share the session's server."""
    return f"sluice-test-{uuid.uuid4().hex[:12]}:"
