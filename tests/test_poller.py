"""Status checks: learned schedules, group listings, and asking by id only when needed."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from importer.clock import LoopClock
from importer.pipeline import run_import
from importer.poller import GIB, DurationModel, StatusPoller, _Watch
from importer.report import Outcome
from importer.simulator import SimulatorConfig, run_simulator
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
