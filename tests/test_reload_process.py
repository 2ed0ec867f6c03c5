"""Hot reload as operators trigger it: SIGHUP, ``sluice reload``, and a
watched config file, on real ``sluice run`` processes (with workers), real
origins and real clients under load."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from pathlib import Path

import httpx

from .proc import Running, ThreadOrigin, free_port, poll, sluice


def write_config(path: Path, port: int, origin: str, *, extra: str = "", server: str = "") -> None:
    path.write_text(textwrap.dedent(f"""
        [server]
        {server}

        [[listeners]]
        address = "127.0.0.1:{port}"
        filters = ["router"]

        [clusters.app]
        endpoints = ["{origin}"]

        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "app"
        {extra}
    """))


def answers_from(url: str, body: bytes, n: int = 8) -> bool:
    """Every one of ``n`` new connections gets ``body`` (so every worker has it)."""
    for _ in range(n):
        with httpx.Client() as client:
            if client.get(url).content != body:
                return False
    return True


def test_sighup_reloads_every_worker_and_a_broken_file_keeps_them_serving(tmp_path):
    old, new = ThreadOrigin(body=b"old"), ThreadOrigin(body=b"new")
    port = free_port()
    path = tmp_path / "sluice.toml"
    write_config(path, port, old.address)
    url = f"http://127.0.0.1:{port}/"
    try:
        with Running("-c", str(path), "--workers", "2") as proxy:
            assert answers_from(url, b"old")
            write_config(path, port, new.address)
            r = sluice("reload", "-c", str(path), "--pid-file", str(tmp_path / "none.pid"))
            assert r.returncode != 0  # no such pid file: said plainly
            proxy.signal(signal.SIGHUP)
            poll(lambda: answers_from(url, b"new"), what="both workers on the new config")
            poll(lambda: sum("config reloaded" in line for line in proxy.stderr) >= 2,
                       what="a 'config reloaded' event per worker")
            path.write_text(path.read_text().replace('cluster = "app"', 'cluster = "nope"'))
            proxy.signal(signal.SIGHUP)
            poll(lambda: sum("reload failed" in line for line in proxy.stderr) >= 2,
                       what="a 'reload failed' event per worker")
            assert any("routes[0].cluster: unknown cluster 'nope'" in line for line in proxy.stderr)
            assert answers_from(url, b"new")  # still the last good config
            assert proxy.proc.poll() is None
    finally:
        old.close()
        new.close()


def test_sluice_reload_finds_the_instance_by_its_pid_file(tmp_path):
    old, new = ThreadOrigin(body=b"old"), ThreadOrigin(body=b"new")
    port = free_port()
    path = tmp_path / "sluice.toml"
    pid_file = tmp_path / "sluice.pid"
    write_config(path, port, old.address, server=f'pid_file = "{pid_file}"')
    url = f"http://127.0.0.1:{port}/"
    try:
        with Running("-c", str(path)):
            poll(pid_file.exists, what="the pid file")
            assert answers_from(url, b"old", 2)
            write_config(path, port, new.address, server=f'pid_file = "{pid_file}"')
            r = sluice("reload", "-c", str(path))
            assert r.returncode == 0, r.stderr
            poll(lambda: answers_from(url, b"new", 2), what="the new config")
    finally:
        old.close()
        new.close()


def test_a_watched_config_file_reloads_when_it_is_replaced(tmp_path):
    old, new = ThreadOrigin(body=b"old"), ThreadOrigin(body=b"new")
    port = free_port()
    path = tmp_path / "sluice.toml"
    write_config(path, port, old.address, server="watch_config = true")
    url = f"http://127.0.0.1:{port}/"
    try:
        with Running("-c", str(path)) as proxy:
            proxy.wait_for_output("watching the config file")
            assert answers_from(url, b"old", 2)
            staged = tmp_path / "sluice.toml.new"  # as editors and config management do: write, rename
            write_config(staged, port, new.address, server="watch_config = true")
            staged.rename(path)
            poll(lambda: answers_from(url, b"new", 2), timeout=15, what="the watched change")
    finally:
        old.close()
        new.close()


def test_twenty_reloads_under_load_lose_no_request(tmp_path):
    a, b = ThreadOrigin(body=b"a"), ThreadOrigin(body=b"b")
    port = free_port()
    path = tmp_path / "sluice.toml"
    write_config(path, port, a.address)
    url = f"http://127.0.0.1:{port}/"
    failures: list = []
    counts = {b"a": 0, b"b": 0}
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=10) as client:  # keep-alive: connections live across reloads
            while not stop.is_set():
                try:
                    r = client.get(url)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(r.status_code)
                else:
                    counts[r.content] += 1

    try:
        with Running("-c", str(path), "--workers", "2") as proxy:
            threads = [threading.Thread(target=client_loop) for _ in range(6)]
            for t in threads:
                t.start()
            try:
                for i in range(20):
                    write_config(path, port, (b if i % 2 == 0 else a).address)
                    proxy.signal(signal.SIGHUP)
                    time.sleep(0.15)
            finally:
                stop.set()
                for t in threads:
                    t.join(10)
            poll(lambda: sum("config reloaded" in line for line in proxy.stderr) >= 2,
                       what="reloads in the log")
            assert proxy.stop() == 0
    finally:
        a.close()
        b.close()
    assert failures == []
    assert counts[b"a"] > 20 and counts[b"b"] > 20, counts
