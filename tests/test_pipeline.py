"""End to end over loopback HTTP: the importer against the simulator, on virtual time."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from importer.catalog import DECOMPRESS_ERROR
from importer.pipeline import run_import
from importer.report import Outcome, Report
from importer.simulator import SimulatorConfig, World, run_simulator
from tests.helpers import TEST_TOKEN, image_urls, manifest_of, settings_for


def live_images_by_tag(world: World) -> Counter[str]:
    """How many images that are not failed or deleted carry each importer entry tag."""
    counts: Counter[str] = Counter()
    for image in world.images.values():
        if image.deleted_by_user or image.status == "deleted":
            continue
        for tag in image.tags:
            if tag.startswith("importer:"):
                counts[tag] += 1
    return counts


async def run_against(
    urls: list[str], sim: dict[str, Any] | None = None, **settings: Any
) -> tuple[Report, World]:
    async with run_simulator(SimulatorConfig.demo(**(sim or {}))) as simulator:
        report = await run_import(
            manifest_of(*urls), settings_for(simulator.base_url, **settings), seed=1
        )
        return report, simulator.world


@pytest.mark.anyio
async def test_all_images_become_available() -> None:
    """Every entry is submitted once, polled to available, and reported in manifest order."""
    with capture_logs() as logs:
        report, world = await run_against(image_urls(12))
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 12
    assert [r.name for r in report.images] == [f"img-{i}" for i in range(12)]
    assert world.request_counts["POST /v2/images"] == 12
    assert all(count == 1 for count in live_images_by_tag(world).values())
    assert len(live_images_by_tag(world)) == 12
    for result in report.images:
        assert result.image_id in world.images
        assert result.status == "available"
        assert result.submitted_at is not None
        assert result.finished_at is not None
        assert result.finished_at >= result.submitted_at
    events = Counter(entry["event"] for entry in logs)
    assert events["image.submitted"] == 12
    assert events["image.available"] == 12
    assert events["run.finished"] == 1
    assert report.requests == sum(world.request_counts.values())
    assert report.rate_limited == 0


@pytest.mark.anyio
async def test_failed_imports_are_reported_with_the_api_message() -> None:
    """A late `deleted` + error_message is `failed` with that message; others still succeed."""
    urls = [
        "https://images.example.com/a-fail-decompress.qcow2.gz",
        "https://images.example.com/b.qcow2",
        "https://images.example.com/c-fail-fast.img",
    ]
    report, _ = await run_against(urls)
    outcomes = [r.outcome for r in report.images]
    assert outcomes == [Outcome.FAILED, Outcome.AVAILABLE, Outcome.FAILED]
    assert report.images[0].error == DECOMPRESS_ERROR
    assert report.images[0].status == "deleted"
    assert report.images[2].error


@pytest.mark.anyio
async def test_401_mid_run_stops_every_request() -> None:
    """After the first 401 nothing is sent; submitted images are pending, others not_submitted."""
    with capture_logs() as logs:
        # 7 requests answered: the account's listing, then 6 creates.
        report, world = await run_against(image_urls(10), sim={"revoke_after": 7}, concurrency=2)
    assert report.stopped == "authentication_failed"
    sent_after_revocation = sum(world.request_counts.values()) - 7
    assert sent_after_revocation == 1  # the one request that was answered 401
    assert report.requests == 8
    outcomes = Counter(r.outcome for r in report.images)
    assert outcomes[Outcome.PENDING] == 6
    assert outcomes[Outcome.NOT_SUBMITTED] == 4
    assert all(r.image_id is not None for r in report.images if r.outcome is Outcome.PENDING)
    assert any(entry["event"] == "run.authentication_failed" for entry in logs)


@pytest.mark.anyio
async def test_429_storm_finishes_without_losing_anything() -> None:
    """With a simulator allowing 5 requests a minute, 20 images still all import, exactly once."""
    report, world = await run_against(image_urls(20), sim={"per_minute": 5}, concurrency=4)
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 20
    assert report.rate_limited > 0
    assert report.rate_limited == world.rate_limited_count
    assert world.request_counts["POST /v2/images"] - report.rate_limited <= 20
    live = live_images_by_tag(world)
    assert len(live) == 20
    assert set(live.values()) == {1}


@pytest.mark.anyio
async def test_client_side_limit_avoids_429s() -> None:
    """When the importer's own limit matches the API's, the storm never happens."""
    report, world = await run_against(
        image_urls(20), sim={"per_minute": 5}, per_minute=5, concurrency=4
    )
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 20
    assert world.rate_limited_count == 0


@pytest.mark.anyio
async def test_stuck_image_times_out() -> None:
    """An image stuck in `pending` is `timed_out` after the per-image timeout; others finish."""
    urls = ["https://images.example.com/x-stuck-pending.qcow2", *image_urls(2)]
    with capture_logs() as logs:
        report, _ = await run_against(urls, image_timeout=600.0)
    assert [r.outcome for r in report.images] == [
        Outcome.TIMED_OUT,
        Outcome.AVAILABLE,
        Outcome.AVAILABLE,
    ]
    timed_out = report.images[0]
    assert timed_out.status == "pending"
    assert timed_out.finished_at is not None
    assert timed_out.submitted_at is not None
    assert timed_out.finished_at - timed_out.submitted_at == pytest.approx(600.0, abs=1.0)
    assert any(entry["event"] == "image.timed_out" for entry in logs)


@pytest.mark.anyio
async def test_rejected_create_is_reported_and_not_retried() -> None:
    """A 422 on submit is `rejected` with the API's message, sent exactly once."""
    manifest = manifest_of(*image_urls(2))
    bad = replace(manifest.entries[0], region="xx9")
    manifest = manifest.__class__(version=1, entries=(bad, manifest.entries[1]), source="<t>")
    async with run_simulator(SimulatorConfig.demo()) as simulator:
        report = await run_import(manifest, settings_for(simulator.base_url))
        posts = simulator.world.request_counts["POST /v2/images"]
    assert report.images[0].outcome is Outcome.REJECTED
    assert report.images[0].error
    assert report.images[1].outcome is Outcome.AVAILABLE
    assert posts == 2


@pytest.mark.anyio
async def test_wrong_token_from_the_start() -> None:
    """A refused token stops the run at the first answer; nothing is submitted."""
    async with run_simulator(SimulatorConfig.demo(token="the-right-one")) as simulator:
        report = await run_import(
            manifest_of(*image_urls(5)), settings_for(simulator.base_url, concurrency=2)
        )
        received = sum(simulator.world.request_counts.values())
    assert report.stopped == "authentication_failed"
    assert received == 1
    assert {r.outcome for r in report.images} == {Outcome.NOT_SUBMITTED}
    assert TEST_TOKEN not in str(report.to_json())


@pytest.mark.anyio
async def test_unreachable_api_stops_the_run() -> None:
    """Nothing listening at the API URL: after the retries the run stops as `api_unreachable`."""
    with capture_logs() as logs:
        report = await run_import(
            manifest_of(*image_urls(3)), settings_for("http://127.0.0.1:9", max_attempts=3)
        )
    assert report.stopped == "api_unreachable"
    assert {r.outcome for r in report.images} == {Outcome.NOT_SUBMITTED}
    assert sum(entry["event"] == "request.retry" for entry in logs) >= 2


@pytest.mark.anyio
async def test_persistent_429s_leave_entries_to_submit_and_the_run_finishes() -> None:
    """Out of 429 retries: those entries are `not_submitted` with the reason; no crash, a report."""
    report, world = await run_against(
        image_urls(6), sim={"per_minute": 2}, max_rate_limited=1, concurrency=4
    )
    outcomes = Counter(r.outcome for r in report.images)
    assert outcomes[Outcome.NOT_SUBMITTED] >= 1
    assert outcomes[Outcome.NOT_SUBMITTED] + outcomes[Outcome.AVAILABLE] == 6
    assert all(r.error for r in report.images if r.outcome is Outcome.NOT_SUBMITTED)
    assert report.stopped is None
    assert world.rate_limited_count >= 1


@pytest.mark.anyio
async def test_unreachable_api_counts_no_requests() -> None:
    """Attempts whose connection never opened are not requests: the report counts none."""
    report = await run_import(
        manifest_of(*image_urls(3)), settings_for("http://127.0.0.1:9", max_attempts=3)
    )
    assert report.stopped == "api_unreachable"
    assert report.requests == 0
    assert report.requests_by_endpoint == {}


@pytest.mark.anyio
async def test_a_refused_token_is_logged_once() -> None:
    """One 401 ends the run: run.authentication_failed is logged once, not once per image."""
    async with run_simulator(SimulatorConfig.demo(token="the-right-one")) as simulator:
        with capture_logs() as logs:
            report = await run_import(manifest_of(*image_urls(5)), settings_for(simulator.base_url))
    assert report.stopped == "authentication_failed"
    assert [entry["event"] for entry in logs].count("run.authentication_failed") == 1


@pytest.mark.anyio
async def test_requests_resent_by_aiohttp_are_counted() -> None:
    """Dropped connections (aiohttp resends a GET once): the count is what the API served."""
    report, world = await run_against(image_urls(12), sim={"reset_rate": 0.3, "seed": 3})
    assert [r.outcome for r in report.images] == [Outcome.AVAILABLE] * 12
    assert world.fault_counts["reset"] > 0
    assert report.requests_by_endpoint == dict(world.request_counts)
    assert report.requests == sum(world.request_counts.values())
