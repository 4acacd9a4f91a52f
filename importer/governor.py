"""The governor: how many requests may be in flight, and when the next may leave.

Three rules, all enforced in :meth:`Governor.slot`:

* at most ``concurrency`` requests in flight;
* at most ``limit`` requests in any sliding window of ``period`` seconds, for
  each window (DigitalOcean counts each request for one minute in its burst
  limit and for one hour in its hourly one: a sliding log, not a fixed window);
* after a 429, nobody sends until the pause the API asked for is over.

Callers queue in FIFO order, so no request waits forever behind later ones.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import structlog

from importer.api import RateLimit
from importer.clock import Clock


@dataclass(frozen=True)
class Window:
    """At most ``limit`` requests in any ``period`` seconds."""

    limit: int
    period: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period <= 0:
            raise ValueError(f"a window needs limit >= 1 and period > 0, got {self}")


class SlidingLog:
    """The send times of the last ``limit`` requests, to tell when one more may go.

    ``margin`` seconds are added to the window: the server stamps a request when
    it arrives, which is a little after we sent it, and by a different amount for
    each request; a request sent the instant ours expires could still find it there.
    """

    def __init__(self, window: Window, margin: float = 0.0) -> None:
        self.window = window
        self._span = window.period + margin
        self._times: deque[float] = deque(maxlen=window.limit)

    def wait_time(self, now: float) -> float:
        """Seconds until one more request fits in the window (0 if it fits now)."""
        if len(self._times) < self.window.limit:
            return 0.0
        return max(0.0, self._times[0] + self._span - now)

    def record(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float) -> int:
        """Requests sent in the last ``period`` seconds."""
        horizon = now - self.window.period
        return sum(1 for t in self._times if t > horizon)


class Governor:
    """Admits requests under a concurrency limit, sliding windows and 429 pauses."""

    def __init__(
        self,
        clock: Clock,
        *,
        concurrency: int,
        windows: Sequence[Window],
        margin: float = 1.0,
        default_pause: float = 5.0,
        max_pause: float = 3600.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._clock = clock
        self._in_flight = anyio.CapacityLimiter(concurrency)
        self._logs = [SlidingLog(w, margin) for w in windows]
        self._queue = anyio.Lock()  # anyio's Lock is fair: FIFO
        self._paused_until = -math.inf
        self._consecutive_429 = 0
        self._default_pause = default_pause
        self._max_pause = max_pause
        self._log = structlog.get_logger("importer.governor")
        #: Requests admitted so far.
        self.admitted = 0
        #: 429 answers observed.
        self.rate_limited = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for permission to send one request; hold it while the request runs."""
        async with self._in_flight:
            await self._admit()
            yield

    async def _admit(self) -> None:
        async with self._queue:
            while True:
                now = self._clock.monotonic()
                wait = max(
                    self._paused_until - now,
                    *(log.wait_time(now) for log in self._logs),
                )
                if wait <= 0:
                    break
                await self._clock.sleep(wait)
            for log in self._logs:
                log.record(now)
            self.admitted += 1

    def observe(self, status: int, rate: RateLimit) -> None:
        """Learn from a response: a 429 pauses everyone, anything else resets the backoff."""
        if status != 429:
            self._consecutive_429 = 0
            return
        self.rate_limited += 1
        self._consecutive_429 += 1
        pause = self._pause_for(rate)
        until = self._clock.monotonic() + pause
        if until > self._paused_until:
            self._paused_until = until
            self._log.warning("rate_limit.paused", seconds=round(pause, 3))

    def _pause_for(self, rate: RateLimit) -> float:
        if rate.retry_after is not None and rate.retry_after >= 0:
            return min(rate.retry_after, self._max_pause)
        if rate.reset is not None and rate.remaining == 0:
            # Hourly limit: nothing frees up before the oldest request expires.
            return min(max(0.0, rate.reset - self._clock.wall()), self._max_pause)
        # No hint: back off exponentially on repeated 429s.
        return min(self._default_pause * 2.0 ** (self._consecutive_429 - 1), self._max_pause)

    def window_counts(self) -> list[int]:
        """Requests in each window right now (for progress and tests)."""
        now = self._clock.monotonic()
        return [log.count(now) for log in self._logs]
