"""The servers a benchmark run starts: the upstream, and each target in front of it.

A target is what wrk talks to: a proxy in front of the upstream, or nothing
(``direct``). For each scenario every target gets its own directory under the
run's temp dir, writes its config there, listens on a free 127.0.0.1 port and
proxies to the one upstream. Each proxy runs 1 worker (process or thread),
except ``sluice-w2``. In the h2 scenarios the targets that speak h2c with prior
knowledge listen for it (nginx and haproxy then only for it); the upstream
stays HTTP/1.1.

Starting and stopping them is procs.py's business.
"""

from __future__ import annotations

import contextlib
import copy
import json
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from load import h2_fetch
from procs import Command, Server, StartError, free_port, http1_probe, running

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))

# What the upstream serves; the scenarios check the answers against these.
SMALL_BODY = b"0123456789abcdef0123456789abcde\n"  # 32 bytes
LARGE_PATH, LARGE_BYTES = "/1m", 1 << 20
UPLOAD_PATH, UPLOAD_BYTES, UPLOAD_ANSWER = "/upload", 100 * 1024, b"ok"

# Shared by the upstream and the nginx target: 1 worker, no access log, as
# many connections as the open files limit allows (10k+ for idle10k). keepalive_requests is raised from nginx's default
# (1000) so client connections stay open for the whole run, as they do with
# the other proxies. Request bodies up to 128k stay in memory.
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_max_body_size 1m;
    client_body_buffer_size 128k;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{servers}
}}
"""

# /upload answers only once the whole body was read: `return` would answer
# from the rewrite phase, before nginx reads the body (it then discards it
# after answering). The mirror module reads the body first (precontent
# phase); empty_gif refuses POST with 405, which error_page turns into 200 ok.
# upstream_reads_whole_body() checks this at every start.
UPSTREAM_SERVERS = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        sendfile on;
        location = / {{ return 200 "{small}"; }}
        location = {large_path} {{ alias {prefix}/large.bin; }}
        location = {upload_path} {{
            mirror /sink;
            mirror_request_body on;
            empty_gif;
            error_page 405 =200 @uploaded;
        }}
        location @uploaded {{ return 200 "{upload_answer}"; }}
        location = /sink {{ internal; return 204; }}
    }}"""

# Large responses pass through 1 MiB of memory buffers (16 x 64k), never a
# temp file on disk: nginx's defaults (8 x 4k, then a temp file) made the 1m
# scenario measure the disk.
NGINX_PROXY_SERVERS = """\
    upstream backend {{
        server {upstream};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl}{http2} backlog=4096;
        {tls}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 16 64k;
            proxy_max_temp_file_size 0;
        }}
    }}"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn {maxconn}
    no strict-limits
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend bench
    bind 127.0.0.1:{port}{tls}
    maxconn {maxconn}
    default_backend upstream
backend upstream
    server upstream {upstream}
"""

CADDYFILE = """\
{{
    admin off
    auto_https off
    {servers}
}}
{scheme}://:{port} {{
    bind 127.0.0.1
    {tls}
    reverse_proxy {upstream}
}}
"""


# ------------------------------------------------------------------ TLS files


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    pem: Path  # cert and key in one file, for haproxy


def make_tls_files(workdir: Path) -> TlsFiles:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, valid for 2 days."""
    cert, key, pem = workdir / "cert.pem", workdir / "key.pem", workdir / "cert+key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return TlsFiles(cert, key, pem)


# -------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Site:
    """Where one target runs for one scenario."""

    dir: Path
    port: int
    upstream: str  # host:port
    tls: TlsFiles | None = None
    max_connections: int | None = None  # raise the proxy's limit to this, if it has one
    h2: bool = False  # listen for h2c with prior knowledge

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Target:
    """A thing to measure. ``command`` writes its config into the site's
    directory and says how to run it; None means no process (``direct``)."""

    name: str
    summary: str
    command: Callable[[Site], Command] | None
    executable: str | None = None  # must be on PATH, else the target is skipped
    install: str = ""
    tls: bool = True
    h2: bool = False  # can listen for h2c with prior knowledge (the h2 scenarios)


def open_files_limit() -> int:
    """The open files limit the servers inherit (raised by run.py as far as it can)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nginx_command(site: Site, servers: str) -> Command:
    (site.dir / "logs").mkdir(parents=True, exist_ok=True)
    conf = site.dir / "nginx.conf"
    connections = max(1024, open_files_limit() - 100)
    conf.write_text(NGINX_CONF.format(prefix=site.dir, servers=servers, connections=connections))
    return Command(["nginx", "-p", str(site.dir), "-c", str(conf), "-e", "stderr"])


def nginx_proxy(site: Site) -> Command:
    tls = (f"ssl_certificate {site.tls.cert}; ssl_certificate_key {site.tls.key};"
           if site.tls else "")
    # nginx 1.22: `listen ... http2` on a plain port is h2c with prior knowledge, and only that.
    # Its keepalive_requests (raised above) also bounds the streams of an h2 connection.
    return nginx_command(site, NGINX_PROXY_SERVERS.format(
        port=site.port, upstream=site.upstream, ssl=" ssl" if site.tls else "",
        http2=" http2" if site.h2 else "", tls=tls))


def haproxy(site: Site) -> Command:
    conf = site.dir / "haproxy.cfg"
    tls = f" ssl crt {site.tls.pem}" if site.tls else ""
    tls += " proto h2" if site.h2 else ""  # h2c with prior knowledge, and only that
    # haproxy counts 2 fds per connection of maxconn and, by default
    # (strict-limits), refuses to start if it cannot raise its open files
    # limit that far; with `no strict-limits` it warns and runs within the
    # limit it has, where an idle client connection takes one fd.
    conf.write_text(HAPROXY_CONF.format(port=site.port, upstream=site.upstream, tls=tls,
                                        maxconn=site.max_connections or 4096))
    return Command(["haproxy", "-db", "-f", str(conf)])


def caddy(site: Site) -> Command:
    conf = site.dir / "Caddyfile"
    tls = f"tls {site.tls.cert} {site.tls.key}" if site.tls else ""
    servers = "servers {\n        protocols h1 h2 h2c\n    }" if site.h2 else ""
    conf.write_text(CADDYFILE.format(scheme="https" if site.tls else "http", port=site.port,
                                     tls=tls, upstream=site.upstream, servers=servers))
    home = str(site.dir)  # caddy keeps state under $HOME / XDG dirs: keep it in the temp dir
    env = {"GOMAXPROCS": "1", "HOME": home, "XDG_DATA_HOME": home, "XDG_CONFIG_HOME": home}
    return Command(["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"], env)


def floor(site: Site) -> Command:
    argv = [PYTHON, str(BENCH_DIR / "floor.py"), "--listen", f"127.0.0.1:{site.port}",
            "--upstream", site.upstream]
    if site.tls:
        argv += ["--cert", str(site.tls.cert), "--key", str(site.tls.key)]
    return Command(argv)


# ---------------------------------------------------------------- sluice ones


def to_toml(table: dict) -> str:
    """TOML for the configs written here: each top-level key on one line,
    nested tables and arrays inline (valid TOML, if not pretty)."""
    return "".join(f"{_toml_key(key)} = {_toml_value(value)}\n" for key, value in table.items())


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def bench_listener(site: Site, listener: dict) -> dict:
    """The listener as the benchmark needs it: its port, its TLS, its connection limit,
    HTTP/2 in the h2 scenarios (the listener's own http2 table if it has one)."""
    listener = {**listener, "address": f"127.0.0.1:{site.port}"}
    if site.h2 and not listener.get("http2"):
        listener["http2"] = True
    listener.pop("tls", None)
    if site.tls:
        listener["tls"] = {"cert": str(site.tls.cert), "key": str(site.tls.key)}
    if site.max_connections:
        limits = dict(listener.get("limits", {}))
        limits["max_connections"] = max(limits.get("max_connections", 0), site.max_connections)
        listener["limits"] = limits
    return listener


def sluice_config(site: Site, filters: list[str], workers: int = 1, codec: str | None = None,
                  metrics: bool = True) -> dict:
    """A config with one listener, one cluster (the upstream, round_robin) and one route;
    Prometheus metrics on (sluice's default) unless ``metrics`` is False."""
    server: dict = {"workers": workers}
    if codec:
        server["http1_codec"] = codec
    config = {
        "server": server,
        "listeners": [bench_listener(site, {"filters": filters})],
        "clusters": {"backend": {"endpoints": [site.upstream], "policy": "round_robin"}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "backend"}],
    }
    if "access_log" in filters:
        config["filters"] = {"access_log": {"path": str(site.dir / "access.jsonl")}}
    if not metrics:
        config["metrics"] = {"enabled": False}
    return config


def user_config(site: Site, config: dict) -> dict:
    """A user's config, adapted: only its first listener (on the benchmark's
    port, TLS and connection limit), every cluster pointing at the upstream
    over plain HTTP, 1 worker."""
    config = copy.deepcopy(config)
    config["listeners"] = [bench_listener(site, config["listeners"][0])]
    for cluster in config.get("clusters", {}).values():
        cluster["endpoints"] = [site.upstream]
        cluster.pop("tls", None)
    config["server"] = {**config.get("server", {}), "workers": 1}
    return config


def sluice(site: Site, make_config: Callable[[Site], dict]) -> Command:
    conf = site.dir / "sluice.toml"
    conf.write_text(to_toml(make_config(site)))
    return Command([PYTHON, "-m", "sluice", "run", "-c", str(conf)])


def sluice_target(name: str, summary: str, h2: bool = True, **config) -> Target:
    return Target(name, summary, partial(sluice, make_config=partial(sluice_config, **config)), h2=h2)


DEFAULT_CHAIN = ["access_log", "router"]
APT = "apt-get install {}  (or: bash benchmarks/setup.sh)"
TARGETS = {t.name: t for t in (
    Target("direct", "no proxy: wrk straight to the upstream", None, tls=False),
    Target("nginx", "nginx, 1 worker, keepalive upstream block", nginx_proxy, "nginx",
           APT.format("nginx"), h2=True),
    Target("haproxy", "haproxy, nbthread 1, http mode, keep-alive to upstream", haproxy, "haproxy",
           APT.format("haproxy"), h2=True),
    Target("caddy", "caddy reverse_proxy, GOMAXPROCS=1", caddy, "caddy", APT.format("caddy"), h2=True),
    Target("floor", "benchmarks/floor.py: trio + httptools, no filters, no checks", floor),
    # its point is the HTTP/1.1 codec: in h2 it would be sluice again
    sluice_target("sluice-h11", "sluice, h11 codec, chain access_log, router", filters=DEFAULT_CHAIN,
                  codec="h11", h2=False),
    sluice_target("sluice", "sluice, codec auto, chain access_log, router", filters=DEFAULT_CHAIN),
    sluice_target("sluice-bare", "sluice, no filters (router only)", filters=["router"]),
    # against "sluice", what recording Prometheus metrics costs (issue 9: at most 10% of throughput)
    sluice_target("sluice-nometrics", "sluice, chain access_log, router, [metrics] enabled = false",
                  filters=DEFAULT_CHAIN, metrics=False),
    sluice_target("sluice-w2", "sluice, chain access_log, router, 2 workers", filters=DEFAULT_CHAIN,
                  workers=2),
)}
NOT_FILTERS = {"balancer", "tls"}  # built-in plugins that add no filter to a chain


def custom_target(config: dict | None, plugins: list[str] | None) -> Target:
    """``sluice-custom``: the user's config file, or the default config with their chain."""
    if config is not None:
        return Target("sluice-custom", "sluice, your config file",
                      partial(sluice, make_config=partial(user_config, config=config)), h2=True)
    chain = [name for name in plugins if name not in NOT_FILTERS]
    return sluice_target("sluice-custom", f"sluice, chain {', '.join(chain)}", filters=chain)


def missing_executable(target: Target) -> str | None:
    """Why the target cannot run here, or None."""
    if target.executable and not shutil.which(target.executable):
        return f"{target.executable} is not installed; to install: {target.install}"
    return None


@contextlib.contextmanager
def run_target(target: Target, site: Site) -> Iterator[Server]:
    if target.command is None:
        yield Server(target.name, f"http://{site.upstream}")
        return
    site.dir.mkdir(parents=True, exist_ok=True)
    try:
        command = target.command(site)
    except (OSError, TypeError, ValueError, subprocess.CalledProcessError) as exc:
        raise StartError(f"{target.name}: could not write its config: {exc}") from exc
    probe = partial(h2_fetch, timeout=1.0) if site.h2 else http1_probe
    with running(target.name, command, site.url, site.dir / "output.log", probe) as server:
        yield server


# ------------------------------------------------------------------- upstream


def upstream_reads_whole_body(address: str) -> bool:
    """True if the upstream answers an upload only after reading all of its body."""
    host, port = address.rsplit(":", 1)
    head = (f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: {address}\r\n"
            f"Content-Length: {UPLOAD_BYTES}\r\n\r\n").encode()
    half = UPLOAD_BYTES // 2
    with socket.create_connection((host, int(port)), timeout=2.0) as sock:
        sock.sendall(head + b"x" * half)
        sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            if sock.recv(100):
                return False  # answered before the body was complete
        sock.settimeout(2.0)
        sock.sendall(b"x" * (UPLOAD_BYTES - half))
        answer = sock.recv(4096)
    return answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n" + UPLOAD_ANSWER)


@contextlib.contextmanager
def upstream(workdir: Path) -> Iterator[str]:
    """The upstream nginx (1 worker); yields its host:port."""
    port = free_port()
    site = Site(workdir / "upstream", port, "")
    site.dir.mkdir(parents=True)
    with open(site.dir / "large.bin", "wb") as large:
        large.truncate(LARGE_BYTES)  # zeros; content does not matter to anyone
    servers = UPSTREAM_SERVERS.format(
        port=port, prefix=site.dir, small=SMALL_BODY.decode().replace("\n", "\\n"),
        large_path=LARGE_PATH, upload_path=UPLOAD_PATH, upload_answer=UPLOAD_ANSWER.decode())
    with running("upstream", nginx_command(site, servers), site.url, site.dir / "output.log") as server:
        address = f"127.0.0.1:{port}"
        try:
            reads_body = upstream_reads_whole_body(address)
        except OSError as exc:
            raise StartError(f"the upstream failed the upload check: {exc}\n{server.output()}") from exc
        if not reads_body:
            raise StartError(f"the upstream answers uploads before reading their body\n{server.output()}")
        yield address


