"""What status checks will need: the poller knows it, the governor keeps room for it.

Creates may use every request of the hour that status checks will not need. What they
will need is forecast by whoever schedules them (:class:`~importer.poller.StatusPoller`:
it knows the groups in flight, its poll interval and how long imports take), and handed
to the :class:`~importer.governor.Governor` through :class:`StatusForecast`. The
governor asks for it when it is about to admit a create; tests give it a fixed one.

A forecast is a :class:`Demand`: how many status requests are expected between now and
any later moment. It is a cumulative curve (piecewise linear, with steps where a
listing is due at once) and a *floor*, a rate of requests always counted on, whatever
the curve says, for as long as status checks are foreseen at all: the guarantee that
images can still be checked once the hour's budget is spent, should the curve be wrong
(imports slower than learned, say).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Demand:
    """Status requests expected from ``origin`` on.

    ``times`` (absolute, on the governor's clock, non-decreasing) and ``counts``
    (cumulative requests expected from ``origin`` to each time, non-decreasing) are the
    curve's corners; a time given twice is a step. The curve is flat after its last
    corner. ``floor_interval``: at least one request per that many seconds is counted
    on, one at once (``inf``: no floor), until ``floor_until``.
    """

    origin: float
    times: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()
    floor_interval: float = math.inf
    floor_until: float = math.inf

    def __post_init__(self) -> None:
        if len(self.times) != len(self.counts):
            raise ValueError("a demand needs as many counts as times")
        if not self.floor_interval > 0:
            raise ValueError("floor_interval must be positive")

    @classmethod
    def of(cls, origin: float, corners: Sequence[tuple[float, float]], **rest: float) -> Demand:
        """A demand through ``corners`` (time, cumulative count)."""
        return cls(origin, tuple(t for t, _ in corners), tuple(c for _, c in corners), **rest)

    def _curve(self, when: float, *, before: bool = False) -> float:
        """The curve at ``when``, after its steps at ``when`` (or ``before`` them)."""
        times = self.times
        if before:
            index = bisect.bisect_left(times, when)
            if index < len(times) and times[index] == when:
                return self.counts[index]
            index -= 1
        else:
            index = bisect.bisect_right(times, when) - 1
        if index < 0:
            return 0.0
        if index >= len(times) - 1:
            return self.counts[-1]
        t0, t1 = times[index], times[index + 1]
        c0, c1 = self.counts[index], self.counts[index + 1]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0)

    def between(self, start: float, end: float) -> float:
        """Requests expected from ``start`` to ``end``, both included (a step at ``start``
        is due then), or the floor's count over that span if more: one at ``start`` and
        one per ``floor_interval`` after."""
        if end < start:
            return 0.0
        curve = self._curve(end) - self._curve(start, before=True)
        floor = 0.0
        if not math.isinf(self.floor_interval) and start <= self.floor_until:
            floor = 1 + (min(end, self.floor_until) - start) / self.floor_interval
        return max(curve, floor)


NO_DEMAND = Demand(origin=-math.inf)


class StatusForecast(Protocol):
    """Tells the governor what status checks will need from ``now`` on."""

    def demand(self, now: float) -> Demand:
        """The status requests expected from ``now`` (the governor's clock) on."""
        ...


@dataclass(frozen=True)
class FixedForecast:
    """A forecast that never changes: ``requests`` spread evenly over ``within`` seconds.

    For tests, and for callers without a poller.
    """

    requests: float
    within: float = 3600.0

    def demand(self, now: float) -> Demand:
        return Demand.of(now, [(now, 0.0), (now + self.within, self.requests)])
