"""The cost of one ``sluice.shared`` ``take_now()`` (lock, probe, refill, unlock), 1 and 2 processes contending.

Each process calls ``take_now`` on the same key in a loop for ``--seconds``;
reported: nanoseconds per call, per process (the median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from sluice.shared import LocalState


def _run(processes: int, seconds: float) -> float:
    state = LocalState()
    r, w = os.pipe()
    pids = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                for _ in range(1000):
                    state.take_now("10.0.0.1", 1, 1e9, 1e9)
                n += 1000
            os.write(w, f"{elapsed * 1e9 / n}\n".encode())
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
    args = parser.parse_args()
    for processes in (1, 2):
        ns = statistics.median(_run(processes, args.seconds) for _ in range(args.repeats))
        print(f"{processes} process(es): {ns:.0f} ns per take()")


if __name__ == "__main__":
    main()
