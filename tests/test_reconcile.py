"""Reconciliation against an API that takes the other side of every unknown.

Listings that lag behind creates, failed images purged before they are read,
deletions cut short by a stop, copies to choose between, deletions refused while
an image imports, and waits that must carry over from one run to the next.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from importer.api import Image
from importer.catalog import DECOMPRESS_ERROR
from importer.clock import LoopClock
from importer.journal import DeletionState, Journal, Phase
from importer.pipeline import Stopper, run_import
from importer.plan import make_plan
from importer.poller import GIB, UNREAD_FAILURE, DurationModel, ListingLag
from importer.reconcile import HiddenBound
from importer.report import Outcome
from importer.simulator import SimulatorConfig, World, run_simulator
from importer.simulator.world import FaultPlan, ImportPlan
from importer.sizing import HeadSizer
from tests.helpers import image_urls, manifest_of, settings_for
from tests.test_pipeline import live_images_by_tag

ONE = manifest_of(*image_urls(1))
ONE_PLAN = make_plan(ONE)
TAG = ONE_PLAN[0].tag


def images_by_tag(world: World) -> Counter[str]:
    """How many images were ever made with each entry tag, deleted or not."""
    return Counter(
        tag for image in world.images.values() for tag in image.tags if tag.startswith("importer:")
    )


def journal_lost_create(state: Path, tag: str = TAG, *, at: float | None = None) -> None:
    """Journal a create for ``tag`` that left (at ``at``, default now) and got no answer."""
    with Journal(state) as journal:
        journal.creating(tag, "img-0", "nyc3", time.time() if at is None else at)


def make_copy(world: World, *, index: int = 0, **plan: Any) -> int:
    """Make an image of entry ``index`` in the simulator (a lost create's), its plan adjusted."""
    item = make_plan(ONE)[index]
    image = world.create_image(item.create_request().body())
    if plan:
        image.plan = replace(image.plan, **plan)
    return image.id


def failing(seconds: float) -> dict[str, Any]:
    """Plan changes for an import that fails ``seconds`` after its creation."""
    return {"fail_after": seconds, "failure_message": DECOMPRESS_ERROR}


def imports_from_now_fail(world: World, *, after: float) -> None:
    """Every import created from now on fails ``after`` seconds (copies made so far keep
    their plans)."""
    plan_import = world.plan_import
    world.plan_import = (  # type: ignore[method-assign]
        lambda name, url: replace(plan_import(name, url), **failing(after))
    )


# -- the listing lag -------------------------------------------------------------


def test_listing_lag_is_bounded_by_twice_the_longest_seen() -> None:
    """Before any create is seen listed: the default; then twice the longest lag, capped."""
    lag = ListingLag()
    assert lag.bound(600.0) == 600.0
    lag.sent(1, 100.0)
    lag.sent(2, 101.0)
    lag.listed([Image(id=1, status="NEW")], 103.0)
    assert lag.longest == 3.0
    lag.listed([Image(id=1, status="NEW"), Image(id=2, status="NEW")], 110.0)
    assert lag.longest == 9.0  # the first listing showing image 2 bounds its lag
    assert lag.bound(600.0) == 18.0
    assert lag.bound(10.0) == 10.0


def test_a_first_listing_long_after_the_send_says_nothing_of_the_lag() -> None:
    """Listed first 200 s after its send, never missed before: the lag is not learned from it."""
    lag = ListingLag()
    lag.sent(1, 100.0, "g")
    lag.listed([Image(id=1, status="NEW")], 300.0, "g")
    assert lag.longest is None
    assert lag.bound(600.0) == 600.0


def test_an_image_a_listing_missed_bounds_the_lag_however_late_it_shows() -> None:
    """Missed by its group's listing 20 s after its send, shown at 200 s: a lag of up to 200 s."""
    lag = ListingLag()
    lag.sent(1, 100.0, "g")
    lag.sent(2, 100.0, "g")
    lag.listed([Image(id=2, status="NEW")], 120.0, "g")  # 2 shown within 20 s, 1 missed
    assert lag.longest == 20.0
    lag.listed([Image(id=1, status="NEW"), Image(id=2, status="NEW")], 300.0, "g")
    assert lag.longest == 200.0
    assert lag.bound(600.0) == 400.0


def test_the_hidden_bound_waits_for_enough_imports_and_keeps_a_margin() -> None:
    """None before 10 imports finished, or for a file of unknown size; then 1.5 x the longest
    seen (at least 1.25 x the fit)."""
    model = DurationModel()
    for _ in range(9):
        model.observe(GIB, 100.0)
    assert HiddenBound.of(model, GIB, interval=30.0) is None
    model.observe(GIB, 100.0)
    assert HiddenBound.of(model, GIB, interval=30.0) == pytest.approx(1.5 * 125.0 + 30.0)
    assert HiddenBound.of(model, None, interval=30.0) is None  # it could be the largest
    model.observe(GIB, 200.0)  # one import far slower than the rest stretches the bound
    fit = model.fit(GIB)
    assert HiddenBound.of(model, GIB, interval=30.0) == pytest.approx(1.5 * 200.0 + 30.0)
    assert fit < 200.0


@pytest.mark.anyio
@pytest.mark.parametrize("list_in_progress", [True, False], ids=["listed", "hidden"])
async def test_no_second_create_for_an_image_the_listing_does_not_show_yet(
    tmp_path: Path, list_in_progress: bool
) -> None:
    """Listings 3 s behind creates, half the creates' answers lost: never a second create."""
    manifest = manifest_of(*image_urls(24))
    config = SimulatorConfig.demo(
        list_in_progress=list_in_progress, list_lag=3.0, pending_seconds=120.0
    )
    async with run_simulator(config) as sim:
        draw_faults = sim.world.draw_faults

        def lose_second_half(method: str, path_qs: str, body: bytes) -> FaultPlan:
            faults = draw_faults(method, path_qs, body)
            late = any(f"ok-{i}.qcow2".encode() in body for i in range(12, 24))
            return replace(faults, lost_create=True) if method == "POST" and late else faults

        sim.world.draw_faults = lose_second_half  # type: ignore[method-assign]
        # 18 requests a minute: the creates go in three bursts, the later ones lost
        # after listings were seen showing importing images.
        settings = settings_for(sim.base_url, state_path=tmp_path / "s.sqlite", per_minute=20)
        report = await run_import(manifest, settings)
        made = images_by_tag(sim.world)
        lost = sim.world.fault_counts["lost_create"]
        posts = sim.world.request_counts["POST /v2/images"]
    assert lost == 12
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 24
    assert posts == 24
    assert made == {item.tag: 1 for item in make_plan(manifest)}
    assert all(r.duplicates_deleted == () for r in report.images)


@pytest.mark.anyio
async def test_a_rerun_goes_on_waiting_where_the_last_run_stopped(tmp_path: Path) -> None:
    """Absence is proven `reconcile_window` after the create left, not after each rerun began."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        left = anyio.current_time()
        journal_lost_create(state)  # and it made nothing
        settings = settings_for(sim.base_url, state_path=state, reconcile_window=600.0)
        first = await run_import(ONE, replace(settings, deadline=300.0))
        assert first.stopped == "deadline"
        assert first.images[0].outcome is Outcome.PENDING
        await anyio.sleep(100.0)  # between the runs
        second = await run_import(ONE, settings)
        posts = [a.at for a in sim.world.answers if a.route == "POST /v2/images"]
    assert second.images[0].outcome is Outcome.AVAILABLE
    assert len(posts) == 1
    # Sent once a listing made 600 s after the lost create showed nothing (asked
    # at most one poll interval late), not 600 s after the rerun began (1,000 s).
    assert 600.0 <= posts[0] - left <= 600.0 + 2 * settings.poll_interval


# -- failure messages --------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failure_never_seen_before_its_image_was_purged_says_so() -> None:
    """A failed image purged before any read: the report says so plainly, not 'not found'."""
    config = SimulatorConfig.demo(purge_failed_after=1.0)
    async with run_simulator(config) as sim:
        url = "https://images.example.com/broken-fail-fast.qcow2"
        report = await run_import(manifest_of(url), settings_for(sim.base_url))
    result = report.images[0]
    assert result.outcome is Outcome.FAILED
    assert result.error == UNREAD_FAILURE


@pytest.mark.anyio
async def test_the_last_look_before_a_timeout_reports_a_purged_failure_plainly() -> None:
    """Failed and purged just before its timeout: the last look's 404 is not the raw message."""
    config = SimulatorConfig.demo(purge_failed_after=0.005)
    async with run_simulator(config) as sim:
        plan_import = sim.world.plan_import

        def late_failure(name: str, url: str) -> ImportPlan:
            # Fails and is purged within the last 0.01 s before the 10 s timeout.
            return replace(plan_import(name, url), pending_seconds=100.0, **failing(9.99))

        sim.world.plan_import = late_failure  # type: ignore[method-assign]
        settings = settings_for(sim.base_url, image_timeout=10.0)
        report = await run_import(ONE, settings, seed=1)
        answers = sim.world.answers
    # The last look, at the timeout, met the 404 (the entry is then imported again,
    # as for any image that vanished, and its copies fail the same way).
    assert any(
        (a.route, a.status) == ("GET /v2/images/{id}", 404)
        and a.at == pytest.approx(10.0, abs=1e-3)
        for a in answers
    )
    result = report.images[0]
    assert result.outcome is Outcome.FAILED
    assert result.error == UNREAD_FAILURE


@pytest.mark.anyio
async def test_a_lost_creates_failure_seen_in_a_listing_is_reported_with_its_message(
    tmp_path: Path,
) -> None:
    """Listed failed, then purged: the message seen is reported, and no second create goes out."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(list_failed=True, purge_failed_after=5.0)
    async with run_simulator(config) as sim:
        journal_lost_create(state)
        made = make_copy(sim.world, **failing(0.5))
        report = await run_import(ONE, settings_for(sim.base_url, state_path=state))
        posts = sim.world.request_counts["POST /v2/images"]
    result = report.images[0]
    assert result.outcome is Outcome.FAILED
    assert result.image_id == made
    assert result.error == DECOMPRESS_ERROR
    assert posts == 0


@pytest.mark.anyio
async def test_an_image_that_vanished_still_runs_the_sweep(tmp_path: Path) -> None:
    """The polled copy fails and is purged; the sweep finds the lost create's copy and keeps it."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(list_in_progress=True, list_lag=10.0, purge_failed_after=0.2)
    async with run_simulator(config) as sim:
        journal_lost_create(state)
        # The lost create's copy: listed only after 10 s, available after 30 s.
        first = make_copy(sim.world, pending_seconds=29.0)
        imports_from_now_fail(sim.world, after=0.5)
        # A window shorter than the lag: taken absent, so a second copy is made.
        settings = settings_for(sim.base_url, state_path=state, reconcile_window=5.0)
        report = await run_import(ONE, settings)
        live = live_images_by_tag(sim.world)
    result = report.images[0]
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == first
    assert live == {TAG: 1}


# -- deletions -------------------------------------------------------------------


def test_a_deletion_is_named_from_its_intent_until_refused(tmp_path: Path) -> None:
    """Journaled before the DELETE: named at once; refused: not named; answered: named."""
    with Journal(tmp_path / "s.sqlite") as journal:
        journal.creating("importer:a", "a", "nyc3", 1.0)
        journal.deleting("importer:a", 7, 2.0)
        journal.deleting("importer:a", 8, 2.0)
        row = journal.get("importer:a")
        assert row is not None
        assert row.duplicates == (7, 8)
        journal.deletion_result(7, DeletionState.DELETED, 3.0)
        journal.deletion_result(8, DeletionState.REFUSED, 3.0, "still importing")
        row = journal.get("importer:a")
        assert row is not None
        assert row.duplicates == (7,)
        assert [d.state for d in journal.deletions("importer:a")] == [
            DeletionState.DELETED,
            DeletionState.REFUSED,
        ]


@pytest.mark.anyio
async def test_a_stop_while_a_delete_is_on_the_wire_still_reports_the_deletion(
    tmp_path: Path,
) -> None:
    """Stopped mid-DELETE (its answer 30 s late): both reports name the copy deleted."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(list_in_progress=True, delay_after=0.0, delay_seconds=30.0)
    async with run_simulator(config) as sim:
        journal_lost_create(state)
        kept, extra = make_copy(sim.world), make_copy(sim.world)
        stopper = Stopper()
        deleting = anyio.Event()
        delete_image = sim.world.delete_image

        def delete_and_tell(image_id: int) -> None:
            delete_image(image_id)
            deleting.set()

        sim.world.delete_image = delete_and_tell  # type: ignore[method-assign]

        async def stop_once_deleting() -> None:
            await deleting.wait()
            await anyio.sleep(1.0)  # the DELETE is done; its answer is on its way
            stopper.stop("terminated")

        settings = settings_for(sim.base_url, state_path=state)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_once_deleting)
            first = await run_import(ONE, settings, stopper=stopper)
        assert sim.world.images[extra].deleted_by_user
        second = await run_import(ONE, settings)
    assert first.stopped == "terminated"
    assert first.images[0].outcome is Outcome.PENDING
    assert first.images[0].duplicates_deleted == (extra,)
    assert first.to_json()["summary"]["duplicates_deleted"] == 1
    assert second.images[0].outcome is Outcome.AVAILABLE
    assert second.images[0].image_id == kept
    assert second.images[0].duplicates_deleted == (extra,)


@pytest.mark.anyio
async def test_the_sweep_keeps_the_available_original_not_the_polled_copy(
    tmp_path: Path,
) -> None:
    """Two available copies after a lost create: the older one stays, the polled one goes."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        journal_lost_create(state)
        original = make_copy(sim.world, new_seconds=1.0, pending_seconds=5.0)  # hidden until 6 s
        settings = settings_for(sim.base_url, state_path=state, reconcile_window=5.0)
        report = await run_import(ONE, settings)
        live = live_images_by_tag(sim.world)
        polled = max(sim.world.images)
    result = report.images[0]
    assert polled != original
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == original
    assert result.duplicates_deleted == (polled,)
    assert live == {TAG: 1}
    assert sim.world.images[polled].deleted_by_user


@pytest.mark.anyio
async def test_a_failed_polled_copy_gives_way_to_an_available_one(tmp_path: Path) -> None:
    """The polled copy fails; the lost create's copy is available: the entry is available."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        journal_lost_create(state)
        original = make_copy(sim.world, new_seconds=1.0, pending_seconds=5.0)
        imports_from_now_fail(sim.world, after=0.5)
        settings = settings_for(sim.base_url, state_path=state, reconcile_window=5.0)
        report = await run_import(ONE, settings)
        live = live_images_by_tag(sim.world)
    result = report.images[0]
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == original
    assert result.error is None
    assert live == {TAG: 1}


@pytest.mark.anyio
async def test_a_copy_still_importing_is_deleted_once_the_api_allows_it(tmp_path: Path) -> None:
    """DELETE refused while the extra copy imports: retried later, the entry never fails."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(list_in_progress=True, refuse_delete_importing=True)
    async with run_simulator(config) as sim:
        journal_lost_create(state)
        kept = make_copy(sim.world, new_seconds=0.2, pending_seconds=0.3)
        extra = make_copy(sim.world, new_seconds=0.2, pending_seconds=20.0)
        with capture_logs() as logs:
            report = await run_import(ONE, settings_for(sim.base_url, state_path=state))
        refusals = sim.world.answers
    result = report.images[0]
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == kept
    assert result.duplicates_deleted == (extra,)
    assert result.error is None
    assert sim.world.images[extra].deleted_by_user
    assert any(a.route == "DELETE /v2/images/{id}" and a.status == 422 for a in refusals)
    assert any(e["event"] == "image.duplicate_refused" for e in logs)


@pytest.mark.anyio
async def test_a_copy_stuck_importing_is_left_and_reported_not_failed(tmp_path: Path) -> None:
    """An extra copy that never stops importing cannot be deleted: named in the error, kept up."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(list_in_progress=True, refuse_delete_importing=True)
    async with run_simulator(config) as sim:
        journal_lost_create(state)
        kept = make_copy(sim.world, new_seconds=0.2, pending_seconds=0.3)
        stuck = make_copy(sim.world, new_seconds=0.2, pending_seconds=float("inf"))
        settings = settings_for(
            sim.base_url, state_path=state, reconcile_window=60.0, deadline=300.0
        )
        report = await run_import(ONE, settings)
    result = report.images[0]
    assert report.stopped is None
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id == kept
    assert result.duplicates_deleted == ()
    assert result.error is not None
    assert str(stuck) in result.error
    with Journal(state) as journal:
        row = journal.get(TAG)
        assert row is not None
        assert row.phase is Phase.FINISHED
        assert [(d.image_id, d.state) for d in journal.deletions(TAG)] == [
            (stuck, DeletionState.REFUSED)
        ]


@pytest.mark.anyio
async def test_a_deletion_a_killed_run_made_is_named_by_the_next_report_once(
    tmp_path: Path,
) -> None:
    """A DELETE journaled by a run that never wrote its report: the next run names it, once."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        kept, extra = make_copy(sim.world), make_copy(sim.world)
        await anyio.sleep(60.0)  # both available
        sim.world.delete_image(extra)
        with Journal(state) as journal:  # what the killed run had journaled
            journal.deleting(TAG, extra, time.time())
        settings = settings_for(sim.base_url, state_path=state)
        first = await run_import(ONE, settings)
        second = await run_import(ONE, settings)
    assert first.images[0].outcome is Outcome.AVAILABLE
    assert first.images[0].image_id == kept
    assert first.images[0].duplicates_deleted == (extra,)
    assert second.images[0].duplicates_deleted == ()


# -- a hidden import slower than any seen -----------------------------------------


@pytest.mark.anyio
async def test_a_late_copy_of_a_create_judged_absent_is_deleted_when_it_shows() -> None:
    """Importing images hidden: a lost create's image takes far longer than every import
    seen, so its entry is created again once imports of its size are surely done (not an
    hour later); the late copy is deleted as soon as a listing shows it, the entry keeps
    its image, and the report names the copy."""
    target = "ok-29.qcow2"
    async with run_simulator(SimulatorConfig.realistic(seed=0)) as sim:
        # Files on the simulator's host, so that their sizes are known (HEAD).
        manifest = manifest_of(*(f"{sim.base_url}/_files/ok-{i}.qcow2" for i in range(30)))
        world = sim.world
        draw_faults, create_image = world.draw_faults, world.create_image
        slow: list[int] = []

        def lose_targets_first_create(method: str, path_qs: str, body: bytes) -> FaultPlan:
            faults = draw_faults(method, path_qs, body)
            if method == "POST" and target.encode() in body and not slow:
                return replace(faults, lost_create=True)
            return faults

        def slow_first_copy(body: object) -> Any:
            image = create_image(body)
            if target in str(body) and not slow:
                # Available about 50 minutes after its creation: within the hour.
                image.plan = replace(image.plan, pending_seconds=3000.0)
                slow.append(image.id)
            return image

        world.draw_faults = lose_targets_first_create  # type: ignore[method-assign]
        world.create_image = slow_first_copy  # type: ignore[method-assign]
        clock = LoopClock()
        started = clock.wall()
        settings = settings_for(sim.base_url, poll_interval=10.0)
        report = await run_import(manifest, settings, clock=clock, sizer=HeadSizer())
        late = world.images[slow[0]]
        live = live_images_by_tag(world)
        posts = world.request_counts["POST /v2/images"]
    result = report.images[29]
    assert result.outcome is Outcome.AVAILABLE
    assert result.image_id != late.id
    assert result.finished_at is not None
    # Created again once 10 imports had finished and the longest seen, by a margin, had
    # passed: about 20 minutes, not the hour the per-image timeout would have waited.
    assert result.finished_at - started < 1500.0
    assert late.available_at is not None
    assert late.available_at > result.finished_at
    assert late.deleted_by_user
    assert result.duplicates_deleted == (late.id,)
    assert posts == 31
    assert live == {item.tag: 1 for item in make_plan(manifest)}
