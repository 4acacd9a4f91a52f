"""The governor keeps every window under its limit and pauses everyone on 429s."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.api import RateLimit
from importer.clock import LoopClock
from importer.governor import Governor, SlidingLog, Window
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
        clock, concurrency=16, windows=(Window(250, 60.0), Window(400, 3600.0)), margin=0.5
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
    """No more than `concurrency` requests are ever inside their slot at once."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=3, windows=(Window(1000, 60.0),))
    inside = 0
    peak = 0

    async def request() -> None:
        nonlocal inside, peak
        async with governor.slot():
            inside += 1
            peak = max(peak, inside)
            await clock.sleep(1.0)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(request)
    assert peak == 3


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
async def test_hourly_429_waits_until_reset() -> None:
    """A 429 with no retry-after and remaining 0 waits until ratelimit-reset."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=1, windows=(Window(250, 60.0),))
    governor.observe(
        429, RateLimit(limit=5000, remaining=0, reset=clock.wall() + 120, retry_after=None)
    )
    before = clock.now
    async with governor.slot():
        pass
    assert clock.now - before == pytest.approx(120.0)


@pytest.mark.anyio
async def test_429_without_hints_backs_off_exponentially() -> None:
    """Repeated hintless 429s double the pause; a success resets it."""
    clock = FakeClock()
    governor = Governor(clock, concurrency=1, windows=(Window(250, 60.0),), default_pause=2.0)
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
