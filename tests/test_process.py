"""The process tree as an operator meets it: real ``sluice run`` processes, real signals.

Workers die with their master, a crashed worker comes back (with backoff),
a port another process listens on stops the start, the pid file, and what
each signal does in the master and in a worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from .proc import ROOT, Running, children, curl, free_port, poll, sluice


def events(proxy: Running, name: str, **fields) -> list[dict]:
    """sluice's own JSON log lines with this event name (and these fields)."""
    found = []
    for line in list(proxy.stderr):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
            found.append(event)
    return found


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def serves(port: int) -> bool:
    return "demo upstream" in curl(f"http://127.0.0.1:{port}/", timeout=5).stdout


def workers_ready(proxy: Running) -> list[int]:
    """The workers' pids once the master said every one listens."""
    poll(lambda: events(proxy, "workers ready"), what="workers ready", proxy=proxy)
    return sorted(children(proxy.pid))


def test_workers_die_with_the_master():
    port = free_port()
    proxy = Running("--listen", f"127.0.0.1:{port}", "--workers", "2")
    workers: list[int] = []
    try:
        workers = workers_ready(proxy)
        assert len(workers) == 2 and serves(port)
        proxy.proc.kill()  # SIGKILL: the master gets no chance to forward anything
        proxy.wait(5)
        poll(lambda: all(gone(pid) for pid in workers), timeout=5, what="orphaned workers exit")
        assert refused(port)
    finally:
        kill(*workers, proxy.pid)
        proxy.wait(5)


def test_a_crashed_worker_is_replaced_under_its_index_and_logged():
    port = free_port()
    proxy = Running("--listen", f"127.0.0.1:{port}", "--workers", "2")
    workers: list[int] = []
    try:
        workers = workers_ready(proxy)
        [dead] = [e["pid"] for e in events(proxy, "worker started", index=0)]
        os.kill(dead, signal.SIGKILL)
        [exited] = poll(lambda: events(proxy, "worker exited", pid=dead), what="worker exited logged", proxy=proxy)
        assert all(serves(port) for _ in range(5))  # the other worker serves meanwhile
        assert exited["signal"] == "SIGKILL" and exited["code"] is None
        assert exited["restart_in"] == 0.1 and exited["level"] == "warning"
        started = poll(lambda: [e for e in events(proxy, "worker started", index=0) if e["pid"] != dead],
                       what="a replacement for worker 0", proxy=proxy)
        replacement = started[0]["pid"]
        workers.append(replacement)
        assert events(proxy, "worker restart", index=0)
        poll(lambda: sorted(children(proxy.pid)) == sorted({*workers} - {dead}), what="two live workers", proxy=proxy)
        proxy.wait_for_output(f"pid {replacement} listening on")
        assert all(serves(port) for _ in range(5))
        assert proxy.stop() == 0
    finally:
        kill(*workers, proxy.pid)


CRASH_LOOP = """
import sys
from sluice.edge.workers import run_workers
from sluice.logs import configure

configure("info")

def target(reuse_port, ready, index):
    if sys.argv[1] == "after":
        ready()  # it started, then it crashes
    raise SystemExit(3)

sys.exit(run_workers(2, target))
"""


def test_a_crash_looping_worker_backs_off_instead_of_spinning():
    master = subprocess.Popen([sys.executable, "-c", CRASH_LOOP, "after"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    threading.Thread(target=lambda: lines.extend(json.loads(line) for line in master.stderr
                                                 if line.startswith("{")), daemon=True).start()

    def exits(index: int) -> list[dict]:
        return [e for e in list(lines) if e["event"] == "worker exited" and e["index"] == index]

    try:
        poll(lambda: len(exits(0)) >= 5, timeout=15, what="worker 0 crashed 5 times")
        ticks = Path(f"/proc/{master.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
        master.send_signal(signal.SIGTERM)
        # It stops on request, promptly. Its status is 0, or 1 when a worker
        # it had just restarted crashed (status 3) on its own as the stop came.
        assert master.wait(10) in (0, 1)
    finally:
        kill(master.pid)
    crashes = exits(0)
    assert [e["restart_in"] for e in crashes[:5]] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert all(e["code"] == 3 for e in crashes)
    # the restarts really waited: 0.1 + 0.2 + 0.4 + 0.8 s between the first crash and the fifth
    stamps = [e["timestamp"] for e in crashes[:5]]
    waited = (datetime.fromisoformat(stamps[-1]) - datetime.fromisoformat(stamps[0])).total_seconds()
    assert waited >= 1.5
    assert sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK") < 1.0  # and the master slept meanwhile


def test_a_worker_that_cannot_start_stops_the_master_with_its_status():
    r = subprocess.run([sys.executable, "-c", CRASH_LOOP, "before"], cwd=ROOT,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 3
    exited = [json.loads(line) for line in r.stderr.splitlines() if '"worker exited"' in line]
    assert exited and all(e["restart_in"] is None for e in exited)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_another_process_listens_on_stops_the_start(workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = sluice("run", "--listen", f"127.0.0.1:{port}", "--workers", workers)
    assert r.returncode == 2
    assert f"listeners[0].address: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_sluice_on_the_same_port_does_not_share_it(workers):
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}", "--workers", "2") as first:
        workers_ready(first)
        r = sluice("run", "--listen", f"127.0.0.1:{port}", "--workers", workers)
        assert r.returncode == 2
        assert f"listeners[0].address: cannot listen on 127.0.0.1:{port}" in r.stderr
        assert "worker started" not in r.stderr  # refused before any fork
        assert serves(port)


def test_port_0_gives_all_workers_one_port():
    with Running("--listen", "127.0.0.1:0", "--workers", "2") as proxy:
        workers_ready(proxy)
        poll(lambda: len(proxy.urls) == 2, what="two listening lines", proxy=proxy)
        assert proxy.urls[0] == proxy.urls[1] and not proxy.urls[0].endswith(":0")


def test_version():
    from importlib.metadata import version

    for args in (["--version"], ["version"]):
        r = sluice(*args)
        assert r.returncode == 0 and r.stdout.strip() == f"sluice {version('sluice')}"


def test_pid_file_lifecycle_reload_and_stop(tmp_path):
    pid_file = tmp_path / "sluice.pid"
    port = free_port()
    proxy = Running("--listen", f"127.0.0.1:{port}", "--workers", "2", "--pid-file", str(pid_file))
    try:
        workers_ready(proxy)
        poll(lambda: pid_file.exists() and pid_file.read_text() == f"{proxy.pid}\n", what="the pid file", proxy=proxy)
        second = sluice("run", "--listen", "127.0.0.1:0", "--pid-file", str(pid_file))
        assert second.returncode == 2
        assert f"--pid-file {pid_file}: sluice is already running as pid {proxy.pid}" in second.stderr
        r = sluice("reload", "--pid-file", str(pid_file))
        assert r.returncode == 0, r.stderr
        poll(lambda: len(events(proxy, "reload requested")) == 2, what="both workers asked to reload", proxy=proxy)
        assert sluice("stop", "--pid-file", str(pid_file)).returncode == 0
        assert proxy.wait(15) == 0
        assert not pid_file.exists()
        assert events(proxy, "stopping", mode="drain", signal="SIGTERM")
    finally:
        kill(*children(proxy.pid), proxy.pid)
    r = sluice("reload", "--pid-file", str(pid_file))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_a_stale_pid_file_is_replaced(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    pid_file = tmp_path / "sluice.pid"
    pid_file.write_text(f"{finished.pid}\n")
    r = sluice("reload", "--pid-file", str(pid_file))
    assert r.returncode == 2 and "not a running sluice (a stale file)" in r.stderr
    with Running("--listen", "127.0.0.1:0", "--pid-file", str(pid_file)) as proxy:
        poll(lambda: pid_file.read_text() == f"{proxy.pid}\n", what="the pid file names the new sluice", proxy=proxy)
        poll(lambda: events(proxy, "stale pid file replaced", pid=finished.pid), what="the stale file logged", proxy=proxy)
    assert not pid_file.exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_no_longer_kills_and_every_worker_asks_to_reload(workers):
    with Running("--listen", "127.0.0.1:0", "--workers", workers) as proxy:
        if workers == "2":
            workers_ready(proxy)
        before = sorted(children(proxy.pid))
        proxy.signal(signal.SIGHUP)
        indexes = poll(lambda: sorted(e["worker"] for e in events(proxy, "reload requested"))
                       == list(range(int(workers))), what="every worker logged the request", proxy=proxy)
        assert indexes
        assert proxy.proc.poll() is None and sorted(children(proxy.pid)) == before
        assert serves(int(proxy.url.rsplit(":", 1)[1]))
        assert proxy.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigquit_stops_at_once_without_draining(workers):
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen()
    port = free_port()
    reached = threading.Event()
    held = []

    def hold():  # takes the request and never answers
        conn, _ = upstream.accept()
        held.append(conn)
        reached.set()

    threading.Thread(target=hold, daemon=True).start()
    proxy = Running("--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{upstream.getsockname()[1]}",
                    "--plugins", "router,balancer", "--workers", workers)
    try:
        if workers == "2":
            workers_ready(proxy)
        result = {}
        client = threading.Thread(target=lambda: result.update(r=curl(f"http://127.0.0.1:{port}/")))
        client.start()
        assert reached.wait(10)
        started = time.monotonic()
        proxy.signal(signal.SIGQUIT)
        assert proxy.wait(5) == 0  # a drain would wait up to drain_timeout (30 s) for the request
        assert time.monotonic() - started < 5
        client.join(10)
        assert result["r"].returncode != 0  # the request in flight was cut, not answered
        assert events(proxy, "stopping", mode="fast")
    finally:
        kill(*children(proxy.pid), proxy.pid)
        upstream.close()
        for conn in held:
            conn.close()


def ok_config(path: Path, port: int, server: str, log: Path | None = None) -> Path:
    """A config whose one route answers ``ok`` itself, with an access log when ``log``."""
    filters = '"access_log", "router"' if log else '"router"'
    path.write_text(f"""
[server]
{server}

[[listeners]]
address = "127.0.0.1:{port}"
filters = [{filters}]

[[routes]]
match = {{ prefix = "/" }}
direct_response = {{ status = 200, body = "ok\\n" }}
""" + (f"""
[filters.access_log]
path = "{log}"
flush_interval = 0.05
""" if log else ""))
    return path


def test_the_config_names_the_pid_file_for_reload_and_stop(tmp_path):
    pid_file = tmp_path / "run" / "sluice.pid"
    pid_file.parent.mkdir()
    config = ok_config(tmp_path / "sluice.toml", free_port(), f'pid_file = "{pid_file}"')
    with Running("-c", str(config)) as proxy:
        poll(lambda: pid_file.exists() and pid_file.read_text() == f"{proxy.pid}\n", what="the pid file", proxy=proxy)
        assert sluice("reload", "-c", str(config)).returncode == 0
        poll(lambda: events(proxy, "reload requested", worker=0), what="reload requested", proxy=proxy)
        assert sluice("stop", "-c", str(config), "--fast").returncode == 0
        assert proxy.wait(10) == 0
        assert events(proxy, "stopping", mode="fast", signal="SIGQUIT")
        assert not pid_file.exists()
    r = sluice("reload", "-c", str(ok_config(tmp_path / "bare.toml", 1, "")))
    assert r.returncode == 2 and "server.pid_file is not set" in r.stderr


def test_sigusr1_reopens_the_access_log_after_logrotate_renames_it(tmp_path):
    log = tmp_path / "access.jsonl"
    port = free_port()
    config = ok_config(tmp_path / "sluice.toml", port, "workers = 2", log)

    def count(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    with Running("-c", str(config)) as proxy:
        workers_ready(proxy)
        for _ in range(4):
            assert curl(f"http://127.0.0.1:{port}/before").stdout == "ok\n"
        poll(lambda: count(log) == 4, what="4 lines in the log", proxy=proxy)
        rotated = tmp_path / "access.jsonl.1"
        log.rename(rotated)  # what logrotate does (without copytruncate)
        proxy.signal(signal.SIGUSR1)
        poll(lambda: len(events(proxy, "logs reopened")) == 2, what="both workers reopened", proxy=proxy)
        for _ in range(10):
            assert curl(f"http://127.0.0.1:{port}/after").stdout == "ok\n"
        poll(lambda: count(log) == 10, what="10 lines in the new file", proxy=proxy)
        assert all(json.loads(line)["path"] == "/after" for line in log.read_text().splitlines())
        assert count(rotated) == 4
        assert proxy.stop() == 0


def test_a_worker_replaced_after_a_reload_serves_the_reloaded_config(tmp_path):
    port = free_port()
    config = ok_config(tmp_path / "sluice.toml", port, "workers = 2")
    with Running("-c", str(config)) as proxy:
        workers = workers_ready(proxy)
        config.write_text(config.read_text().replace('body = "ok\\n"', 'body = "reloaded\\n"'))
        proxy.signal(signal.SIGHUP)
        poll(lambda: len(events(proxy, "config reloaded")) == 2, what="both workers reloaded", proxy=proxy)
        for pid in workers:  # both, so that whichever answers is a replacement
            os.kill(pid, signal.SIGKILL)
        poll(lambda: len(events(proxy, "worker started")) == 4 and len(proxy.urls) == 4,
             what="two replacements listening", proxy=proxy)
        assert all(curl(f"http://127.0.0.1:{port}/").stdout == "reloaded\n" for _ in range(4))
        assert proxy.stop() == 0
