"""The journal: resume from each state, reconcile lost creates, never a duplicate, one process."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from importer.errors import StateLockedError
from importer.journal import Journal, Phase
from importer.pipeline import Stopper, run_import
from importer.plan import make_plan
from importer.report import Outcome
from importer.simulator import SimulatorConfig, World, run_simulator
from tests.helpers import image_urls, manifest_of, settings_for
from tests.test_pipeline import live_images_by_tag

MANIFEST = manifest_of(*image_urls(6))
PLAN = make_plan(MANIFEST)


def create_in_world(world: World, index: int) -> int:
    """Make the entry's image directly in the simulator, as a create whose answer was lost."""
    body: dict[str, Any] = PLAN[index].create_request().body()
    return world.create_image(body).id


@pytest.mark.anyio
async def test_finished_entries_are_not_touched_again(tmp_path: Path) -> None:
    """A second run with the same state reads the account (one listing) and sends nothing else."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        settings = settings_for(sim.base_url, state_path=state)
        first = await run_import(MANIFEST, settings)
        before = dict(sim.world.request_counts)
        second = await run_import(MANIFEST, settings)
        after = dict(sim.world.request_counts)
    sent = {route: after[route] - before.get(route, 0) for route in after}
    assert {route: n for route, n in sent.items() if n} == {"GET /v2/images": 1}
    assert [r.outcome for r in second.images] == [Outcome.AVAILABLE] * 6
    assert [r.image_id for r in second.images] == [r.image_id for r in first.images]
    assert [r.action for r in second.images] == ["unchanged"] * 6


@pytest.mark.anyio
async def test_stopped_run_resumes_by_polling_not_resubmitting(tmp_path: Path) -> None:
    """Stopped by its deadline with images pending, the next run polls them: still one POST each."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo(pending_seconds=30.0)) as sim:
        first = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state, deadline=5))
        assert first.stopped == "deadline"
        assert {r.outcome for r in first.images} == {Outcome.PENDING}
        assert all(r.image_id is not None for r in first.images)
        second = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
        posts = sim.world.request_counts["POST /v2/images"]
    assert [r.outcome for r in second.images] == [Outcome.AVAILABLE] * 6
    assert [r.image_id for r in second.images] == [r.image_id for r in first.images]
    assert posts == 6


@pytest.mark.anyio
async def test_deadline_before_any_submission_reports_not_submitted(tmp_path: Path) -> None:
    """Entries never sent before the stop are `not_submitted`, and a later run submits them."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(per_minute=2)
    async with run_simulator(config) as sim:
        settings = settings_for(sim.base_url, state_path=state, per_minute=2, deadline=30)
        first = await run_import(MANIFEST, settings)
        outcomes = [r.outcome for r in first.images]
        assert first.stopped == "deadline"
        assert outcomes.count(Outcome.NOT_SUBMITTED) >= 3
        second = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
        assert [r.outcome for r in second.images] == [Outcome.AVAILABLE] * 6
        assert live_images_by_tag(sim.world) == {item.tag: 1 for item in PLAN}


@pytest.mark.anyio
@pytest.mark.parametrize("list_in_progress", [True, False])
async def test_uncertain_create_found_by_tag_is_adopted(
    tmp_path: Path, list_in_progress: bool
) -> None:
    """A journaled create with no answer whose image exists is adopted, never sent again."""
    state = tmp_path / "state.sqlite"
    with Journal(state) as journal:
        journal.creating(PLAN[0].tag, "img-0", "nyc3", time.time())  # just now
    config = SimulatorConfig.demo(list_in_progress=list_in_progress)
    async with run_simulator(config) as sim:
        made = create_in_world(sim.world, 0)
        with capture_logs() as logs:
            report = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
        posts = sim.world.request_counts["POST /v2/images"]
    assert report.images[0].image_id == made
    assert report.images[0].outcome is Outcome.AVAILABLE
    assert posts == 5  # the five other entries only
    assert any(e["event"] == "image.adopted" for e in logs)


@pytest.mark.anyio
async def test_uncertain_create_that_made_nothing_is_sent_again(tmp_path: Path) -> None:
    """A journaled create that made no image is resubmitted once it is surely absent."""
    state = tmp_path / "state.sqlite"
    with Journal(state) as journal:
        journal.creating(PLAN[0].tag, "img-0", "nyc3", time.time())  # just now
    async with run_simulator(SimulatorConfig.demo()) as sim:
        settings = settings_for(sim.base_url, state_path=state, reconcile_window=120.0)
        with capture_logs() as logs:
            report = await run_import(MANIFEST, settings)
        posts = sim.world.request_counts["POST /v2/images"]
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 6
    assert posts == 6
    assert any(e["event"] == "image.absent" for e in logs)


@pytest.mark.anyio
async def test_duplicates_found_by_tag_are_deleted_and_reported(tmp_path: Path) -> None:
    """Two images for one uncertain entry: one is kept, the extra deleted and reported."""
    state = tmp_path / "state.sqlite"
    with Journal(state) as journal:
        journal.creating(PLAN[0].tag, "img-0", "nyc3", time.time())  # just now
    config = SimulatorConfig.demo(list_in_progress=True)
    async with run_simulator(config) as sim:
        first, second = create_in_world(sim.world, 0), create_in_world(sim.world, 0)
        report = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
        live = live_images_by_tag(sim.world)
    result = report.images[0]
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == first
    assert result.duplicates_deleted == (second,)
    assert report.to_json()["summary"]["duplicates_deleted"] == 1
    assert live[PLAN[0].tag] == 1


@pytest.mark.anyio
async def test_lost_create_answers_never_leave_duplicates(tmp_path: Path) -> None:
    """With half the create answers lost, every entry still ends with exactly one live image."""
    manifest = manifest_of(*image_urls(30))
    config = SimulatorConfig.demo(lost_create_rate=0.5, seed=3)
    async with run_simulator(config) as sim:
        settings = settings_for(sim.base_url, state_path=tmp_path / "s.sqlite", max_creates=10)
        report = await run_import(manifest, settings)
        live = live_images_by_tag(sim.world)
        lost = sim.world.fault_counts["lost_create"]
    assert lost > 0
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 30
    assert live == {item.tag: 1 for item in make_plan(manifest)}


@pytest.mark.anyio
async def test_journal_records_each_step(tmp_path: Path) -> None:
    """After a run the journal holds the id, last status and outcome of every entry."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
    with Journal(state) as journal:
        for item, result in zip(PLAN, report.images, strict=True):
            row = journal.get(item.tag)
            assert row is not None
            assert row.phase is Phase.FINISHED
            assert row.image_id == result.image_id
            assert row.status == "available"
            assert row.outcome == "available"
            assert row.creates_sent == 1


def test_second_process_on_the_same_state_is_refused(tmp_path: Path) -> None:
    """While one journal is open, opening it again fails with a message naming the holder."""
    state = tmp_path / "state.sqlite"
    with Journal(state), pytest.raises(StateLockedError, match="another importer"):
        Journal(state)
    with Journal(state):  # released on close
        pass


def test_state_file_that_is_not_a_journal(tmp_path: Path) -> None:
    """A file that is not SQLite is refused with advice, not a traceback."""
    state = tmp_path / "state.sqlite"
    state.write_text("not a database")
    with pytest.raises(Exception, match="not a usable importer state file"):
        Journal(state)


@pytest.mark.anyio
async def test_stop_request_lets_creates_in_flight_finish(tmp_path: Path) -> None:
    """A stop while creates are on the wire: each answered create is journaled with its id."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(slow_rate=1.0, slow_seconds=5.0)
    async with run_simulator(config) as sim:
        stopper = Stopper()

        async def stop_soon() -> None:
            await anyio.sleep(1.0)  # virtual: every create is on the wire by now
            stopper.stop("interrupted")

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_soon)
            report = await run_import(
                MANIFEST, settings_for(sim.base_url, state_path=state), stopper=stopper
            )
        made = {image.id for image in sim.world.images.values()}
    assert report.stopped == "interrupted"
    recorded = {r.image_id for r in report.images if r.image_id is not None}
    assert recorded == made
    assert {r.outcome for r in report.images} <= {Outcome.PENDING, Outcome.NOT_SUBMITTED}
    with Journal(state) as journal:
        for item in PLAN:
            row = journal.get(item.tag)
            assert row is None or row.phase is Phase.SUBMITTED


def test_a_create_certainly_not_processed_leaves_no_trace(tmp_path: Path) -> None:
    """`creating` then `not_sent` (a 429): no row is left to reconcile; an uncertain one stays."""
    with Journal(tmp_path / "s.sqlite") as journal:
        journal.creating("importer:a", "a", "nyc3", 1.0)
        journal.not_sent("importer:a")
        assert journal.get("importer:a") is None
        journal.creating("importer:b", "b", "nyc3", 1.0)
        journal.uncertain("importer:b", 2.0)
        journal.creating("importer:b", "b", "nyc3", 3.0)
        journal.not_sent("importer:b")
        row = journal.get("importer:b")
        assert row is not None
        assert row.phase is Phase.CREATING
        assert row.first_sent_at == 1.0


@pytest.mark.anyio
async def test_resumed_imports_do_not_hold_up_new_submissions(tmp_path: Path) -> None:
    """Entries being polled after a resume leave the submission turns to new entries."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        stuck = [
            create_in_world(sim.world, i) for i in range(4)
        ]  # resumed entries, importing for as long as the test lasts
        for image_id in stuck:
            sim.world.images[image_id].plan = replace(
                sim.world.images[image_id].plan, pending_seconds=10_000.0
            )
        with Journal(state) as journal:
            for i, image_id in enumerate(stuck):
                journal.creating(PLAN[i].tag, f"img-{i}", "nyc3", 0.0)
                journal.submitted(PLAN[i].tag, image_id, "NEW", sim.world.clock.wall())
        settings = settings_for(sim.base_url, state_path=state, concurrency=2, image_timeout=600)
        report = await run_import(MANIFEST, settings)
    fresh = report.images[4:]
    assert all(r.outcome is Outcome.AVAILABLE for r in fresh)
    assert all(r.submitted_at is not None for r in fresh)
    started = min(r.submitted_at for r in report.images if r.submitted_at is not None)
    assert max(r.submitted_at for r in fresh if r.submitted_at) - started < 5.0


@pytest.mark.anyio
async def test_timeout_counts_from_the_original_submission(tmp_path: Path) -> None:
    """An image submitted 50 minutes before the resume times out 10 minutes into it."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        image_id = sim.world.create_image(
            {**PLAN[0].create_request().body(), "url": "https://images.example.com/x-stuck-new.img"}
        ).id
        now = sim.world.clock.wall()
        with Journal(state) as journal:
            journal.creating(PLAN[0].tag, "img-0", "nyc3", now - 3000)
            journal.submitted(PLAN[0].tag, image_id, "NEW", now - 3000)
        start = sim.world.clock.monotonic()
        report = await run_import(
            manifest_of(image_urls(1)[0]), settings_for(sim.base_url, state_path=state)
        )
        took = sim.world.clock.monotonic() - start
    assert report.images[0].outcome is Outcome.TIMED_OUT
    assert took == pytest.approx(600.0, abs=5.0)


@pytest.mark.anyio
async def test_an_earlier_import_of_this_version_stays_the_entrys_after_a_lost_create(
    tmp_path: Path,
) -> None:
    """A lost create that made nothing, beside last month's image of this version: no second one."""
    async with run_simulator(SimulatorConfig.demo(list_in_progress=True)) as sim:
        old = create_in_world(sim.world, 0)
        await anyio.sleep(30 * 24 * 3600)  # a month of virtual time
        state = tmp_path / "new-state.sqlite"
        with Journal(state) as journal:  # this run's create was sent, its answer lost
            journal.creating(PLAN[0].tag, "img-0", "nyc3", sim.world.clock.wall())
        report = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
        live = live_images_by_tag(sim.world)
        posts = sim.world.request_counts["POST /v2/images"]
    result = report.images[0]
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == old
    assert result.action == "unchanged"
    assert result.duplicates_deleted == ()
    assert live[PLAN[0].tag] == 1
    assert posts == 5  # the five other entries only


@pytest.mark.anyio
async def test_an_image_that_finished_after_its_timeout_between_runs_counts(
    tmp_path: Path,
) -> None:
    """Resumed after its timeout passed, an image that became available is reported available."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        image_id = create_in_world(sim.world, 0)
        await anyio.sleep(7200)  # two hours pass between the runs
        with Journal(state) as journal:
            journal.creating(PLAN[0].tag, "img-0", "nyc3", sim.world.clock.wall() - 7200)
            journal.submitted(PLAN[0].tag, image_id, "NEW", sim.world.clock.wall() - 7200)
        report = await run_import(
            manifest_of(image_urls(1)[0]), settings_for(sim.base_url, state_path=state)
        )
    assert report.images[0].outcome is Outcome.AVAILABLE
    assert report.images[0].image_id == image_id


@pytest.mark.anyio
async def test_a_stop_while_reconciling_reports_pending_and_counts_the_create_once(
    tmp_path: Path,
) -> None:
    """Stopped mid-reconciliation twice: `pending` each time, the create counted uncertain once."""
    state = tmp_path / "state.sqlite"
    with Journal(state) as journal:
        journal.creating(PLAN[0].tag, "img-0", "nyc3", time.time())  # just now
    async with run_simulator(SimulatorConfig.demo()) as sim:
        for _ in range(2):
            settings = settings_for(sim.base_url, state_path=state, deadline=30)
            report = await run_import(manifest_of(image_urls(1)[0]), settings)
            assert report.stopped == "deadline"
            assert report.images[0].outcome is Outcome.PENDING
            assert report.images[0].error
    with Journal(state) as journal:
        row = journal.get(PLAN[0].tag)
    assert row is not None
    assert row.phase is Phase.CREATING
    assert row.uncertain == 1
