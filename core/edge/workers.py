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


Target = Callable[[bool, Callable[[], None], int], None]


def _spawn(target: Target, index: int) -> tuple[int, int]:
    """Fork a worker; returns its pid and a pipe it writes to once it listens."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(ready_r)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's forwarder
        signal.signal(signal.SIGINT, signal.SIG_DFL)

        def ready() -> None:
            os.write(ready_w, b"!")

        code = 0
        try:
            target(True, ready, index)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - report, never return into the parent's code
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    os.set_blocking(ready_r, False)
    return pid, ready_r


def _was_ready(fd: int) -> bool:
    try:
        return os.read(fd, 1) == b"!"
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def run_workers(n: int, target: Target) -> int:
    """Run ``target(reuse_port, ready, index)`` in-process (n == 1) or in n forked workers.

    ``ready()`` is called by the worker once it listens; a worker that dies
    before that could not start, and is not replaced. ``index`` is the
    worker's stable number, 0..n-1 (0 in-process): a replacement gets the
    index of the worker it replaces, so "worker 0" always exists once.
    """
    if n == 1:
        target(False, lambda: None, 0)
        return 0
    stopping = False
    pids: dict[int, int] = {}  # live workers -> their ready pipe
    indexes: dict[int, int] = {}  # live workers -> their index

    def spawn(index: int) -> None:
        pid, ready_fd = _spawn(target, index)
        pids[pid] = ready_fd
        indexes[pid] = index

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
    for index in range(n):
        spawn(index)
    failed = False
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        ready_fd = pids.pop(pid, None)
        index = indexes.pop(pid, 0)
        started = ready_fd is not None and _was_ready(ready_fd)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed |= code != 0
            continue
        if not started:
            # It could not even start (port taken, ...): replacing it would
            # only fail again. Stop the others and report.
            print(f"sluice: worker {pid} failed at startup ({code}); stopping", file=sys.stderr, flush=True)
            failed = True
            forward(signal.SIGTERM, None)
            continue
        print(f"sluice: worker {pid} exited with {code}; starting another", file=sys.stderr, flush=True)
        time.sleep(_RESPAWN_BACKOFF)
        if not stopping:
            spawn(index)
    return 1 if failed else 0
