"""The cost of one ``sluice.shared`` ``take_now()`` (lock, probe, refill, unlock), 1 and 2 processes contending.

Each process calls ``take_now`` on the same key in a loop for ``--seconds``;
reported: nanoseconds per call, per process (the median of ``--repeats``).

``--backend redis`` measures ``plugins/redis_state.py`` instead: each process
runs a trio loop awaiting ``take()`` one after another (one ``EVALSHA`` round
trip each) against a ``redis-server`` it starts on a free loopback port
(``tests/servers/redis.py``), or the one ``--redis HOST:PORT`` names.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from sluice.shared import LocalState

REPO = Path(__file__).resolve().parent.parent


def _local_loop():
    """Seconds per take_now(), on a table made here, before the fork, so every process shares it."""
    state = LocalState()

    def loop(seconds: float) -> float:
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(1000):
                state.take_now("10.0.0.1", 1, 1e9, 1e9)
            n += 1000
        return elapsed / n

    return loop


def _redis_loop(address: str, seconds: float) -> float:
    """Seconds per awaited take() on Redis, each process with its own client."""
    from sluice.plugins.redis_state import RedisConfig, RedisState

    async def run() -> float:
        async with RedisState(RedisConfig(address=address, timeout=1.0, prefix="bench:")) as state:
            await state.take("10.0.0.1", 1, 1e9, 1e9)  # connect, load the script
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                for _ in range(100):
                    await state.take("10.0.0.1", 1, 1e9, 1e9)
                n += 100
            assert not state.down
            return elapsed / n

    return trio.run(run)


def _run(processes: int, seconds: float, make_loop) -> float:
    loop = make_loop()
    r, w = os.pipe()
    pids = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            os.write(w, f"{loop(seconds) * 1e9}\n".encode())
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    with os.fdopen(r) as f:
        return statistics.mean(float(line) for line in f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=["local", "redis"], default="local")
    parser.add_argument("--redis", metavar="HOST:PORT", help="a running Redis (default: start one)")
    args = parser.parse_args()
    server, make_loop = None, _local_loop
    if args.backend == "redis":
        address = args.redis
        if address is None:
            sys.path.insert(0, str(REPO))  # for tests.servers: the same redis-server the tests start
            from tests.servers.redis import start_redis

            tmp = tempfile.TemporaryDirectory(prefix="sluice-bench-")
            server = start_redis(Path(tmp.name))
            address = server.address

        def make_loop():
            return lambda seconds: _redis_loop(address, seconds)
    try:
        for processes in (1, 2):
            ns = statistics.median(_run(processes, args.seconds, make_loop) for _ in range(args.repeats))
            print(f"{args.backend}, {processes} process(es): {ns / 1000:.1f} us per take()")
    finally:
        if server is not None:
            server.stop()
            tmp.cleanup()


if __name__ == "__main__":
    main()
