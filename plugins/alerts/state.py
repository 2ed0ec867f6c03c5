"""An alert's life: inactive -> pending -> firing -> resolved, per instance.

A rule has instances, one per label set it is about (a route, a cluster,
an endpoint). Each evaluation gives every instance a value (or none: no
data, or no longer there). The rules, as a table:

==========  ====================================  =========================
state       when                                  becomes
==========  ====================================  =========================
inactive    value above threshold                 pending (firing at once
                                                  when ``for`` is 0)
pending     above threshold for ``for`` seconds   firing  -> notify firing
pending     not above threshold                   inactive (nothing sent)
firing      value at or below resolve_threshold,  inactive -> notify
            or no value                           resolved
==========  ====================================  =========================

``resolve_threshold`` defaults to ``threshold``. Boolean kinds give 1 or 0
against a threshold of 0. No I/O here: ``step`` returns the transitions
and the caller logs and sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Instance", "RuleState", "Transition", "step"]

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Instance:
    labels: Labels
    state: str = "inactive"  # inactive | pending | firing
    since: float = 0.0  # wall time the condition started holding (pending or firing)
    value: float | None = None
    fired_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Transition:
    labels: Labels
    state: str  # "firing" or "resolved"
    value: float | None
    starts_at: float  # wall time the condition started holding
    ends_at: float | None  # wall time it stopped (resolved)


@dataclass(slots=True)
class RuleState:
    instances: dict[Labels, Instance] = field(default_factory=dict)

    def firing(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state == "firing"]


def step(state: RuleState, values: dict[Labels, float | None], now: float, *,
         threshold: float, resolve_threshold: float | None, hold: float) -> list[Transition]:
    """Advance every instance by one evaluation at wall time ``now``."""
    resolve = threshold if resolve_threshold is None else resolve_threshold
    out = []
    for labels in set(state.instances) | set(values):
        value = values.get(labels)
        inst = state.instances.get(labels)
        if inst is None:
            inst = state.instances[labels] = Instance(labels)
        inst.value = value
        if inst.state == "firing":
            if value is None or value <= resolve:
                out.append(Transition(labels, "resolved", value, inst.since, now))
                inst.state = "inactive"
        elif value is not None and value > threshold:
            if inst.state == "inactive":
                inst.state, inst.since = "pending", now
            if now - inst.since >= hold:
                inst.state, inst.fired_at = "firing", now
                out.append(Transition(labels, "firing", value, inst.since, None))
        else:
            inst.state = "inactive"
        if inst.state == "inactive" and labels not in values:
            del state.instances[labels]  # gone and quiet: forget it
    return out
