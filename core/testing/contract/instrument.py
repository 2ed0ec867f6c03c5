"""The instrument that tells a blocking step from a preempted one.

A trio ``Instrument`` sees every task step begin and end: the time between
is how long the task held the loop. Wall time alone would blame a filter
for a busy machine, so a long step counts only when the thread spent it on
the CPU or gave the CPU up of its own accord (see ``_Steps``).
"""

from __future__ import annotations

import resource
from time import perf_counter, thread_time
from typing import Any

import trio

_HARNESS = "sluice-contract"  # task names of the battery's own clients and origin


class _Steps(trio.abc.Instrument):
    """Times every task step; keeps the proxy's steps past the threshold.

    A step counts as blocking when it took longer than the threshold and
    either spent that long on the CPU or gave the CPU up of its own accord
    (a sleep, a blocking read: a voluntary context switch). A step that was
    only preempted, on a busy machine running other tests, is not the
    filter's doing and is not blamed on it."""

    def __init__(self, threshold: float, main: Any) -> None:
        self.threshold = threshold
        self.main = main
        self.longest: tuple[float, str] = (0.0, "")
        self.slow: list[tuple[float, float, str]] = []
        self._began: tuple[float, float, int] | None = None

    def before_task_step(self, task) -> None:
        self._began = (perf_counter(), thread_time(), _waits())

    def after_task_step(self, task) -> None:
        began, self._began = self._began, None
        if began is None or task is self.main:
            return
        took = perf_counter() - began[0]
        if took > self.longest[0] and not _harness(task):
            self.longest = (took, task.name)
        if took > self.threshold and not _harness(task):
            cpu = thread_time() - began[1]
            if cpu > self.threshold or _waits() > began[2]:
                self.slow.append((took, cpu, task.name))


def _waits() -> int:
    """Voluntary context switches of this thread so far."""
    return resource.getrusage(_THREAD).ru_nvcsw


_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


def _harness(task) -> bool:
    """Whether ``task`` is one of the battery's own (a client, the origin)."""
    while task is not None:
        if task.name.startswith(_HARNESS):
            return True
        nursery = task.parent_nursery
        task = nursery.parent_task if nursery is not None else None
    return False
