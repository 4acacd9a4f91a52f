"""Images in every region the manifest asks for: transfers, over the simulator on virtual time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from importer.cli import exit_code, main
from importer.client import ImagesClient
from importer.clock import LoopClock
from importer.errors import UncertainCreateError
from importer.journal import Journal, TransferPhase
from importer.logs import reset_logging
from importer.manifest import Manifest
from importer.pipeline import plan_only, run_import
from importer.report import Outcome, Report
from importer.simulator import SimulatorConfig, World, run_simulator
from importer.simulator.app import Simulator
from importer.sources import SourceProber
from tests.helpers import image_urls, manifest_of, settings_for

pytestmark = pytest.mark.anyio

THREE = ("nyc3", "ams3", "sgp1")
ACTIONS = "POST /v2/images/{id}/actions"
ACTION_READS = "GET /v2/actions/{id}"


def in_regions(document: Manifest, regions: Sequence[str]) -> Manifest:
    """``document`` with every entry asking for ``regions`` (the first is its import region)."""
    entries = tuple(
        replace(entry, region=regions[0], transfer_regions=tuple(regions[1:]))
        for entry in document.entries
    )
    return replace(document, entries=entries)


def nightly(sim: Simulator, names: Sequence[str], regions: Sequence[str]) -> Manifest:
    """Entries whose files are on the simulator's file host (so versions come from ETags)."""
    urls = [sim.file_url(f"{name}.qcow2") for name in names]
    return in_regions(replace(manifest_of(*urls), set="regions"), regions)


async def run(
    sim: Simulator, document: Manifest, *, probe: bool = False, **settings: Any
) -> Report:
    clock = LoopClock()
    prober = SourceProber(clock) if probe else None
    return await run_import(
        document, settings_for(sim.base_url, **settings), clock=clock, prober=prober, seed=1
    )


def counts(world: World) -> dict[str, int]:
    return dict(world.request_counts)


def busiest_minute(world: World) -> int:
    """The most requests the simulator saw arrive within any 60 s."""
    times = sorted(answer.at for answer in world.answers)
    return max(
        (sum(1 for t in times[i:] if t < start + 60.0) for i, start in enumerate(times)),
        default=0,
    )


async def test_three_regions_for_50_entries_within_the_budget_on_listings_alone() -> None:
    """50 entries in three regions: 100 transfers, paced by the budget (no 429), and their
    completion learned from group listings only: no read of an image or an action by id."""
    config = SimulatorConfig.realistic(per_minute=60, list_in_progress=False)
    document = in_regions(manifest_of(*image_urls(50)), THREE)
    async with run_simulator(config) as sim:
        report = await run(sim, document, per_minute=60, first_poll=60.0, poll_interval=40.0)
        world = sim.world
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 50
    assert all(r.error is None for r in report.images)
    assert all(
        r.region_states() == {"nyc3": "available", "ams3": "transferred", "sgp1": "transferred"}
        for r in report.images
    )
    for image in world.images.values():
        assert image.regions == ["nyc3", "ams3", "sgp1"] or image.regions == [
            "nyc3",
            "sgp1",
            "ams3",
        ]
    served = counts(world)
    assert served[ACTIONS] == 100
    assert served.get(ACTION_READS, 0) == 0
    assert served.get("GET /v2/images/{id}", 0) == 0
    assert world.rate_limited_count == 0
    assert busiest_minute(world) <= 60
    assert report.requests == sum(served.values())
    assert exit_code(report) == 0


async def test_a_failed_transfer_is_reported_for_its_region_only() -> None:
    """``fail-transfer-sgp1``: that entry's sgp1 is ``transfer_failed`` after three tries (each
    errored one learned from its action), its ams3 is transferred, the image stays available
    and named; the others are whole; exit 1."""
    urls = [*image_urls(3), "https://images.example.com/odd-fail-transfer-sgp1.qcow2"]
    document = in_regions(manifest_of(*urls), THREE)
    async with run_simulator(SimulatorConfig.demo()) as sim:
        with capture_logs() as logs:
            report = await run(sim, document)
        world = sim.world
    odd = report.images[3]
    assert odd.outcome is Outcome.AVAILABLE
    states = odd.region_states()
    assert states["ams3"] == "transferred"
    assert states["sgp1"].startswith("transfer_failed: ")
    assert odd.error is not None
    assert "sgp1" in odd.error
    assert "ams3" not in odd.error
    assert [r.error for r in report.images[:3]] == [None] * 3
    image = world.images[odd.image_id or 0]
    assert (image.status, image.name, image.regions) == ("available", "img-3", ["nyc3", "ams3"])
    to_sgp1 = [a for a in world.actions.values() if a.image_id == image.id and a.region == "sgp1"]
    assert len(to_sgp1) == 3  # max_transfers
    # A listing cannot tell an errored copy from a slow one: each errored attempt is learned
    # from its action, the fallback, and nothing else is read by id.
    assert world.request_counts[ACTION_READS] == 3
    assert world.request_counts["GET /v2/images/{id}"] == 0
    assert report.to_json()["summary"]["regions"] == {"transfer_failed": 1, "transferred": 7}
    assert exit_code(report) == 1
    failed = [e for e in logs if e["event"] == "image.transfer_failed"]
    assert [(e["name"], e["region"]) for e in failed] == [("img-3", "sgp1")]


async def test_an_unchanged_image_missing_a_region_gets_exactly_one_transfer() -> None:
    """A night later the manifest adds sgp1: the plan says ``1 to transfer`` per entry, the
    run sends one transfer each and nothing else but the listings."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        first = await run(sim, nightly(sim, ["web", "api"], ("nyc3", "ams3")), probe=True)
        assert [r.action for r in first.images] == ["create", "create"]
        before = counts(sim.world)
        wider = nightly(sim, ["web", "api"], THREE)
        clock = LoopClock()
        plan = await plan_only(
            wider, settings_for(sim.base_url), clock=clock, prober=SourceProber(clock)
        )
        assert [item.transfers for item in plan.items] == [("sgp1",), ("sgp1",)]
        assert "0 to create, 0 to replace, 0 to watch, 2 unchanged, 2 to transfer" in (
            plan.summary_line()
        )
        assert "      transfer image to sgp1" in plan.table()
        second = await run(sim, wider, probe=True)
        after = counts(sim.world)
    assert [r.action for r in second.images] == ["unchanged", "unchanged"]
    assert after[ACTIONS] - before[ACTIONS] == 2
    assert after["POST /v2/images"] == before["POST /v2/images"]
    assert after.get(ACTION_READS, 0) == 0
    assert [r.region_states() for r in second.images] == [
        {"nyc3": "available", "ams3": "transferred", "sgp1": "transferred"}
    ] * 2


async def test_an_image_in_every_region_needs_nothing() -> None:
    """The account's ``regions`` is the truth: a rerun with a fresh state sends no transfer."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        document = nightly(sim, ["web"], THREE)
        await run(sim, document, probe=True)
        before = counts(sim.world)
        again = await run(sim, document, probe=True)
        after = counts(sim.world)
    assert after[ACTIONS] == before[ACTIONS] == 2
    assert again.images[0].region_states()["sgp1"] == "transferred"
    assert again.requests == 1  # the set's listing


async def test_a_rerun_watches_the_transfer_a_stopped_run_left_in_flight(tmp_path: Path) -> None:
    """Stopped by its deadline while copying: the journal holds the action ids, and the rerun
    with that state watches them rather than sending a second transfer."""
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(transfer_seconds=600.0, transfer_seconds_per_gib=0.0)
    async with run_simulator(config) as sim:
        document = nightly(sim, ["web"], ("nyc3", "ams3"))
        stopped = await run(sim, document, probe=True, state_path=state, deadline=60.0)
        assert stopped.stopped == "deadline"
        assert stopped.images[0].outcome is Outcome.PENDING
        assert stopped.images[0].region_states() == {"nyc3": "available", "ams3": "transferring"}
        with Journal(state) as journal:
            row = journal.transfer(stopped.images[0].tag, "ams3")
        assert row is not None
        assert row.phase is TransferPhase.IN_PROGRESS
        assert row.action_id in sim.world.actions
        rerun = await run(sim, document, probe=True, state_path=state)
        served = counts(sim.world)
    assert served[ACTIONS] == 1
    assert rerun.images[0].region_states() == {"nyc3": "available", "ams3": "transferred"}
    assert rerun.images[0].error is None


async def test_a_lost_transfer_answer_is_watched_for_not_resent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transfer whose answer is lost after it was processed: the region shows in a listing
    soon, and no second transfer is sent."""
    real = ImagesClient.transfer
    lost: list[int] = []

    async def answer_lost(self: ImagesClient, image_id: int, region: str, **kwargs: Any) -> Any:
        action = await real(self, image_id, region, **kwargs)
        if not lost:
            lost.append(action.id)
            raise UncertainCreateError("no answer: connection reset", method="POST", path="x")
        return action

    monkeypatch.setattr(ImagesClient, "transfer", answer_lost)
    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run(sim, in_regions(manifest_of(*image_urls(1)), ("nyc3", "ams3")))
        served = counts(sim.world)
    assert lost
    assert served[ACTIONS] == 1
    assert report.images[0].region_states()["ams3"] == "transferred"


async def test_a_new_version_takes_the_name_only_once_it_is_in_every_region() -> None:
    """Replacing a version: the new image is copied first, and renamed to the entry's name
    only after its transfer completed (the old version keeps the name meanwhile)."""
    config = SimulatorConfig.demo(transfer_seconds=30.0, transfer_seconds_per_gib=0.0)
    async with run_simulator(config) as sim:
        document = nightly(sim, ["web"], ("nyc3", "ams3"))
        await run(sim, document, probe=True)
        sim.world.change_file("web.qcow2")
        second = await run(sim, document, probe=True)
        world = sim.world
    assert second.images[0].action == "replace"
    new_id = second.images[0].image_id
    (copy,) = [a for a in world.actions.values() if a.image_id == new_id]
    assert copy.completed_at is not None
    renamed_to_name = [r for r in second.images[0].renamed if r.new == "img-0"]
    assert [r.image_id for r in renamed_to_name] == [new_id]
    puts = [a.at for a in world.answers if a.route == "PUT /v2/images/{id}"]
    # The last PUT gives the new image the name; it comes after the copy completed.
    assert max(puts) >= copy.started_mono + copy.duration
    old = [i for i in world.images.values() if i.id != new_id]
    assert [i.regions for i in old] == [["nyc3", "ams3"]]  # kept version, not copied again


def test_the_regions_example_over_the_command_line(tmp_path: Path) -> None:
    """``manifests/example-regions.yaml``: the plan counts 7 transfers; the run copies every
    image where asked, reports the one region whose transfers always fail, and exits 1."""
    example = str(Path(__file__).resolve().parents[1] / "manifests" / "example-regions.yaml")
    runner = CliRunner()
    try:
        plan = runner.invoke(main, ["plan", example, "--simulate"], catch_exceptions=False)
        assert plan.exit_code == 0
        assert "5 to create, 0 to replace, 0 to watch, 0 unchanged, 7 to transfer" in plan.stdout
        report_path = tmp_path / "report.json"
        ran = runner.invoke(
            main,
            ["run", example, "--simulate", "--virtual-time", "--report", str(report_path)],
            catch_exceptions=False,
        )
    finally:
        reset_logging()
    assert ran.exit_code == 1
    data = json.loads(report_path.read_text())
    regions = {image["name"]: image["regions"] for image in data["images"]}
    assert regions["worker-rocky-9-2024-06"] == {"fra1": "available", "lon1": "transferred"}
    assert regions["ci-runner-fedora-40"] == {"sfo3": "available"}
    vpn = regions["vpn-gateway-2024-06"]
    assert (vpn["nyc3"], vpn["ams3"]) == ("available", "transferred")
    assert vpn["sgp1"].startswith("transfer_failed: ")
    assert data["summary"]["regions"] == {"transfer_failed": 1, "transferred": 6}
    assert {image["outcome"] for image in data["images"]} == {"available"}
    assert Report.from_json(data).to_json()["images"] == data["images"]
