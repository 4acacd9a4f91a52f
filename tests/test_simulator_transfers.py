"""The simulator's transfer actions: they take time, can fail, and show in ``regions`` when done."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest

from importer.clock import LoopClock
from importer.simulator import Simulator, SimulatorConfig, World, run_simulator

TOKEN = "dop_v1_transfer_test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Imports ready after 30 s, transfers done after 60 s, exactly.
EXACT: dict[str, Any] = {
    "new_seconds": 10.0,
    "pending_seconds": 20.0,
    "seconds_per_gib": 0.0,
    "duration_noise": 0.0,
    "transfer_seconds": 60.0,
    "transfer_seconds_per_gib": 0.0,
}

pytestmark = pytest.mark.anyio

Client = tuple[Simulator, aiohttp.ClientSession]


@asynccontextmanager
async def simulator(**overrides: Any) -> AsyncIterator[Client]:
    config = SimulatorConfig.demo(**{"token": TOKEN, **EXACT, **overrides})
    async with (
        run_simulator(config, LoopClock(epoch=1_700_000_000.0)) as sim,
        aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as http,
    ):
        yield sim, http


async def available_image(client: Client, filename: str = "disk.qcow2") -> int:
    sim, http = client
    body = {"name": filename, "url": sim.file_url(filename), "region": "nyc3"}
    async with http.post("/v2/images", json=body) as response:
        assert response.status == 202
        image_id: int = (await response.json())["image"]["id"]
    await anyio.sleep(31)
    return image_id


async def transfer(client: Client, image_id: int, region: str, status: int = 201) -> Any:
    body = {"type": "transfer", "region": region}
    async with client[1].post(f"/v2/images/{image_id}/actions", json=body) as response:
        assert response.status == status, await response.text()
        return (await response.json())["action" if status == 201 else "message"]


async def action_status(client: Client, action_id: int) -> str:
    async with client[1].get(f"/v2/actions/{action_id}") as response:
        assert response.status == 200
        status: str = (await response.json())["action"]["status"]
        return status


async def regions(client: Client, image_id: int) -> list[str]:
    async with client[1].get(f"/v2/images/{image_id}") as response:
        found: list[str] = (await response.json())["image"]["regions"]
        return found


async def test_a_transfer_shows_in_regions_only_once_completed_also_in_listings() -> None:
    """In progress for its duration, then completed: the region shows in get and list alike."""
    async with simulator() as client:
        image_id = await available_image(client)
        action = await transfer(client, image_id, "ams3")
        await anyio.sleep(59)
        assert await action_status(client, action["id"]) == "in-progress"
        assert await regions(client, image_id) == ["nyc3"]
        await anyio.sleep(2)
        assert await action_status(client, action["id"]) == "completed"
        async with client[1].get("/v2/images?private=true") as response:
            (listed,) = (await response.json())["images"]
        assert listed["regions"] == ["nyc3", "ams3"]


async def test_transfers_to_several_regions_run_side_by_side() -> None:
    """Two transfers started together both complete after one duration, in request order."""
    async with simulator() as client:
        image_id = await available_image(client)
        await transfer(client, image_id, "sgp1")
        await transfer(client, image_id, "ams3")
        await anyio.sleep(61)
        assert await regions(client, image_id) == ["nyc3", "sgp1", "ams3"]


async def test_the_region_marker_fails_that_region_only_every_time() -> None:
    """``fail-transfer-ams3``: transfers to ams3 turn errored part-way, again on retry;
    sgp1 completes."""
    async with simulator() as client:
        image_id = await available_image(client, "disk-fail-transfer-ams3.qcow2")
        failing = await transfer(client, image_id, "ams3")
        working = await transfer(client, image_id, "sgp1")
        await anyio.sleep(61)
        assert await action_status(client, failing["id"]) == "errored"
        assert await action_status(client, working["id"]) == "completed"
        assert await regions(client, image_id) == ["nyc3", "sgp1"]
        again = await transfer(client, image_id, "ams3")  # an errored one leaves room
        await anyio.sleep(61)
        assert await action_status(client, again["id"]) == "errored"
        assert await regions(client, image_id) == ["nyc3", "sgp1"]


async def test_the_plain_marker_fails_every_region() -> None:
    """``fail-transfer`` without a region: every transfer of the image errors."""
    async with simulator() as client:
        image_id = await available_image(client, "disk-fail-transfer.qcow2")
        actions = [await transfer(client, image_id, r) for r in ("ams3", "sgp1")]
        await anyio.sleep(61)
        assert [await action_status(client, a["id"]) for a in actions] == ["errored"] * 2


async def test_an_errored_transfer_errors_before_its_duration() -> None:
    """An errored transfer stops part-way (between 20% and 90% of its duration)."""
    async with simulator(transfer_failure_rate=1.0) as client:
        image_id = await available_image(client)
        action = await transfer(client, image_id, "ams3")
        await anyio.sleep(11)
        assert await action_status(client, action["id"]) == "in-progress"
        await anyio.sleep(44)
        assert await action_status(client, action["id"]) == "errored"


async def test_the_failure_rate_draws_each_attempt_anew() -> None:
    """With a rate of one half, some first attempts fail and some retries of those succeed."""
    clock = LoopClock()
    world = World(SimulatorConfig.demo(transfer_failure_rate=0.5, seed=3), clock)
    first: list[bool] = []
    retried: list[bool] = []
    for number in range(40):
        image = world.create_image(
            {"name": f"i{number}", "url": "https://h/i.img", "region": "nyc3"}
        )
        image.created_mono -= 1000  # long available
        action = world.transfer_image(image.id, {"type": "transfer", "region": "ams3"})
        first.append(action.error_after is not None)
        if action.error_after is not None:
            action.started_mono -= 1000  # errored by now
            retry = world.transfer_image(image.id, {"type": "transfer", "region": "ams3"})
            retried.append(retry.error_after is not None)
    assert 10 < sum(first) < 30
    assert False in retried


async def test_a_region_already_there_is_refused_one_in_progress_is_accepted() -> None:
    """422 for a region the image is in; a second transfer to a region still copying: 201."""
    async with simulator() as client:
        image_id = await available_image(client)
        message = await transfer(client, image_id, "nyc3", status=422)
        assert "already in nyc3" in message
        first = await transfer(client, image_id, "ams3")
        second = await transfer(client, image_id, "ams3")
        assert first["id"] != second["id"]
        await anyio.sleep(61)
        assert await regions(client, image_id) == ["nyc3", "ams3"]
        await transfer(client, image_id, "ams3", status=422)


async def test_transfers_are_counted_and_shown_in_the_admin_state() -> None:
    """Each POST and GET of an action is a counted request; the admin view lists actions."""
    async with simulator() as client:
        sim = client[0]
        image_id = await available_image(client)
        action = await transfer(client, image_id, "ams3")
        await action_status(client, action["id"])
        counts = sim.world.request_counts
        assert counts["POST /v2/images/{id}/actions"] == 1
        assert counts["GET /v2/actions/{id}"] == 1
        (shown,) = sim.world.state()["actions"]
        assert (shown["image_id"], shown["region"], shown["status"]) == (
            image_id,
            "ams3",
            "in-progress",
        )


async def test_a_failing_transfer_survives_a_snapshot() -> None:
    """A saved and restored world keeps an action's fate: errored stays errored."""
    clock = LoopClock()
    world = World(SimulatorConfig.demo(**EXACT, transfer_failure_rate=1.0), clock)
    image = world.create_image({"name": "a", "url": "https://h/a.img", "region": "nyc3"})
    image.created_mono -= 100
    action = world.transfer_image(image.id, {"type": "transfer", "region": "ams3"})
    restored = World(SimulatorConfig.demo(**EXACT), clock)
    restored.restore(world.snapshot())
    assert restored.actions[action.id].error_after == action.error_after
    await anyio.sleep(61)
    assert restored.actions[action.id].status == "errored"
    assert restored.images[image.id].regions == ["nyc3"]
