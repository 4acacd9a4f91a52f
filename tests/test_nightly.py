"""Nightly runs converge on the manifest, reading the account: the scenarios a scheduled job meets.

Each test runs the importer against the in-process simulator (real loopback HTTP, virtual
time), with the entries' files on the simulator's file host, so each night probes them for
their version (``ETag``) as a real run does. "Losing the state" is a fresh in-memory journal.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from importer.cli import main
from importer.clock import LoopClock
from importer.identity import ENTRY_TAG_PREFIX, VERSION_TAG_PREFIX, set_tag
from importer.journal import MEMORY, Journal
from importer.logs import reset_logging
from importer.manifest import Entry, Manifest
from importer.pipeline import plan_only, run_import
from importer.plan import RunPlan
from importer.report import Outcome, Report
from importer.simulator import SimulatorConfig, World, run_simulator
from importer.simulator.app import Simulator
from importer.sources import SourceProber
from tests.helpers import settings_for

SET = "nightly"
NAMES = ("web", "api", "worker")


def manifest(
    sim: Simulator, names: Sequence[str] = NAMES, *, keep: int = 2, **per_entry: Any
) -> Manifest:
    """One entry per name, its file ``<name>.qcow2`` on the simulator's file host."""
    entries = tuple(
        Entry(
            index=i,
            name=name,
            url=sim.file_url(f"{name}.qcow2"),
            region="nyc3",
            distribution="Ubuntu",
            description=None,
            tags=("nightly",),
            keep=keep,
            **per_entry.get(name, {}),
        )
        for i, name in enumerate(names)
    )
    return Manifest(version=1, entries=entries, source="<nightly>", set=SET)


async def night(
    sim: Simulator,
    document: Manifest,
    *,
    state: Path | None = None,
    journal: Journal | None = None,
    **options: Any,
) -> Report:
    """One scheduled run: probe the files, read the account, converge."""
    clock = LoopClock()
    settings = settings_for(sim.base_url, state_path=state, **options.pop("settings", {}))
    return await run_import(
        document,
        settings,
        clock=clock,
        journal=journal,
        prober=SourceProber(clock),
        seed=1,
        **options,
    )


def live(world: World) -> list[Any]:
    """The set's images that are neither failed nor deleted."""
    the_set = set_tag(SET)
    return [
        image
        for image in world.images.values()
        if not image.deleted_by_user and image.status != "deleted" and the_set in image.tags
    ]


def tag_of(image: Any, prefix: str) -> str:
    tag: str = next(tag for tag in image.tags if tag.startswith(prefix))
    return tag


def assert_converged(world: World, names: Sequence[str] = NAMES) -> None:
    """Exactly one available image of the set carries each name; no version twice."""
    images = live(world)
    available = Counter(image.name for image in images if image.status == "available")
    for name in names:
        assert available[name] == 1, f"{name}: {available[name]} available images carry it"
    copies = Counter(
        (tag_of(image, ENTRY_TAG_PREFIX), tag_of(image, VERSION_TAG_PREFIX)) for image in images
    )
    assert set(copies.values()) <= {1}, f"a version of an entry is there twice: {copies}"


def posts(world: World) -> int:
    return world.request_counts["POST /v2/images"]


@pytest.mark.anyio
@pytest.mark.parametrize("list_in_progress", [True, False])
async def test_a_lost_state_costs_a_listing_never_a_duplicate(list_in_progress: bool) -> None:
    """(a) Run, delete the state, run again: no create, every entry `unchanged`."""
    config = SimulatorConfig.demo(list_in_progress=list_in_progress)
    async with run_simulator(config) as sim:
        first = await night(sim, manifest(sim))
        assert [r.outcome for r in first.images] == [Outcome.AVAILABLE] * 3
        before = dict(sim.world.request_counts)
        second = await night(sim, manifest(sim))  # a fresh, in-memory state
        sent = Counter(sim.world.request_counts) - Counter(before)
        assert_converged(sim.world)
    assert sent == {"GET /v2/images": 1}  # one page of the set's listing, nothing else
    assert [r.action for r in second.images] == ["unchanged"] * 3
    assert [r.outcome for r in second.images] == [Outcome.AVAILABLE] * 3
    assert [r.image_id for r in second.images] == [r.image_id for r in first.images]


@pytest.mark.anyio
@pytest.mark.parametrize("keep", [1, 2])
async def test_a_changed_file_replaces_exactly_its_entry(keep: int) -> None:
    """(b) New content behind the same URL: that entry is replaced; the new image takes the
    name, the old one is renamed (keep 2) or deleted (keep 1)."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await night(sim, manifest(sim, keep=keep))
        old = first.images[0].image_id
        assert old is not None
        sim.world.change_file("web.qcow2")
        creates = posts(sim.world)
        second = await night(sim, manifest(sim, keep=keep))
        assert posts(sim.world) - creates == 1
        assert_converged(sim.world)
        new = second.images[0].image_id
        assert new is not None
        assert new != old
        assert sim.world.images[new].name == "web"
        assert sim.world.images[new].status == "available"
        if keep == 2:
            assert not sim.world.images[old].deleted_by_user
            assert sim.world.images[old].name.startswith("web@")
            assert [r.image_id for r in second.images[0].renamed] == [old, new]
            assert second.images[0].deleted == ()
        else:
            assert sim.world.images[old].deleted_by_user
            assert second.images[0].deleted == (old,)
            assert [r.image_id for r in second.images[0].renamed] == [new]
    assert [r.action for r in second.images] == ["replace", "unchanged", "unchanged"]
    assert second.images[0].version_source == "etag"
    assert second.images[0].version != first.images[0].version
    assert second.to_json()["report_version"] == 2


@pytest.mark.anyio
async def test_the_name_stays_on_the_old_version_while_the_new_one_fails() -> None:
    """A replacement that fails never takes the name nor deletes the old version."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await night(sim, manifest(sim, keep=1))
        sim.world.change_file("web.qcow2", defect="decompress")
        second = await night(sim, manifest(sim, keep=1))
        old = sim.world.images[first.images[0].image_id or 0]
        assert_converged(sim.world)
    assert second.images[0].outcome is Outcome.FAILED
    assert not old.deleted_by_user
    assert old.name == "web"


@pytest.mark.anyio
async def test_a_failed_entry_is_imported_once_its_file_is_fixed(tmp_path: Path) -> None:
    """(c) An entry failed last night; its file is fixed: tonight imports it (same state)."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        sim.world.change_file("api.qcow2", defect="decompress")
        first = await night(sim, manifest(sim), state=state)
        assert [r.outcome for r in first.images] == [
            Outcome.AVAILABLE,
            Outcome.FAILED,
            Outcome.AVAILABLE,
        ]
        sim.world.change_file("api.qcow2")  # fixed: new content, sound
        second = await night(sim, manifest(sim), state=state)
        assert_converged(sim.world)
    assert [r.outcome for r in second.images] == [Outcome.AVAILABLE] * 3
    assert [r.action for r in second.images] == ["unchanged", "create", "unchanged"]


@pytest.mark.anyio
async def test_a_failed_entry_is_tried_again_even_when_its_file_did_not_change() -> None:
    """Failed imports never count: the next night tries the entry again."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        sim.world.change_file("api.qcow2", defect="download")
        await night(sim, manifest(sim))
        creates = posts(sim.world)
        second = await night(sim, manifest(sim))
    assert posts(sim.world) - creates == 1
    assert second.images[1].action == "create"


@pytest.mark.anyio
@pytest.mark.parametrize("keep_state", [True, False])
async def test_an_image_deleted_by_a_person_is_imported_again(
    tmp_path: Path, keep_state: bool
) -> None:
    """(d) Someone deletes an available image: the next run imports it again, state or not."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await night(sim, manifest(sim), state=state)
        gone = first.images[1].image_id
        assert gone is not None
        sim.world.delete_image(gone)
        second = await night(sim, manifest(sim), state=state if keep_state else None)
        assert_converged(sim.world)
    again = second.images[1]
    assert again.outcome is Outcome.AVAILABLE
    assert again.image_id != gone
    if keep_state:
        # The journal named the image; the account no longer shows it: read by id, gone.
        assert again.action == "create"
    assert [r.action for r in second.images][::2] == ["unchanged", "unchanged"]


@pytest.mark.anyio
async def test_an_entry_removed_from_the_manifest_is_orphaned_and_pruned_only_when_asked() -> None:
    """(e) `orphaned` in the plan and the report; deleted only with prune."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        await night(sim, manifest(sim))
        worker = next(i for i in live(sim.world) if i.name == "worker")
        smaller = manifest(sim, names=("web", "api"))
        clock = LoopClock()
        with Journal(MEMORY) as journal:
            plan: RunPlan = await plan_only(
                smaller,
                settings_for(sim.base_url),
                clock=clock,
                journal=journal,
                prober=SourceProber(clock),
            )
        assert [image.id for image in plan.orphans] == [worker.id]
        assert plan.counts()["orphaned"] == 1
        assert "1 orphaned" in plan.summary_line()
        kept = await night(sim, smaller)
        assert not worker.deleted_by_user
        assert [(o.image_id, o.deleted) for o in kept.orphans] == [(worker.id, False)]
        assert kept.all_available
        pruned = await night(sim, smaller, prune=True)
        assert worker.deleted_by_user
    assert [(o.image_id, o.deleted) for o in pruned.orphans] == [(worker.id, True)]
    assert pruned.to_json()["summary"]["orphans_deleted"] == 1


async def kill_while_importing(sim: Simulator, document: Manifest, version_of: str) -> None:
    """Run a night and cut it off (as kill -9 would) once an image of the new content imports."""

    async def watch_and_kill(scope: anyio.CancelScope) -> None:
        # The simulated world has no event to wait on: look every 50 ms (virtual).
        while not any(  # noqa: ASYNC110
            version_of in image.tags and image.status in ("NEW", "pending")
            for image in sim.world.images.values()
        ):
            await anyio.sleep(0.05)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_and_kill, tg.cancel_scope)
        await night(sim, document)  # its in-memory journal dies with it


#: The other side of two unknowns: listings that show a new image only after a lag, and
#: DELETE refused while an image imports.
ADVERSE = {"list_lag": 3.0, "refuse_delete_importing": True}


@pytest.mark.anyio
@pytest.mark.parametrize("list_in_progress", [True, False])
@pytest.mark.parametrize("keep", [1, 2])
@pytest.mark.parametrize("adverse", [False, True])
async def test_killed_while_replacing_with_the_state_lost(
    list_in_progress: bool, keep: int, adverse: bool
) -> None:
    """(f) kill -9 while a replacement imports, state lost, rerun: no duplicate, one name each."""
    config = SimulatorConfig.demo(
        list_in_progress=list_in_progress, pending_seconds=20.0, **(ADVERSE if adverse else {})
    )
    async with run_simulator(config) as sim:
        first = await night(sim, manifest(sim, keep=keep))
        sim.world.change_file("web.qcow2")
        clock = LoopClock()
        with Journal(MEMORY) as journal:
            plan = await plan_only(
                manifest(sim, keep=keep),
                settings_for(sim.base_url),
                clock=clock,
                journal=journal,
                prober=SourceProber(clock),
            )
        new_version = plan.items[0].version_tag
        assert new_version is not None
        await kill_while_importing(sim, manifest(sim, keep=keep), new_version)
        killed = [i for i in sim.world.images.values() if new_version in i.tags]
        assert len(killed) == 1
        rerun = await night(sim, manifest(sim, keep=keep))
        assert_converged(sim.world)
        current = [i for i in live(sim.world) if new_version in i.tags]
    assert len(current) == 1
    assert current[0].name == "web"
    assert rerun.images[0].image_id == current[0].id
    # The image the killed run started is the one kept (listed: watched; hidden: it is
    # the older copy, and this run's own is deleted as the duplicate).
    assert current[0].id == killed[0].id
    if not adverse:  # with a listing lag, the killed run's image is not listed yet
        assert rerun.images[0].action == ("watch" if list_in_progress else "replace")
    old = sim.world.images[first.images[0].image_id or 0]
    assert old.deleted_by_user is (keep == 1)


@pytest.mark.anyio
@pytest.mark.parametrize("list_in_progress", [True, False])
@pytest.mark.parametrize("change", [False, True])
@pytest.mark.parametrize("stagger", [0.0, 1.5])
@pytest.mark.parametrize("adverse", [False, True])
async def test_two_runs_at_once_leave_no_duplicate(
    list_in_progress: bool, change: bool, stagger: float, adverse: bool
) -> None:
    """(g) Two runs of one set at the same time, each with its own state: one image per name."""
    config = SimulatorConfig.demo(list_in_progress=list_in_progress, **(ADVERSE if adverse else {}))
    async with run_simulator(config) as sim:
        if change:  # replacing: last night's import, and a file that changed since
            await night(sim, manifest(sim))
            sim.world.change_file("web.qcow2")
            sim.world.change_file("worker.qcow2")
        reports: list[Report] = []

        async def one(delay: float) -> None:
            await anyio.sleep(delay)  # the second starts while the first's imports run
            reports.append(await night(sim, manifest(sim)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0.0)
            tg.start_soon(one, stagger)
        assert_converged(sim.world)
        survivors = {image.name: image.id for image in live(sim.world)}
    for report in reports:
        assert report.stopped is None
        if not adverse:  # else the first may report a copy the second deleted later
            assert {r.name: r.image_id for r in report.images} == {n: survivors[n] for n in NAMES}


@pytest.mark.anyio
async def test_an_unreadable_checksums_file_fails_its_entry_and_the_others_go_on() -> None:
    """(h) checksums_url unreadable, or without a line for the file: that entry fails, clearly."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        sim.world.define_checksums("SHA256SUMS", ["web.qcow2"])  # no line for api.qcow2
        document = manifest(
            sim,
            web={"checksums_url": sim.file_url("SHA256SUMS")},
            api={"checksums_url": sim.file_url("SHA256SUMS")},
            worker={"checksums_url": sim.file_url("MISSING-SUMS")},
        )
        report = await night(sim, document)
        images = live(sim.world)
    web, api, worker = report.images
    assert web.outcome is Outcome.AVAILABLE
    assert web.version_source == "checksums_url"
    assert (api.outcome, api.action) == (Outcome.FAILED, "error")
    assert "has no line for 'api.qcow2'" in (api.error or "")
    assert (worker.outcome, worker.action) == (Outcome.FAILED, "error")
    assert "MISSING-SUMS" in (worker.error or "")
    assert [image.name for image in images] == ["web"]


@pytest.mark.anyio
async def test_a_plan_sends_nothing_but_reads() -> None:
    """`plan`: every kind of action and an orphan, from GETs alone (no POST, PUT or DELETE)."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await night(sim, manifest(sim, names=(*NAMES, "gone")))
        old_web = first.images[0].image_id
        sim.world.change_file("web.qcow2")
        sim.world.delete_image(next(i.id for i in live(sim.world) if i.name == "api"))
        before = Counter(sim.world.request_counts)
        clock = LoopClock()
        with Journal(MEMORY) as journal:
            plan = await plan_only(
                manifest(sim, keep=1),
                settings_for(sim.base_url),
                clock=clock,
                journal=journal,
                prober=SourceProber(clock),
                prune=True,
            )
        sent = Counter(sim.world.request_counts) - before
    assert set(sent) == {"GET /v2/images"}
    assert [item.decision.action.value for item in sorted(plan.items, key=lambda i: i.index)] == [
        "replace",
        "create",
        "unchanged",
    ]
    assert plan.summary_line() == (
        "1 to create, 1 to replace, 0 to watch, 1 unchanged, 1 to rename, 2 to delete, 1 orphaned"
    )
    document = plan.to_json()
    assert document["summary"]["orphaned"] == 1
    web = document["entries"][0]
    assert web["deletes"] == [{"image_id": old_web, "reason": "old_version"}]
    assert web["renames"] == [{"image_id": None, "from": web["create_name"], "to": "web"}]
    assert web["create_name"].startswith("web@")
    assert document["orphans"][0]["delete"] is True


def test_the_plan_command_and_a_resumed_simulated_demo(tmp_path: Path) -> None:
    """`--simulate --state S` keeps the simulator's account beside S: a stopped demo resumes
    (no image lost), and `importer plan` on it shows every entry unchanged, as text and JSON."""
    example = str(Path(__file__).resolve().parents[1] / "manifests" / "example.yaml")
    state, report = tmp_path / "s.sqlite", tmp_path / "r.json"
    runner = CliRunner()
    try:
        common = ["--simulate", "--state", str(state)]
        stopped = runner.invoke(
            main,
            [
                "run",
                example,
                *common,
                "--virtual-time",
                "--deadline",
                "2s",
                "--report",
                str(report),
            ],
        )
        assert stopped.exit_code == 4, stopped.output
        pending = json.loads(report.read_text())["images"]
        assert (tmp_path / "s.sqlite.simulator.json").exists()
        resumed = runner.invoke(
            main, ["run", example, *common, "--virtual-time", "--report", str(report)]
        )
        assert resumed.exit_code == 0, resumed.output
        done = json.loads(report.read_text())["images"]
        planned = runner.invoke(
            main, ["plan", example, *common, "--json", str(tmp_path / "p.json")]
        )
    finally:
        reset_logging()
    assert {image["outcome"] for image in done} == {"available"}
    kept = [image["image_id"] for image in pending if image["image_id"] is not None]
    assert kept
    assert set(kept) <= {image["image_id"] for image in done}
    assert planned.exit_code == 0, planned.output
    assert "0 to create, 0 to replace, 0 to watch, 5 unchanged" in planned.stdout
    assert {e["action"] for e in json.loads((tmp_path / "p.json").read_text())["entries"]} == {
        "unchanged"
    }


def unreachable(document: Manifest) -> Manifest:
    """The same entries, their files on a loopback port nobody listens on (DigitalOcean
    reaches them; the importer cannot)."""
    entries = tuple(
        replace(entry, url=f"http://127.0.0.1:9/{entry.name}.qcow2") for entry in document.entries
    )
    return replace(document, entries=entries)


@pytest.mark.anyio
async def test_sources_the_importer_cannot_reach_converge_on_their_urls() -> None:
    """Unprobeable files (no checksum declared) import once, by URL, and stay unchanged after."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        document = unreachable(manifest(sim))
        first = await night(sim, document)
        second = await night(sim, document)  # a fresh state, as a CronJob without a volume
        assert_converged(sim.world)
        creates = posts(sim.world)
    assert [r.outcome for r in first.images] == [Outcome.AVAILABLE] * 3
    assert {r.version_source for r in first.images} == {"url"}
    assert [(r.outcome, r.action) for r in second.images] == [(Outcome.AVAILABLE, "unchanged")] * 3
    assert creates == 3


@pytest.mark.anyio
async def test_a_file_that_cannot_be_probed_tonight_keeps_its_image() -> None:
    """A host the importer cannot reach tonight is no new version: the image stays, untouched."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await night(sim, manifest(sim))
        before = Counter(sim.world.request_counts)
        second = await night(sim, unreachable(manifest(sim)))
        sent = Counter(sim.world.request_counts) - before
        assert_converged(sim.world)
    assert [r.version_source for r in first.images] == ["etag"] * 3
    assert [(r.outcome, r.action) for r in second.images] == [(Outcome.AVAILABLE, "unchanged")] * 3
    assert [r.image_id for r in second.images] == [r.image_id for r in first.images]
    assert set(sent) == {"GET /v2/images"}


@pytest.mark.anyio
@pytest.mark.parametrize("in_progress_listed", [True, False])
async def test_an_import_in_flight_is_watched_when_its_host_cannot_be_probed(
    in_progress_listed: bool,
) -> None:
    """Last night's import still running and its host unreachable tonight: watched, not redone."""
    config = SimulatorConfig.demo(list_in_progress=in_progress_listed)
    async with run_simulator(config) as sim:
        document = manifest(sim, names=("web",))
        with Journal(MEMORY) as journal:
            first = await night(sim, document, journal=journal, settings={"image_timeout": 2.0})
            # With the state kept (the journal knows the image, were it hidden from listings).
            second = await night(sim, unreachable(document), journal=journal)
        assert_converged(sim.world, names=("web",))
        creates = posts(sim.world)
    assert first.images[0].outcome is Outcome.TIMED_OUT
    (web,) = second.images
    assert (web.outcome, web.action, web.image_id) == (
        Outcome.AVAILABLE,
        "watch",
        first.images[0].image_id,
    )
    assert creates == 1


@pytest.mark.anyio
@pytest.mark.parametrize("changed", [False, True])
async def test_an_image_taken_out_of_the_set_is_never_touched(changed: bool) -> None:
    """A person takes the set tag off an image to keep it: later runs neither rename nor
    delete it, even when its group number is used again."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await night(sim, manifest(sim, names=("web",), keep=1))
        kept = first.images[0].image_id
        assert kept is not None
        sim.world.untag_image(kept, set_tag(SET))
        if changed:
            sim.world.change_file("web.qcow2")
        second = await night(sim, manifest(sim, names=("web",), keep=1))
        outside = sim.world.images[kept]
        assert_converged(sim.world, names=("web",))
    (web,) = second.images
    assert (outside.deleted_by_user, outside.name) == (False, "web")
    assert web.outcome is Outcome.AVAILABLE
    assert web.image_id != kept
    assert web.deleted == ()
    assert kept not in {r.image_id for r in web.renamed}
