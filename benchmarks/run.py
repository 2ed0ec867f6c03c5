#!/usr/bin/env python3
"""Benchmark sluice against nginx, haproxy, caddy and a bare trio + httptools floor.

Every target proxies the same upstream (a separate nginx, 1 worker) and runs
1 worker; wrk drives each scenario against every target, a warm-up each,
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
import resource
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import peers
from load import WRK_TIMEOUT_S, hold_idle, run_wrk, still_held, wrong_answer
from peers import TARGETS, Site, Target, run_target
from procs import Server, StartError, free_port, log, tree_rss_bytes
from report import MIB, add_ratios, format_report, goals, machine_facts, problems, summarize, timestamp, write_json
from scenarios import QUICK, SCENARIOS, Scenario

OUT_DIR = peers.BENCH_DIR / "out"
PRESETS = {  # what --full changes; explicit flags win
    "quick": {"scenarios": list(QUICK), "duration": 2, "repeats": 3, "warmup": 1},
    "full": {"scenarios": list(SCENARIOS), "duration": 5, "repeats": 5, "warmup": 2},
}


@dataclass(frozen=True)
class Bench:
    """One run's fixed context: where things go and what every target proxies to."""

    workdir: Path
    upstream: str
    tls: peers.TlsFiles | None
    args: argparse.Namespace

    def site(self, target: Target, scenario: Scenario) -> Site:
        return Site(target.name, self.workdir / scenario.name / target.name, free_port(),
                    self.upstream, self.tls if scenario.tls else None, scenario.max_connections)


# ------------------------------------------------------------ wrk scenarios


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
            run_wrk(server.url, scenario, args.threads, args.warmup, script)
        for round_no in range(1, args.repeats + 1):
            for name, server in list(servers.items()):
                if died(server, outcomes[name]):
                    del servers[name]
                    continue
                run = run_wrk(server.url, scenario, args.threads, args.duration, script)
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
    """direct has no process to hold connections, and no TLS listener."""
    if scenario.idle:
        return target.command is not None
    return target.tls or not scenario.tls


def run_scenarios(args: argparse.Namespace, targets: list[Target]) -> dict:
    """Start the upstream, run each scenario against the targets, stop everything."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp, \
            peers.upstream(Path(tmp)) as upstream:
        workdir = Path(tmp)
        workdir.chmod(0o711)  # nginx workers run as nobody: they must reach the upstream's files
        tls = peers.make_tls_files(workdir) if any(s.tls for s in args.scenarios) else None
        bench = Bench(workdir, upstream, tls, args)
        for scenario in args.scenarios:
            chosen = [t for t in targets if applicable(t, scenario)]
            log(f"=== {scenario.name}: {scenario.title} ({', '.join(t.name for t in chosen)})")
            measure = measure_idle if scenario.idle else measure_load
            results[scenario.name] = measure(bench, scenario, chosen)
    return results


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


def warn_if_busy() -> None:
    load = float(Path("/proc/loadavg").read_text().split()[0])
    if load > 0.5:
        log(f"WARNING: the machine is busy before the run (load average {load:.2f}): the "
            "benchmark shares the CPUs with other processes, expect noisy numbers")


def missing_tools() -> list[str]:
    return [f"{tool} is required; to install: apt-get install {tool}  (or: bash benchmarks/setup.sh)"
            for tool in ("nginx", "wrk") if not shutil.which(tool)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools()
    for problem in missing:
        log(f"FAILED: {problem}")
    if missing:
        return 2
    raise_open_files_limit(args.idle_connections + 2000)
    warn_if_busy()
    targets, skipped = available_targets(args)
    started = time.monotonic()
    try:
        results = run_scenarios(args, targets)
    except (StartError, OSError) as exc:
        log(f"FAILED: the upstream did not start: {exc}")
        return 2
    found, start_failed = problems(results)
    goal_list = goals(results)
    settings = settings_of(args)
    machine = machine_facts()
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
    footer = (f"sluice {machine['sluice_commit']} · {time.strftime('%Y-%m-%d')} · "
              f"{machine['cpu_model']} x{machine['nproc']} · wrk -t{settings['threads']}, "
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


# ------------------------------------------------------------------ options


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def header(text: str) -> str:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return f"{name}: {value.strip()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="every scenario, 5 runs of 5 s each, 2 s warm-up (default: the quick "
                             "set, 3 runs of 2 s, 1 s warm-up)")
    parser.add_argument("--scenarios", type=names, help=f"comma-separated, from {','.join(SCENARIOS)}")
    parser.add_argument("--targets", type=names,
                        help=f"comma-separated, from {','.join(TARGETS)},sluice-custom (default: all)")
    parser.add_argument("--config", type=Path,
                        help="your sluice config: measured as sluice-custom (see README)")
    parser.add_argument("--plugins", type=names,
                        help="your filter chain, e.g. my_filter,router: measured as sluice-custom")
    parser.add_argument("--header", action="append", default=[], type=header,
                        help="'Name: value' added to every request (repeat for more), "
                             "e.g. the API key your chain asks for")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (%(default)s)")
    parser.add_argument("--duration", type=int, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, help="measured runs per target and scenario")
    parser.add_argument("--warmup", type=int, help="warm-up seconds per target and scenario")
    parser.add_argument("--idle-connections", type=int, default=10_000,
                        help="connections held in idle10k (%(default)s)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="for the JSON (%(default)s)")
    parser.add_argument("--plots-dir", type=Path,
                        help="for the PNGs (default: OUT_DIR/plots-TIMESTAMP)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)
    preset = PRESETS["full" if args.full else "quick"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.duration, args.repeats, args.threads, args.idle_connections) < 1 or args.warmup < 0:
        parser.error("--duration, --repeats, --threads and --idle-connections must be at least 1")
    args.scenarios = choose_scenarios(parser, args)
    args.targets = choose_targets(parser, args)
    return args


def choose_scenarios(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Scenario]:
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: choose from {','.join(SCENARIOS)}")
    count = args.idle_connections
    idle = replace(SCENARIOS["idle10k"], connections=count, max_connections=count + 2000,
                   title=f"{count:,} idle keep-alive connections: RSS of the proxy")
    chosen = [idle if name == "idle10k" else SCENARIOS[name] for name in SCENARIOS if name in args.scenarios]
    return [replace(s, headers=s.headers + tuple(args.header)) for s in chosen]


def choose_targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Target]:
    known = dict(TARGETS)
    if args.config and args.plugins:
        parser.error("--config and --plugins: choose one")
    if args.config:
        known["sluice-custom"] = peers.custom_target(load_user_config(parser, args.config), None)
    elif args.plugins:
        known["sluice-custom"] = peers.custom_target(None, args.plugins)
    chosen = args.targets or list(known)
    unknown = set(chosen) - set(known)
    if unknown:
        extra = " (sluice-custom needs --config or --plugins)" if "sluice-custom" in unknown else ""
        parser.error(f"--targets: unknown {','.join(sorted(unknown))}; choose from {','.join(known)}{extra}")
    return [target for name, target in known.items() if name in chosen]


def load_user_config(parser: argparse.ArgumentParser, path: Path) -> dict:
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    if not config.get("listeners"):
        parser.error(f"--config {path}: no [[listeners]]")
    return config


if __name__ == "__main__":
    sys.exit(main())
