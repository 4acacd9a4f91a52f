"""Status checks: learned schedules, group listings, and asking by id only when needed."""

from __future__ import annotations

from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from importer.api import Image
from importer.clock import LoopClock
from importer.pipeline import run_import
from importer.poller import GIB, DurationModel, StatusPoller, _Watch
from importer.report import Outcome
from importer.simulator import SimulatorConfig, run_simulator
from tests.fakes import FakeClock
from tests.helpers import manifest_of, settings_for


def test_model_needs_a_few_imports_before_it_predicts() -> None:
    """Fewer than three finished imports: not ready; then ready."""
    model = DurationModel()
    for size in (1, 2):
        model.observe(size * GIB, 100.0 + 60 * size)
    assert not model.ready
    model.observe(3 * GIB, 280.0)
    assert model.ready


def test_model_fits_duration_against_size() -> None:
    """Exact samples of 150 s + 60 s/GiB are fitted back, with early == late == the fit."""
    model = DurationModel()
    for size in (0.5, 1, 2, 4, 8):
        model.observe(int(size * GIB), 150.0 + 60.0 * size)
    assert model.early(6 * GIB) == pytest.approx(510.0)
    assert model.late(6 * GIB) == pytest.approx(510.0)


@given(
    samples=st.lists(
        st.tuples(st.integers(0, 16 * GIB), st.floats(1.0, 5000.0)), min_size=3, max_size=60
    ),
    size=st.integers(0, 16 * GIB),
)
def test_model_bounds_are_ordered_and_positive(samples: list[tuple[int, float]], size: int) -> None:
    """For any history, 0 < early <= late: checks never go back in time."""
    model = DurationModel()
    for sample_size, duration in samples:
        model.observe(sample_size, duration)
    assert 0 < model.early(size) <= model.late(size)


@pytest.mark.anyio
async def test_successful_imports_are_learned_from_group_listings_alone() -> None:
    """100 minutes-long imports: no GET by id at all, and a few dozen listings in all."""
    async with run_simulator(SimulatorConfig.realistic(seed=2)) as sim:
        urls = [sim.file_url(f"img-{i}.qcow2") for i in range(100)]
        settings = settings_for(sim.base_url, first_poll=60.0, poll_interval=40.0)
        report = await run_import(manifest_of(*urls), settings)
        counts = dict(sim.world.request_counts)
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 100
    assert counts.get("GET /v2/images/{id}", 0) == 0
    assert counts["GET /v2/images"] <= 30


@pytest.mark.anyio
async def test_failure_is_read_by_id_soon_when_listings_show_importing_images() -> None:
    """Once listings are known to show importing images, a missing one is asked for at once."""
    config = SimulatorConfig.realistic(seed=2, list_in_progress=True)
    async with run_simulator(config) as sim:
        urls = [sim.file_url(f"img-{i}.qcow2") for i in range(5)]
        urls.append(sim.file_url("broken-fail-fast.qcow2"))
        settings = settings_for(sim.base_url, first_poll=60.0, poll_interval=40.0)
        report = await run_import(manifest_of(*urls), settings)
        by_id = sim.world.request_counts.get("GET /v2/images/{id}", 0)
    failed = report.images[-1]
    assert failed.outcome is Outcome.FAILED
    assert failed.error
    assert failed.finished_at is not None
    assert failed.submitted_at is not None
    assert failed.finished_at - failed.submitted_at <= 60.0 + 10.0  # the first check, jittered
    assert by_id == 1


@pytest.mark.anyio
async def test_backoff_of_an_image_checked_thousands_of_times_does_not_overflow() -> None:
    """Before durations are learned, the 2,000th check of a stuck image is still 4 intervals on."""
    clock = LoopClock()
    poller = StatusPoller(cast(Any, None), clock, first_poll=60.0, poll_interval=40.0)
    watch = _Watch(1, "group", None, clock.monotonic(), lambda image: None, checks=2000)
    now = clock.monotonic()
    assert poller._next_check(watch, now) == pytest.approx(now + 160.0)


def _censored_history(model: DurationModel) -> None:
    """8 GiB imports all seen finishing (630 s give or take 30%), and of twenty 1 GiB ones
    submitted later only the four quickest (about 150 s; 210 s on average, in truth)."""
    for i in range(20):
        model.observe(8 * GIB, 630.0 * (0.7 + 0.6 * i / 19))
    for i in range(4):
        model.observe(GIB, 210.0 * (0.7 + 0.03 * i))


def test_a_refit_counts_the_imports_still_running() -> None:
    """The quickest alone make 1 GiB look like 156 s; counted with the sixteen still running
    after 180 s, the fit is 210 s (the truth), and the first check comes at 160 s, not 119 s."""
    model = DurationModel()
    _censored_history(model)
    assert model.fit(GIB) < 160.0
    assert model.early(GIB) < 120.0
    model.refit([(GIB, 180.0)] * 16)
    assert model.fit(GIB) == pytest.approx(210.0, rel=0.02)
    assert model.fit(8 * GIB) == pytest.approx(630.0, rel=0.02)
    assert model.early(GIB) == pytest.approx(160.0, rel=0.03)


def test_a_refit_without_running_imports_is_the_plain_fit() -> None:
    """Nothing running: the refit changes nothing."""
    model = DurationModel()
    _censored_history(model)
    before = (model.fit(GIB), model.early(GIB), model.late(GIB))
    model.refit([])
    assert (model.fit(GIB), model.early(GIB), model.late(GIB)) == before


class _Unlisted:
    """Listings show nothing: every image stays importing."""

    async def list(self, **_: object) -> list[Image]:
        return []


@pytest.mark.anyio
async def test_a_group_not_seen_finishing_is_first_listed_by_the_refitted_model() -> None:
    """Sixteen 1 GiB imports listed unfinished after 180 s make the poller refit: a group of
    1 GiB just submitted is first checked at about 160 s, not at the 119 s the quickest
    alone promised (a listing then would find nothing)."""
    clock = FakeClock()
    poller = StatusPoller(_Unlisted(), clock, first_poll=60.0, poll_interval=30.0)  # type: ignore[arg-type]
    _censored_history(poller.model)
    async with anyio.create_task_group() as tg:
        for image_id in range(16):
            tg.start_soon(_wait, poller, image_id, "old", clock.wall() - 180.0)
        for image_id in range(100, 110):
            tg.start_soon(_wait, poller, image_id, "new", None)
        await anyio.lowlevel.checkpoint()
        now = clock.monotonic()
        new = poller._groups["new"].unfinished()
        assert max(watch.due for watch in new) <= now + 1.1 * 120.0
        poller.take_listing("old", [])  # the sixteen, still importing after 180 s
        poller._refit(now)
        assert min(watch.due for watch in new) >= now + 0.9 * 155.0
        tg.cancel_scope.cancel()


async def _wait(poller: StatusPoller, image_id: int, group: str, submitted: float | None) -> None:
    await poller.wait(image_id, lambda image: None, group=group, size=GIB, submitted_at=submitted)


def test_a_refit_keeps_the_plain_fit_while_few_have_finished() -> None:
    """Three imports seen finishing and four hundred running: how the quickest tenth fares
    is not known yet, so the refit guesses nothing (it once fitted 73 s to 1 GiB here, and
    the checks it planned cost a scaled-down run its hour)."""
    model = DurationModel()
    for size in (1, 2, 3):
        model.observe(size * GIB, 150.0 + 10.0 * size)
    before = (model.fit(GIB), model.early(GIB), model.late(GIB), model.slowest_ratio)
    model.refit([(GIB, 100.0)] * 200 + [(4 * GIB, 200.0)] * 200)
    assert (model.fit(GIB), model.early(GIB), model.late(GIB), model.slowest_ratio) == before
