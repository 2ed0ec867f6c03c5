#!/usr/bin/env python3
"""Benchmark sluice against nginx, haproxy, caddy and a bare trio + httptools floor.

Every target proxies the same upstream (a separate nginx, 1 worker) and runs
1 worker; wrk (h2load for the h2 scenarios) drives each scenario against every target, a warm-up each,
then interleaved rounds (A, B, C, A, B, C, ...) so that they share the
machine's noise. Prints a table of medians with ratios to nginx and to the
floor and whether the issue's goals are met, writes every run as JSON to
benchmarks/out/, and draws PNG plots.

    python benchmarks/run.py                  # quick: small, newconn, 1m, upload; 3 x 2 s
    python benchmarks/run.py --full           # every scenario; 5 x 5 s
    python benchmarks/run.py --scenarios small,tls --targets nginx,floor,sluice
    python benchmarks/run.py --plugins my_filter,router    # adds target sluice-custom
    python benchmarks/run.py --config my.toml              # the same, from your config file

Exit status: 0 all went well; 1 a run had errors, a target answered wrongly
or died; 2 a server did not start (the others are still measured).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import peers
from load import WRK_TIMEOUT_S, hold_idle, run_load, still_held, wrong_answer
from options import parse_args
from peers import Site, Target, run_target
from procs import Server, StartError, free_port, log, tree_rss_bytes
from report import MIB, add_ratios, format_report, goals, machine_facts, problems, summarize, timestamp, write_json
from scenarios import Scenario


@dataclass(frozen=True)
class Bench:
    """One run's fixed context: where things go and what every target proxies to."""

    workdir: Path
    upstream: str
    tls: peers.TlsFiles | None
    args: argparse.Namespace

    def site(self, target: Target, scenario: Scenario) -> Site:
        return Site(self.workdir / scenario.name / target.name, free_port(), self.upstream,
                    self.tls if scenario.tls else None, scenario.max_connections, scenario.h2)


# ----------------------------------------------------------- load scenarios


def start_all(bench: Bench, scenario: Scenario, targets: list[Target], stack: contextlib.ExitStack,
              outcomes: dict[str, dict]) -> dict[str, Server]:
    """Start every target and check its answer; the ones that fail are recorded, not returned."""
    servers = {}
    for target in targets:
        try:
            server = stack.enter_context(run_target(target, bench.site(target, scenario)))
        except StartError as exc:
            log(f"{scenario.name}: {target.name} did not start: {exc}")
            outcomes[target.name] = {"status": "did not start", "error": str(exc)}
            continue
        problem = wrong_answer(server.url, scenario)
        if problem:
            log(f"{scenario.name}: {target.name} answered wrongly: {problem}")
            outcomes[target.name] = {"status": "wrong answer", "error": problem}
            continue
        servers[target.name] = server
        if server.says_listening():
            outcomes[target.name]["startup"] = server.says_listening()
    return servers


def died(server: Server, outcome: dict) -> bool:
    """True (and the outcome says so) if the server's process has exited."""
    code = server.exit_code()
    if code is None:
        return False
    outcome.update(status="died", error=f"exited with code {code}; its output:\n{server.output(2000)}")
    log(f"{server.name} died (exit code {code})")
    return True


def wrk_script(bench: Bench, scenario: Scenario) -> Path | None:
    if not scenario.lua:
        return None
    path = bench.workdir / f"{scenario.name}.lua"
    path.write_text(scenario.lua)
    return path


def describe(run: dict) -> str:
    if "failure" in run:
        return run["failure"]
    return (f"{run['rps']:.0f} req/s, p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms, "
            f"errors {run['errors']}")


def measure_load(bench: Bench, scenario: Scenario, targets: list[Target]) -> dict[str, dict]:
    """Warm every target up, then interleaved rounds of wrk runs."""
    args, script = bench.args, wrk_script(bench, scenario)
    outcomes = {t.name: {"status": "ok", "runs": []} for t in targets}
    with contextlib.ExitStack() as stack:
        servers = start_all(bench, scenario, targets, stack, outcomes)
        for name, server in servers.items() if args.warmup else ():
            log(f"{scenario.name}: warm-up {name} ({args.warmup} s)")
            run_load(server.url, scenario, args.threads, args.warmup, script)
        for round_no in range(1, args.repeats + 1):
            for name, server in list(servers.items()):
                if died(server, outcomes[name]):
                    del servers[name]
                    continue
                run = run_load(server.url, scenario, args.threads, args.duration, script)
                outcomes[name]["runs"].append(run)
                log(f"{scenario.name} round {round_no}/{args.repeats} {name}: {describe(run)}")
        for name, server in servers.items():
            died(server, outcomes[name])
    for outcome in outcomes.values():
        if outcome.get("runs"):
            outcome["summary"] = summarize(outcome["runs"])
    add_ratios(outcomes)
    return outcomes


# ------------------------------------------------------------------ idle10k


def hold(server: Server, port: int, count: int, headers: tuple[str, ...]) -> dict:
    """Memory of the server's process tree before and while it holds ``count`` idle connections."""
    pid = server.proc.pid
    before = tree_rss_bytes(pid)

    def measure(clients: set[int]) -> dict:
        return {"rss_held_mib": round(tree_rss_bytes(pid) / MIB, 1), "held": still_held(port, clients)}

    result = hold_idle(port, count, headers, measure)
    outcome = {"status": "ok", "requested": count, "rss_before_mib": round(before / MIB, 1), **result}
    if result["held"] < count:
        outcome["failures"] = max(result["failures"], count - result["held"])
        outcome["first_failures"] = result["first_failures"] or [
            f"the server held {result['held']} of {count}"]
    return outcome


def measure_idle(bench: Bench, scenario: Scenario, targets: list[Target]) -> dict[str, dict]:
    """Each target in turn, freshly started: RSS before and while holding the connections."""
    outcomes = {}
    for target in targets:
        site = bench.site(target, scenario)
        try:
            with run_target(target, site) as server:
                log(f"{scenario.name}: {target.name}: opening {scenario.connections:,} connections")
                outcome = hold(server, site.port, scenario.connections, scenario.headers)
                died(server, outcome)
        except StartError as exc:
            log(f"{scenario.name}: {target.name} did not start: {exc}")
            outcome = {"status": "did not start", "error": str(exc)}
        outcomes[target.name] = outcome
        if "rss_held_mib" in outcome:
            log(f"{scenario.name} {target.name}: {outcome['rss_held_mib']} MiB holding "
                f"{outcome['held']:,} (idle: {outcome['rss_before_mib']} MiB)")
    return outcomes


# --------------------------------------------------------------------- main


def applicable(target: Target, scenario: Scenario) -> bool:
    """direct has no process to hold connections, and no TLS listener; only
    the targets that speak h2c are in the h2 scenarios."""
    if scenario.idle:
        return target.command is not None
    if scenario.h2 and not target.h2:
        return False
    return target.tls or not scenario.tls


def run_scenarios(args: argparse.Namespace, targets: list[Target]) -> dict:
    """Start the upstream, run each scenario against the targets, stop everything."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o711)  # nginx workers run as nobody: they must reach the upstream's files
        with peers.upstream(workdir) as upstream:
            bench = Bench(workdir, upstream, tls_files(workdir, args.scenarios), args)
            for scenario in args.scenarios:
                if scenario.tls and bench.tls is None:
                    continue
                if scenario.h2 and not shutil.which("h2load"):
                    log(f"skipping {scenario.name}: h2load is not installed; to install: "
                        "apt-get install nghttp2-client  (or: bash benchmarks/setup.sh)")
                    continue
                if scenario.grpc and importlib.util.find_spec("grpc") is None:
                    log(f"skipping {scenario.name}: grpcio is not installed; to install: "
                        ".venv/bin/python -m pip install -e '.[test]'")
                    continue
                results[scenario.name] = run_scenario(bench, scenario, targets)
    return results


def tls_files(workdir: Path, scenarios: list[Scenario]) -> peers.TlsFiles | None:
    """A certificate, if a scenario needs one and openssl can make it."""
    if not any(s.tls for s in scenarios):
        return None
    try:
        return peers.make_tls_files(workdir)
    except (OSError, subprocess.CalledProcessError) as exc:
        log(f"skipping the TLS scenarios: openssl could not make a certificate: {exc}")
        return None


def run_scenario(bench: Bench, scenario: Scenario, targets: list[Target]) -> dict[str, dict]:
    if scenario.grpc:  # its own targets: a grpcio server, direct and through sluice
        return measure_grpc(bench, scenario)
    if scenario.route_scale:
        return measure_route_scale(scenario)
    if scenario.policy_cost:
        return measure_policy_cost(scenario)
    if scenario.filter_cost:
        return measure_filter_cost(bench, scenario)
    chosen = [t for t in targets if applicable(t, scenario)]
    log(f"=== {scenario.name}: {scenario.title} ({', '.join(t.name for t in chosen)})")
    measure = measure_idle if scenario.idle else measure_load
    return measure(bench, scenario, chosen)


def measure_grpc(bench: Bench, scenario: Scenario) -> dict[str, dict]:
    import grpc_unary  # needs grpcio (the test extra); only this scenario does

    log(f"=== {scenario.name}: {scenario.title} (direct, sluice)")
    args = bench.args
    outcomes = grpc_unary.measure(bench.workdir / scenario.name, scenario.connections, args.duration,
                                  args.repeats, args.warmup)
    log(f"{scenario.name}:\n{grpc_unary.table(outcomes)}")  # with sluice's share of direct
    return outcomes


def measure_route_scale(scenario: Scenario) -> dict[str, dict]:
    import route_scale  # the router plugin timed in this process: no servers

    log(f"=== {scenario.name}: {scenario.title}")
    measured = route_scale.measure([10, 1_000, 10_000])
    log(f"{scenario.name}:\n{measured['table']}")
    base = measured["rows"][10]["indexed_ns"]
    return {f"{size:,} routes": {"status": "ok" if row["indexed_ns"] <= route_scale.GOAL * base
                                 else f"{row['indexed_ns'] / base:.2f}x the cost at 10",
                                 "summary": {"rps": 1e9 / row["indexed_ns"], "errors": 0}}
            for size, row in measured["rows"].items()}


def measure_policy_cost(scenario: Scenario) -> dict[str, dict]:
    import policy_cost  # the balancer plugin's policies timed in this process: no servers

    log(f"=== {scenario.name}: {scenario.title}")
    measured = policy_cost.measure([3, 10, 100])
    log(f"{scenario.name}:\n{measured['table']}")
    return {f"{name} @ {size}": {"status": "ok", "summary": {"rps": 1e9 / ns, "errors": 0}}
            for name, row in measured["rows"].items() for size, ns in row.items()}


def measure_filter_cost(bench: Bench, scenario: Scenario) -> dict[str, dict]:
    import filter_cost  # sluice's own listener over memory, in this process: no servers

    log(f"=== {scenario.name}: {scenario.title}")
    added = filter_cost.measure(["access_log", "api_key", "basic"], bench.args.repeats, 10_000)
    base = added.pop("router")
    log(f"{scenario.name}: router alone {base:.1f} us; "
        + ", ".join(f"{name} +{us:.1f} us" for name, us in added.items()))
    return {name: {"status": "ok", "summary": {"rps": 1e6 / max(us, 0.01), "errors": 0}}
            for name, us in added.items()}


def available_targets(args: argparse.Namespace) -> tuple[list[Target], dict[str, str]]:
    """The chosen targets that can run here, and why the others are skipped."""
    ready, skipped = [], {}
    for target in args.targets:
        reason = peers.missing_executable(target)
        if reason:
            log(f"skipping {target.name}: {reason}")
            skipped[target.name] = reason
        else:
            ready.append(target)
    return ready, skipped


def raise_open_files_limit(need: int) -> None:
    """Room for the idle connections in this process, and in the servers and wrk (inherited):
    each holds one end of them, plus a few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(need, soft)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))  # root may raise hard
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        log(f"WARNING: open files limited to {hard}; idle10k needs about {need}")


def cpu_busy(interval_s: float = 1.0) -> float:
    """The share of all CPUs that was busy over the interval, from /proc/stat
    (unlike the load average, not raised by a benchmark that just ended)."""
    def sample() -> tuple[int, int]:
        ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    idle0, total0 = sample()
    time.sleep(interval_s)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def warn_if_busy() -> float:
    busy = cpu_busy()
    if busy > 0.25:
        log(f"WARNING: {busy:.0%} of the CPUs were busy before the run: the benchmark shares "
            "them with other processes, expect noisy numbers")
    return busy


def missing_tools() -> list[str]:
    return [f"{tool} is required; to install: apt-get install {tool}  (or: bash benchmarks/setup.sh)"
            for tool in ("nginx", "wrk") if not shutil.which(tool)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    missing = missing_tools()
    for problem in missing:
        log(f"FAILED: {problem}")
    if missing:
        return 2
    raise_open_files_limit(args.idle_connections + 2000)
    busy_before = warn_if_busy()
    targets, skipped = available_targets(args)
    started = time.monotonic()
    try:
        results = run_scenarios(args, targets)
    except StartError as exc:
        log(f"FAILED: the upstream did not start: {exc}")
        return 2
    found, start_failed = problems(results)
    goal_list = goals(results)
    settings = settings_of(args)
    machine = {**machine_facts(), "cpu_busy_before": round(busy_before, 2)}
    report = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "elapsed_s": round(time.monotonic() - started),
        "settings": settings,
        "machine": machine,
        "targets": {t.name: t.summary for t in targets},
        "skipped": skipped,
        "results": results,
        "goals": goal_list,
        "problems": found,
    }
    stamp = timestamp()
    scenarios = {s.name: s for s in args.scenarios}
    print(format_report(results, scenarios, goal_list, settings))
    print(f"\nresults: {write_json(report, args.out_dir, stamp)}")
    if not args.no_plots:
        draw(results, scenarios, settings, machine, args.plots_dir or args.out_dir / f"plots-{stamp}")
    for problem in found:
        log(f"FAILED: {problem}")
    return 2 if start_failed else 1 if found else 0


def draw(results: dict, scenarios: dict[str, Scenario], settings: dict, machine: dict,
         plots_dir: Path) -> None:
    try:
        from plots import plot_all
    except ImportError as exc:
        log(f"no plots: {exc}; to install: .venv/bin/python -m pip install matplotlib")
        return
    clients = "/".join(sorted({"h2load" if s.h2 else "wrk" for s in scenarios.values() if not s.idle}))
    footer = (f"sluice {machine['sluice_commit']} · {time.strftime('%Y-%m-%d')} · "
              f"{machine['cpu_model']} x{machine['nproc']} · {clients or 'wrk'} -t{settings['threads']}, "
              f"medians of {settings['repeats']} x {settings['duration']} s")
    try:
        paths = plot_all(results, scenarios, footer, plots_dir)
    except ImportError as exc:
        log(f"no plots: {exc}; to install: .venv/bin/python -m pip install matplotlib")
        return
    print(f"plots: {plots_dir} ({len(paths)} PNG)")


def settings_of(args: argparse.Namespace) -> dict:
    return {
        "scenarios": [s.name for s in args.scenarios],
        "targets": [t.name for t in args.targets],
        **{key: getattr(args, key) for key in ("threads", "duration", "repeats", "warmup",
                                              "idle_connections", "plugins", "header")},
        "config": str(args.config) if args.config else None,
        "wrk_timeout_s": WRK_TIMEOUT_S,
    }


if __name__ == "__main__":
    sys.exit(main())
