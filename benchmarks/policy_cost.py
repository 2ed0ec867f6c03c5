#!/usr/bin/env python3
"""What one pick costs per balancing policy, with 3, 10 and 100 endpoints.

Pure Python, no sockets: each policy of the balancer plugin is built over
the endpoints (as a cluster builds it) and its ``pick`` timed over a fixed
set of 200 requests, every endpoint eligible. The hash policies read their
key from an ``x-user`` header (200 distinct users), so the figure includes
reading the key and hashing it; ewma has heard a latency from every
endpoint first, and endpoints have a few requests in flight. Rounds
interleave the policies and sizes so that a busy machine slows them alike;
figures are medians, in nanoseconds per pick. Building the structures
(ring, Maglev table) is not timed: a cluster does it once.

    .venv/bin/python benchmarks/policy_cost.py
    .venv/bin/python benchmarks/policy_cost.py --sizes 3,10,100,1000 --rounds 9
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

from sluice import Endpoint, Headers, Request
from sluice.plugins.balancer import Ewma, LeastRequest, Maglev, Random, RingHash, RoundRobin, WeightedRoundRobin
from sluice.upstream.cluster import SUCCESS, Attempt

SEED = 8
POLICIES = (RoundRobin, WeightedRoundRobin, Random, LeastRequest, Ewma, RingHash, Maglev)


def build(policy: type, size: int):
    """The policy over ``size`` endpoints (weights 1-3), ready to pick."""
    rng = random.Random(SEED)
    endpoints = [Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 8080, weight=rng.randint(1, 3), active=rng.randint(0, 4))
                 for i in range(size)]
    if policy in (RingHash, Maglev):
        return policy(endpoints, policy.Config(key="header:x-user"), rng=random.Random(SEED))
    if policy in (Random, LeastRequest, Ewma):
        built = policy(endpoints, rng=random.Random(SEED))
    else:
        built = policy(endpoints)
    if policy is Ewma:
        for endpoint in endpoints:
            built.feedback(Attempt(endpoint, SUCCESS, 200, rng.uniform(0.005, 0.05)))
    return built


def requests(count: int = 200) -> list:
    out = []
    for i in range(count):
        headers = Headers([("host", "svc.example.com"), ("x-user", f"user-{i * 7919 % 100_000}")])
        out.append(SimpleNamespace(request=Request("GET", f"/api/items/{i}", headers), client=("10.1.0.1", 4000 + i),
                                   hash_key=None))
    return out


def per_pick_ns(policy, ctxs: list, repeat: int) -> float:
    pick, endpoints = policy.pick, policy.endpoints
    start = time.perf_counter_ns()
    for _ in range(repeat):
        for ctx in ctxs:
            pick(ctx, endpoints)
    return (time.perf_counter_ns() - start) / (repeat * len(ctxs))


def measure(sizes: list[int], rounds: int = 15, repeat: int = 20) -> dict:
    """Medians of ns per pick, per policy and size, and the table to print."""
    ctxs = requests()
    built = {(p.name, s): build(p, s) for p in POLICIES for s in sizes}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in built}
    for _ in range(rounds):
        for key, policy in built.items():
            samples[key].append(per_pick_ns(policy, ctxs, repeat))
    rows = {name: {s: statistics.median(samples[name, s]) for s in sizes} for name in (p.name for p in POLICIES)}
    width = max(len(n) for n in rows)
    lines = [f"{'policy':<{width}} " + " ".join(f"{f'{s:,} eps':>9}" for s in sizes)]
    for name, row in rows.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{row[s]:>9.0f}" for s in sizes))
    lines.append(f"ns per pick, medians of {rounds} interleaved rounds of {repeat} x {len(ctxs)} picks")
    return {"rows": rows, "table": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3,10,100", help="endpoint counts, comma-separated (%(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (%(default)s)")
    parser.add_argument("--repeat", type=int, default=20, help="passes over the requests per round (%(default)s)")
    args = parser.parse_args()
    print(measure([int(s) for s in args.sizes.split(",")], args.rounds, args.repeat)["table"])


if __name__ == "__main__":
    main()
