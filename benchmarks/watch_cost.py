#!/usr/bin/env python3
"""What following the config file (``server.watch_config = true``) adds to one proxied request.

``exchange_cost.py``'s memory-backed listener serves the router chain with,
alongside in the same trio run, nothing; a watchfiles ``awatch`` of the
config file's directory (how ``watch_config`` worked until 2026-11-27: a
Rust thread that wakes every 50 ms and takes the GIL); or the watcher
sluice runs now (``sluice.control.watch.watch_config``: a stat on the event
loop). Rounds are interleaved; the figures are medians of the wall time
and of the process's CPU time (every thread's) per request.

    .venv/bin/python benchmarks/watch_cost.py
    .venv/bin/python benchmarks/watch_cost.py --repeats 9 -n 20000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import trio
from watchfiles import awatch

from exchange_cost import _app, _serve
from sluice.control.watch import watch_config


async def _watchfiles(path: Path) -> None:
    async for _ in awatch(path.parent, recursive=False):
        pass


async def _run(mode: str, path: Path, n: int) -> tuple[float, float]:
    async with trio.open_nursery() as nursery:
        if mode == "watchfiles":
            nursery.start_soon(_watchfiles, path)
        elif mode == "stat":
            nursery.start_soon(watch_config, str(path), lambda: None)
        await trio.sleep(0.2)  # the watcher running
        wall, cpu = time.perf_counter(), time.process_time()
        await _serve(_app(["router"], "auto", str(path.parent)), n)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        nursery.cancel_scope.cancel()
    return wall / n * 1e6, cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("-n", type=int, default=10000, help="requests per round")
    args = parser.parse_args()
    modes = ["none", "watchfiles", "stat"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sluice.toml"
        path.write_text("")
        for mode in modes:
            trio.run(_run, mode, path, 2000)  # warm-up
        samples: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                samples[mode].append(trio.run(_run, mode, path, args.n))
    base = [statistics.median(s[i] for s in samples["none"]) for i in (0, 1)]
    print(f"{'watcher':<11} {'wall us/req':>12} {'cpu us/req':>11}")
    for mode, figures in samples.items():
        wall, cpu = (statistics.median(f[i] for f in figures) for i in (0, 1))
        extra = "" if mode == "none" else f"   (+{wall - base[0]:.1f} wall, +{cpu - base[1]:.1f} cpu)"
        print(f"{mode:<11} {wall:>12.1f} {cpu:>11.1f}{extra}")
    print(f"medians of {args.repeats} interleaved rounds of {args.n} requests; router chain, metrics off")


if __name__ == "__main__":
    main()
