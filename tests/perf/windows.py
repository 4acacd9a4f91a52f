"""Sliding request windows, as DigitalOcean counts them: the benchmark's own, small and exact.

The lower bounds and the strong baseline's pacer use this rather than the importer's
governor, so that the yardstick does not move when the importer's internals do.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

MINUTE = 60.0
HOUR = 3600.0


class RequestLog:
    """Send times under several sliding windows: at most ``limit`` requests in any ``period``."""

    def __init__(self, *windows: tuple[int, float]) -> None:
        if not windows or any(limit < 1 or period <= 0 for limit, period in windows):
            raise ValueError(f"each window needs limit >= 1 and period > 0, got {windows}")
        self._windows = [(limit, period, deque[float]()) for limit, period in windows]

    @classmethod
    def per(cls, per_minute: int, per_hour: int) -> RequestLog:
        return cls((per_minute, MINUTE), (per_hour, HOUR))

    def wait_time(self, now: float) -> float:
        """Seconds until one more request fits in every window (0 if it fits now)."""
        wait = 0.0
        for limit, period, times in self._windows:
            while times and times[0] + period <= now:
                times.popleft()
            if len(times) >= limit:
                wait = max(wait, times[len(times) - limit] + period - now)
        return wait

    def next_slot(self, now: float) -> float:
        """The earliest time at or after ``now`` when one more request fits."""
        # Waiting for one window can leave another full: wait until all have room. (At least
        # one step up: a wait below the float spacing at `now` would never end.)
        while (wait := self.wait_time(now)) > 0:
            now = max(now + wait, math.nextafter(now, math.inf))
        return now

    def record(self, now: float) -> None:
        for _, _, times in self._windows:
            times.append(now)


def fastest_sends(count: int, per_minute: int, per_hour: int) -> Iterator[float]:
    """The send times of ``count`` requests at the fastest pace both windows allow, from 0."""
    log = RequestLog.per(per_minute, per_hour)
    now = 0.0
    for _ in range(count):
        now = log.next_slot(now)
        log.record(now)
        yield now
