"""``--workers N``: N processes, each its own trio loop, sharing the port.

Each worker binds the listener itself with SO_REUSEPORT and the kernel
spreads connections across them. The parent only supervises: it forwards
SIGTERM/SIGINT (each worker then drains), replaces a worker that died
while it was not stopping, and exits 0 once every worker exited cleanly.
Workers are forked after the config was validated in the parent.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

__all__ = ["run_workers"]

_RESPAWN_BACKOFF = 1.0
_STARTUP_GRACE = 2.0  # a worker dying sooner than this failed to start


def _spawn(target: Callable[[bool], None]) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            target(True)
        except BaseException:  # noqa: BLE001 - report, never return into the parent's code
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def run_workers(n: int, target: Callable[[bool], None]) -> int:
    """Run ``target(reuse_port)`` in-process (n == 1) or in n forked workers."""
    if n == 1:
        target(False)
        return 0
    stopping = False
    started: dict[int, float] = {}

    def spawn() -> None:
        started[_spawn(target)] = time.monotonic()

    for _ in range(n):
        spawn()
    pids = started  # live workers, with their start time

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        born = pids.pop(pid, time.monotonic())
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed |= code != 0
            continue
        if time.monotonic() - born < _STARTUP_GRACE:
            # It could not even start (port taken, ...): replacing it would
            # only fail again. Stop the others and report.
            print(f"sluice: worker {pid} failed at startup ({code}); stopping", file=sys.stderr, flush=True)
            failed = True
            forward(signal.SIGTERM, None)
            continue
        print(f"sluice: worker {pid} exited with {code}; starting another", file=sys.stderr, flush=True)
        time.sleep(_RESPAWN_BACKOFF)
        if not stopping:
            spawn()
    return 1 if failed else 0
