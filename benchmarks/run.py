#!/usr/bin/env python3
"""Benchmark sluice against nginx, both proxying the same nginx upstream.

One run measures three targets with wrk, interleaved so they share the
machine's noise:

  direct  wrk -> upstream nginx                  (ceiling: no proxy at all)
  nginx   wrk -> nginx reverse proxy -> upstream (reference proxy)
  sluice  wrk -> sluice -> upstream              (access_log + router, round_robin)

Prints a table of medians, writes the same data as JSON to benchmarks/out/,
and exits non-zero if any target saw errors or served no requests.
Usage: python benchmarks/run.py [--quick] [--targets direct,nginx,sluice]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
SLUICE_PYTHON = REPO / ".venv" / "bin" / "python"
TARGETS = ("direct", "nginx", "sluice")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
ACCESS_LOG = "access.jsonl"  # sluice's access_log filter output, in the temp dir

# Both nginx instances: 1 worker, no access log, logs to stderr, every path
# inside their own prefix. keepalive_requests is raised from nginx's default
# (1000) so client connections stay open for the whole run, as they do with
# sluice; otherwise direct/nginx would pay for periodic reconnects.
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{servers}
}}
"""

UPSTREAM_SERVERS = """\
    server {{
        listen 127.0.0.1:{port};
        default_type text/plain;
        location / {{ return 200 "hello from upstream\\n"; }}
    }}"""

NGINX_PROXY_SERVERS = """\
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""

SLUICE_CONF = """\
[server]
workers = 1

[[listeners]]
address = "127.0.0.1:{port}"
filters = ["access_log", "router"]

[clusters.backend]
endpoints = ["127.0.0.1:{upstream_port}"]
policy = "round_robin"

[[routes]]
match = {{ prefix = "/" }}
cluster = "backend"

[filters.access_log]
path = "{access_log}"
"""

# wrk prints times as e.g. 812.00us, 1.23ms, 2.01s (and m/h for huge values).
MS_PER_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class BenchError(Exception):
    """A setup step failed; the message says what and includes process output."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serves_http(port: int) -> bool:
    """True if a TCP connect and one GET / to the port return a 2xx."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return 200 <= response.status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def server_output(name: str, log_path: Path, limit: int = 20_000) -> str:
    """The end of a server's captured stdout+stderr, for error messages."""
    return f"--- {name} output ---\n{log_path.read_text(errors='replace')[-limit:]}"


def wait_until_ready(name: str, proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with code {proc.returncode} before serving\n"
                             + server_output(name, log_path))
        if serves_http(port):
            return
        time.sleep(0.1)
    raise BenchError(f"{name} did not answer GET / with 2xx on port {port} within "
                     f"{READY_TIMEOUT_S:.0f}s\n" + server_output(name, log_path))


def stop_process(name: str, proc: subprocess.Popen) -> None:
    """SIGTERM by PID, SIGKILL if it has not exited after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log(f"{name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; sending SIGKILL")
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_server(name: str, argv: list[str], workdir: Path, port: int):
    """Run argv until the block ends; yields the URL once it serves HTTP."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(name, proc, port, log_path)
        log(f"{name} ready on 127.0.0.1:{port} (pid {proc.pid})")
        yield f"http://127.0.0.1:{port}/"
        if proc.poll() is not None:
            log(f"WARNING: {name} exited (code {proc.returncode}) during the run\n"
                + server_output(name, log_path, limit=2000))
    finally:
        stop_process(name, proc)


def nginx_server(name: str, workdir: Path, port: int, servers: str):
    prefix = workdir / name
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, servers=servers))
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    return running_server(name, argv, workdir, port)


def warn_if_empty(access_log: Path) -> None:
    """The sluice chain is meant to include a file access log; say so if it wrote nothing."""
    if not access_log.exists() or access_log.stat().st_size == 0:
        log(f"WARNING: sluice wrote nothing to {access_log.name}; "
            "the access_log filter may not be active in the measured chain")


def sluice_server(workdir: Path, port: int, upstream_port: int):
    conf = workdir / "sluice.toml"
    conf.write_text(SLUICE_CONF.format(port=port, upstream_port=upstream_port,
                                       access_log=workdir / ACCESS_LOG))
    argv = [str(SLUICE_PYTHON), "-m", "sluice", "run", "-c", str(conf)]
    return running_server("sluice", argv, workdir, port)


def target_server(name: str, workdir: Path, upstream_port: int):
    """Context manager that runs the server for one target and yields its URL."""
    if name == "direct":
        return contextlib.nullcontext(f"http://127.0.0.1:{upstream_port}/")
    port = free_port()
    if name == "nginx":
        servers = NGINX_PROXY_SERVERS.format(port=port, upstream_port=upstream_port)
        return nginx_server("nginx-proxy", workdir, port, servers)
    return sluice_server(workdir, port, upstream_port)


# ------------------------------------------------------------------------- wrk


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"unrecognised wrk time {text!r}")
    return round(float(match[1]) * MS_PER_UNIT[match[2]], 4)


def parse_wrk(output: str) -> dict:
    """Extract throughput, latency percentiles and error counts from wrk --latency output."""
    def find(pattern: str) -> re.Match:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise BenchError(f"could not find {pattern!r} in wrk output:\n{output}")
        return match

    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_counts = dict(zip(("connect", "read", "write", "timeout"),
                             map(int, socket_errors.groups() if socket_errors else (0,) * 4),
                             strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result = {
        "requests": int(find(r"(\d+) requests in")[1]),
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")[1]),
        "p50_ms": to_ms(find(r"^\s+50%\s+(\S+)")[1]),
        "p99_ms": to_ms(find(r"^\s+99%\s+(\S+)")[1]),
        "socket_errors": socket_counts,
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
    }
    result["errors"] = result["non_2xx"] + sum(socket_counts.values())
    return result


def run_wrk(url: str, args: argparse.Namespace, duration_s: int) -> dict:
    """One wrk run. If wrk itself fails (e.g. the target died and refuses
    connections) the run is recorded with no requests and a failure message,
    so the remaining runs and the table still happen."""
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration_s}s",
            "--latency", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0:
        message = f"wrk exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()}"
        return {"requests": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None,
                "socket_errors": {}, "non_2xx": 0, "errors": 0, "failure": message}
    return parse_wrk(proc.stdout)


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Warm each target up, then run REPEATS rounds of direct, nginx, sluice, ..."""
    for name, url in urls.items():
        log(f"warm-up {name} ({args.warmup}s)")
        run_wrk(url, args, args.warmup)
    runs: dict[str, list[dict]] = {name: [] for name in urls}
    for round_no in range(1, args.repeats + 1):
        for name, url in urls.items():
            result = run_wrk(url, args, args.duration)
            runs[name].append(result)
            log(f"round {round_no}/{args.repeats} {name}: " + result.get("failure", (
                f"{result['rps']:.0f} req/s, p50 {result['p50_ms']} ms, "
                f"p99 {result['p99_ms']} ms, errors {result['errors']}")))
    return runs


# --------------------------------------------------------------------- results


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    return {
        "rps": median_of(runs, "rps"),
        "p50_ms": median_of(runs, "p50_ms"),
        "p99_ms": median_of(runs, "p99_ms"),
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
    }


def ratios(summaries: dict[str, dict]) -> dict[str, float]:
    """sluice req/s relative to each other target measured in the same run."""
    if "sluice" not in summaries:
        return {}
    sluice_rps = summaries["sluice"]["rps"]
    return {f"sluice/{name}": sluice_rps / summaries[name]["rps"]
            for name in ("nginx", "direct") if summaries.get(name, {}).get("rps")}


def failures(runs: dict[str, list[dict]]) -> list[str]:
    problems = []
    for name, target_runs in runs.items():
        errors = sum(r["errors"] for r in target_runs)
        if errors:
            problems.append(f"{name}: {errors} errors (non-2xx + socket errors)")
        if any(r["requests"] == 0 and "failure" not in r for r in target_runs):
            problems.append(f"{name}: a run completed no requests")
        problems += [f"{name}: {r['failure']}" for r in target_runs if "failure" in r]
    return problems


def format_table(summaries: dict[str, dict], ratio_values: dict[str, float]) -> str:
    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'target':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for name, s in summaries.items():
        lines.append(f"{name:<8} {cell(s['rps'], '.0f'):>10} {cell(s['p50_ms'], '.2f'):>8} "
                     f"{cell(s['p99_ms'], '.2f'):>8} {s['errors']:>7}")
    for label, value in ratio_values.items():
        lines.append(f"{label} req/s: {value:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- machine facts


def command_output(argv: list[str]) -> str | None:
    """First line a command prints (stdout or stderr), or None if it cannot run."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def proc_field(path: str, key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def sluice_commit() -> str:
    commit = command_output(["git", "rev-parse", "--short", "HEAD"])
    if not commit or not re.fullmatch(r"[0-9a-f]+", commit):
        commit = "no-commit"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=REPO).stdout.strip()
    return f"{commit}-dirty" if dirty else commit


def machine_facts() -> dict:
    mem_kb = proc_field("/proc/meminfo", "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": proc_field("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": command_output([str(SLUICE_PYTHON), "--version"]),
        "nginx": command_output(["nginx", "-v"]),
        "wrk": command_output(["wrk", "-v"]),
        "sluice_commit": sluice_commit(),
    }


def write_json(report: dict) -> Path:
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (%(default)s)")
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections (%(default)s)")
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds per measured run (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measured runs per target (%(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="warm-up seconds per target (%(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s runs, 1 repeat, 1 s warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.warmup = 3, 1, 1
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets must be a subset of {','.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in args.targets]  # canonical order
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Start the upstream and every target, measure them, stop everything."""
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp, \
            contextlib.ExitStack() as servers:
        workdir = Path(tmp)
        upstream_port = free_port()
        servers.enter_context(nginx_server("upstream", workdir, upstream_port,
                                           UPSTREAM_SERVERS.format(port=upstream_port)))
        urls = {name: servers.enter_context(target_server(name, workdir, upstream_port))
                for name in args.targets}
        runs = measure(urls, args)
        if "sluice" in urls:
            warn_if_empty(workdir / ACCESS_LOG)
        return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = run_benchmark(args)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 2
    summaries = {name: summarize(target_runs) for name, target_runs in runs.items()}
    ratio_values = ratios(summaries)
    problems = failures(runs)
    report = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: getattr(args, k) for k in
                     ("targets", "threads", "connections", "duration", "repeats", "warmup")},
        "machine": machine_facts(),
        "summary": summaries,
        "ratios": ratio_values,
        "runs": runs,
        "failures": problems,
    }
    print(format_table(summaries, ratio_values))
    print(f"results: {write_json(report)}")
    for problem in problems:
        log(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
