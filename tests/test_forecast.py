"""What status checks will need: the demand curve, its floor, and the poller's forecast."""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import pytest

from importer.api import Image
from importer.forecast import Demand, FixedForecast
from importer.poller import GIB, StatusPoller
from tests.fakes import FakeClock


def test_demand_counts_steps_at_the_start_and_interpolates_between_corners() -> None:
    """A listing due now counts from now; a ramp of 10 requests over 100 s counts 5 by 50 s."""
    demand = Demand.of(0.0, [(0.0, 0.0), (0.0, 1.0), (100.0, 11.0)])
    assert demand.between(0.0, 0.0) == 1.0
    assert demand.between(0.0, 50.0) == pytest.approx(6.0)
    assert demand.between(50.0, 100.0) == pytest.approx(5.0)
    assert demand.between(0.0, 1000.0) == pytest.approx(11.0)  # flat after the last corner
    assert demand.between(10.0, 5.0) == 0.0


def test_the_floor_counts_one_request_per_interval_until_it_ends() -> None:
    """Floor of one per 30 s until 300 s: 1 + 600/30 would be 21, but it stops at 300 s."""
    demand = Demand.of(0.0, [(0.0, 0.0)], floor_interval=30.0, floor_until=300.0)
    assert demand.between(0.0, 60.0) == pytest.approx(3.0)
    assert demand.between(0.0, 600.0) == pytest.approx(11.0)
    assert demand.between(400.0, 600.0) == 0.0


def test_the_curve_wins_over_the_floor_when_higher() -> None:
    """The floor is a minimum, not an addition."""
    demand = Demand.of(0.0, [(0.0, 0.0), (60.0, 30.0)], floor_interval=30.0)
    assert demand.between(0.0, 60.0) == pytest.approx(30.0)


def test_a_demand_needs_matching_corners() -> None:
    """Times and counts come in pairs; the floor's interval is positive."""
    with pytest.raises(ValueError, match="as many"):
        Demand(0.0, (0.0, 1.0), (0.0,))
    with pytest.raises(ValueError, match="positive"):
        Demand(0.0, floor_interval=0.0)


def test_a_fixed_forecast_spreads_its_requests_over_its_span() -> None:
    """10 requests within the hour: 5 in its first half, from whenever it is asked."""
    demand = FixedForecast(10).demand(1000.0)
    assert demand.between(1000.0, 2800.0) == pytest.approx(5.0)
    assert demand.between(1000.0, 1000.0 + 3600.0) == pytest.approx(10.0)


class _Images:
    """A client whose listings show nothing: every image stays importing."""

    async def list(self, **_: object) -> list[Image]:
        return []

    async def get(self, image_id: int, **_: object) -> Image:
        return Image(id=image_id, name="x", status="pending")


def _learned(poller: StatusPoller) -> None:
    # Three imports of 1 GiB seen taking 300 s: the model predicts 300 s for 1 GiB.
    for _ in range(3):
        poller.model.observe(GIB, 300.0)


@pytest.mark.anyio
async def test_the_poller_forecasts_a_listing_per_interval_while_a_group_is_due() -> None:
    """Two groups of 1 GiB imports submitted now, learned to take 300 s (planned as 25%
    quicker or slower): each is listed from 225 s, once per 30 s, until 375 s and one
    interval more; before 225 s only the floor counts, one request per interval."""
    clock = FakeClock()
    poller = StatusPoller(_Images(), clock, first_poll=60.0, poll_interval=30.0)  # type: ignore[arg-type]
    poller.pace_with(_NoBudget(), lambda: 0)  # nothing more to submit
    _learned(poller)
    async with anyio.create_task_group() as tg:
        for image_id, group in ((1, "g1"), (2, "g1"), (3, "g2")):
            tg.start_soon(_wait, poller, image_id, group)
        await anyio.lowlevel.checkpoint()
        now = clock.monotonic()
        demand = poller.demand(now)
        tg.cancel_scope.cancel()
    assert demand.between(now, now + 220.0) == pytest.approx(1 + 220.0 / 30.0)
    # Each group: 1 + 180 // 30 listings, counted as a half at the start and 6 after.
    assert demand.between(now + 225.0, now + 405.0) == pytest.approx(2 * (0.5 + 6.0))
    assert demand.floor_until == pytest.approx(now + 405.0 + 60.0)


async def _wait(poller: StatusPoller, image_id: int, group: str) -> None:
    await poller.wait(image_id, _ignore, group=group, size=GIB)


def _ignore(image: Image) -> None:
    pass


class _NoBudget:
    def spare(self, creates: int) -> float:
        return math.inf


class _Budget:
    def __init__(self, spare: float) -> None:
        self.value = spare

    def spare(self, creates: int) -> float:
        return self.value


@pytest.mark.anyio
async def test_the_interval_is_stretched_when_checks_would_cost_creates_an_hour() -> None:
    """2,000 creates to come make ten groups, whose checks need 15 + 1,500/I requests at an
    interval of I s (imports learned to take 300 s, assumed to differ by 25% either way),
    within 90% of what the governor says is spare, less 20. Ample budget: the interval
    stays; 80 spare (52 aimed at): stretched to 1,500/37 s; 50: three times the interval,
    the most, short by little; 35: hopeless, the creates wait for the next hour anyway."""
    clock = FakeClock()
    poller = StatusPoller(_Images(), clock, first_poll=60.0, poll_interval=30.0)  # type: ignore[arg-type]
    budget = _Budget(math.inf)
    poller.pace_with(budget, lambda: 2000)
    _learned(poller)
    poller._retune(clock.monotonic())
    assert poller.interval == 30.0
    budget.value = 80.0
    clock.advance(61.0)
    poller._retune(clock.monotonic())
    assert poller.interval == pytest.approx(1500.0 / 37.0)
    budget.value = 50.0
    clock.advance(61.0)
    poller._retune(clock.monotonic())
    assert poller.interval == 90.0
    budget.value = 35.0
    clock.advance(61.0)
    poller._retune(clock.monotonic())
    assert poller.interval == 30.0


@pytest.mark.anyio
async def test_the_endgame_starts_at_once_and_pulls_in_planned_listings() -> None:
    """The last create sent with three images left: the interval drops to a third at once
    (not at the next minute's retune), and a group listing planned at the old interval is
    brought within the new one (the run's end is the last image seen)."""
    clock = FakeClock()
    poller = StatusPoller(_Images(), clock, first_poll=60.0, poll_interval=30.0)  # type: ignore[arg-type]
    creates = [10]
    poller.pace_with(_NoBudget(), lambda: creates[0])
    _learned(poller)
    async with anyio.create_task_group() as tg:
        for image_id in (1, 2, 3):
            tg.start_soon(_wait, poller, image_id, "g1")
        await anyio.lowlevel.checkpoint()
        poller._retune(clock.monotonic())
        assert poller.interval == 30.0
        poller.take_listing("g1", [])  # listed: next at about 30 s from now
        creates[0] = 0
        clock.advance(1.0)
        now = clock.monotonic()
        poller._retune(now)
        assert poller.interval == pytest.approx(10.0)
        stats = poller._groups["g1"]
        assert stats.next_listing is not None
        assert stats.next_listing <= now + 11.0
        assert all(watch.due <= now + 11.0 for watch in stats.unfinished())
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_import_counts_as_slow_for_as_long_as_it_was_seen_importing() -> None:
    """Imports learned to take 300 s; one listed importing 200 s after its create, and not
    listed since, 400 s after it: the slowest import may have taken 200 s, not 400 s (it may
    be done, unseen), so groups are planned 25% beyond the fit (the prior), not 33%."""
    clock = FakeClock()
    poller = StatusPoller(_Images(), clock, first_poll=60.0, poll_interval=30.0)  # type: ignore[arg-type]
    poller.pace_with(_NoBudget(), lambda: 0)
    _learned(poller)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_wait_since, poller, 1, "g1", clock.wall() - 200.0)
        await anyio.lowlevel.checkpoint()
        poller.take_listing("g1", [])
        clock.advance(200.0)
        assert poller._tail_ratio(clock.monotonic()) == pytest.approx(1.25)
        tg.cancel_scope.cancel()


async def _wait_since(poller: StatusPoller, image_id: int, group: str, submitted: float) -> None:
    await poller.wait(image_id, _ignore, group=group, size=GIB, submitted_at=submitted)
