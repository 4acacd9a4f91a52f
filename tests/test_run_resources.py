"""What a run costs the process beyond requests: the garbage collector's pace."""

from __future__ import annotations

import gc

import pytest

from importer.pipeline import RUN_GC_THRESHOLD, run_import
from importer.progress import RunMonitor
from importer.report import Outcome
from importer.simulator import SimulatorConfig, run_simulator
from tests.helpers import image_urls, manifest_of, settings_for


@pytest.mark.anyio
async def test_a_run_collects_garbage_less_often_and_then_as_before() -> None:
    """During a run the youngest generation waits for 10,000 allocations; after it, the
    thresholds are what they were (700 by default), also when the run ends early."""
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []

    def started(monitor: RunMonitor) -> None:
        seen.append(gc.get_threshold())

    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run_import(
            manifest_of(*image_urls(3)), settings_for(sim.base_url), on_start=started
        )
        stopped = await run_import(
            manifest_of(*image_urls(3, "other"), prefix="other"),
            settings_for(sim.base_url, deadline=0.5),
        )
    assert {result.outcome for result in report.images} == {Outcome.AVAILABLE}
    assert stopped.stopped == "deadline"
    assert seen == [(max(before[0], RUN_GC_THRESHOLD), *before[1:])]
    assert gc.get_threshold() == before
