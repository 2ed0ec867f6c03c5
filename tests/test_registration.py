"""Self-registration (``sluice.plugins.registration``) and ``sluice register``, on a real etcd
and a real ZooKeeper, with real ``sluice run`` and ``sluice register`` processes.

The store is read the way a discovery source reads it (etcd's range over the prefix, the
ZooKeeper path's children), synchronously from the test: the processes under test do the
trio side.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from structlog.testing import capture_logs

from sluice.plugins.etcd.codec import b64, prefix_end
from sluice.plugins import registration
from sluice.plugins.registration import endpoint_json

from .proc import ROOT, SLUICE, Running, ThreadOrigin, free_port, poll, sluice
from .servers.etcd import etcd_server_process

DEADLINE = 10


# --- reading the stores --------------------------------------------------------------------

def etcd_entries(url: str, prefix: str) -> dict[str, dict]:
    """``{key: JSON}`` under ``prefix``, through etcd's JSON gateway."""
    import base64

    body = json.dumps({"key": b64(prefix), "range_end": b64(prefix_end(prefix.encode()))}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v3/kv/range", body), timeout=5) as answer:
        kvs = json.loads(answer.read()).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in kvs}


def etcd_lease(url: str, key: str) -> str:
    """The id of the lease ``key`` is attached to."""
    body = json.dumps({"key": b64(key)}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v3/kv/range", body), timeout=5) as answer:
        return json.loads(answer.read())["kvs"][0]["lease"]


def registered(entries: dict, services: int = 2) -> dict:
    """``entries`` once every service of ``config()`` is in (they are written one after another)."""
    return entries if len(entries) == services else {}


class ZooKeeperReader:
    def __init__(self, hosts: str) -> None:
        self.kazoo = KazooClient(hosts=hosts)
        self.kazoo.start(DEADLINE)

    def entries(self, path: str) -> dict[str, dict]:
        try:
            names = self.kazoo.get_children(path)
        except NoNodeError:
            return {}
        out = {}
        for name in names:
            try:
                out[name] = json.loads(self.kazoo.get(f"{path}/{name}")[0])
            except NoNodeError:
                pass
        return out

    def close(self) -> None:
        self.kazoo.stop()
        self.kazoo.close()


@pytest.fixture
def zk_reader(zookeeper_server):
    reader = ZooKeeperReader(zookeeper_server.hosts)
    yield reader
    reader.close()


# --- configs and processes -------------------------------------------------------------------

def config(tmp_path, table: str, origin: str = "127.0.0.1:9") -> str:
    path = tmp_path / "sluice.toml"
    path.write_text(f"""
[clusters.app]
endpoints = [{{ address = "{origin}" }}]

[[routes]]
match = {{ prefix = "/" }}
cluster = "app"

[[listeners]]
name = "public"
address = "127.0.0.1:0"
filters = ["router"]

[server]
drain_timeout = 5

[filters.registration]
{table}

[[filters.registration.services]]
listener = "public"
zone = "z1"
metadata = {{ role = "gateway" }}

[[filters.registration.services]]
address = "10.9.8.7:8080"
weight = 5
""")
    return str(path)


def etcd_table(url: str, prefix: str, ttl: int = 2) -> str:
    return f'store = "etcd"\naddress = "{url}"\nprefix = "{prefix}"\nttl = {ttl}\ninstance_id = "edge-1"'


def zk_table(hosts: str, path: str, ttl: int = 2) -> str:
    return f'store = "zookeeper"\naddress = "{hosts}"\npath = "{path}"\nttl = {ttl}'


def answers(url: str) -> int:
    """The status ``url`` answers (any status says the proxy serves)."""
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def body(url: str) -> str:
    """The body ``url`` answers, over a connection of its own."""
    with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
        return answer.read().decode()


def port_of(proxy: Running) -> str:
    return proxy.url.split("://", 1)[1]


class Sidecar:
    """``sluice register ...`` in the background, its output kept."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*SLUICE, "register", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return "".join(self.lines)


class App:
    """An application the test controls: ``/health`` answers 200 or 503 as ``ok`` says; ``/slow``
    sets ``arrived`` and answers once ``release`` is set (a request held in flight)."""

    def __init__(self) -> None:
        self.ok = True
        self.arrived, self.release = threading.Event(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path == "/slow":
                    outer.arrived.set()
                    outer.release.wait(DEADLINE)
                self.send_response(200 if outer.ok else 503)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.health = f"http://{self.address}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --- the JSON and the settings -----------------------------------------------------------------

def test_the_entry_is_the_schema_the_discovery_sources_read():
    assert json.loads(endpoint_json("10.0.0.1:80", 3, "z", {"a": 1})) == \
        {"address": "10.0.0.1:80", "weight": 3, "zone": "z", "metadata": {"a": 1}}
    assert json.loads(endpoint_json("10.0.0.1:80")) == {"address": "10.0.0.1:80", "weight": 1, "metadata": {}}


def test_settings_are_checked_by_key_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("""
[[listeners]]
name = "public"
address = "127.0.0.1:0"
filters = ["router"]

[filters.registration]
store = "etcd"
address = "http://127.0.0.1:2379"
prefix = "/s/"

[[filters.registration.services]]
listener = "private"
""")
    result = sluice("check", str(path))
    assert result.returncode == 2
    assert "filters.registration.services[0].listener: 'private' names no listener" in result.stderr
    path.write_text(path.read_text().replace('listener = "private"', 'address = "nothost"'))
    result = sluice("check", str(path))
    assert result.returncode == 2 and "filters.registration.services[0]" in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--store", "etcd", "--address", "x"], "the following arguments are required: --service"),
    (["--store", "etcd", "--address", "x", "--service", "a:1"], "--store: store etcd needs prefix"),
    (["--store", "etcd", "--address", "x", "--prefix", "/p/", "--service", "foo"], "--service: address 'foo'"),
    (["--store", "etcd", "--address", "x", "--prefix", "/p/", "--service", "a:1", "--metadata", "[1]"],
     "--metadata: expected a JSON object"),
    (["--store", "consul", "--address", "x", "--service", "a:1"], "invalid choice: 'consul'"),
])
def test_register_refuses_bad_arguments_in_one_line(args, message):
    result = sluice("register", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_an_unexpected_error_is_logged_and_retried_never_raised(monkeypatch):
    """Registering never takes the proxy down: an error that is not the store being away (a
    bug; no real store answers this way, so a store that raises one stands in) is logged as
    ``registration failed`` and retried like an outage."""
    tries, second = [], trio.Event()

    @asynccontextmanager
    async def store(address, entries, ttl, tls):
        tries.append(address)
        if len(tries) == 1:
            raise KeyError("a bug")
        second.set()
        yield

    monkeypatch.setitem(registration.STORES, "etcd", store)
    until = trio.Event()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registration.keep_registered, "etcd", "x", [("/k", b"{}")], 2, until)
            with trio.fail_after(DEADLINE):
                await second.wait()
            until.set()
    assert [entry["event"] for entry in logs] == ["registration failed", "registered", "deregistered"]


# --- sluice run, etcd -------------------------------------------------------------------------------

def test_etcd_registered_after_start_once_with_two_workers_and_gone_right_after_sigterm(
        etcd_server, etcd_prefix, tmp_path):
    proxy = Running("-c", config(tmp_path, etcd_table(etcd_server.url, etcd_prefix, ttl=30)), "--workers", "2")
    try:
        entries = poll(lambda: registered(etcd_entries(etcd_server.url, etcd_prefix)), DEADLINE, "registered", proxy)
        assert entries == {
            f"{etcd_prefix}edge-1": {"address": port_of(proxy), "weight": 1, "zone": "z1",
                                     "metadata": {"role": "gateway"}},
            f"{etcd_prefix}edge-1-1": {"address": "10.9.8.7:8080", "weight": 5, "metadata": {}},
        }
        assert not port_of(proxy).endswith(":0")
        proxy.wait_for_output('"worker": 1')  # the second worker is up too, and registered nothing more
        assert len(etcd_entries(etcd_server.url, etcd_prefix)) == 2
        proxy.signal(signal.SIGTERM)
        # gone well within the 30 s lease: deleted (revoked) as the drain begins
        poll(lambda: not etcd_entries(etcd_server.url, etcd_prefix), 5, "deregistered", proxy)
        assert proxy.wait() == 0
    finally:
        proxy.stop()
    assert sum("registered" in line and "registration lost" not in line and "deregistered" not in line
               for line in proxy.stderr + proxy.stdout) == 1


def test_etcd_entry_is_gone_within_the_ttl_after_sigkill(etcd_server, etcd_prefix, tmp_path):
    proxy = Running("-c", config(tmp_path, etcd_table(etcd_server.url, etcd_prefix, ttl=2)))
    try:
        poll(lambda: registered(etcd_entries(etcd_server.url, etcd_prefix)), DEADLINE, "registered", proxy)
        killed = time.monotonic()
        proxy.signal(signal.SIGKILL)
        poll(lambda: not etcd_entries(etcd_server.url, etcd_prefix), DEADLINE, "expired", proxy)
        gone = time.monotonic() - killed
    finally:
        proxy.stop()
    print(f"etcd: the entry went {gone:.2f} s after SIGKILL (lease TTL 2 s)", file=sys.stderr)
    assert gone <= 2 + 1.0  # the TTL, plus etcd's expiry check and the poll


def test_etcd_down_at_start_then_registered_once_it_is_up(tmp_path, etcd_prefix):
    server = etcd_server_process(tmp_path / "store")
    proxy = Running("-c", config(tmp_path, etcd_table(server.url, etcd_prefix, ttl=2)))
    try:
        proxy.wait_for_output("registration lost")
        assert answers(proxy.url + "/")  # serving on meanwhile
        server.start()
        entries = poll(lambda: registered(etcd_entries(server.url, etcd_prefix)), DEADLINE, "registered", proxy)
        assert entries[f"{etcd_prefix}edge-1"]["address"] == port_of(proxy)
        proxy.stop()
        poll(lambda: not etcd_entries(server.url, etcd_prefix), 5, "deregistered", proxy)
    finally:
        proxy.stop()
        server.stop()


def test_etcd_lease_lost_mid_run_is_registered_again(etcd_server, etcd_prefix, tmp_path):
    """The lease revoked under the instance (as an expiry during a long outage does): its keepalive
    learns the lease is gone, and it registers anew under a new lease, logging both."""
    proxy = Running("-c", config(tmp_path, etcd_table(etcd_server.url, etcd_prefix, ttl=3)))
    try:
        poll(lambda: registered(etcd_entries(etcd_server.url, etcd_prefix)), DEADLINE, "registered", proxy)
        lease = etcd_lease(etcd_server.url, f"{etcd_prefix}edge-1")
        body = json.dumps({"ID": lease}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{etcd_server.url}/v3/lease/revoke", body), timeout=5).close()
        assert not etcd_entries(etcd_server.url, etcd_prefix)
        proxy.wait_for_output("registration lost")
        poll(lambda: etcd_entries(etcd_server.url, etcd_prefix), DEADLINE, "registered again", proxy)
        assert etcd_lease(etcd_server.url, f"{etcd_prefix}edge-1") != lease
        assert answers(proxy.url + "/")  # served on throughout
    finally:
        proxy.stop()


def test_a_reload_keeps_the_registration_and_says_a_changed_table_needs_a_restart(etcd_server, etcd_prefix, tmp_path):
    path = config(tmp_path, etcd_table(etcd_server.url, etcd_prefix, ttl=30))
    proxy = Running("-c", path)
    try:
        before = poll(lambda: registered(etcd_entries(etcd_server.url, etcd_prefix)), DEADLINE, "registered", proxy)
        with open(path) as file:
            text = file.read()
        with open(path, "w") as file:
            file.write(text.replace("weight = 5", "weight = 6"))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_output("registration settings changed; they apply at the next restart")
        assert etcd_entries(etcd_server.url, etcd_prefix) == before
        proxy.signal(signal.SIGTERM)  # the reloaded instance still deregisters as it stops
        poll(lambda: not etcd_entries(etcd_server.url, etcd_prefix), 5, "deregistered", proxy)
        assert proxy.wait() == 0
    finally:
        proxy.stop()


# --- sluice run, ZooKeeper ---------------------------------------------------------------------------

def test_zookeeper_registered_once_with_two_workers_and_gone_right_after_sigterm(
        zookeeper_server, zk_chroot, zk_reader, tmp_path):
    proxy = Running("-c", config(tmp_path, zk_table(zookeeper_server.hosts, zk_chroot, ttl=10)), "--workers", "2")
    try:
        entries = poll(lambda: registered(zk_reader.entries(zk_chroot)),
                       DEADLINE, "registered", proxy)
        assert all(name.startswith("instance-") for name in entries)
        assert sorted(entries.values(), key=lambda e: e["weight"]) == [
            {"address": port_of(proxy), "weight": 1, "zone": "z1", "metadata": {"role": "gateway"}},
            {"address": "10.9.8.7:8080", "weight": 5, "metadata": {}},
        ]
        proxy.wait_for_output('"worker": 1')
        assert len(zk_reader.entries(zk_chroot)) == 2
        proxy.signal(signal.SIGTERM)
        poll(lambda: not zk_reader.entries(zk_chroot), 5, "deregistered", proxy)
        assert proxy.wait() == 0
    finally:
        proxy.stop()


def test_zookeeper_node_is_gone_within_the_session_timeout_after_sigkill(
        zookeeper_server, zk_chroot, zk_reader, tmp_path):
    proxy = Running("-c", config(tmp_path, zk_table(zookeeper_server.hosts, zk_chroot, ttl=2)))
    try:
        poll(lambda: registered(zk_reader.entries(zk_chroot)), DEADLINE, "registered", proxy)
        killed = time.monotonic()
        proxy.signal(signal.SIGKILL)
        poll(lambda: not zk_reader.entries(zk_chroot), DEADLINE, "expired", proxy)
        gone = time.monotonic() - killed
    finally:
        proxy.stop()
    print(f"zookeeper: the node went {gone:.2f} s after SIGKILL (session timeout 2 s)", file=sys.stderr)
    assert gone <= 2 + 1.0


def test_entries_default_to_a_key_per_host_and_pid_and_zookeeper_nodes_are_sequential():
    import os
    import socket

    from sluice.plugins.registration import RegistrationConfig, entries_for

    services = [{"listener": "public"}, {"address": "10.0.0.1:80"}]
    etcd = RegistrationConfig(store="etcd", address="x", prefix="/p/", services=services)
    assert [key for key, _ in entries_for(etcd, {"public": "127.0.0.1:4000"})] == \
        [f"/p/{socket.gethostname()}-{os.getpid()}", f"/p/{socket.gethostname()}-{os.getpid()}-1"]
    zk = RegistrationConfig(store="zookeeper", address="x", path="/services/app/", services=services)
    entries = entries_for(zk, {"public": "127.0.0.1:4000"})
    assert [key for key, _ in entries] == ["/services/app/instance-"] * 2
    assert json.loads(entries[0][1])["address"] == "127.0.0.1:4000"


def test_zookeeper_down_at_start_then_registered_once_it_is_up(tmp_path, zk_chroot):
    from .servers.zookeeper import zookeeper_server_process

    server = zookeeper_server_process(tmp_path / "store")
    proxy = Running("-c", config(tmp_path, zk_table(server.hosts, zk_chroot, ttl=2)))
    reader = None
    try:
        proxy.wait_for_output("registration lost")
        assert answers(proxy.url + "/")  # serving on meanwhile
        server.start()
        reader = ZooKeeperReader(server.hosts)
        entries = poll(lambda: registered(reader.entries(zk_chroot)), DEADLINE,
                       "registered", proxy)
        assert port_of(proxy) in {entry["address"] for entry in entries.values()}
    finally:
        proxy.stop()
        if reader is not None:
            reader.close()
        server.stop()


# --- sluice register -----------------------------------------------------------------------------------

def test_register_sidecar_in_etcd_follows_the_health_check_and_deregisters_on_sigterm(etcd_server, etcd_prefix):
    health = App()
    app = f"127.0.0.1:{free_port()}"
    # host:port, as an operator writes it (the scheme is optional)
    sidecar = Sidecar("--store", "etcd", "--address", etcd_server.url.removeprefix("http://"), "--prefix", etcd_prefix,
                      "--service", app, "--weight", "7", "--zone", "z2", "--ttl", "5", "--id", "app-1",
                      "--check", health.health, "--check-interval", "0.2")
    try:
        entries = poll(lambda: etcd_entries(etcd_server.url, etcd_prefix), DEADLINE, "registered")
        assert entries == {f"{etcd_prefix}app-1": {"address": app, "weight": 7, "zone": "z2", "metadata": {}}}
        health.ok = False
        poll(lambda: not etcd_entries(etcd_server.url, etcd_prefix), DEADLINE, "deregistered while failing")
        health.ok = True
        poll(lambda: etcd_entries(etcd_server.url, etcd_prefix), DEADLINE, "registered again")
        assert sidecar.stop(signal.SIGTERM) == 0
        assert not etcd_entries(etcd_server.url, etcd_prefix)
    finally:
        sidecar.stop()
        health.close()
    assert "health check failing" in sidecar.output() and "deregistered" in sidecar.output()


def test_register_sidecar_in_zookeeper_follows_the_health_check_and_deregisters_on_sigint(
        zookeeper_server, zk_chroot, zk_reader):
    health = App()
    app = f"127.0.0.1:{free_port()}"
    sidecar = Sidecar("--store", "zookeeper", "--address", zookeeper_server.hosts, "--path", zk_chroot,
                      "--service", app, "--ttl", "5", "--check", health.health, "--check-interval", "0.2")
    try:
        entries = poll(lambda: zk_reader.entries(zk_chroot), DEADLINE, "registered")
        assert list(entries.values()) == [{"address": app, "weight": 1, "metadata": {}}]
        health.ok = False
        poll(lambda: not zk_reader.entries(zk_chroot), DEADLINE, "deregistered while failing")
        health.ok = True
        poll(lambda: zk_reader.entries(zk_chroot), DEADLINE, "registered again")
        assert sidecar.stop(signal.SIGINT) == 0
        assert not zk_reader.entries(zk_chroot)
    finally:
        sidecar.stop()
        health.close()


def test_etcd_entry_goes_as_the_drain_begins_while_a_request_is_in_flight(etcd_server, etcd_prefix, tmp_path):
    """SIGTERM: the entry is deleted while the request in flight is still being answered, and
    that request still finishes: traffic moves away first, then the drain completes."""
    app = App()
    proxy = Running("-c", config(tmp_path, etcd_table(etcd_server.url, etcd_prefix, ttl=30), app.address))
    answer: list[int] = []
    client = threading.Thread(target=lambda: answer.append(answers(proxy.url + "/slow")), daemon=True)
    try:
        poll(lambda: registered(etcd_entries(etcd_server.url, etcd_prefix)), DEADLINE, "registered", proxy)
        client.start()
        assert app.arrived.wait(DEADLINE)
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        poll(lambda: not etcd_entries(etcd_server.url, etcd_prefix), 5, "deregistered", proxy)
        gone = time.monotonic() - signalled
        assert client.is_alive() and not answer  # still in flight
        app.release.set()
        client.join(DEADLINE)
        assert answer == [200]
        assert proxy.wait() == 0
    finally:
        proxy.stop()
        app.close()
    print(f"etcd: the entry went {gone * 1000:.0f} ms after SIGTERM, a request still in flight", file=sys.stderr)


def test_what_registration_writes_the_discovery_sources_read():
    from sluice.plugins.registry_entries import endpoint_of

    spec = endpoint_of(endpoint_json("10.0.0.1:8080", 7, "z1", {"v": "2"}))
    assert (spec.host, spec.port, spec.weight, spec.zone) == ("10.0.0.1", 8080, 7, "z1")
    assert dict(spec.metadata) == {"v": "2"}


def test_three_sidecars_feed_an_etcd_discovered_cluster_and_a_killed_one_leaves_within_the_ttl(
        etcd_server, etcd_prefix, tmp_path):
    """The issue's scenario end to end: 3 apps registered by `sluice register`, a proxy whose
    cluster discovers them in etcd; the sidecar of one is SIGKILLed (the app stays up: only the
    registry says it is gone) and traffic is off it within the lease's TTL."""
    origins = {name: ThreadOrigin(body=name.encode()) for name in ("a", "b", "c")}
    sidecars = {name: Sidecar("--store", "etcd", "--address", etcd_server.url, "--prefix", etcd_prefix,
                              "--service", origin.address, "--ttl", "2", "--id", name)
                for name, origin in origins.items()}
    path = tmp_path / "discovered.toml"
    path.write_text(f"""
[[listeners]]
address = "127.0.0.1:0"
filters = ["router"]

[clusters.app]
policy = "round_robin"  # 12 requests see every endpoint: a set without b means b is gone
discovery = {{ source = "etcd", address = "{etcd_server.url}", prefix = "{etcd_prefix}" }}

[[routes]]
match = {{ prefix = "/" }}
cluster = "app"
""")
    proxy = None
    try:
        poll(lambda: len(etcd_entries(etcd_server.url, etcd_prefix)) == 3, DEADLINE, "three registered")
        proxy = Running("-c", str(path))

        def seen(n: int = 12) -> set[str]:
            return {body(proxy.url + "/") for _ in range(n)}

        poll(lambda: seen() == {"a", "b", "c"}, DEADLINE, "all three served", proxy)
        killed = time.monotonic()
        sidecars["b"].proc.kill()
        poll(lambda: seen() == {"a", "c"}, DEADLINE, "traffic off b", proxy)
        moved = time.monotonic() - killed
    finally:
        if proxy is not None:
            proxy.stop()
        for sidecar in sidecars.values():
            sidecar.stop()
        for origin in origins.values():
            origin.close()
    print(f"etcd discovery: traffic off a SIGKILLed sidecar's app {moved:.2f} s after (lease TTL 2 s)",
          file=sys.stderr)
    assert moved <= 2 + 1.5  # the TTL, etcd's expiry check, the watch and the poll
