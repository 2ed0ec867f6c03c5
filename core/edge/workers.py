"""``--workers N``: a master process supervising N forked workers that share the port.

Each worker is its own trio loop and binds the listeners itself with
SO_REUSEPORT; the kernel spreads connections across them. Workers are
forked after the config was validated, and after the master reserved the
ports (``ports.py``) so that only its own workers share them. The master
serves nothing; it

- forwards signals: SIGTERM and SIGINT as SIGTERM (each worker drains),
  SIGQUIT (each stops at once), SIGHUP (reload) and SIGUSR1 (reopen logs);
- replaces a worker that died while the master was not stopping, under the
  same index, after a backoff that doubles from ``BACKOFF_FIRST`` to
  ``BACKOFF_MAX`` per index and starts again once a worker stayed up
  ``STABLE_AFTER``: a worker that crash-loops costs a fork every 10 s, not
  a core;
- stops everything when one of the first N workers dies before it listens:
  a replacement would only fail the same way (a port, a plugin's startup);
- exits 0 once every worker exited cleanly after a stop, 1 when one did
  not, or the status of the worker that could not start (2 for a config
  error).

Workers die with the master, however it dies (SIGKILL, a crash): each asks
the kernel for a SIGTERM when its parent goes (``PR_SET_PDEATHSIG``), and
exits at once if the master was already gone before it asked. SIGTERM
rather than SIGKILL, so that an orphaned worker does what it does on any
SIGTERM: its listening sockets close now (the port refuses new
connections), and the requests in flight finish within ``drain_timeout``.

The master waits in one ``select()`` on the workers' ready pipes and on a
signal wakeup pipe (``signal.set_wakeup_fd``): signals, exits and due
restarts are handled in one loop, in order, with no work in a signal
handler. Its events are structlog lines: ``workers starting``, ``worker
started``, ``workers ready``, ``worker exited`` (with ``code`` or
``signal``, and ``restart_in``), ``worker restart``, ``stopping``.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from ..metrics import worker_exited

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "STABLE_AFTER", "run_workers"]

log = structlog.get_logger("sluice")

BACKOFF_FIRST = 0.1  # seconds before the first restart of a worker
BACKOFF_MAX = 10.0  # the cap: a crash loop forks once per this, at most
STABLE_AFTER = 30.0  # a worker up this long was not crash-looping: its backoff starts again

Target = Callable[[bool, Callable[[], None], int], None]

# What the master does with each signal: forward it as (stop mode).
_FORWARD = {
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGINT: signal.SIGTERM,
    signal.SIGQUIT: signal.SIGQUIT,
    signal.SIGHUP: signal.SIGHUP,
    signal.SIGUSR1: signal.SIGUSR1,
}
_STOP_MODE = {signal.SIGTERM: "drain", signal.SIGINT: "drain", signal.SIGQUIT: "fast"}
_WATCHED = (*_FORWARD, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_workers(n: int, target: Target, *, reserved: Sequence[socket.socket] = (),
                on_ready: Callable[[], None] | None = None) -> int:
    """Run ``target(reuse_port, ready, index)`` in-process (n == 1) or in n forked workers.

    ``ready()`` is called by the worker once it listens; ``on_ready()`` is
    called (in this process) once every worker listens. ``index`` is the
    worker's stable number, 0..n-1 (0 in-process): a replacement gets the
    index of the worker it replaces, so "worker 0" always exists once.
    ``reserved`` are the ports' reservation sockets, held here and closed in
    each worker.
    """
    if n == 1:
        target(False, on_ready or (lambda: None), 0)
        return 0
    return _Master(n, target, reserved, on_ready).run()


@dataclass(eq=False)
class _Worker:
    index: int
    pid: int
    ready_fd: int | None  # open until the worker said it listens, or died
    started: float
    first: bool  # one of the first n: dying before it listens fails the start
    ready: bool = False


def _die_with_master(master: int) -> None:
    """Have the kernel SIGTERM this worker when the master dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("worker cannot follow the master's death", errno=ctypes.get_errno())
    if os.getppid() != master:  # the master died between fork() and prctl(): no signal will come
        os._exit(1)


def _noop(_signum: int, _frame) -> None:
    """The signal's number reaches the wakeup pipe; the loop does the rest."""


class _Master:
    def __init__(self, n: int, target: Target, reserved: Sequence[socket.socket],
                 on_ready: Callable[[], None] | None) -> None:
        self.n = n
        self.target = target
        self.reserved = reserved
        self.on_ready = on_ready
        self.workers: dict[int, _Worker] = {}  # by pid
        self.backoff = [BACKOFF_FIRST] * n  # by index: the next restart's delay
        self.due: dict[int, float] = {}  # index -> when (monotonic) its replacement starts
        self.stopping: str | None = None  # "drain", "fast" or "failed"
        self.announced = False
        self.code = 0
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()

    def run(self) -> int:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        previous_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, _noop) for sig in _WATCHED}
        try:
            log.info("workers starting", workers=self.n, pid=os.getpid())
            for index in range(self.n):
                self.spawn(index, first=True)
            while self.workers or self.due:
                timeout = max(0.0, min(self.due.values()) - time.monotonic()) if self.due else None
                for key, _ in self.selector.select(timeout):
                    if key.fd == self.wake_r:
                        self.signals()
                    else:
                        self.reported(key.data)
                self.reap()
                self.restart_due()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.selector.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
        return self.code

    # -- workers -------------------------------------------------------------

    def spawn(self, index: int, first: bool = False) -> None:
        master = os.getpid()
        ready_r, ready_w = os.pipe()
        # No signal may run the master's handler in the child between fork()
        # and its reset: it would write to the master's wakeup pipe.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            self._become_worker(master, mask)
            self._work(ready_w, index)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        worker = _Worker(index, pid, ready_r, time.monotonic(), first)
        self.workers[pid] = worker
        self.selector.register(ready_r, selectors.EVENT_READ, worker)
        log.info("worker started", pid=pid, index=index)

    def _become_worker(self, master: int, mask: set) -> None:
        """In the fresh child: drop what is the master's, then unblock signals."""
        signal.set_wakeup_fd(-1)
        for sig in _WATCHED:
            signal.signal(sig, signal.SIG_DFL)
        # A reload or a log reopen that comes before the worker's own
        # receiver is up must not be its death (their default).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.selector.close()
        for fd in (self.wake_r, self.wake_w, *(w.ready_fd for w in self.workers.values() if w.ready_fd is not None)):
            os.close(fd)
        for sock in self.reserved:
            sock.close()
        _die_with_master(master)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _work(self, ready_w: int, index: int) -> None:
        def ready() -> None:
            os.write(ready_w, b"!")

        code = 0
        try:
            self.target(True, ready, index)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - report, never return into the master's code
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def reported(self, worker: _Worker) -> None:
        """Its ready pipe is readable: it listens (``!``), or it died first (EOF)."""
        self._read_ready(worker)
        if not self.announced and self.stopping is None \
                and sum(w.ready for w in self.workers.values()) == self.n:
            self.announced = True
            log.info("workers ready", workers=self.n, pids=sorted(self.workers))
            if self.on_ready is not None:
                self.on_ready()

    def _read_ready(self, worker: _Worker) -> None:
        if worker.ready_fd is None:
            return
        try:
            worker.ready = os.read(worker.ready_fd, 1) == b"!"
        except BlockingIOError:
            return
        self.selector.unregister(worker.ready_fd)
        os.close(worker.ready_fd)
        worker.ready_fd = None

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            worker_exited(pid)  # its live gauges leave the metrics' sums
            self._read_ready(worker)  # it may have said so just before it died
            if worker.ready_fd is not None:  # it died with the pipe empty
                self.selector.unregister(worker.ready_fd)
                os.close(worker.ready_fd)
                worker.ready_fd = None
            self.exited(worker, os.waitstatus_to_exitcode(status))

    def exited(self, worker: _Worker, code: int) -> None:
        now = time.monotonic()
        fields = {
            "pid": worker.pid,
            "index": worker.index,
            "code": code if code >= 0 else None,
            "signal": signal.Signals(-code).name if code < 0 else None,
            "uptime": round(now - worker.started, 3),
        }
        if self.stopping is not None:
            # Killed by the signal it was sent (before its own handler was
            # up, at startup) is a clean stop too.
            if code not in (0, -signal.SIGTERM, -signal.SIGQUIT) and self.code == 0:
                self.code = 1
            log.info("worker exited", **fields, restart_in=None)
            return
        if worker.first and not worker.ready:
            # It could not even start (a port, a plugin's startup): a
            # replacement would only fail again. Stop the others and report.
            log.error("worker exited", **fields, restart_in=None, listening=False)
            self.code = code if code > 0 else 1
            self.stop("failed", signal.SIGTERM)
            return
        if now - worker.started >= STABLE_AFTER:
            self.backoff[worker.index] = BACKOFF_FIRST
        delay = self.backoff[worker.index]
        self.backoff[worker.index] = min(delay * 2, BACKOFF_MAX)
        self.due[worker.index] = now + delay
        log.warning("worker exited", **fields, restart_in=delay)

    def restart_due(self) -> None:
        now = time.monotonic()
        for index, when in sorted(self.due.items()):
            if when <= now:
                del self.due[index]
                log.info("worker restart", index=index)
                self.spawn(index)

    # -- signals ---------------------------------------------------------------

    def signals(self) -> None:
        try:
            received = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        for signum in received:
            sig = signal.Signals(signum)
            if sig == signal.SIGCHLD:
                continue  # the loop reaps after every wakeup
            mode = _STOP_MODE.get(sig)
            if mode is not None:
                if self.stopping is None or mode == "fast":  # a drain can still become fast
                    self.stop(mode, _FORWARD[sig], sig.name)
                continue
            log.info("signal forwarded", signal=sig.name, workers=len(self.workers))
            self.kill_all(_FORWARD[sig])

    def stop(self, mode: str, sig: signal.Signals, why: str = "") -> None:
        if self.stopping != mode:
            log.info("stopping", mode=mode, signal=why or None, workers=len(self.workers))
        self.stopping = mode
        self.due.clear()  # no replacement starts once stopping
        self.kill_all(sig)

    def kill_all(self, sig: signal.Signals) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
