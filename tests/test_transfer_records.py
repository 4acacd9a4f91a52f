"""Transfers in the plan, the entry's state machine, the journal and the report (no HTTP)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import structlog
from structlog.testing import capture_logs

from importer.api import Image
from importer.identity import set_tag, version_tag
from importer.inventory import Inventory
from importer.journal import MEMORY, Journal, TransferPhase
from importer.lifecycle import TRANSITIONS, EntryLifecycle, IllegalTransitionError, State
from importer.manifest import Manifest
from importer.plan import RunPlan, fallback_version, make_plan
from importer.report import ImageResult, Outcome, Report
from tests.fakes import FakeClock
from tests.helpers import image_urls, manifest_of

THREE = ("nyc3", "ams3", "sgp1")


def with_regions(document: Manifest, *regions: tuple[str, ...]) -> Manifest:
    entries = tuple(
        replace(entry, region=wanted[0], transfer_regions=wanted[1:])
        for entry, wanted in zip(document.entries, regions, strict=True)
    )
    return replace(document, entries=entries)


def account_image(document: Manifest, index: int, image_id: int, *regions: str) -> Image:
    """The entry's image of its current version, available in ``regions``."""
    item = make_plan(document)[index]
    entry = document.entries[index]
    tags = (set_tag(document.set), item.tag, version_tag(fallback_version(entry)))
    return Image(
        id=image_id, name=entry.name, status="available", tags=tags, regions=tuple(regions)
    )


# --- the plan -----------------------------------------------------------------------------


def test_the_plan_transfers_new_imports_and_unchanged_images_missing_a_region() -> None:
    """A create is transferred to all but its import region; an unchanged image to the regions
    it is not in; one already everywhere, nowhere. The counts line says how many."""
    document = with_regions(manifest_of(*image_urls(3)), THREE, THREE, ("nyc3", "ams3"))
    images = [
        account_image(document, 1, 11, "nyc3", "ams3"),
        account_image(document, 2, 12, "nyc3", "ams3"),
    ]
    items = make_plan(document, inventory=Inventory.of(set_tag(document.set), images))
    by_index = {item.index: item for item in items}
    assert [by_index[i].decision.action.value for i in range(3)] == [
        "create",
        "unchanged",
        "unchanged",
    ]
    assert [by_index[i].transfers for i in range(3)] == [("ams3", "sgp1"), ("sgp1",), ()]
    plan = RunPlan(document.set, set_tag(document.set), items)
    assert plan.counts()["transfer"] == 3
    assert (
        "1 to create, 0 to replace, 0 to watch, 2 unchanged, 3 to transfer" in plan.summary_line()
    )
    assert plan.to_json()["summary"]["transfer"] == 3
    entries = plan.to_json()["entries"]
    assert entries[1]["transfers"] == ["sgp1"]
    assert entries[1]["regions"] == list(THREE)
    table = plan.table()
    assert "      transfer new image to ams3" in table
    assert "      transfer image to sgp1" in table
    assert not any("img-2" in line for line in plan.table(every=False))


def test_a_single_region_manifest_keeps_its_counts_line() -> None:
    """Without ``regions`` the counts line is as before (no ``to transfer``); JSON has the 0."""
    document = manifest_of(*image_urls(2))
    plan = RunPlan(document.set, set_tag(document.set), make_plan(document))
    assert "transfer" not in plan.summary_line()
    assert plan.to_json()["summary"]["transfer"] == 0


# --- the state machine and the journal ------------------------------------------------------


def entry_of(journal: Journal) -> EntryLifecycle:
    document = with_regions(manifest_of(*image_urls(1)), THREE)
    return EntryLifecycle(make_plan(document)[0], journal, FakeClock(), structlog.get_logger())


@pytest.mark.anyio
async def test_transfers_are_journaled_reported_and_logged_region_by_region() -> None:
    """unchanged -> transferring -> finished: each region's transfer in journal, report, log."""
    with Journal(MEMORY) as journal, capture_logs() as logs:
        entry = entry_of(journal)
        image = Image(id=5, status="available", regions=("nyc3",))
        entry.unchanged(image)
        assert entry.result.regions == (("ams3", "not_transferred"), ("sgp1", "not_transferred"))
        entry.transferring(("ams3", "sgp1"))
        assert entry.state is State.TRANSFERRING
        entry.transfer_sending("ams3", 5)
        sending = journal.transfer(entry.tag, "ams3")
        assert sending is not None
        assert sending.phase is TransferPhase.SENDING
        entry.transfer_started("ams3", 77)
        started = journal.transfer(entry.tag, "ams3")
        assert started is not None
        assert (started.phase, started.action_id, started.image_id) == (
            TransferPhase.IN_PROGRESS,
            77,
            5,
        )
        entry.transfer_sending("sgp1", 5)
        entry.transfer_not_sent("sgp1")
        assert journal.transfer(entry.tag, "sgp1") is None
        entry.transfer_sending("sgp1", 5)
        entry.transfer_started("sgp1", 78)
        entry.transfer_errored("sgp1", "the transfer action errored", 1)
        errored = journal.transfer(entry.tag, "sgp1")
        assert errored is not None
        assert errored.phase is TransferPhase.ERRORED
        entry.transferred("ams3")
        entry.transfer_failed("sgp1", "the transfer action errored (3 attempts)")
        failed = journal.transfer(entry.tag, "sgp1")
        assert failed is not None
        assert failed.phase is TransferPhase.FAILED
        entry.available(
            image, error="transfer to sgp1 failed: the transfer action errored (3 attempts)"
        )
    assert entry.result.region_states() == {
        "nyc3": "available",
        "ams3": "transferred",
        "sgp1": "transfer_failed: the transfer action errored (3 attempts)",
    }
    # ``image.unchanged`` is a debug line, which an earlier test's logging setup may filter.
    assert [e["event"] for e in logs if e["event"] != "image.unchanged"] == [
        "image.transferring",
        "image.transfer_started",
        "image.transfer_started",
        "image.transfer_errored",
        "image.transferred",
        "image.transfer_failed",
        "image.available",
    ]


@pytest.mark.anyio
async def test_regions_the_image_is_in_already_count_as_transferred() -> None:
    """An unchanged image already in ams3: reported ``transferred`` there without a transfer."""
    with Journal(MEMORY) as journal:
        entry = entry_of(journal)
        entry.unchanged(Image(id=5, status="available", regions=("nyc3", "ams3")))
    assert dict(entry.result.regions) == {"ams3": "transferred", "sgp1": "not_transferred"}


@pytest.mark.anyio
async def test_transfer_records_outside_transferring_are_bugs() -> None:
    """A transfer recorded before the image is available, or after the entry ended: refused."""
    with Journal(MEMORY) as journal:
        entry = entry_of(journal)
        with pytest.raises(IllegalTransitionError):
            entry.transfer_started("ams3", 1)
        with pytest.raises(IllegalTransitionError):
            entry.transferring(("ams3",))
    assert TRANSITIONS["transferring"][1] is State.TRANSFERRING
    assert State.TRANSFERRING in TRANSITIONS["rotating"][0]
    assert State.TRANSFERRING in TRANSITIONS["stopped"][0]


# --- the report -----------------------------------------------------------------------------


def test_the_report_gives_each_entry_its_regions_and_counts_them() -> None:
    """``regions`` maps every region to its state, the import region first; an entry whose
    image is not available shows its outcome there; the summary counts transfer states."""
    done = ImageResult(
        index=0, name="a", region="nyc3", tag="importer:0", outcome=Outcome.AVAILABLE,
        regions=(("ams3", "transferred"), ("sgp1", "transfer_failed: refused")),
    )  # fmt: skip
    failed = ImageResult(
        index=1, name="b", region="fra1", tag="importer:1", outcome=Outcome.FAILED,
        regions=(("lon1", "not_transferred"),),
    )  # fmt: skip
    alone = ImageResult(index=2, name="c", region="tor1", tag="importer:2", outcome=Outcome.PENDING)
    report = Report(
        manifest="m.yaml", api_url="https://api.example.com", started_at=0.0, finished_at=1.0,
        images=(done, failed, alone), requests=3, rate_limited=0,
    )  # fmt: skip
    data = report.to_json()
    assert [image["regions"] for image in data["images"]] == [
        {"nyc3": "available", "ams3": "transferred", "sgp1": "transfer_failed: refused"},
        {"fra1": "failed", "lon1": "not_transferred"},
        {"tor1": "pending"},
    ]
    assert list(data["images"][0]["regions"]) == ["nyc3", "ams3", "sgp1"]
    assert data["summary"]["regions"] == {
        "not_transferred": 1,
        "transfer_failed": 1,
        "transferred": 1,
    }
    assert data["report_version"] == 2
