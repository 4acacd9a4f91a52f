"""End to end: the importer against an API whose minute is already spent, on virtual time.

What the API sees is measured from the simulator's own record of every request
(arrival, status, retry-after): no stall (no quiet gap longer than the longest
pause the API asked for), no storm (at most one 429 a second beyond the first
second of a pause), every entry imported exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from importer.pipeline import run_import
from importer.report import Outcome, Report
from importer.simulator import Answer, SimulatorConfig, World, run_simulator
from tests.helpers import image_urls, manifest_of, settings_for

pytestmark = pytest.mark.anyio

#: Imports of a few seconds: these tests are about the budget, not about waiting.
QUICK: dict[str, Any] = {"new_seconds": 1.0, "pending_seconds": 2.0, "seconds_per_gib": 0.1}


def longest_pause(answers: Sequence[Answer]) -> float:
    """The longest retry-after the API sent."""
    return max((a.retry_after or 0.0 for a in answers), default=0.0)


def longest_quiet_gap(answers: Sequence[Answer]) -> float:
    """The longest time between two consecutive requests reaching the API."""
    times = [a.at for a in answers]
    return max((later - earlier for earlier, later in pairwise(times)), default=0.0)


def storm_429s(answers: Sequence[Answer]) -> list[float]:
    """The 429s beyond the first second of a pause that came within a second of another.

    A pause begins with a 429 and lasts until a request gets through after the
    time the API asked to wait (its retry-after) is over. Its first second is
    excused: the requests already on their way when it began meet it too.
    """
    paused = False
    start = end = -float("inf")
    late: list[float] = []
    for answer in answers:
        if answer.status != 429:
            if answer.status and answer.at >= end:
                paused = False
            continue
        if not paused:
            paused, start = True, answer.at
        elif answer.at >= start + 1.0:
            late.append(answer.at)
        end = max(end, answer.at + (answer.retry_after or 0.0))
    return [later for earlier, later in pairwise(late) if later - earlier < 1.0]


def live_images_by_tag(world: World) -> Counter[str]:
    counts: Counter[str] = Counter()
    for image in world.images.values():
        if not image.deleted_by_user and image.status != "deleted":
            counts.update(t for t in image.tags if t.startswith("importer:"))
    return counts


def assert_paced(answers: Sequence[Answer]) -> None:
    """No stall and no storm in what the API saw."""
    assert storm_429s(answers) == []
    # A second of slack: retry-after is whole seconds, and the last poll may wait a little.
    assert longest_quiet_gap(answers) <= max(longest_pause(answers), 2.0) + 1.0


def assert_all_imported_once(report: Report, world: World, entries: int) -> None:
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * entries
    live = live_images_by_tag(world)
    assert len(live) == entries
    assert set(live.values()) == {1}
    assert report.rate_limited == world.rate_limited_count
    assert report.requests == sum(world.request_counts.values())


async def test_a_burst_429_costs_its_retry_after_not_an_hour() -> None:
    """60 entries against an API allowing 40 requests a minute (the importer allows itself
    225): its burst 429s say remaining 0, yet the run never stalls for the hour."""
    async with run_simulator(SimulatorConfig.demo(per_minute=40, **QUICK)) as simulator:
        report = await run_import(
            manifest_of(*image_urls(60)), settings_for(simulator.base_url), seed=1
        )
        world = simulator.world
    assert_all_imported_once(report, world, 60)
    assert world.rate_limited_count > 0  # the case is the one meant: the API said 429
    assert report.finished_at - report.started_at < 300  # 40 a minute: about 2 minutes
    assert_paced(world.answers)


@pytest.mark.parametrize("count_rate_limited", [False, True], ids=["429s-free", "429s-count"])
async def test_another_client_has_spent_the_minute(count_rate_limited: bool) -> None:
    """Another client spent the whole minute just before the run and keeps spending half of
    it: the importer pauses as asked, probes alone, then paces itself; no storm, no stall.
    (Where 429s count, a crowd leaving when a pause ends finds the window full again.)"""
    config = SimulatorConfig.demo(
        per_minute=60,
        other_burst=60,
        other_per_minute=30,
        count_rate_limited=count_rate_limited,
        **QUICK,
    )
    async with run_simulator(config) as simulator:
        report = await run_import(
            manifest_of(*image_urls(60)), settings_for(simulator.base_url), seed=1
        )
        world = simulator.world
    assert_all_imported_once(report, world, 60)
    assert world.answers[0].status == 429
    assert_paced(world.answers)


@pytest.mark.parametrize("count_rate_limited", [False, True], ids=["429s-free", "429s-count"])
async def test_a_rerun_within_a_minute_of_a_stopped_run(
    tmp_path: Path, count_rate_limited: bool
) -> None:
    """A run stopped after 20 s leaves its minute's requests in the API's minute; the rerun,
    with an empty minute of its own, meets 429s at once: it probes and paces, no storm, no
    stall."""
    config = SimulatorConfig.demo(per_minute=60, count_rate_limited=count_rate_limited, **QUICK)
    manifest = manifest_of(*image_urls(120))
    state = tmp_path / "state.sqlite"
    async with run_simulator(config) as simulator:
        # The first run spends the API's minute at once on creates, with no 429: it keeps
        # what its status checks will need in the minute (3, checking every 30 s), so it
        # is told a limit of 63.
        first = await run_import(
            manifest,
            settings_for(
                simulator.base_url,
                state_path=state,
                deadline=20.0,
                per_minute=63,
                reserve=0.0,
                first_poll=30.0,
                poll_interval=30.0,
            ),
            seed=1,
        )
        rerun_from = len(simulator.world.answers)
        report = await run_import(
            manifest, settings_for(simulator.base_url, state_path=state), seed=2
        )
        world = simulator.world
    assert first.stopped == "deadline"
    assert first.rate_limited == 0
    rerun = world.answers[rerun_from:]
    assert rerun[0].status == 429
    assert rerun[0].at - world.answers[0].at < 60.0
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 120
    assert set(live_images_by_tag(world).values()) == {1}
    assert len(live_images_by_tag(world)) == 120
    assert_paced(rerun)
