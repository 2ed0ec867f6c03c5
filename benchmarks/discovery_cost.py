#!/usr/bin/env python3
"""What applying a discovery snapshot costs the event loop, per policy and size.

No sockets: inside a trio run, a cluster with a discovery runner
(``sluice.upstream.discovery.Discovery``) is given full snapshots of N
endpoints alternately with 10% of them replaced (the diff, the swap and the
policy's ``endpoints_changed``) and then the same snapshot again (the diff
alone, what every DNS refresh without a change costs). ring_hash and maglev
build a large ring or table in a thread (``sluice.plugins.hashing``): for
them the change's cost on the loop is the ``update`` call plus the longest
the loop then waits for a tick while the thread builds (the GIL is shared:
the thread hands it back every switch interval, 5 ms), and the build itself
is timed to the swap. A ticker task sleeps 0 in a loop; its longest gap is
the loop's stall. Figures are medians in milliseconds per snapshot. A static
cluster pays none of this.

    .venv/bin/python benchmarks/discovery_cost.py
    .venv/bin/python benchmarks/discovery_cost.py --sizes 10,100,1000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import structlog
import trio

from sluice.plugins.balancer import Ewma, Maglev, RingHash, RoundRobin
from sluice.upstream.cluster import Cluster
from sluice.upstream.discovery import Discovery, DiscoverySource, EndpointSpec


def specs(prefix: int, n: int) -> list[EndpointSpec]:
    return [EndpointSpec(f"10.{prefix}.{i // 250}.{i % 250 + 1}", 8080) for i in range(n)]


class _Ticker:
    """The longest the loop went without running this task, since ``reset``."""

    def __init__(self) -> None:
        self.gap = 0.0
        self._last = time.perf_counter()

    def reset(self) -> None:
        self.gap, self._last = 0.0, time.perf_counter()

    async def run(self) -> None:
        while True:
            await trio.sleep(0)
            now = time.perf_counter()
            self.gap = max(self.gap, now - self._last)
            self._last = now


async def measure(policy, n: int, rounds: int, ticker: _Ticker) -> tuple[float, float, float, float]:
    """Medians (ms): the update call, the loop's longest stall over the change, the time to
    the new table (0 when there is none to build), and an unchanged snapshot's update."""
    cluster = Cluster("c", [], policy([], policy.Config()), connect_timeout=1, response_timeout=1,
                      idle_timeout=1, max_idle=1)
    discovery = Discovery(cluster, DiscoverySource(None, "c"), None, 1.0)
    settled = getattr(cluster.balancer, "settled", None)
    base = specs(0, n)
    swap = max(1, n // 10)
    changed = base[:-swap] + specs(1, swap)
    discovery.update(base)
    if settled:
        await settled()
    call, stall, built, same = [], [], [], []
    for _ in range(rounds):
        for snapshot in (changed, base):
            await trio.sleep(0)
            ticker.reset()
            start = time.perf_counter()
            discovery.update(snapshot)
            call.append(time.perf_counter() - start)
            if settled:
                await settled()
            built.append(time.perf_counter() - start if settled else 0.0)
            await trio.sleep(0)  # (the ticker records the gap up to here)
            stall.append(max(ticker.gap, call[-1]))
        start = time.perf_counter()
        discovery.update(base)
        same.append(time.perf_counter() - start)
    return tuple(statistics.median(x) * 1e3 for x in (call, stall, built, same))


async def run(sizes: list[int], rounds: int) -> None:
    print(f"{'endpoints':>9}  {'policy':<12} {'update (ms)':>12} {'loop stall (ms)':>16} "
          f"{'to new table (ms)':>18} {'unchanged (ms)':>15}")
    ticker = _Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        for n in sizes:
            for policy in (RoundRobin, Ewma, RingHash, Maglev):
                call, stall, built, same = await measure(policy, n, rounds, ticker)
                print(f"{n:>9}  {policy.name:<12} {call:>12.3f} {stall:>16.3f} {built:>18.3f} {same:>15.3f}")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the events are not timed
    trio.run(run, [int(x) for x in args.sizes.split(",")], args.rounds)


if __name__ == "__main__":
    main()
