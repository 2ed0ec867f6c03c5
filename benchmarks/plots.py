"""PNG plots of a run, small enough to commit (800x450 at 100 dpi).

For each wrk scenario: ``<scenario>-throughput.png`` (req/s per target, each
bar labelled with its req/s and its ratio to nginx) and
``<scenario>-latency.png`` (p50/p90/p99 per target, log scale). For idle10k:
``idle10k-rss.png`` (RSS per target holding the idle connections, with the
200 MiB goal). Needs matplotlib, which ``make bench`` installs.
"""

from __future__ import annotations

from pathlib import Path

from scenarios import Scenario

SIZE_IN, DPI = (8, 4.5), 100
PEER_COLOR, SLUICE_COLOR, FLOOR_COLOR, DIRECT_COLOR = "#7a8ca3", "#e07b39", "#4c9a5b", "#c9c9c9"
LATENCY_COLORS = {"p50_ms": "#9ecae1", "p90_ms": "#4292c6", "p99_ms": "#08519c"}
IDLE_GOAL_MIB = 200


def _color(target: str) -> str:
    if target.startswith("sluice"):
        return SLUICE_COLOR
    return {"floor": FLOOR_COLOR, "direct": DIRECT_COLOR}.get(target, PEER_COLOR)


def _short(rps: float) -> str:
    return f"{rps / 1000:.1f}k" if rps >= 1000 else f"{rps:.0f}"


def _figure(title: str, footer: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.text(0.01, 0.01, footer, fontsize=7, color="#666666")
    return fig, ax


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _measured(outcomes: dict[str, dict], key: str) -> dict[str, dict]:
    return {t: o for t, o in outcomes.items() if (o.get("summary") or o).get(key) is not None}


def throughput(scenario: Scenario, outcomes: dict[str, dict], footer: str, out_dir: Path) -> Path:
    name = scenario.name
    measured = _measured(outcomes, "rps")
    fig, ax = _figure(f"{name}: {scenario.title}\nreq/s (label: req/s, ratio to nginx)", footer)
    targets = list(measured)
    values = [measured[t]["summary"]["rps"] for t in targets]
    bars = ax.bar(targets, values, color=[_color(t) for t in targets])
    for bar, target in zip(bars, targets, strict=True):
        summary = measured[target]["summary"]
        ratio = f"\n{summary['x_nginx']:.2f}×" if "x_nginx" in summary else ""
        ax.annotate(_short(summary["rps"]) + ratio, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("requests/s")
    ax.margins(y=0.18)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    return _save(fig, out_dir / f"{name}-throughput.png")


def latency(scenario: Scenario, outcomes: dict[str, dict], footer: str, out_dir: Path) -> Path:
    name = scenario.name
    measured = _measured(outcomes, "p99_ms")
    fig, ax = _figure(f"{name}: latency percentiles under load (ms, log scale)", footer)
    targets = list(measured)
    width = 0.8 / len(LATENCY_COLORS)
    for i, (key, color) in enumerate(LATENCY_COLORS.items()):
        xs = [n + (i - 1) * width for n in range(len(targets))]
        ax.bar(xs, [measured[t]["summary"][key] for t in targets], width, color=color,
               label=key.removesuffix("_ms"))
    ax.set_xticks(range(len(targets)), targets, fontsize=8, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, out_dir / f"{name}-latency.png")


def idle_rss(scenario: Scenario, outcomes: dict[str, dict], footer: str, out_dir: Path) -> Path:
    name = scenario.name
    measured = _measured(outcomes, "rss_held_mib")
    fig, ax = _figure(f"{name}: RSS holding {scenario.connections:,} idle keep-alive connections (MiB)",
                      footer)
    targets = list(measured)
    bars = ax.bar(targets, [measured[t]["rss_held_mib"] for t in targets],
                  color=[_color(t) for t in targets])
    ax.bar_label(bars, [f"{measured[t]['rss_held_mib']:.0f}" for t in targets], fontsize=8)
    ax.axhline(IDLE_GOAL_MIB, color="#b22222", linestyle="--", linewidth=1)
    ax.text(-0.4, IDLE_GOAL_MIB, f"goal for sluice: {IDLE_GOAL_MIB} MiB", ha="left",
            va="bottom", fontsize=8, color="#b22222")
    ax.set_ylabel("MiB (process tree)")
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    return _save(fig, out_dir / f"{name}-rss.png")


def plot_all(results: dict, scenarios: dict[str, Scenario], footer: str, out_dir: Path) -> list[Path]:
    """Write every plot for the run's results; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, outcomes in results.items():
        scenario = scenarios[name]
        if scenario.idle:
            if _measured(outcomes, "rss_held_mib"):
                paths.append(idle_rss(scenario, outcomes, footer, out_dir))
        elif _measured(outcomes, "rps"):
            paths += [throughput(scenario, outcomes, footer, out_dir),
                      latency(scenario, outcomes, footer, out_dir)]
    return paths
