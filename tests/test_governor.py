"""The governor keeps every window under its limit and pauses everyone on 429s."""

from __future__ import annotations

import math
from collections import Counter

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.api import RateLimit
from importer.clock import LoopClock
from importer.forecast import Demand, FixedForecast, StatusForecast
from importer.governor import Governor, Priority, SlidingLog, Window
from tests.fakes import FakeClock

NO_HINT = RateLimit(limit=None, remaining=None, reset=None, retry_after=None)


def max_in_any_window(times: list[float], period: float) -> int:
    """The largest number of ``times`` inside any half-open window of ``period`` seconds."""
    times = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(times):
        while times[start] <= t - period:
            start += 1
        best = max(best, end - start + 1)
    return best


@given(
    limit=st.integers(1, 20),
    period=st.floats(0.5, 100),
    gaps=st.lists(st.floats(0, 50), min_size=1, max_size=200),
)
@settings(max_examples=200, deadline=None)
def test_sliding_log_never_admits_more_than_limit(
    limit: int, period: float, gaps: list[float]
) -> None:
    """Following SlidingLog.wait_time, no window of `period` ever holds more than `limit` sends."""
    log = SlidingLog(Window(limit, period), margin=1e-6)
    now = 0.0
    sent: list[float] = []
    for gap in gaps:
        now += gap
        now += log.wait_time(now)
        log.record(now)
        sent.append(now)
    assert max_in_any_window(sent, period) <= limit


@pytest.mark.anyio
async def test_governor_respects_both_windows_under_load() -> None:
    """600 concurrent requests on virtual time: never more than 250/min or 400/h, and no idling."""
    clock = LoopClock(epoch=0.0)
    governor = Governor(
        clock,
        concurrency=16,
        windows=(Window(250, 60.0), Window(400, 3600.0)),
        margin=0.5,
    )
    admitted: list[float] = []

    async def request() -> None:
        async with governor.slot():
            admitted.append(clock.monotonic())
            await clock.sleep(0.2)  # the request's own latency

    start = clock.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(600):
            tg.start_soon(request)

    assert len(admitted) == 600
    assert max_in_any_window(admitted, 60.0) <= 250
    assert max_in_any_window(admitted, 3600.0) <= 400
    # Requests 401-600 had to wait for the first hour's requests to expire, no longer.
    assert admitted[400] - start == pytest.approx(3600.5)


@pytest.mark.anyio
async def test_governor_limits_concurrency() -> None:
    """At most `concurrency` requests in flight, and creates leave one slot to status checks."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=3, windows=(Window(1000, 60.0),))
    inside: Counter[Priority] = Counter()
    peaks: Counter[str] = Counter()

    async def request(priority: Priority) -> None:
        async with governor.slot(priority):
            inside[priority] += 1
            peaks["all"] = max(peaks["all"], sum(inside.values()))
            peaks[priority.name] = max(peaks[priority.name], inside[priority])
            await clock.sleep(1.0)
            inside[priority] -= 1

    async with anyio.create_task_group() as tg:
        for number in range(40):
            tg.start_soon(request, Priority.CREATE if number % 2 else Priority.STATUS)
    assert peaks["all"] == 3
    assert peaks["CREATE"] == 2
    assert peaks["STATUS"] == 3


@pytest.mark.anyio
async def test_429_with_retry_after_pauses_every_request() -> None:
    """After a 429 carrying retry-after: 7, the next admission waits 7 seconds."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=4, windows=(Window(250, 60.0),))
    async with governor.slot():
        pass
    governor.observe(429, RateLimit(limit=5000, remaining=10, reset=None, retry_after=7.0))
    before = clock.now
    async with governor.slot():
        pass
    assert clock.now - before == pytest.approx(7.0)
    assert governor.rate_limited == 1


@pytest.mark.anyio
async def test_429_without_retry_after_probes_soon_whatever_remaining_says() -> None:
    """A 429 with remaining 0 and a reset 2 minutes away but no retry-after: a 2 s probe pause.

    remaining 0 on a 429 does not tell the hour is spent: a burst 429 says the same.
    """
    clock = FakeClock()
    governor = Governor(clock, concurrency=2, windows=(Window(250, 60.0),))
    governor.observe(
        429, RateLimit(limit=5000, remaining=0, reset=clock.wall() + 120, retry_after=None)
    )
    before = clock.now
    async with governor.slot():
        pass
    assert clock.now - before == pytest.approx(2.0)


@pytest.mark.anyio
async def test_a_burst_429_does_not_count_the_hour_as_spent_by_others() -> None:
    """Burst 429 (remaining 0, retry-after 29): every priority waits 29 s, not the hour."""
    clock = FakeClock()
    governor = Governor(
        clock, concurrency=4, windows=(Window(225, 60.0), Window(4500, 3600.0)), margin=0.0
    )
    for _ in range(3):
        async with governor.slot():
            pass
    burst = RateLimit(limit=5000, remaining=0, reset=clock.wall() + 3600, retry_after=29.0)
    governor.observe(429, burst)
    start = clock.now
    async with governor.slot(Priority.STATUS):
        governor.observe(200, RateLimit(limit=5000, remaining=4996, reset=None, retry_after=None))
    assert clock.now - start == pytest.approx(29.0)
    for priority in (Priority.STATUS, Priority.CREATE):
        async with governor.slot(priority):
            pass
    # The minute was full at the 429; its rest frees over the minute, nothing like an hour.
    assert clock.now - start < 60.0


@pytest.mark.anyio
async def test_others_are_learned_from_successful_answers_only() -> None:
    """An error answer's remaining teaches nothing; a 2xx's does (here: 60 of 100 left)."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=2, windows=(Window(100, 3600.0),), margin=0.0)
    governor.observe(404, RateLimit(limit=100, remaining=0, reset=None, retry_after=None))
    governor.observe(500, RateLimit(limit=100, remaining=0, reset=None, retry_after=None))
    start = clock.now
    for _ in range(60):
        async with governor.slot():
            pass
    assert clock.now == start
    governor.observe(200, RateLimit(limit=100, remaining=0, reset=None, retry_after=None))
    async with governor.slot():
        pass
    assert clock.now - start == pytest.approx(3600.0)  # the hour is spent: 40 theirs, 60 ours


@pytest.mark.anyio
async def test_a_rate_limited_request_leaves_the_logs() -> None:
    """A request answered 429 was not counted by the API: its place in the window is free."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=2, windows=(Window(2, 60.0),), margin=0.0)
    async with governor.slot():
        governor.observe(200, NO_HINT)
    async with governor.slot():
        governor.observe(429, NO_HINT)
    start = clock.now
    async with governor.slot():  # the probe, after the short pause
        governor.observe(200, NO_HINT)
    assert clock.now - start == pytest.approx(2.0)
    async with governor.slot():  # the window holds the first request and the probe
        pass
    assert clock.now - start == pytest.approx(60.0)


@pytest.mark.anyio
async def test_after_a_429_one_probe_goes_alone_until_one_gets_through() -> None:
    """Eight waiting requests after a 429: one probe at a time until one succeeds, then all."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=8, windows=(Window(1000, 60.0),), margin=0.0)
    answers = iter([429, 429, 200])
    admitted: list[float] = []

    async def request() -> None:
        async with governor.slot(Priority.STATUS):
            admitted.append(clock.monotonic())
            await clock.sleep(0.5)  # latency: the other requests queue meanwhile
            status = next(answers, 200)
            retry = 3.0 if status == 429 else None
            governor.observe(status, RateLimit(None, None, None, retry_after=retry))

    start = clock.monotonic()
    async with governor.slot():
        governor.observe(429, RateLimit(None, None, None, retry_after=5.0))
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(request)
    relative = [round(t - start, 3) for t in admitted]
    # 5 s pause, probe answered 429 at 5.5 s (3 s more), probe at 8.5 s answered 429 too,
    # probe at 12 s gets through at 12.5 s: the five others follow at once.
    assert relative == [5.0, 8.5, 12.0] + [12.5] * 5
    assert governor.rate_limited == 3


@pytest.mark.anyio
async def test_requests_in_flight_at_a_429_do_not_prolong_the_pause() -> None:
    """Four hintless 429s for requests sent together: one 2 s pause, not a doubled backoff."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=4, windows=(Window(1000, 60.0),))
    admitted: list[float] = []

    async def request() -> None:
        async with governor.slot(Priority.STATUS):
            admitted.append(clock.monotonic())
            await clock.sleep(0.1)
            governor.observe(429 if len(admitted) <= 4 else 200, NO_HINT)

    start = clock.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(request)
    assert [round(t - start, 3) for t in admitted] == [0.0] * 4 + [2.1]
    assert governor.rate_limited == 4


@pytest.mark.anyio
async def test_a_burst_429_spreads_the_queue_over_the_rest_of_the_minute() -> None:
    """Burst 429 with retry-after 30 and nothing of ours in the minute: after the probe, the
    queue leaves one request every 3 s (the API's full window freeing from 30 s to 60 s)."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=8, windows=(Window(10, 60.0),), margin=0.0)
    admitted: list[float] = []

    async def request() -> None:
        async with governor.slot(Priority.STATUS):
            admitted.append(clock.monotonic())
            governor.observe(200, NO_HINT)

    start = clock.monotonic()
    governor.observe(429, RateLimit(None, 0, None, retry_after=30.0))
    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(request)
    relative = [round(t - start, 3) for t in admitted]
    assert relative[:10] == [30.0 + 3 * i for i in range(10)]
    assert relative[10:] == [90.0, 93.0]  # then our own requests' minute rules


@pytest.mark.anyio
async def test_429_without_hints_backs_off_exponentially() -> None:
    """Repeated hintless 429s double the pause; a success resets it."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=2, windows=(Window(250, 60.0),), default_pause=2.0)
    pauses = []
    for _ in range(3):
        governor.observe(429, NO_HINT)
        before = clock.now
        async with governor.slot():
            pass
        pauses.append(clock.now - before)
    governor.observe(200, NO_HINT)
    governor.observe(429, NO_HINT)
    before = clock.now
    async with governor.slot():
        pass
    assert pauses == [2.0, 4.0, 8.0]
    assert clock.now - before == 2.0


@pytest.mark.anyio
async def test_status_checks_go_before_queued_creates() -> None:
    """With creates queued behind a full minute window, a status check gets the next slot."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=4, windows=(Window(10, 60.0),), margin=0.0)
    order: list[str] = []

    async def request(kind: str, priority: Priority) -> None:
        async with governor.slot(priority):
            order.append(kind)

    async with anyio.create_task_group() as tg:
        for _ in range(15):
            tg.start_soon(request, "create", Priority.CREATE)
        await anyio.sleep(30)  # the first 10 creates went; the rest wait for the window
        tg.start_soon(request, "status", Priority.STATUS)
    assert order.index("status") == 10


@pytest.mark.anyio
async def test_creates_leave_what_status_checks_will_need_of_the_hour() -> None:
    """Status checks forecast to need 10 of the hour's 100: creates stop at 90, and the 10
    status checks get through at once."""
    clock = LoopClock()
    governor = Governor(
        clock,
        concurrency=4,
        windows=(Window(100, 3600.0),),
        margin=0.0,
        forecast=FixedForecast(10),
    )
    creates: list[float] = []

    async def create() -> None:
        async with governor.slot(Priority.CREATE):
            creates.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(95):
            tg.start_soon(create)
        await anyio.sleep(60)
        assert len(creates) == 90  # 10 of the hour's 100 are kept for status checks
        start = clock.monotonic()
        for _ in range(10):
            async with governor.slot(Priority.STATUS):
                pass
        assert clock.monotonic() == start  # no wait for any of them
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_what_others_spend_comes_off_the_hour() -> None:
    """Headers showing 40 requests used by others leave 60 of 100 for us, until they expire."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=2, windows=(Window(100, 3600.0),), margin=0.0)
    async with governor.slot():
        pass
    governor.observe(200, RateLimit(limit=100, remaining=59, reset=None, retry_after=None))
    sent = [clock.monotonic()]
    for _ in range(80):
        async with governor.slot():
            sent.append(clock.monotonic())
    assert sum(1 for t in sent if t < 3600) == 60
    assert max_in_any_window(sent, 3600.0) <= 100


@pytest.mark.anyio
async def test_a_request_cancelled_while_admitted_returns_its_slots() -> None:
    """Cancellation at the moment a slot is taken never leaks it (else: a deadlock)."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=2, windows=(Window(1000, 60.0),))
    for _ in range(5):
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with governor.slot(Priority.CREATE):
                pytest.fail("admitted inside a cancelled scope")
    with anyio.fail_after(60):  # virtual: a leaked slot would make this wait forever
        async with governor.slot(Priority.CREATE), governor.slot(Priority.STATUS):
            pass


def test_concurrency_below_two_is_refused() -> None:
    """One slot is kept for status checks, so fewer than two make no sense."""
    with pytest.raises(ValueError, match="at least 2"):
        Governor(LoopClock(), concurrency=1, windows=(Window(10, 60.0),))


class _Forecast:
    """A forecast fixed in time: ``corners`` (absolute time, cumulative requests)."""

    def __init__(self, *corners: tuple[float, float]) -> None:
        self.corners = corners

    def demand(self, now: float) -> Demand:
        return Demand.of(-1e9, [(-1e9, 0.0), *self.corners])


@pytest.mark.anyio
async def test_creates_may_use_every_request_status_checks_will_not_need() -> None:
    """Status checks forecast to need 2 of the hour's 200: 198 creates go at once (the old
    5% kept 10, and let 190 through)."""
    clock = LoopClock()
    governor = Governor(
        clock, concurrency=4, windows=(Window(200, 3600.0),), margin=0.0, forecast=FixedForecast(2)
    )
    creates: list[float] = []

    async def create() -> None:
        async with governor.slot(Priority.CREATE):
            creates.append(clock.monotonic())

    start = clock.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(create)
        await anyio.sleep(60)
        assert len(creates) == 198
        assert max(creates) == start
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_create_counts_on_requests_that_expire_within_the_minute() -> None:
    """A minute holding 60 listings that expire in 7.5 s, and checks forecast at one a
    second: a create fits at once (the listings due before they expire still find room),
    where 5-second steps counted those 60 until 10 s on and held it back 5 s."""
    clock = LoopClock()
    governor = Governor(
        clock,
        concurrency=2,
        windows=(Window(70, 60.0),),
        margin=0.0,
        forecast=FixedForecast(3600, within=3600.0),
    )
    start = clock.monotonic()
    for _ in range(60):
        async with governor.slot(Priority.STATUS):
            pass
    await anyio.sleep(52.5)
    async with governor.slot(Priority.CREATE):
        left = clock.monotonic() - start
    assert left == 52.5


async def _creates_at_3500(forecast: StatusForecast) -> int:
    """In a 100-request hour whose first 90 went at 0 s, how many of 10 creates go at 3,500 s."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=4, windows=(Window(100, 3600.0),), margin=0.0)
    for _ in range(90):
        async with governor.slot(Priority.CREATE):
            pass
    governor.use_forecast(forecast)
    await anyio.sleep(3500)
    creates: list[float] = []

    async def create() -> None:
        async with governor.slot(Priority.CREATE):
            creates.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(create)
        await anyio.sleep(50)
        tg.cancel_scope.cancel()
    return len(creates)


@pytest.mark.anyio
async def test_checks_needed_after_the_window_frees_up_hold_no_create_back() -> None:
    """90 of 100 spent at 0 s; 20 checks forecast after 3,600 s, when those 90 have expired:
    at 3,500 s the last 10 creates of the hour go. Spread over the coming hour, the same 20
    keep some of them back."""
    start = anyio.current_time()
    after = _Forecast((start + 3650.0, 0.0), (start + 3700.0, 20.0))
    assert await _creates_at_3500(after) == 10
    assert await _creates_at_3500(FixedForecast(20)) < 10


@pytest.mark.anyio
async def test_a_create_waits_for_the_forecast_checks_to_pass_not_for_the_hour() -> None:
    """20 checks due at 300 s, in a 100-request hour: 80 creates go at once, the other 15
    once the checks' time is past (within the forecast's refresh), not an hour later."""
    clock = LoopClock()
    start = clock.monotonic()
    governor = Governor(
        clock,
        concurrency=4,
        windows=(Window(100, 3600.0),),
        margin=0.0,
        forecast=_Forecast((start + 300.0, 0.0), (start + 300.0, 20.0)),
    )
    creates: list[float] = []

    async def create() -> None:
        async with governor.slot(Priority.CREATE):
            creates.append(clock.monotonic() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(95):
            tg.start_soon(create)
    assert creates[:80] == [0.0] * 80
    assert all(300.0 < t <= 306.0 for t in creates[80:]), creates[80:]


@pytest.mark.anyio
async def test_the_minute_keeps_room_for_checks_due_before_it_frees_up() -> None:
    """2 checks due at 30 s: of 12 creates queued against 10 a minute, 8 go at once, and the
    checks go at 30 s, not when the minute frees up at 60 s."""
    clock = LoopClock()
    start = clock.monotonic()
    governor = Governor(
        clock,
        concurrency=4,
        windows=(Window(10, 60.0),),
        margin=0.0,
        forecast=_Forecast((start + 30.0, 0.0), (start + 30.0, 2.0)),
    )
    creates: list[float] = []
    checks: list[float] = []

    async def create() -> None:
        async with governor.slot(Priority.CREATE):
            creates.append(clock.monotonic() - start)

    async def check() -> None:
        await anyio.sleep(30)
        async with governor.slot(Priority.STATUS):
            checks.append(clock.monotonic() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(create)
        for _ in range(2):
            tg.start_soon(check)
    assert creates[:8] == [0.0] * 8
    assert checks == [30.0, 30.0]


@pytest.mark.anyio
async def test_status_checks_are_kept_at_most_half_a_window() -> None:
    """A forecast beyond what the window can give (1,000 checks a minute of 4) leaves
    creates half of it: they are slowed, never stopped."""
    clock = LoopClock()
    governor = Governor(
        clock,
        concurrency=2,
        windows=(Window(4, 60.0),),
        margin=0.0,
        forecast=FixedForecast(1000, within=60.0),
    )
    start = clock.monotonic()
    for _ in range(4):
        async with governor.slot(Priority.CREATE):
            pass
    assert clock.monotonic() - start == pytest.approx(60.0)


@pytest.mark.anyio
async def test_spare_is_what_fits_besides_the_creates_before_a_lull() -> None:
    """60 of 100 spent at 0 s; at 10 s: 40 leave now, then nothing until 3,600 s. With 30
    creates to go, 10 requests more fit before that lull; with 50, the last create waits
    for 3,600 s whatever happens, and 90 more fit in the hour that then frees up."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=2, windows=(Window(100, 3600.0),), margin=0.0)
    for _ in range(60):
        async with governor.slot(Priority.CREATE):
            pass
    clock.advance(10.0)
    assert governor.spare(30) == 10
    assert governor.spare(50) == 90
    assert governor.spare(0) == math.inf
