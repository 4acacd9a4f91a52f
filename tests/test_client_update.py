"""``ImagesClient.update`` (``PUT /v2/images/{id}``), end to end against the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from importer.client import CreateRequest, ImagesClient
from importer.clock import LoopClock
from importer.errors import RejectedError
from importer.governor import Governor, Window
from importer.simulator import Simulator, SimulatorConfig, run_simulator
from tests.helpers import settings_for

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def client_and_simulator(**sim: Any) -> AsyncIterator[tuple[ImagesClient, Simulator]]:
    clock = LoopClock(epoch=1_700_000_000.0)
    async with run_simulator(SimulatorConfig.demo(**sim), clock) as simulator:
        settings = settings_for(simulator.base_url, max_attempts=6, backoff_initial=0.1)
        governor = Governor(clock, concurrency=4, windows=(Window(250, 60.0),))
        async with ImagesClient.open(settings, governor, clock) as client:
            yield client, simulator


async def test_update_renames_and_changes_description_and_distribution() -> None:
    """PUT sets the given fields, answers the image, and leaves the others as they were."""
    async with client_and_simulator() as (client, sim):
        request = CreateRequest(
            name="web", url=sim.file_url("web.qcow2"), region="nyc3", description="first"
        )
        created = await client.create(request)
        renamed = await client.update(created.id, name="web@0123456789ab")
        assert (renamed.id, renamed.name, renamed.status) == (created.id, "web@0123456789ab", "NEW")
        await client.update(created.id, description="kept for rollback", distribution="Debian")
        image = sim.world.images[created.id]
        assert (image.name, image.description, image.distribution) == (
            "web@0123456789ab",
            "kept for rollback",
            "Debian",
        )
        assert (await client.get(created.id)).name == "web@0123456789ab"
        assert client.sent["PUT /v2/images/{id}"] == 2


async def test_update_of_an_unknown_or_deleted_image_is_rejected_with_404() -> None:
    """A 404 is a RejectedError carrying the status; nothing is retried."""
    async with client_and_simulator() as (client, sim):
        created = await client.create(
            CreateRequest(name="a", url=sim.file_url("a.qcow2"), region="nyc3")
        )
        await client.delete(created.id)
        for image_id in (created.id, 999):
            with pytest.raises(RejectedError) as caught:
                await client.update(image_id, name="b")
            assert caught.value.status == 404
        assert client.sent["PUT /v2/images/{id}"] == 2


async def test_update_is_retried_after_server_errors_as_it_is_idempotent() -> None:
    """Under 5xx and dropped connections, the rename still lands (PUT is safe to repeat)."""
    async with client_and_simulator(error_rate=0.5, reset_rate=0.2, seed=3) as (client, sim):
        world = sim.world
        image = world.create_image({"name": "a", "url": sim.file_url("a.raw"), "region": "nyc3"})
        renamed = await client.update(image.id, name="a@old")
        assert renamed.name == "a@old"
        assert world.images[image.id].name == "a@old"
        assert world.request_counts["PUT /v2/images/{id}"] > 1


async def test_update_without_any_field_is_a_bug_and_sends_nothing() -> None:
    """No field to set is a ValueError before any request."""
    async with client_and_simulator() as (client, _):
        with pytest.raises(ValueError, match="at least one"):
            await client.update(1)
        assert client.requests_sent == 0
