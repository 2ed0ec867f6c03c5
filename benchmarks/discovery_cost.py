#!/usr/bin/env python3
"""What applying a discovery snapshot costs the event loop, per policy and size.

Pure Python, no sockets: a cluster with a discovery runner
(``sluice.upstream.discovery.Discovery``) is given full snapshots of N
endpoints alternately with 10% of them replaced (the diff, the swap and the
policy's ``endpoints_changed``: ring and table rebuilds included) and then
the same snapshot again (the diff alone, what every DNS refresh without a
change costs). Figures are medians in milliseconds per snapshot; the loop
runs nothing else meanwhile. A static cluster pays none of this.

    .venv/bin/python benchmarks/discovery_cost.py
    .venv/bin/python benchmarks/discovery_cost.py --sizes 10,100,1000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import structlog

from sluice.plugins.balancer import Ewma, Maglev, RingHash, RoundRobin
from sluice.upstream.cluster import Cluster
from sluice.upstream.discovery import Discovery, DiscoverySource, EndpointSpec


def specs(prefix: int, n: int) -> list[EndpointSpec]:
    return [EndpointSpec(f"10.{prefix}.{i // 250}.{i % 250 + 1}", 8080) for i in range(n)]


def measure(policy, n: int, rounds: int) -> tuple[float, float]:
    cluster = Cluster("c", [], policy([], policy.Config()), connect_timeout=1, response_timeout=1,
                      idle_timeout=1, max_idle=1)
    discovery = Discovery(cluster, DiscoverySource(None, "c"), None, 1.0)
    base = specs(0, n)
    swap = max(1, n // 10)
    changed = base[:-swap] + specs(1, swap)
    discovery.update(base)
    change, same = [], []
    for _ in range(rounds):
        for snapshot in (changed, base):
            start = time.perf_counter()
            discovery.update(snapshot)
            change.append(time.perf_counter() - start)
        start = time.perf_counter()
        discovery.update(base)
        same.append(time.perf_counter() - start)
    return statistics.median(change) * 1e3, statistics.median(same) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the events are not timed
    print(f"{'endpoints':>9}  {'policy':<12} {'10% replaced (ms)':>18} {'unchanged (ms)':>15}")
    for n in (int(x) for x in args.sizes.split(",")):
        for policy in (RoundRobin, Ewma, RingHash, Maglev):
            change, same = measure(policy, n, args.rounds)
            print(f"{n:>9}  {policy.name:<12} {change:>18.3f} {same:>15.3f}")


if __name__ == "__main__":
    main()
