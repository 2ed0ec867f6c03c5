"""The config centre on a real etcd, with real ``sluice run`` processes and real clients.

Routes and clusters are pushed to the store and every instance follows (converging within
1 s, measured and printed with ``-s``); an invalid document, put raw as etcdctl would
(bypassing ``sluice config push``'s check), is refused by every instance, which keeps
serving and says so in admin and metrics; etcd stopped mid-run leaves traffic on the last
good config with staleness reported, and its return is followed again; a start during the
outage runs on the on-disk cache; a store that accepts and never answers costs the data
path nothing. ``sluice config push/get/diff`` run as the real command.
"""

from __future__ import annotations

import base64
import json
import socket
import statistics
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from .proc import Running, ThreadOrigin, free_port, poll, sluice
from .servers.etcd import etcd_server_process

CONVERGE = 1.0  # seconds: every instance answers by a pushed route within this


def bootstrap(tmp_path: Path, table: str, *, name: str = "sluice", admin: int | None = None) -> str:
    """A bootstrap file: a listener on a free port, routes from the store."""
    path = tmp_path / f"{name}.toml"
    admin_table = f'[admin]\nenabled = true\naddress = "127.0.0.1:{admin}"\n' if admin else ""
    path.write_text(textwrap.dedent(f"""
        [[listeners]]
        address = "127.0.0.1:{free_port()}"
        filters = ["router"]

        [server]
        drain_timeout = 1
        """) + admin_table + table)
    return str(path)


def etcd_table(url: str, prefix: str, cache: str | None = None, timeout: float = 2.0) -> str:
    cache_line = f'cache = "{cache}"\n' if cache else ""
    return (f'[config_store]\nstore = "etcd"\naddress = "{url}"\nprefix = "{prefix}"\ntimeout = {timeout}\n'
            f"backoff_initial = 0.1\nbackoff_max = 0.5\n{cache_line}")


def document(origin: str, cluster: str = "app") -> str:
    """The store's document: one route to one cluster."""
    return textwrap.dedent(f"""
        [clusters.{cluster}]
        endpoints = ["{origin}"]

        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "{cluster}"
        """)


def etcd_put(url: str, key: str, value: str) -> int:
    """A raw put (what ``etcdctl put`` does), with no check of ours; the store's revision after it."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                       "value": base64.b64encode(value.encode()).decode()}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v3/kv/put", body), timeout=5) as answer:
        return int(json.loads(answer.read())["header"]["revision"])


def etcd_get(url: str, key: str) -> str | None:
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v3/kv/range", body), timeout=5) as answer:
        kvs = json.loads(answer.read()).get("kvs")
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def body(url: str) -> bytes | None:
    """One request on a new connection (so each worker gets its turn): the body, None if it failed.
    A plain socket, not an httpx client per request: polling every 5 ms from three threads must
    not itself load the machine it measures."""
    host, _, port = url.split("://", 1)[1].split("/", 1)[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
    except OSError:
        return None
    head, _, content = answer.partition(b"\r\n\r\n")
    return content if head.startswith(b"HTTP/1.1 200") else None


def settled(url: str, expected: bytes, n: int = 4) -> bool:
    return all(body(url) == expected for _ in range(n))


def admin_json(port: int, path: str) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).json()


def metric(port: int, name: str) -> float | None:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def converge(urls: list[str], expected: bytes, started: float) -> list[float]:
    """Seconds from ``started`` to each instance answering ``expected`` (polled every 5 ms, then
    confirmed on 4 more new connections, so both of a 2-worker instance's workers have it)."""
    times: list[float | None] = [None] * len(urls)

    def watch(i: int) -> None:
        deadline = started + 5
        while time.monotonic() < deadline:
            if body(urls[i]) == expected:
                seen = time.monotonic() - started
                if settled(urls[i], expected):
                    times[i] = seen
                    return
            time.sleep(0.005)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(t is not None for t in times), f"not every instance converged: {times}"
    return times


def test_a_pushed_route_converges_on_three_instances_within_a_second(etcd_server, etcd_prefix, tmp_path):
    a, b = ThreadOrigin(body=b"A"), ThreadOrigin(body=b"B")
    key = f"{etcd_prefix}config"
    etcd_put(etcd_server.url, key, document(a.address))
    table = etcd_table(etcd_server.url, etcd_prefix)
    procs = [Running("-c", bootstrap(tmp_path, table, name=f"i{i}"), *(["--workers", "2"] if i == 0 else []))
             for i in range(3)]
    try:
        urls = [p.url + "/" for p in procs]
        for url in urls:
            assert settled(url, b"A")
        figures = []
        for n in range(10):
            target = (b, b"B") if n % 2 == 0 else (a, b"A")
            started = time.monotonic()
            etcd_put(etcd_server.url, key, document(target[0].address))
            times = converge(urls, target[1], started)
            figures.append(max(times))
            print(f"push {n + 1}: converged in " + ", ".join(f"{t * 1000:.0f} ms" for t in times)
                  + " (instances 1 (2 workers), 2, 3)")
        print(f"convergence over {len(figures)} pushes: median {statistics.median(figures) * 1000:.0f} ms, "
              f"max {max(figures) * 1000:.0f} ms")
        assert max(figures) <= CONVERGE
        for p in procs:
            assert sum("config store applied" in line for line in p.stderr) >= 10
        # An invalid document, put raw: refused by every instance (each of its workers), all serve on.
        last = b"A" if len(figures) % 2 == 0 else b"B"
        etcd_put(etcd_server.url, key, "[[routes]]\nmatch = { prefix = '/' }\ncluster = 'gone'\n")
        for p, workers in zip(procs, (2, 1, 1), strict=True):
            poll(lambda p=p, w=workers: sum("config store document refused" in line for line in p.stderr) >= w, 5,
                 "refused", p)
        for url in urls:
            assert settled(url, last)
    finally:
        for p in procs:
            p.stop()
        a.close()
        b.close()


def test_an_invalid_document_is_refused_by_every_worker_which_keeps_serving(etcd_server, etcd_prefix, tmp_path):
    a = ThreadOrigin(body=b"A")
    key = f"{etcd_prefix}config"
    etcd_put(etcd_server.url, key, document(a.address))
    admin = free_port()
    proxy = Running("-c", bootstrap(tmp_path, etcd_table(etcd_server.url, etcd_prefix), admin=admin),
                    "--workers", "2")
    try:
        url = proxy.url + "/"
        assert settled(url, b"A")
        state = admin_json(admin, "/config")["config_store"]
        assert state["connected"] and state["revision"] and state["last_error"] is None
        good = state["revision"]
        assert metric(admin, "sluice_config_store_connected") == 1
        # A route to a cluster that does not exist: every worker refuses it.
        etcd_put(etcd_server.url, key, document(a.address).replace('cluster = "app"', 'cluster = "nope"'))
        poll(lambda: sum("config store document refused" in line for line in proxy.stderr) >= 2, 5,
             "refused by both workers", proxy)
        assert any("routes[0].cluster: unknown cluster 'nope'" in line for line in proxy.stderr)
        assert settled(url, b"A", 8)
        state = admin_json(admin, "/config")["config_store"]
        assert state["revision"] == good and state["refused_revision"] > good
        assert "routes[0].cluster" in state["last_error"]
        poll(lambda: metric(admin, "sluice_config_last_reload_successful") == 0, 5, "reload metric 0")
        assert metric(admin, "sluice_config_store_revision") == good
        # Not TOML at all, and a section the store may not hold: refused the same way.
        etcd_put(etcd_server.url, key, "routes = [[[")
        poll(lambda: "not valid TOML" in (admin_json(admin, "/config")["config_store"]["last_error"] or ""), 5,
             "garbage refused", proxy)
        etcd_put(etcd_server.url, key, '[[listeners]]\naddress = "0.0.0.0:1"\n')
        poll(lambda: "listeners: not allowed in the store" in
             (admin_json(admin, "/config")["config_store"]["last_error"] or ""), 5, "listeners refused", proxy)
        assert settled(url, b"A", 8)
        # A good one again: applied, the error cleared.
        etcd_put(etcd_server.url, key, document(a.address, cluster="again"))
        poll(lambda: admin_json(admin, "/config")["config_store"]["last_error"] is None, 5, "applied", proxy)
        poll(lambda: metric(admin, "sluice_config_last_reload_successful") == 1, 5, "reload metric 1")
        assert settled(url, b"A")
        assert not any("Traceback" in line for line in proxy.stderr)
    finally:
        proxy.stop()
        a.close()


def test_etcd_down_keeps_the_last_config_a_restart_uses_the_cache_and_its_return_is_followed(
        tmp_path, etcd_prefix):
    a, b, c = ThreadOrigin(body=b"A"), ThreadOrigin(body=b"B"), ThreadOrigin(body=b"C")
    server = etcd_server_process(tmp_path / "store").start()
    key, cache = f"{etcd_prefix}config", str(tmp_path / "cache.json")
    admin = free_port()
    alert = ('[filters.alerts]\ninterval = 0.2\n[[filters.alerts.rules]]\nname = "StoreStale"\n'
             'kind = "config_store_stale"\nthreshold = 1\nfor = 0\n')
    path = bootstrap(tmp_path, etcd_table(server.url, etcd_prefix, cache=cache, timeout=1) + alert, admin=admin)
    proxy = restarted = None
    try:
        etcd_put(server.url, key, document(a.address))
        proxy = Running("-c", path)
        url = proxy.url + "/"
        assert settled(url, b"A")
        etcd_put(server.url, key, document(b.address))
        poll(lambda: settled(url, b"B"), 5, "B applied", proxy)
        poll(lambda: Path(cache).exists() and b.address in json.loads(Path(cache).read_text())["document"], 5,
             "the cache holds B", proxy)
        server.stop()
        proxy.wait_for_output("config store lost")
        assert settled(url, b"B", 8)  # the last good config serves on
        stale = poll(lambda: admin_json(admin, "/config")["config_store"]["stale_seconds"] > 0.5 or None, 5,
                     "staleness reported")
        assert stale and not admin_json(admin, "/config")["config_store"]["connected"]
        poll(lambda: (metric(admin, "sluice_config_store_stale_seconds") or 0) > 0.5, 5, "stale metric")
        assert metric(admin, "sluice_config_store_connected") == 0
        poll(lambda: any("alert firing" in line and "StoreStale" in line for line in proxy.stderr), 5,
             "the alert rule firing past 1 s out of sync", proxy)
        # A restart while etcd is down starts from the cache, and says how old it is.
        proxy.stop()
        started = time.monotonic()
        restarted = Running("-c", path)
        print(f"started from the cache in {time.monotonic() - started:.2f}s (etcd refuses connections)")
        restarted.wait_for_output("starting from the cache")
        assert any("starting from the cache" in line and "age_seconds" in line for line in restarted.stderr)
        url = restarted.url + "/"
        assert settled(url, b"B")
        # etcd back (same data, same ports): followed again, and a new push applies.
        server.start()
        restarted.wait_for_output("config store back", timeout=10)
        back = time.time()  # the same document there: the cache is confirmed now, its age restarts
        poll(lambda: json.loads(Path(cache).read_text())["saved"] > back - 1, 5, "the cache re-saved", restarted)
        etcd_put(server.url, key, document(c.address))
        poll(lambda: settled(url, b"C"), 5, "C applied after etcd's return", restarted)
        assert admin_json(admin, "/config")["config_store"]["connected"]
        restarted.wait_for_output("alert resolved")  # (it fired again after the restart from the cache)
    finally:
        for p in (proxy, restarted):
            if p is not None:
                p.stop()
        server.stop()
        for o in (a, b, c):
            o.close()


def test_a_compaction_while_etcd_was_away_forces_a_full_read(tmp_path, etcd_prefix):
    """What changed while the watch was cut is compacted away: the instance reads the key whole."""
    a, b = ThreadOrigin(body=b"A"), ThreadOrigin(body=b"B")
    server = etcd_server_process(tmp_path / "store")
    # The same store on another client port: changed and compacted where the instance cannot see.
    hidden = etcd_server_process(tmp_path / "store", peer=server.peer_port)
    server.start()
    key = f"{etcd_prefix}config"
    proxy = None
    try:
        etcd_put(server.url, key, document(a.address))
        proxy = Running("-c", bootstrap(tmp_path, etcd_table(server.url, etcd_prefix, timeout=1)))
        url = proxy.url + "/"
        assert settled(url, b"A")
        server.stop()
        proxy.wait_for_output("config store lost")
        hidden.start()
        etcd_put(hidden.url, key, document(a.address, cluster="between"))
        revision = etcd_put(hidden.url, key, document(b.address))
        body_ = json.dumps({"revision": str(revision), "physical": True}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{hidden.url}/v3/kv/compaction", body_), timeout=5).close()
        hidden.stop()
        server.start()
        poll(lambda: settled(url, b"B"), 10, "B after the full read", proxy)
        assert any("etcd.watch.resync" in line for line in proxy.stderr)
        proxy.wait_for_output("config store back")
    finally:
        if proxy is not None:
            proxy.stop()
        hidden.stop()
        server.stop()
        a.close()
        b.close()


def test_no_store_and_no_cache_is_a_clear_error_naming_both(tmp_path, etcd_prefix):
    port = free_port()  # nothing listens there
    cache = str(tmp_path / "none.json")
    path = bootstrap(tmp_path, etcd_table(f"http://127.0.0.1:{port}", etcd_prefix, cache=cache, timeout=0.5))
    r = sluice("run", "-c", path)
    assert r.returncode == 2
    assert f"127.0.0.1:{port}" in r.stderr and cache in r.stderr and "config_store.cache" in r.stderr
    assert "Traceback" not in r.stderr
    Path(cache).write_text("{not json")  # a damaged cache: named, never a traceback
    r = sluice("run", "-c", path)
    assert r.returncode == 2 and f"config_store.cache: {cache}: not a sluice config cache" in r.stderr
    assert "Traceback" not in r.stderr


class Silent:
    """A TCP listener that accepts and never answers: a store that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for s in self.held:
            s.close()


def test_a_store_that_hangs_never_slows_the_data_path(tmp_path, etcd_prefix):
    from sluice.control.config_store import Document, save_cache
    from sluice.plugins.config_etcd import EtcdConfigStore

    a, silent = ThreadOrigin(body=b"A"), Silent()
    cache = str(tmp_path / "cache.json")
    admin = free_port()
    table = etcd_table(f"http://{silent.address}", etcd_prefix, cache=cache, timeout=0.5)
    path = bootstrap(tmp_path, table, admin=admin)
    from sluice.control.config import load

    save_cache(cache, EtcdConfigStore(load(path).config_store), Document(7, document(a.address).encode()))
    proxy = Running("-c", path)
    try:
        url = proxy.url + "/"
        latencies = []
        with httpx.Client(timeout=2) as client:
            deadline = time.monotonic() + 3  # several store timeouts and retries
            while time.monotonic() < deadline:
                t = time.monotonic()
                assert client.get(url).content == b"A"
                latencies.append(time.monotonic() - t)
            direct = []  # the origin alone, for scale (http.server's own answer time)
            for _ in range(20):
                t = time.monotonic()
                client.get(f"http://{a.address}/")
                direct.append(time.monotonic() - t)
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        print(f"store hanging: {len(latencies)} requests in 3 s, median {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; the origin alone: median "
              f"{statistics.median(direct) * 1000:.1f} ms")
        assert latencies[-1] < 0.25  # a store call waits 0.5 s: none of it was on a request's path
        state = admin_json(admin, "/config")["config_store"]
        assert state["connected"] is False and state["revision"] == 7 and state["source"] == "cache"
        assert any("config store lost" in line for line in proxy.stderr)
    finally:
        proxy.stop()
        silent.close()
        a.close()


# --- the commands --------------------------------------------------------------------

def test_config_push_get_diff_through_the_real_command(etcd_server, etcd_prefix, tmp_path):
    a = ThreadOrigin(body=b"A")
    flags = ["--store", "etcd", "--address", etcd_server.url, "--prefix", etcd_prefix]
    key = f"{etcd_prefix}config"
    try:
        good = tmp_path / "good.toml"
        good.write_text(document(a.address))
        r = sluice("config", "get", *flags)
        assert r.returncode == 1 and "no document" in r.stderr
        r = sluice("config", "push", str(good), *flags)
        assert r.returncode == 0, r.stderr
        assert "revision" in r.stdout and etcd_get(etcd_server.url, key) == good.read_text()
        r = sluice("config", "get", *flags)
        assert r.returncode == 0 and r.stdout == good.read_text()
        r = sluice("config", "diff", str(good), *flags)
        assert (r.returncode, r.stdout) == (0, "")
        changed = tmp_path / "changed.toml"
        changed.write_text(document(a.address, cluster="other"))
        r = sluice("config", "diff", str(changed), *flags)
        assert r.returncode == 1 and '-cluster = "app"' in r.stdout and '+cluster = "other"' in r.stdout
        # A bad file never reaches the store: exit 2, one line naming the key.
        bad = tmp_path / "bad.toml"
        bad.write_text(document(a.address).replace('cluster = "app"', 'cluster = "nope"'))
        r = sluice("config", "push", str(bad), *flags)
        assert r.returncode == 2 and "routes[0].cluster" in r.stderr and "Traceback" not in r.stderr
        garbage = tmp_path / "garbage.toml"
        garbage.write_text('[[listeners]]\naddress = "127.0.0.1:1"\n')
        r = sluice("config", "push", str(garbage), *flags)
        assert r.returncode == 2 and "listeners: not allowed in the store" in r.stderr
        assert etcd_get(etcd_server.url, key) == good.read_text()
        # The store named by a bootstrap file's table works the same.
        boot = bootstrap(tmp_path, etcd_table(etcd_server.url, etcd_prefix))
        r = sluice("config", "diff", str(good), "-c", boot)
        assert r.returncode == 0, r.stderr
        # An unreachable store: exit 2 and one line, no traceback.
        r = sluice("config", "get", "--store", "etcd", "--address", f"http://127.0.0.1:{free_port()}",
                   "--prefix", etcd_prefix, "--timeout", "1")
        assert r.returncode == 2 and "unreachable" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        r = sluice("config", "get", "--store", "etcd", "--address", etcd_server.url)
        assert r.returncode == 2 and "prefix" in r.stderr and "Traceback" not in r.stderr
    finally:
        a.close()


def test_sluice_check_checks_the_stores_document_else_the_cache_as_a_start_would(etcd_server, etcd_prefix, tmp_path):
    a = ThreadOrigin(body=b"A")
    key, cache = f"{etcd_prefix}config", tmp_path / "cache.json"
    path = bootstrap(tmp_path, etcd_table(etcd_server.url, etcd_prefix, cache=str(cache), timeout=1))
    bad = document(a.address).replace('cluster = "app"', 'cluster = "nope"')
    try:
        r = sluice("check", path)
        assert r.returncode == 0 and "with the file alone (the config store (etcd at" in r.stdout, r.stderr
        revision = etcd_put(etcd_server.url, key, document(a.address))
        r = sluice("check", path)
        assert r.returncode == 0, r.stderr
        assert f"ok with the config store's document (etcd at {etcd_server.url}" in r.stdout
        assert f"revision {revision})" in r.stdout and "cluster app:" in r.stdout
        revision = etcd_put(etcd_server.url, key, bad)  # as etcdctl would, past push's check
        r = sluice("check", path)
        assert r.returncode == 2 and f"revision {revision}" in r.stderr and "routes[0].cluster" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not cache.exists()  # (check writes no cache)
        etcd_put(etcd_server.url, key, "[listeners]\n")
        r = sluice("check", path)
        assert r.returncode == 2 and "listeners: not allowed in the store" in r.stderr, r.stderr
        # The store unreachable: a start would run on the cache, so check checks that, and says so.
        dead = bootstrap(tmp_path, etcd_table(f"http://127.0.0.1:{free_port()}", etcd_prefix, cache=str(cache),
                                              timeout=1), name="dead")
        r = sluice("check", dead)
        assert r.returncode == 2 and "unreachable" in r.stderr and f"no cache yet at {cache}" in r.stderr, r.stderr
        cache.write_text(json.dumps({"store": "etcd", "revision": 7, "saved": time.time(),
                                     "document": document(a.address)}))
        r = sluice("check", dead)
        assert r.returncode == 0, r.stderr
        assert f"ok with the cache {cache} (revision 7" in r.stdout and "is unreachable" in r.stdout
        assert "cluster app:" in r.stdout
        cache.write_text(json.dumps({"store": "etcd", "revision": 8, "saved": time.time(), "document": bad}))
        r = sluice("check", dead)
        assert r.returncode == 2 and f"the cache {cache} (revision 8" in r.stderr, r.stderr
        assert "routes[0].cluster" in r.stderr and "Traceback" not in r.stderr
    finally:
        a.close()


@pytest.mark.parametrize(("table", "message"), [
    ('[config_store]\nstore = "etcd"\naddress = "http://127.0.0.1:1"\n', "config_store: store etcd needs prefix"),
    ('[config_store]\nstore = "consul"\naddress = "x"\n', "config_store.store: unknown config store 'consul'"),
    ('[config_store]\nstore = "etcd"\naddress = "x"\nprefix = "/p/"\ntimeout = -1\n', "config_store.timeout"),
])
def test_a_bad_config_store_table_names_its_key(tmp_path, table, message):
    r = sluice("run", "-c", bootstrap(tmp_path, table))
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.parametrize(("rule", "message"), [
    ('kind = "config_store_stale"\n', "filters.alerts.rules[0].threshold: required for kind 'config_store_stale'"),
    ('kind = "config_store_stale"\nthreshold = 5\ncluster = "x"\n', "not routes or clusters"),
])
def test_a_config_store_stale_rule_is_checked(tmp_path, rule, message):
    table = '[config_store]\nstore = "etcd"\naddress = "http://127.0.0.1:1"\nprefix = "/p/"\n'
    path = bootstrap(tmp_path, table + f'[[filters.alerts.rules]]\nname = "S"\n{rule}')
    r = sluice("check", path)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_sluice_plugins_lists_the_config_stores():
    r = sluice("plugins")
    assert r.returncode == 0
    assert "  config store etcd: " in r.stdout and "  config store zookeeper: " in r.stdout


def test_a_store_with_no_document_yet_starts_on_the_file_alone_and_follows_the_first_push(
        etcd_server, etcd_prefix, tmp_path):
    a = ThreadOrigin(body=b"A")
    admin = free_port()
    proxy = Running("-c", bootstrap(tmp_path, etcd_table(etcd_server.url, etcd_prefix), admin=admin),
                    "--workers", "2")
    try:
        url = proxy.url + "/"
        proxy.wait_for_output("config store empty")
        assert httpx.get(url, timeout=2).status_code == 404  # the file has no routes
        assert admin_json(admin, "/config")["config_store"]["last_error"] is None
        etcd_put(etcd_server.url, f"{etcd_prefix}config", document(a.address))
        poll(lambda: settled(url, b"A"), 5, "the first document applied", proxy)
        assert not any("config store document refused" in line for line in proxy.stderr)
    finally:
        proxy.stop()
        a.close()


def test_the_overlay_replaces_routes_and_merges_clusters_and_filters_by_name():
    from sluice.control.config_store import overlay

    base = {"listeners": [{"address": "127.0.0.1:1"}], "routes": [{"cluster": "file"}],
            "clusters": {"file": {"endpoints": ["a:1"]}, "both": {"endpoints": ["a:2"]}},
            "filters": {"alerts": {"interval": 5}}}
    doc = {"routes": [{"cluster": "both"}], "clusters": {"both": {"endpoints": ["b:2"]}},
           "filters": {"jwt": {"providers": {}}}}
    merged = overlay(base, doc)
    assert merged["routes"] == [{"cluster": "both"}]
    assert merged["clusters"] == {"file": {"endpoints": ["a:1"]}, "both": {"endpoints": ["b:2"]}}
    assert merged["filters"] == {"alerts": {"interval": 5}, "jwt": {"providers": {}}}
    assert merged["listeners"] == base["listeners"] and base["routes"] == [{"cluster": "file"}]  # (a copy)
    assert overlay(base, {"clusters": ["not", "a", "table"]})["clusters"] == ["not", "a", "table"]
