"""Windows over cumulative series: what ``increase()`` and
``histogram_quantile()`` compute in Prometheus, over samples kept here.

The evaluator samples aggregated counters every ``interval``; a ``Ring``
keeps one rule's samples for its window (and no more: its length is
bounded by window / interval). A window's increase is the newest sample
minus the oldest one still inside the window. A total that went down means
the counters restarted (a new metrics directory): the ring starts over
rather than report a negative increase.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

__all__ = ["Ring", "quantile"]


class Ring:
    """Samples ``(time, values)`` of cumulative values, for one window."""

    def __init__(self, window: float, interval: float) -> None:
        self.window = window
        # One sample at or before the window's start, plus one per interval in it.
        self._samples: deque[tuple[float, dict]] = deque(maxlen=math.ceil(window / interval) + 2)

    def add(self, now: float, values: Mapping) -> None:
        if self._samples and any(values.get(k, 0.0) < v for k, v in self._samples[-1][1].items()):
            self._samples.clear()  # a counter reset
        self._samples.append((now, dict(values)))

    def increase(self) -> dict | None:
        """Each value's increase over the window; None before two samples.

        The base is the newest sample at or before ``now - window`` (else the
        oldest kept), so a window of 60 s with samples every 5 s compares
        values 60 s apart, as ``increase(x[60s])`` does (without its
        extrapolation to the window's edges)."""
        if len(self._samples) < 2:
            return None
        now, newest = self._samples[-1]
        base = self._samples[0][1]
        for t, values in self._samples:
            if t > now - self.window:
                break
            base = values
        return {k: v - base.get(k, 0.0) for k, v in newest.items()}


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative bucket counts by upper
    bound (``+Inf`` included): the bucket the rank falls in, and a linear
    interpolation inside it. None when there are no observations; the
    highest finite bound when the rank is in the ``+Inf`` bucket, as
    Prometheus answers."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower if len(bounds) > 1 else None
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None
