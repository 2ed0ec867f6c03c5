"""What a run found: medians, ratios, the issue's goals, the table, facts about
the machine, and the JSON file.

``results`` throughout is ``{scenario: {target: outcome}}``. An outcome has a
``status`` ("ok", or what went wrong: "did not start", "wrong answer",
"died") and, for wrk scenarios, ``runs`` (one dict per wrk run, see
load.parse_wrk); for idle10k, the memory figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

from load import PERCENTILES
from peers import PYTHON, REPO
from scenarios import Scenario

MIB = 1 << 20
LATENCY_KEYS = tuple(f"p{p}_ms" for p in PERCENTILES)


# -------------------------------------------------------------------- figures


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Medians over the runs that completed; errors and requests summed."""
    done = [r for r in runs if "failure" not in r]
    rps = [r["rps"] for r in done]
    return {
        "rps": _median(done, "rps"),
        "rps_range": [min(rps), max(rps)] if rps else None,
        "transfer_bytes_s": _median(done, "transfer_bytes_s"),
        **{key: _median(done, key) for key in LATENCY_KEYS},
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
    }


def add_ratios(outcomes: dict[str, dict]) -> None:
    """Each target's req/s as a share of nginx's and of the floor's, in place."""
    for reference in ("nginx", "floor"):
        base = outcomes.get(reference, {}).get("summary", {}).get("rps")
        for outcome in outcomes.values():
            rps = outcome.get("summary", {}).get("rps")
            if base and rps is not None:
                outcome["summary"][f"x_{reference}"] = rps / base


def _summary(results: dict, scenario: str, target: str) -> dict:
    return results.get(scenario, {}).get(target, {}).get("summary") or {}


def goals(results: dict) -> list[dict]:
    """The issue's targets for sluice, each with what was measured and whether it is met
    (``met`` None: not measured in this run)."""
    small_sluice = _summary(results, "small", "sluice")
    small_bare = _summary(results, "small", "sluice-bare")
    idle = results.get("idle10k", {}).get("sluice", {})

    def share(summary: dict, need: float, label: str) -> dict:
        value = summary.get("x_floor")
        return {"goal": f"{label} >= {need:.0%} of floor (small req/s)",
                "measured": None if value is None else f"{value:.0%}",
                "met": None if value is None else value >= need}

    p50, p99 = small_sluice.get("p50_ms"), small_sluice.get("p99_ms")
    tail = {"goal": "sluice p99 <= 3x its p50 (small)",
            "measured": f"p99/p50 = {p99 / p50:.1f}" if p50 and p99 else None,
            "met": p99 <= 3 * p50 if p50 and p99 else None}
    h2_share = _summary(results, "h2", "sluice").get("x_nginx")
    h2 = {"goal": "sluice h2c >= 0.10x nginx h2c (h2 req/s)",
          "measured": None if h2_share is None else f"{h2_share:.3f}x",
          "met": None if h2_share is None else h2_share >= 0.10}
    measured = "rss_held_mib" in idle and idle["requested"] >= 10_000
    memory = {"goal": "sluice holding 10k idle connections <= 200 MiB RSS (idle10k)",
              "measured": f"{idle['rss_held_mib']:.0f} MiB with {idle['held']:,} held" if measured else None,
              "met": idle["rss_held_mib"] <= 200 and idle["held"] >= 10_000 if measured else None}
    return [share(small_sluice, 0.5, "sluice (default chain)"),
            share(small_bare, 0.7, "sluice-bare (no filters)"), tail, memory, h2]


def problems(results: dict) -> tuple[list[str], bool]:
    """Everything that went wrong, and whether a server failed to start."""
    found, start_failed = [], False
    for scenario, outcomes in results.items():
        for target, outcome in outcomes.items():
            where = f"{scenario}/{target}"
            if outcome["status"] != "ok":
                first_line = outcome.get("error", "").partition("\n")[0]
                found.append(f"{where}: {outcome['status']}: {first_line}".rstrip(": "))
                start_failed |= outcome["status"] == "did not start"
            for run in outcome.get("runs", []):
                if "failure" in run:
                    found.append(f"{where}: {run['failure']}")
                elif run["requests"] == 0:
                    found.append(f"{where}: a run completed no requests")
            errors = outcome.get("summary", {}).get("errors")
            if errors:
                found.append(f"{where}: {errors} errors (non-2xx + socket errors)")
            if outcome.get("failures"):
                found.append(f"{where}: {outcome['failures']} connections not held: "
                             + "; ".join(outcome["first_failures"]))
    return found, start_failed


# ---------------------------------------------------------------------- table


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def load_table(scenario: Scenario, outcomes: dict[str, dict]) -> str:
    payload = scenario.payload_bytes
    header = f"{'target':<14} {'req/s':>9}"
    header += f" {'MiB/s':>7}" if payload else ""
    header += "".join(f" {p + ' ms':>9}" for p in ("p50", "p90", "p99"))
    lines = [header + f" {'errors':>6} {'x nginx':>8} {'x floor':>8}"]
    for target, outcome in outcomes.items():
        s = outcome.get("summary", {})
        line = f"{target:<14} {_cell(s.get('rps'), '.0f'):>9}"
        if payload:
            mib_s = s["rps"] * payload / MIB if s.get("rps") is not None else None
            line += f" {_cell(mib_s, '.0f'):>7}"
        line += "".join(f" {_cell(s.get(key), '.2f'):>9}" for key in ("p50_ms", "p90_ms", "p99_ms"))
        line += f" {s.get('errors', 0):>6} {_cell(s.get('x_nginx'), '.3f'):>8}"
        line += f" {_cell(s.get('x_floor'), '.3f'):>8}"
        if outcome["status"] != "ok":
            line += f"  {outcome['status']}"
        lines.append(line)
    return "\n".join(lines)


def idle_table(outcomes: dict[str, dict]) -> str:
    lines = [f"{'target':<14} {'RSS idle MiB':>12} {'RSS held MiB':>12} {'KiB/conn':>9} {'held':>7}"]
    for target, o in outcomes.items():
        per_conn = ((o["rss_held_mib"] - o["rss_before_mib"]) * 1024 / o["held"]
                    if o.get("held") else None)
        line = (f"{target:<14} {_cell(o.get('rss_before_mib'), '.1f'):>12} "
                f"{_cell(o.get('rss_held_mib'), '.1f'):>12} {_cell(per_conn, '.1f'):>9} "
                f"{o.get('held', '-'):>7}")
        lines.append(line + (f"  {o['status']}" if o["status"] != "ok" else ""))
    return "\n".join(lines)


def format_report(results: dict, scenarios: dict[str, Scenario], goal_list: list[dict],
                  settings: dict) -> str:
    blocks = []
    for name, outcomes in results.items():
        scenario = scenarios[name]
        if scenario.idle:
            blocks.append(f"== {name}: {scenario.title} ==\n{idle_table(outcomes)}")
        else:
            runs = f"medians of {settings['repeats']} x {settings['duration']} s"
            blocks.append(f"== {name}: {scenario.title} ({runs}) ==\n{load_table(scenario, outcomes)}")
    marks = {True: "met", False: "NOT met", None: "not measured"}
    goal_lines = [f"  [{marks[g['met']]}] {g['goal']}"
                  + (f": {g['measured']}" if g["measured"] else "") for g in goal_list]
    blocks.append("== goals ==\n" + "\n".join(goal_lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------- machine facts


def _first_line(argv: list[str]) -> str | None:
    """First line a command prints (stdout or stderr), or None if it cannot run."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _proc_field(path: str, key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def _version(distribution: str) -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(distribution)
    return None


def sluice_commit() -> str:
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    if not commit or not re.fullmatch(r"[0-9a-f]+", commit):
        return "no-commit"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=REPO).stdout.strip()
    return f"{commit}-dirty" if dirty else commit


def machine_facts() -> dict:
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": _first_line([PYTHON, "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "caddy": _first_line(["caddy", "version"]),
        "wrk": _first_line(["wrk", "-v"]),
        "h2load": _first_line(["h2load", "--version"]),
        "openssl": _first_line(["openssl", "version"]),
        "trio": _version("trio"),
        "httptools": _version("httptools"),
        "h11": _version("h11"),
        "sluice_commit": sluice_commit(),
    }


def write_json(report: dict, out_dir: Path, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
