"""The governor: how many requests may be in flight, and when the next may leave.

Five rules, all enforced in :meth:`Governor.slot`:

* at most ``concurrency`` requests in flight;
* at most ``limit`` requests in any sliding window of ``period`` seconds, for
  each window (DigitalOcean counts each request for one minute in its burst
  limit and for one hour in its hourly one: a sliding log, not a fixed window);
* what other users of the token spend comes off the hourly budget: every
  successful answer's ``ratelimit-remaining`` says how much of the hour the token
  has used, and what is not ours is theirs. A 429's ``ratelimit-remaining`` says
  nothing about the hour (a burst 429 reads 0 however much of the hour is left),
  so 429s never teach it;
* after a 429, nobody sends until the pause is over: ``retry-after`` when the
  API gives it, else a short pause that doubles on each further 429, up to a
  minute;
* then a single *probe* goes alone, one request in flight until one is answered
  without a 429; only then does everyone else follow, at the pace of the windows.
  A burst 429 also says the API's minute is full: the minute window is padded
  with the requests the API must be holding, freed from ``retry-after`` to the
  end of the minute, so that the queue does not rush into a window that frees
  one request at a time.

A 429'd request was not counted by the API (if it was, the next successful
answer's ``ratelimit-remaining`` says so, and it is counted as someone else's),
so it leaves our logs.

Requests wait in priority order, FIFO within a priority: status checks (few, and
each one that waits delays what the run learns) go before creates (many, and
each waiting one only delays itself). Neither starves: status checks are paced
by the poller, and creates get everything else, except two things kept for
status checks: one request in flight, and what the status checks will need of
the hourly window. The latter matters when the hour's budget is spent: for the
rest of that hour nothing frees up, and images must still be checked. What they
will need is a forecast (:mod:`importer.forecast`, from the poller, which knows
its schedule): a create may leave only if, at every moment of the coming hour,
the requests still counted then, plus the status checks forecast until then,
plus this create, fit the window. Creates thus take every request status checks
will not need, and a run needing a few more creates than 95% of the hour no
longer waits a whole hour for them.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import IntEnum

import anyio
import structlog

from importer.api import RateLimit
from importer.clock import Clock
from importer.forecast import Demand, StatusForecast

HOUR = 3600.0
#: A window is checked ahead in this many steps (a create may leave only if the status
#: checks forecast up to the end of each step fit beside what is still counted at its
#: start), and the first step's forecast is kept free right now...
RESERVE_STEPS = 60
#: ...steps of at most this long (the hour is checked minute by minute, the minute
#: second by second). A step counts each request still held at its start until its end,
#: against the checks due by its end: in a minute, where the last minute's listings
#: expire one every few seconds, 5-second steps (12 a window) kept a create or two of
#: each minute idle, and at 3,000 images the last creates waited for the next minute.
RESERVE_STEP = 60.0
#: How long a forecast, and the room it leaves, are used before they are asked again...
RESERVE_REFRESH = 5.0
#: ...at most this share of the window (a window of a few seconds asks more often).
RESERVE_REFRESH_SHARE = 1 / 12
#: Status checks are kept at most this share of a window: a forecast beyond what the
#: window can give (a poll interval of seconds, a limit of a few a minute) must not stop
#: creates altogether.
RESERVE_MAX_SHARE = 0.5
#: A lull longer than this in the hourly window freeing up is where a run that needs
#: one request more waits (see :meth:`Governor.spare`).
SPARE_GAP = 60.0


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

    Besides our own requests, the log may hold requests the server is known to
    hold for someone else (see :meth:`fill`).
    """

    def __init__(self, window: Window, margin: float = 0.0) -> None:
        self.window = window
        self._span = window.period + margin
        self._ours: deque[float] = deque()
        self._theirs: deque[float] = deque()

    def _expire(self, now: float) -> None:
        horizon = now - self._span
        for times in (self._ours, self._theirs):
            while times and times[0] <= horizon:
                times.popleft()

    def _nth_oldest(self, index: int) -> float:
        if not self._theirs:
            return self._ours[index]
        return next(itertools.islice(heapq.merge(self._ours, self._theirs), index, None))

    def wait_time(self, now: float, spent_elsewhere: int = 0) -> float:
        """Seconds until one more request fits (0 if it fits now).

        ``spent_elsewhere`` requests (of other users, or kept for others) also
        occupy the window.
        """
        self._expire(now)
        held = len(self._ours) + len(self._theirs)
        room = self.window.limit - spent_elsewhere
        if room <= 0:
            # Not ours to free: wait as long as our oldest, or a whole window if none.
            return self._span if not held else self._nth_oldest(0) + self._span - now
        if held < room:
            return 0.0
        return max(0.0, self._nth_oldest(held - room) + self._span - now)

    def record(self, now: float) -> None:
        self._ours.append(now)

    def forget(self, sent: float) -> None:
        """Take back one request recorded at ``sent`` (the API did not count it)."""
        # The newest entries are at the right, and the one to forget is recent.
        for index in range(len(self._ours) - 1, -1, -1):
            if self._ours[index] == sent:
                del self._ours[index]
                return

    def fill(self, now: float, first_free: float) -> None:
        """Fill the window up to its limit with others' requests, freed from ``first_free`` on.

        For a window the server says is full now and frees its oldest request at
        ``first_free``: when the rest free is unknown, so they are spread evenly
        over the rest of the window.
        """
        self._expire(now)
        missing = self.window.limit - len(self._ours) - len(self._theirs)
        if missing <= 0:
            return
        last_free = max(first_free, now + self.window.period)
        step = (last_free - first_free) / missing
        # An entry recorded at t frees at t + span.
        theirs = [first_free + i * step - self._span for i in range(missing)]
        self._theirs = deque(heapq.merge(self._theirs, theirs))

    def count(self, now: float) -> int:
        """Our requests in the window right now."""
        self._expire(now)
        return len(self._ours)

    def held_after(self, when: float) -> int:
        """Requests (ours and others' known) still in the window just after ``when``."""
        horizon = when - self._span
        return sum(len(times) - bisect.bisect_right(times, horizon) for times in self._held())

    def held_times(self, now: float) -> list[float]:
        """The send times of every request in the window now, oldest first."""
        self._expire(now)
        return list(heapq.merge(*self._held()))

    def _held(self) -> tuple[deque[float], ...]:
        return (self._ours, self._theirs) if self._theirs else (self._ours,)

    @property
    def span(self) -> float:
        """How long a request stays in the window (the period and the margin)."""
        return self._span


class _Reserve:
    """The room one window leaves creates beside what status checks will need.

    A create may leave only if, at every step of the window ahead, the requests still
    counted then, plus the status checks forecast from now until the end of that step,
    plus the create, fit the limit. The first step is the window's ordinary check with
    its forecast kept free; the rest is computed at most once per ``refresh`` while it
    lasts, each request admitted since taking one from it (a status check the forecast
    counted too, which errs on the safe side until the next computation).
    """

    def __init__(self, log: SlidingLog) -> None:
        self.log = log
        self.step = min(RESERVE_STEP, log.span / RESERVE_STEPS)
        # Not every step: a minute's room computed each second would wake every create
        # waiting for it each second, for nothing most of the time.
        self.refresh = min(RESERVE_REFRESH, log.span * RESERVE_REFRESH_SHARE)
        self.most = math.floor(log.window.limit * RESERVE_MAX_SHARE)
        self._room = 0
        self._at = -math.inf
        self.admitted = 0

    def soon(self, now: float, demand: Demand) -> int:
        """What status checks need within the first step: kept free now."""
        return min(self.most, _whole(demand.between(now, now + self.step)))

    def later_wait(self, now: float, demand: Demand, theirs: int, until: float) -> float:
        """0 if a create leaves room for the status checks after the first step, else how
        long until that is asked again. ``theirs`` requests of others count until ``until``."""
        if now - self._at >= self.refresh or self._room - self.admitted < 1 <= self._room:
            self._room = self._later_room(now, demand, theirs, until)
            self._at = now
            self.admitted = 0
        if self._room - self.admitted >= 1:
            return 0.0
        return max(self._at + self.refresh - now, 1e-3)

    def _later_room(self, now: float, demand: Demand, theirs: int, until: float) -> int:
        log = self.log
        limit = log.window.limit
        end = now + log.span
        room = limit
        start = now + self.step
        while start < end:
            stop = min(start + self.step, end)
            others = theirs if start < until else 0
            need = min(self.most, _whole(demand.between(now, stop)))
            room = min(room, limit - others - log.held_after(start) - need)
            start = stop
        return room


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


@dataclass(eq=False)
class _Ticket:
    """One admitted request: when it was logged, and under which pause it left."""

    governor: Governor
    sent: float
    #: The governor's pause count when it left: a 429 to a request that left
    #: before the latest pause began tells nothing new.
    epoch: int
    probe: bool
    answered: bool = False


# The request the current task holds a slot for, so that ``observe`` (called by
# the client inside the slot) knows which request an answer is about.
_HELD: ContextVar[_Ticket | None] = ContextVar("importer_governor_held", default=None)


class Governor:
    """Admits requests under a concurrency limit, sliding windows and 429 pauses."""

    def __init__(
        self,
        clock: Clock,
        *,
        concurrency: int,
        windows: Sequence[Window],
        margin: float = 0.25,
        forecast: StatusForecast | None = None,
        default_pause: float = 2.0,
        max_probe_pause: float = 60.0,
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
        # The burst window a retry-after speaks of: the shortest one under an hour.
        short = [log for log in self._logs if log.window.period < HOUR]
        self._burst = min(short, key=lambda log: log.window.period) if short else None
        # Others' requests seen in the hour, and when the last of those surely expired.
        self._others = 0
        self._others_until = -math.inf
        # What status checks will need; none is kept for them without a forecast.
        self._forecast = forecast
        self._demand: Demand | None = None
        self._demand_at = -math.inf
        self._reserves = {id(log): _Reserve(log) for log in self._logs}
        self._paused_until = -math.inf
        # Pauses begun so far; each 429 to a request sent under the latest one begins another.
        self._epoch = 0
        # After a 429: one request at a time until one gets through.
        self._probing = False
        self._probe_out = False
        self._changed: anyio.Event | None = None
        self._consecutive_429 = 0
        self._default_pause = default_pause
        self._max_probe_pause = max_probe_pause
        self._max_pause = max_pause
        self._log = structlog.get_logger("importer.governor")
        #: 429 answers observed.
        self.rate_limited = 0

    def use_forecast(self, forecast: StatusForecast) -> None:
        """Keep for status checks what ``forecast`` says they will need (set once, early)."""
        self._forecast = forecast
        self._demand = None
        self._reserves = {id(log): _Reserve(log) for log in self._logs}

    @asynccontextmanager
    async def slot(self, priority: Priority = Priority.CREATE) -> AsyncIterator[None]:
        """Wait for permission to send one request; hold it while the request runs."""
        async with contextlib.AsyncExitStack() as stack:
            if priority is Priority.CREATE:
                await stack.enter_async_context(self._creates.hold(priority))
            await stack.enter_async_context(self._in_flight.hold(priority))
            while True:
                async with self._head.hold(priority):
                    ticket = await self._wait_for_budget(priority)
                    if ticket is not None:
                        break
            held = _HELD.set(ticket)
            try:
                yield
            finally:
                _HELD.reset(held)
                if ticket.probe and not ticket.answered:
                    # No answer (a dropped connection, a cancellation): the next one probes.
                    self._probe_done()

    async def _wait_for_budget(self, priority: Priority) -> _Ticket | None:
        """Wait until the budget allows one more request and take it; ``None`` to yield.

        Whoever waits at the head sleeps until budget frees up; if someone more
        urgent arrived meanwhile, it steps back so that they get that budget.
        """
        while True:
            now = self._clock.monotonic()
            wait = self._budget_wait(now, priority)
            if wait <= 0:
                break
            if await self._sleep_unless_outranked(wait, priority):
                return None
        self._record(now)
        ticket = _Ticket(self, now, self._epoch, probe=self._probing)
        if ticket.probe:
            self._probe_out = True
        return ticket

    async def _sleep_unless_outranked(self, seconds: float, priority: Priority) -> bool:
        """Sleep ``seconds``; ``True`` if cut short because someone more urgent arrived.

        An infinite wait (a probe is out) lasts until the probe's answer, or the
        next 429, changes things.
        """
        if self._head.outranked(priority):
            return True
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        outranked = False
        async with anyio.create_task_group() as tg:

            async def sleep() -> None:
                if math.isinf(seconds):
                    await changed.wait()  # a probe is out: its answer decides
                else:
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

    def _signal_change(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _probe_done(self) -> None:
        self._probe_out = False
        self._signal_change()

    def _budget_wait(self, now: float, priority: Priority) -> float:
        if self._probing and self._probe_out:
            return math.inf
        waits = [self._paused_until - now]
        demand = None
        if priority is Priority.CREATE and self._forecast is not None:
            demand = self._current_demand(now)
        for log in self._logs:
            others = 0
            kept = 0
            reserve = self._reserves[id(log)]
            if log is self._hourly:
                others = self._others if now < self._others_until else 0
            if demand is not None:
                # What status checks need soon stays free now: a burst of creates that
                # fills the minute must not hold a due listing until it expires.
                kept = reserve.soon(now, demand)
            wait = log.wait_time(now, others + kept)
            if others:
                # By then every request of theirs that we know of has expired.
                wait = min(wait, max(self._others_until - now, log.wait_time(now, kept)))
            if kept and wait > reserve.refresh:
                # Held back for checks the forecast may drop (they went, or are not due
                # after all): ask again soon rather than wait for the window to free up.
                wait = max(reserve.refresh, min(wait, log.wait_time(now, others)))
            if wait <= 0 and demand is not None:
                until = self._others_until if log is self._hourly else -math.inf
                wait = reserve.later_wait(now, demand, others, until)
            waits.append(wait)
        return max(waits)

    def _current_demand(self, now: float) -> Demand:
        assert self._forecast is not None
        if self._demand is None or now - self._demand_at >= RESERVE_REFRESH:
            self._demand = self._forecast.demand(now)
            self._demand_at = now
        return self._demand

    def spare(self, creates: int, gap: float = SPARE_GAP) -> float:
        """Requests that may go besides ``creates`` more creates before the last create
        would have to wait for a lull of more than ``gap`` seconds in the hourly window.

        Sent as fast as the hour allows, the k-th request from now leaves when the
        window has room: at once while it has, then as each request in it expires,
        then an hour after each of those. Where that schedule pauses for long (the
        rest of an hour whose budget went in its first minutes), a run needing one
        request more than fits before the pause waits for all of it. ``inf`` without
        an hourly window.
        """
        log = self._hourly
        if log is None or creates <= 0:
            return math.inf
        now = self._clock.monotonic()
        held = log.held_times(now)
        room = log.window.limit - (self._others if now < self._others_until else 0)
        if room <= 0:
            return 0.0
        free = room - len(held)
        span = log.span
        # When each of the next `room` requests can leave; after that, an hour later each.
        starts = [now] * max(0, free) + [sent + span for sent in held[max(0, -free) :]]

        def leaves(k: int) -> float:
            cycle, position = divmod(k, room)
            return starts[position] + cycle * span

        last = max(creates, 1) - 1
        when = leaves(last)
        # Follow the schedule past the last create, up to an hour's worth, until it pauses.
        for k in range(last + 1, last + 1 + room):
            following = leaves(k)
            if following - when > gap:
                break
            when = following
            last = k
        return float(last + 1 - creates)

    def observe(self, status: int, rate: RateLimit) -> None:
        """Learn from an answer: what others spend, and whether to pause everyone.

        Called inside :meth:`slot`, it knows which request answered; outside one
        (an answer not tied to a slot), the answer is taken as the newest news.
        """
        ticket = _HELD.get()
        if ticket is not None and (ticket.governor is not self or ticket.answered):
            ticket = None
        if ticket is not None:
            ticket.answered = True
            if ticket.probe:
                self._probe_done()
        # Sent under the latest pause (or unknown): its answer is news about now.
        current = ticket is None or ticket.epoch == self._epoch
        if 200 <= status < 300:
            self._learn_others(rate)
        if status != 429:
            if current and status < 500:
                # It passed the API's limits: the way is open again.
                self._consecutive_429 = 0
                if self._probing:
                    self._probing = False
                    self._signal_change()
            return
        self.rate_limited += 1
        now = self._clock.monotonic()
        if ticket is not None:
            for log in self._logs:
                log.forget(ticket.sent)
        if current:
            self._epoch += 1
            self._consecutive_429 += 1
            self._probing = True
        pause = self._pause_for(rate)
        if rate.retry_after is not None and self._burst is not None:
            self._burst.fill(now, now + pause)
        until = now + pause
        if until > self._paused_until:
            self._paused_until = until
            self._log.warning("rate_limit.paused", seconds=round(pause, 3))
        self._signal_change()

    def _learn_others(self, rate: RateLimit) -> None:
        if rate.limit is None or rate.remaining is None or self._hourly is None:
            return
        now = self._clock.monotonic()
        # The token's use in the hour, less ours, is theirs. Their requests expire
        # at unknown times within the hour; until then, count them all.
        others = max(0, rate.limit - rate.remaining - self._hourly.count(now))
        if others != self._others:
            self._log.info("rate_limit.shared", others=others, remaining=rate.remaining)
        self._others = others
        self._others_until = now + self._hourly.window.period

    def _pause_for(self, rate: RateLimit) -> float:
        if rate.retry_after is not None and rate.retry_after >= 0:
            return min(rate.retry_after, self._max_pause)
        # No hint: a burst or the hour, nobody says. Probe soon, and less often
        # while 429s go on. (An hour spent by others shows in successful answers'
        # ratelimit-remaining, and the hourly window waits for it by itself.)
        backoff = self._default_pause * 2.0 ** max(0, self._consecutive_429 - 1)
        return min(backoff, self._max_probe_pause)

    def charge(self, now: float) -> None:
        """Count a request that left without asking: aiohttp resends some on its own."""
        self._record(now)

    def _record(self, now: float) -> None:
        for log in self._logs:
            log.record(now)
        for reserve in self._reserves.values():
            reserve.admitted += 1

    def hour_usage(self) -> tuple[int, int] | None:
        """Our requests in the sliding hour, and the hour's budget (after the reserve)."""
        if self._hourly is None:
            return None
        return self._hourly.count(self._clock.monotonic()), self._hourly.window.limit


def _whole(requests: float) -> int:
    """Whole requests to keep for an expected count (a hair's rounding error forgiven)."""
    return max(0, math.ceil(requests - 1e-6))
