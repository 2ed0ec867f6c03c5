"""The contract's rules, as failure messages name them, and the verdict
that checks them after every scenario (``ContractViolation`` names each one
broken, with the filter and the scenario):

- ``on_complete`` runs exactly once per exchange for the filter, aborted and
  cancelled exchanges included (an exchange is what the first probe's
  request phase or any watched ``on_complete`` saw, tagged in ``ctx.vars``),
  and ``on_response_headers`` at most once, whatever reply the core made;
- no exception escapes a phase: none raised through the battery's wrapper of
  each phase the filter overrides, no error-level sluice log event, no
  ``FE`` flag;
- no step blocks the loop: a ``trio.abc.Instrument`` times every task step
  of the proxy (the battery's own client and origin tasks excepted); one
  longer than ``block_threshold`` fails, naming the task, if it spent that
  long on the CPU or waited of its own accord (a sleep, blocking I/O), not
  when it was merely preempted on a busy machine. Automatic garbage
  collection is off while a scenario runs, so a collector pause is not
  blamed on the filter;
- framing stays correct: each response parses, its body is as long as its
  Content-Length with nothing after it, and each request the origin got
  holds as many bytes as its Content-Length says; with no body phase in
  the filter, the origin's echo comes back byte for byte;
- per-request state is released: once the proxy has stopped and
  ``gc.collect()`` ran, no ``Context`` of the scenario and no weakly
  referenceable ``ctx.state(filter)`` object is alive, and no container held
  by the filter instance grew with the number of requests;
- no state crosses requests: each of the keep-alive and concurrent
  exchanges gets its own response, and the origin gets each request as
  it was sent;
- every exchange ends: every client wait is bounded, and a hang fails;
- the scenario ran as designed: the core gave the answer the scenario
  provokes (a 503 for the closed port, ...) unless a filter answered
  itself, and a plain GET reaches the origin, so a filter refusing every
  request (an auth filter without ``request_headers``) fails instead of
  passing by testing nothing.

The checks a scenario asks for itself (an expected status, an echo, the
origin's requests) are ``_Run``'s; they run here, before the rules that
hold for every scenario.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from ...proxy.context import Context

if TYPE_CHECKING:
    from .run import _Run

ONCE = "on_complete runs exactly once"
HEAD_ONCE = "on_response_headers runs at most once"
RAISED = "no exception escapes a phase"
BLOCKED = "no step blocks the event loop"
FRAMING = "framing stays correct"
RELEASED = "per-request state is released"
ENDED = "every exchange ends"
ISOLATED = "no state crosses requests"
DESIGNED = "the scenario ran as designed"  # the battery's own check that it tested what it says


class ContractViolation(AssertionError):
    """A filter broke the contract; the message lists every rule broken."""


def verdict(run: _Run, errors: list[str]) -> None:
    """Check every rule over what ``run`` recorded (``errors``: the
    error-level log events); raise ContractViolation listing each broken."""
    __tracebackhide__ = True
    rec = run.recorder
    name = run.cls.name
    for check in run.later:
        check()
    if not rec.instances:
        run.violate(ONCE, f"the proxy never built filter {name!r} through the battery's watch "
                          "(does its from_config build another class without calling the base?)")
    for n, exchange in sorted(rec.exchanges.items()):
        times = rec.completes.get((name, n), 0)
        if times != 1:
            run.violate(ONCE, f"on_complete ran {times} times for exchange #{n}: {exchange}")
        heads = rec.response_heads.get(n, 0)
        if heads > 1:
            run.violate(HEAD_ONCE, f"on_response_headers ran {heads} times for exchange #{n}: {exchange}")
        if "FE" in exchange.flags:
            run.violate(RAISED, f"exchange #{n} failed with flag FE (a filter raised, or broke the "
                                f"framing): {exchange}")
            if "content-length" in exchange.error.lower():  # the core refused to send a mis-framed body
                run.violate(FRAMING, f"exchange #{n}: a body phase changed the body's size but not its "
                                     f"Content-Length: {exchange}")
    for raised in dict.fromkeys(rec.raised):
        run.violate(RAISED, raised)
    for event in dict.fromkeys(errors):
        run.violate(RAISED, f"sluice logged the error {event}")
    if run.steps is not None:
        for took, cpu, task in run.steps.slow[:3]:
            run.violate(BLOCKED, f"a step of task {task!r} took {took * 1000:.0f} ms, {cpu * 1000:.0f} ms "
                                 f"of it on the CPU (block_threshold {run.spec.options.block_threshold * 1000:.0f} ms)")
    exchanges = len(rec.exchanges) - run.exchanges_before
    if exchanges >= 10:
        for attr, size in run.sizes.items():
            grew = size - run.baseline.get(attr, 0)
            if grew >= exchanges // 2:
                run.violate(RELEASED, f"{attr} grew by {grew} over {exchanges} exchanges "
                                      "(and stayed so after the proxy stopped)")
    run.recorder = None  # nothing of ours holds the scenario's objects now
    gc.collect()
    alive = sum(1 for o in gc.get_objects() if type(o) is Context and id(o) in rec.context_ids)
    if alive:
        run.violate(RELEASED, f"{alive} of the scenario's {len(rec.context_ids)} request contexts are still "
                              "alive after the proxy stopped (held by the filter?)")
    kept = [kind for ref, kind in rec.states if ref() is not None]
    if kept:
        run.violate(RELEASED, f"{len(kept)} per-request state objects ({kept[0]}) are still alive "
                              "after their exchanges ended")
    if run.violations:
        order = [ONCE, HEAD_ONCE, RAISED, BLOCKED, FRAMING, RELEASED, ISOLATED, ENDED, DESIGNED]
        ranked = sorted(run.violations, key=lambda v: order.index(v[0]) if v[0] in order else len(order))
        lines = [f"  - {rule}: {detail}" for rule, detail in ranked]
        steps = run.steps.longest if run.steps is not None else (0.0, "")
        raise ContractViolation(
            f"filter {name!r} broke the contract in scenario {run.scenario!r}:\n" + "\n".join(lines)
            + f"\n  (longest proxy step: {steps[0] * 1000:.1f} ms in task {steps[1]!r})")
