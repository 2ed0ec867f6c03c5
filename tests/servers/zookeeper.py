"""A real ZooKeeper (Debian ``zookeeperd``, 3.8) for the tests: one per session, a chroot per test.

Not the packaged system service: ``ZooKeeperServerMain`` (standalone) is run from the jars the
package installs, with its own zoo.cfg on a free loopback port and a temp dataDir. The tick is
short (200 ms), so sessions may be as short as 0.4 s (``minSessionTimeout``) and a test can
let one expire quickly. Readiness is the ``ruok`` four-letter word answered ``imok``. The
server can be stopped and started again on the same port and data (sessions survive a short
restart, as they do in production). Each test gets its own chroot path (``zk_chroot``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import ServerProcess, free_port, require_binary, running, unique_name

_JARS = Path("/usr/share/java")


def zookeeper_server_process(data_root: Path) -> ServerProcess:
    """A ZooKeeper ``ServerProcess`` (not started) on a free loopback port under ``data_root``."""
    java = require_binary("java", "zookeeperd, through default-jre-headless")
    if not (_JARS / "zookeeper.jar").exists():
        pytest.skip("ZooKeeper is not installed (Debian package zookeeperd; `make test-deps` installs it)")
    port = free_port()
    data_dir = data_root / "zookeeper"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_root / "zoo.cfg"
    config.write_text("\n".join([
        "tickTime=200", f"dataDir={data_dir}", f"clientPort={port}", "clientPortAddress=127.0.0.1",
        "minSessionTimeout=400", "maxSessionTimeout=30000", "admin.enableServer=false",
        "4lw.commands.whitelist=ruok,srvr", "",
    ]))

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
            probe.sendall(b"ruok")
            return probe.recv(4) == b"imok"

    # zookeeper.jar's manifest names its dependencies; slf4j-simple sends its log to the
    # server's log file (stderr) instead of the package's /var/log/zookeeper.
    classpath = f"{_JARS / 'zookeeper.jar'}:{_JARS / 'slf4j-simple.jar'}"
    server = ServerProcess("zookeeper", [
        java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", classpath,
        "org.apache.zookeeper.server.ZooKeeperServerMain", str(config),
    ], data_dir=data_dir, ready=ready)
    server.hosts = f"127.0.0.1:{port}"
    return server


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The session's ZooKeeper, started once (``.hosts`` is ``host:port``), stopped by PID at the end."""
    yield from running(zookeeper_server_process(tmp_path_factory.mktemp("zookeeper")))


@pytest.fixture
def zk_chroot(zookeeper_server, request) -> str:
    """A path of this test's own: ``/sluice-test/<unique name>``."""
    return f"/sluice-test/{unique_name(request)}"
