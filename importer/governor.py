"""The governor: how many requests may be in flight, and when the next may leave.

Four rules, all enforced in :meth:`Governor.slot`:

* at most ``concurrency`` requests in flight;
* at most ``limit`` requests in any sliding window of ``period`` seconds, for
  each window (DigitalOcean counts each request for one minute in its burst
  limit and for one hour in its hourly one: a sliding log, not a fixed window);
* what other users of the token spend comes off the hourly budget: every answer's
  ``ratelimit-remaining`` says how much of the hour the token has used, and what
  is not ours is theirs;
* after a 429, nobody sends until the pause the API asked for is over.

Requests wait in priority order, FIFO within a priority: status checks (few, and
each one that waits delays what the run learns) go before creates (many, and
each waiting one only delays itself). Neither starves: status checks are paced
by the poller, and creates get everything else, except two things kept for
status checks: one request in flight, and ``status_share`` of the hourly window.
The latter matters when the hour's budget is spent: for the rest of that hour
nothing frees up, and without a share kept back, no image could be checked.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import anyio
import structlog

from importer.api import RateLimit
from importer.clock import Clock

HOUR = 3600.0


class Priority(IntEnum):
    """Who goes first when several requests wait: lower first."""

    STATUS = 0
    CREATE = 1


@dataclass(frozen=True)
class Window:
    """At most ``limit`` requests in any ``period`` seconds."""

    limit: int
    period: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period <= 0:
            raise ValueError(f"a window needs limit >= 1 and period > 0, got {self}")


class SlidingLog:
    """The send times of recent requests, to tell when one more may go.

    ``margin`` seconds are added to the window: the server stamps a request when
    it arrives, which is a little after we sent it, and by a different amount for
    each request; a request sent the instant ours expires could still find it there.
    """

    def __init__(self, window: Window, margin: float = 0.0) -> None:
        self.window = window
        self._span = window.period + margin
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        horizon = now - self._span
        while self._times and self._times[0] <= horizon:
            self._times.popleft()

    def wait_time(self, now: float, spent_elsewhere: int = 0) -> float:
        """Seconds until one more request fits (0 if it fits now).

        ``spent_elsewhere`` requests (of other users, or kept for others) also
        occupy the window.
        """
        self._expire(now)
        room = self.window.limit - spent_elsewhere
        if room <= 0:
            # Not ours to free: wait as long as our oldest, or a whole window if none.
            return self._span if not self._times else self._times[0] + self._span - now
        if len(self._times) < room:
            return 0.0
        return max(0.0, self._times[len(self._times) - room] + self._span - now)

    def record(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float) -> int:
        """Our requests in the window right now."""
        self._expire(now)
        return len(self._times)


@dataclass(order=True)
class _Waiter:
    priority: int
    sequence: int
    event: anyio.Event = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class _PriorityGate:
    """A semaphore whose waiters are served by priority, then in arrival order.

    A released slot is handed to the next waiter directly, so a newcomer never
    overtakes the queue, and waking one waiter costs O(log n).
    """

    def __init__(self, capacity: int) -> None:
        self._free = capacity
        self._waiters: list[_Waiter] = []
        self._sequence = itertools.count()
        self._arrival: anyio.Event | None = None

    @asynccontextmanager
    async def hold(self, priority: int) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    def outranked(self, priority: int) -> bool:
        """Whether someone more urgent than ``priority`` is waiting."""
        return any(w.priority < priority and not w.cancelled for w in self._waiters)

    async def wait_outranked(self, priority: int) -> None:
        """Return once someone more urgent than ``priority`` waits."""
        while not self.outranked(priority):
            if self._arrival is None:
                self._arrival = anyio.Event()
            await self._arrival.wait()

    async def _acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            # Cancellation may strike only before the slot is ours, never after:
            # a slot taken by a cancelled task would never come back.
            await anyio.lowlevel.checkpoint_if_cancelled()
            self._free -= 1
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(priority, next(self._sequence), anyio.Event())
        heapq.heappush(self._waiters, waiter)
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = None
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.event.is_set():
                self._release()  # the slot was handed to us as we were cancelled
            else:
                waiter.cancelled = True
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = heapq.heappop(self._waiters)
            if not waiter.cancelled:
                waiter.event.set()
                return
        self._free += 1


class Governor:
    """Admits requests under a concurrency limit, sliding windows and 429 pauses."""

    def __init__(
        self,
        clock: Clock,
        *,
        concurrency: int,
        windows: Sequence[Window],
        margin: float = 1.0,
        status_share: float = 0.05,
        default_pause: float = 5.0,
        max_pause: float = 3600.0,
    ) -> None:
        if concurrency < 2:
            raise ValueError("concurrency must be at least 2: one slot is kept for status checks")
        self._clock = clock
        self._in_flight = _PriorityGate(concurrency)
        # Creates may fill all but one slot: a status check never waits for a
        # create that itself waits for budget.
        self._creates = _PriorityGate(concurrency - 1)
        self._head = _PriorityGate(1)
        self._logs = [SlidingLog(w, margin) for w in windows]
        # The window DigitalOcean's ratelimit-* headers describe: the hour.
        self._hourly = next((log for log in self._logs if log.window.period >= HOUR), None)
        # Others' requests seen in the hour, and when the last of those surely expired.
        self._others = 0
        self._others_until = -math.inf
        self._kept_for_status = (
            math.floor(self._hourly.window.limit * status_share) if self._hourly else 0
        )
        self._paused_until = -math.inf
        self._consecutive_429 = 0
        self._default_pause = default_pause
        self._max_pause = max_pause
        self._log = structlog.get_logger("importer.governor")
        #: 429 answers observed.
        self.rate_limited = 0

    @asynccontextmanager
    async def slot(self, priority: Priority = Priority.CREATE) -> AsyncIterator[None]:
        """Wait for permission to send one request; hold it while the request runs."""
        async with contextlib.AsyncExitStack() as stack:
            if priority is Priority.CREATE:
                await stack.enter_async_context(self._creates.hold(priority))
            await stack.enter_async_context(self._in_flight.hold(priority))
            while True:
                async with self._head.hold(priority):
                    if await self._wait_for_budget(priority):
                        break
            yield

    async def _wait_for_budget(self, priority: Priority) -> bool:
        """Wait until the budget allows one more request and take it; ``False`` to yield.

        Whoever waits at the head sleeps until budget frees up; if someone more
        urgent arrived meanwhile, it steps back so that they get that budget.
        """
        while True:
            now = self._clock.monotonic()
            wait = self._budget_wait(now, priority)
            if wait <= 0:
                break
            if await self._sleep_unless_outranked(wait, priority):
                return False
        for log in self._logs:
            log.record(now)
        return True

    async def _sleep_unless_outranked(self, seconds: float, priority: Priority) -> bool:
        """Sleep ``seconds``; ``True`` if cut short because someone more urgent arrived."""
        if self._head.outranked(priority):
            return True
        outranked = False
        async with anyio.create_task_group() as tg:

            async def sleep() -> None:
                await self._clock.sleep(seconds)
                tg.cancel_scope.cancel()

            async def watch() -> None:
                nonlocal outranked
                await self._head.wait_outranked(priority)
                outranked = True
                tg.cancel_scope.cancel()

            tg.start_soon(sleep)
            if priority is not Priority.STATUS:
                tg.start_soon(watch)
        return outranked

    def _budget_wait(self, now: float, priority: Priority) -> float:
        waits = [self._paused_until - now]
        for log in self._logs:
            others = 0
            kept = 0
            if log is self._hourly:
                others = self._others if now < self._others_until else 0
                kept = self._kept_for_status if priority is Priority.CREATE else 0
            wait = log.wait_time(now, others + kept)
            if others:
                # By then every request of theirs that we know of has expired.
                wait = min(wait, max(self._others_until - now, log.wait_time(now, kept)))
            waits.append(wait)
        return max(waits)

    def observe(self, status: int, rate: RateLimit) -> None:
        """Learn from an answer: what others spend, and whether to pause everyone."""
        if rate.limit is not None and rate.remaining is not None and self._hourly is not None:
            now = self._clock.monotonic()
            # The token's use in the hour, less ours, is theirs. Their requests expire
            # at unknown times within the hour; until then, count them all.
            others = max(0, rate.limit - rate.remaining - self._hourly.count(now))
            if others != self._others:
                self._log.info("rate_limit.shared", others=others, remaining=rate.remaining)
            self._others = others
            self._others_until = now + self._hourly.window.period
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

    def charge(self, now: float) -> None:
        """Count a request that left without asking: aiohttp resends some on its own."""
        for log in self._logs:
            log.record(now)
