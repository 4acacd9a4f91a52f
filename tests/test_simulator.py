"""The simulator, over real loopback HTTP, on virtual time."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
from click.testing import CliRunner

from importer import cli
from importer.catalog import DECOMPRESS_ERROR
from importer.clock import LoopClock, isoformat
from importer.simulator import Simulator, SimulatorConfig, World, run_simulator
from importer.simulator.world import (
    DOWNLOAD_ERROR,
    GIB,
    MIB,
    NOT_FOUND_MESSAGE,
    TOO_LARGE_ERROR,
    UNSUPPORTED_FORMAT_ERROR,
)
from tests.fakes import FakeClock

TOKEN = "dop_v1_simulator_test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EPOCH = 1_700_000_000.0
#: Exact timings: NEW 10 s, pending 20 s, no growth with size, no noise.
EXACT: dict[str, Any] = {
    "new_seconds": 10.0,
    "pending_seconds": 20.0,
    "seconds_per_gib": 0.0,
    "duration_noise": 0.0,
}

pytestmark = pytest.mark.anyio

Client = tuple[Simulator, aiohttp.ClientSession]


@asynccontextmanager
async def simulator(
    preset: Callable[..., SimulatorConfig] = SimulatorConfig.demo, **overrides: Any
) -> AsyncIterator[Client]:
    config = preset(**{"token": TOKEN, **overrides})
    async with (
        run_simulator(config, LoopClock(epoch=EPOCH)) as sim,
        aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as http,
    ):
        yield sim, http


async def create(
    client: Client, filename: str = "image.qcow2", name: str = "image", **fields: Any
) -> dict[str, Any]:
    sim, http = client
    body = {"name": name, "url": sim.file_url(filename), "region": "nyc3", **fields}
    async with http.post("/v2/images", json=body) as response:
        assert response.status == 202, await response.text()
        image: dict[str, Any] = (await response.json())["image"]
        return image


async def get(client: Client, image_id: int) -> dict[str, Any]:
    async with client[1].get(f"/v2/images/{image_id}") as response:
        assert response.status == 200, await response.text()
        image: dict[str, Any] = (await response.json())["image"]
        return image


async def listed_ids(client: Client, query: str = "private=true&per_page=200") -> list[int]:
    async with client[1].get(f"/v2/images?{query}") as response:
        assert response.status == 200
        return [image["id"] for image in (await response.json())["images"]]


async def at(t0: float, seconds: float) -> None:
    """Sleep until ``seconds`` of virtual time after ``t0``."""
    await anyio.sleep(t0 + seconds - anyio.current_time())


# -- create and lifecycle ---------------------------------------------------------


async def test_create_answers_202_with_a_new_image() -> None:
    """POST answers 202 with the documented NEW image, its created_at from the clock's wall time."""
    async with simulator() as client:
        image = await create(client, tags=["base", "importer:key-1"], distribution="Debian")
    assert image["status"] == "NEW"
    assert image["regions"] == []
    assert image["error_message"] == ""
    assert image["type"] == "custom"
    assert image["public"] is False
    assert image["slug"] is None
    assert image["min_disk_size"] is None
    assert image["size_gigabytes"] is None
    assert image["tags"] == ["base", "importer:key-1"]
    assert image["distribution"] == "Debian"
    assert image["description"] == ""
    assert image["created_at"] == isoformat(EPOCH)


async def test_lifecycle_goes_new_pending_available_over_virtual_time() -> None:
    """NEW for new_seconds, then pending, then available with region and sizes filled."""
    async with simulator(**EXACT) as client:
        t0 = anyio.current_time()
        image = await create(client, "disk-size-2G.qcow2")
        await at(t0, 9)
        assert (await get(client, image["id"]))["status"] == "NEW"
        await at(t0, 11)
        pending = await get(client, image["id"])
        assert pending["status"] == "pending"
        assert pending["regions"] == []
        await at(t0, 29)
        assert (await get(client, image["id"]))["status"] == "pending"
        await at(t0, 31)
        ready = await get(client, image["id"])
        sim_image = client[0].world.images[image["id"]]
    assert ready["status"] == "available"
    assert ready["regions"] == ["nyc3"]
    assert ready["min_disk_size"] == 2
    assert ready["size_gigabytes"] == 2.0
    assert sim_image.available_at == pytest.approx(EPOCH + 30)


async def test_import_time_grows_with_source_size() -> None:
    """pending lasts pending_seconds + seconds_per_gib x size: a 1 GiB file beats a 5 GiB one."""
    async with simulator(**{**EXACT, "seconds_per_gib": 10.0}) as client:
        t0 = anyio.current_time()
        small = await create(client, "small-size-1G.raw", name="small")
        big = await create(client, "big-size-5G.raw", name="big")
        await at(t0, 41)  # 10 + 20 + 10 * 1
        assert (await get(client, small["id"]))["status"] == "available"
        assert (await get(client, big["id"]))["status"] == "pending"
        await at(t0, 81)  # 10 + 20 + 10 * 5
        assert (await get(client, big["id"]))["status"] == "available"


async def test_slow_marker_multiplies_durations_by_ten() -> None:
    """A `slow` file takes slow_factor times longer in each phase."""
    async with simulator(**EXACT) as client:
        t0 = anyio.current_time()
        image = await create(client, "slow.qcow2")
        await at(t0, 99)
        assert (await get(client, image["id"]))["status"] == "NEW"
        await at(t0, 101)
        assert (await get(client, image["id"]))["status"] == "pending"
        await at(t0, 301)
        assert (await get(client, image["id"]))["status"] == "available"


@pytest.mark.parametrize(
    ("filename", "message"),
    [
        ("broken-fail-decompress.qcow2.gz", DECOMPRESS_ERROR),
        ("missing-fail-download.qcow2", DOWNLOAD_ERROR),
        ("rootfs.tar.gz", DECOMPRESS_ERROR),
        ("disk.xz", DECOMPRESS_ERROR),
        ("installer.iso", UNSUPPORTED_FORMAT_ERROR),
        ("huge-size-150G.raw", TOO_LARGE_ERROR),
        ("nohead-no-head.raw", DOWNLOAD_ERROR),
    ],
)
async def test_failures_are_asynchronous(filename: str, message: str) -> None:
    """A doomed file is still accepted with 202, goes pending, then turns deleted with a message."""
    async with simulator(**EXACT) as client:
        t0 = anyio.current_time()
        image = await create(client, filename)
        assert image["status"] == "NEW"
        await at(t0, 11)
        assert (await get(client, image["id"]))["status"] == "pending"
        await at(t0, 31)
        failed = await get(client, image["id"])
    assert failed["status"] == "deleted"
    assert failed["error_message"] == message
    assert failed["regions"] == []


async def test_fail_fast_fails_within_seconds_even_with_realistic_timings() -> None:
    """`fail-fast` turns deleted after fail_fast_seconds, while NEW alone lasts ~30 s."""
    async with simulator(SimulatorConfig.realistic) as client:
        t0 = anyio.current_time()
        image = await create(client, "oops-fail-fast.qcow2")
        await at(t0, 4)
        assert (await get(client, image["id"]))["status"] == "NEW"
        await at(t0, 6)
        failed = await get(client, image["id"])
    assert failed["status"] == "deleted"
    assert failed["error_message"] == DECOMPRESS_ERROR


@pytest.mark.parametrize(("marker", "status"), [("stuck-new", "NEW"), ("stuck-pending", "pending")])
async def test_stuck_images_never_leave_their_status(marker: str, status: str) -> None:
    """`stuck-new`/`stuck-pending` images are still in that status ten hours later."""
    async with simulator(**EXACT) as client:
        image = await create(client, f"{marker}.qcow2")
        await anyio.sleep(36_000)
        assert (await get(client, image["id"]))["status"] == status
        assert client[0].world.images[image["id"]].available_at is None


async def test_query_string_urls_fail_only_when_configured() -> None:
    """fail_query_urls makes presigned-style URLs fail; by default they import."""
    for fail, expected in ((True, "deleted"), (False, "available")):
        async with simulator(**EXACT, fail_query_urls=fail) as client:
            image = await create(client, "disk.qcow2?X-Amz-Signature=secret")
            await anyio.sleep(31)
            assert (await get(client, image["id"]))["status"] == expected


# -- listing ----------------------------------------------------------------------


async def test_failed_images_drop_out_of_lists_but_stay_readable_by_id() -> None:
    """A failed import is gone from GET /v2/images yet GET /v2/images/{id} still shows why."""
    async with simulator(**EXACT) as client:
        good = await create(client, "good.qcow2", name="good")
        bad = await create(client, "bad-fail-decompress.qcow2", name="bad")
        await anyio.sleep(31)
        assert await listed_ids(client) == [good["id"]]
        failed = await get(client, bad["id"])
    assert failed["status"] == "deleted"
    assert failed["error_message"] == DECOMPRESS_ERROR


@pytest.mark.parametrize("list_in_progress", [True, False])
async def test_list_in_progress_switches_whether_unfinished_images_are_listed(
    list_in_progress: bool,
) -> None:
    """With list_in_progress, NEW and pending images are listed; without it, only available ones."""
    async with simulator(**EXACT, list_in_progress=list_in_progress) as client:
        t0 = anyio.current_time()
        first = await create(client, "first.qcow2", name="first")
        await at(t0, 15)
        second = await create(client, "second.qcow2", name="second")
        in_progress = await listed_ids(client)
        await at(t0, 31)
        later = await listed_ids(client)
    expected = [first["id"], second["id"]] if list_in_progress else []
    assert in_progress == expected
    assert later == ([first["id"], second["id"]] if list_in_progress else [first["id"]])


async def test_pagination_links_and_meta_total() -> None:
    """Pages are by ascending id; links name only the pages that apply, as absolute URLs."""
    async with simulator(**EXACT) as client:
        sim, http = client
        ids = [(await create(client, f"img{i}.qcow2", name=f"img{i}"))["id"] for i in range(5)]
        await anyio.sleep(31)
        pages: list[dict[str, Any]] = []
        url: str | None = f"{sim.base_url}/v2/images?private=true&per_page=2"
        while url is not None:
            async with http.get(url) as response:
                assert response.status == 200
                pages.append(await response.json())
            url = pages[-1]["links"]["pages"].get("next")
    assert [sorted(p["links"]["pages"]) for p in pages] == [
        ["last", "next"],
        ["first", "last", "next", "prev"],
        ["first", "prev"],
    ]
    assert all(p["meta"]["total"] == 5 for p in pages)
    assert [image["id"] for p in pages for image in p["images"]] == sorted(ids) == ids
    first_links = pages[0]["links"]["pages"]
    assert first_links["last"].startswith(f"{sim.base_url}/v2/images?")
    assert "page=3" in first_links["last"]
    assert "per_page=2" in first_links["last"]
    assert "private=true" in first_links["last"]


async def test_single_page_has_no_links_and_default_per_page_is_20() -> None:
    """Up to 20 images fit the default page, with an empty pages object."""
    async with simulator(**EXACT) as client:
        for i in range(21):
            await create(client, f"i{i}.raw", name=f"i{i}")
        await anyio.sleep(31)
        async with client[1].get("/v2/images?private=true") as response:
            body = await response.json()
        async with client[1].get("/v2/images?private=true&per_page=21") as response:
            whole = await response.json()
    assert len(body["images"]) == 20
    assert body["meta"]["total"] == 21
    assert set(body["links"]["pages"]) == {"next", "last"}
    assert whole["links"]["pages"] == {}


@pytest.mark.parametrize("query", ["per_page=0", "per_page=201", "per_page=x", "page=0"])
async def test_out_of_range_paging_is_422(query: str) -> None:
    """per_page outside 1..200 or page < 1 answer 422 instead of being silently clamped."""
    async with simulator() as client, client[1].get(f"/v2/images?{query}") as response:
        assert response.status == 422
        assert (await response.json())["id"] == "unprocessable_entity"


async def test_tag_name_filters_the_list() -> None:
    """tag_name lists only images carrying that tag."""
    async with simulator(**EXACT) as client:
        tagged = await create(client, "a.raw", name="a", tags=["importer:batch-1"])
        await create(client, "b.raw", name="b", tags=["other"])
        await anyio.sleep(31)
        assert await listed_ids(client, "private=true&tag_name=importer:batch-1") == [tagged["id"]]


# -- delete and 404 ---------------------------------------------------------------


async def test_delete_answers_204_and_the_image_is_gone() -> None:
    """DELETE answers 204 with no body; the image then 404s, leaves lists, is marked in state."""
    async with simulator(**EXACT) as client:
        sim, http = client
        image = await create(client)
        await anyio.sleep(31)
        async with http.delete(f"/v2/images/{image['id']}") as response:
            assert response.status == 204
            assert await response.read() == b""
        async with http.get(f"/v2/images/{image['id']}") as response:
            assert response.status == 404
        async with http.delete(f"/v2/images/{image['id']}") as response:
            assert response.status == 404
        assert await listed_ids(client) == []
        state = sim.world.state()
    assert state["images"][0]["deleted_by_user"] is True
    assert state["images"][0]["status"] == "deleted"
    assert state["images"][0]["available_at"] == pytest.approx(EPOCH + 30)


@pytest.mark.parametrize("image_id", ["999", "ubuntu-22-04-x64"])
async def test_unknown_image_is_404_not_found(image_id: str) -> None:
    """An unknown id (or a public slug, not simulated) answers DigitalOcean's 404 body."""
    async with simulator() as client, client[1].get(f"/v2/images/{image_id}") as response:
        body = await response.json()
        assert response.status == 404
        assert body["id"] == "not_found"
        assert body["message"] == NOT_FOUND_MESSAGE
        assert body["request_id"] == response.headers["x-request-id"]


# -- validation -------------------------------------------------------------------


async def test_body_that_is_not_json_is_400() -> None:
    """A body that does not parse as JSON answers 400 bad_request."""
    async with simulator() as client:
        async with client[1].post("/v2/images", data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["id"] == "bad_request"
        assert client[0].world.images == {}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"name": None}, "name"),
        ({"url": None}, "url"),
        ({"url": "ftp://example.com/disk.raw"}, "url"),
        ({"region": None}, "region"),
        ({"region": "mars1"}, "mars1"),
        ({"tags": ["has space"]}, "has space"),
        ({"tags": ["x" * 256]}, "255"),
        ({"tags": "prod"}, "tags"),
    ],
)
async def test_invalid_create_is_422(change: dict[str, Any], complaint: str) -> None:
    """Missing name/url/region, an unknown region or a bad tag answer 422 unprocessable_entity."""
    body = {"name": "n", "url": "https://example.com/disk.raw", "region": "nyc3", **change}
    body = {key: value for key, value in body.items() if value is not None}
    async with simulator() as client:
        async with client[1].post("/v2/images", json=body) as response:
            assert response.status == 422
            error = await response.json()
        assert client[0].world.images == {}
    assert error["id"] == "unprocessable_entity"
    assert complaint in error["message"]


async def test_unknown_distribution_becomes_unknown_and_names_may_repeat() -> None:
    """As for real: an unknown distribution silently becomes Unknown; names may repeat."""
    async with simulator() as client:
        first = await create(client, name="same", distribution="Windows")
        second = await create(client, name="same", distribution="Ubuntu")
    assert first["distribution"] == "Unknown"
    assert second["distribution"] == "Ubuntu"
    assert first["id"] != second["id"]


# -- auth -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Basic dXNlcjpwdw==", "Bearer wrong-token"]
)
async def test_missing_or_wrong_token_is_401(authorization: str | None) -> None:
    """No header, a malformed one or the wrong token answer 401 and use no budget."""
    headers = {} if authorization is None else {"Authorization": authorization}
    async with simulator() as client:
        sim, _ = client
        async with (
            aiohttp.ClientSession(base_url=sim.base_url) as anonymous,
            anonymous.get("/v2/images", headers=headers) as response,
        ):
            body = await response.json()
            assert response.status == 401
            assert response.headers["ratelimit-remaining"] == "5000"
            assert "ratelimit-reset" in response.headers
    assert body["id"] == "unauthorized"
    assert body["message"] == "Unable to authenticate you."


async def test_any_bearer_token_is_accepted_when_none_is_configured() -> None:
    """With token=None any non-empty bearer token works, each with its own budget."""
    async with simulator(token=None, per_minute=1) as client:
        sim, _ = client
        async with aiohttp.ClientSession(base_url=sim.base_url) as http:
            for token in ("one", "two"):
                headers = {"Authorization": f"bearer {token}"}
                async with http.get("/v2/images", headers=headers) as response:
                    assert response.status == 200


async def test_revoke_after_turns_every_later_request_into_401() -> None:
    """After revoke_after authenticated requests the token is refused for good."""
    async with simulator(revoke_after=3) as client:
        statuses = []
        for _ in range(5):
            async with client[1].get("/v2/images") as response:
                statuses.append(response.status)
        await anyio.sleep(7200)
        async with client[1].get("/v2/images") as response:
            statuses.append(response.status)
    assert statuses == [200, 200, 200, 401, 401, 401]


# -- rate limits ------------------------------------------------------------------


async def test_minute_limit_answers_429_with_retry_after() -> None:
    """The per-minute burst limit answers 429 with retry-after until the oldest request expires,
    and remaining 0 although most of the hour is left, as DigitalOcean documents."""
    async with simulator(per_minute=3, per_hour=100) as client:
        t0 = anyio.current_time()
        for moment in (0, 10, 20):
            await at(t0, moment)
            async with client[1].get("/v2/images") as response:
                assert response.status == 200
        await at(t0, 30)
        async with client[1].get("/v2/images") as response:
            body = await response.json()
            assert response.status == 429
            headers = response.headers
        await at(t0, 60)
        async with client[1].get("/v2/images") as response:
            assert response.status == 200
            assert response.headers["ratelimit-remaining"] == "96"
    assert body == {
        "id": "too_many_requests",
        "message": "API rate limit exceeded.",
        "request_id": headers["x-request-id"],
    }
    assert headers["retry-after"] == "30"
    assert headers["ratelimit-limit"] == "100"
    assert headers["ratelimit-remaining"] == "0"
    assert headers["ratelimit-reset"] == str(math.ceil(EPOCH + 3600))


async def test_hour_limit_answers_429_without_retry_after() -> None:
    """The hourly budget is a sliding log: 429 (no retry-after) until its oldest entry ages out."""
    async with simulator(per_minute=100, per_hour=3) as client:
        t0 = anyio.current_time()
        for moment in (0, 600, 1200):
            await at(t0, moment)
            async with client[1].get("/v2/images") as response:
                assert response.status == 200
        await at(t0, 3599)
        async with client[1].get("/v2/images") as response:
            assert response.status == 429
            assert "retry-after" not in response.headers
            assert response.headers["ratelimit-remaining"] == "0"
            assert response.headers["ratelimit-reset"] == str(math.ceil(EPOCH + 3600))
        await at(t0, 3600)
        async with client[1].get("/v2/images") as response:
            assert response.status == 200
            assert response.headers["ratelimit-remaining"] == "0"
            assert response.headers["ratelimit-reset"] == str(math.ceil(EPOCH + 4200))


async def test_429_answers_do_not_count_against_the_budget() -> None:
    """Hammering through 429s does not extend the block: the window frees as if they never came."""
    async with simulator(per_minute=2, per_hour=100) as client:
        t0 = anyio.current_time()
        statuses = []
        for _ in range(2):
            async with client[1].get("/v2/images") as response:
                statuses.append(response.status)
        for moment in range(1, 60, 5):
            await at(t0, moment)
            async with client[1].get("/v2/images") as response:
                statuses.append(response.status)
        await at(t0, 60)
        remaining = []
        for _ in range(3):
            async with client[1].get("/v2/images") as response:
                statuses.append(response.status)
                remaining.append(response.headers["ratelimit-remaining"])
        assert client[0].world.rate_limited_count == 13
    assert statuses == [200, 200] + [429] * 12 + [200, 200, 429]
    assert remaining == ["97", "96", "0"]


async def test_every_response_carries_rate_limit_headers_and_request_id() -> None:
    """202, 200, 204, 404, 422, 401 and 429 answers all carry ratelimit-* and x-request-id."""
    async with simulator(per_minute=6) as client:
        http = client[1]
        image = await create(client)
        calls = [
            http.get(f"/v2/images/{image['id']}"),
            http.get("/v2/images"),
            http.delete(f"/v2/images/{image['id']}"),
            http.get("/v2/images/1"),
            http.post("/v2/images", json={}),
            http.get("/v2/images"),
            http.get("/v2/images", headers={"Authorization": "Bearer nope"}),
        ]
        seen = []
        for call in calls:
            async with call as response:
                seen.append(response.status)
                for header in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
                    assert response.headers[header].isdigit()
                assert response.headers["x-request-id"]
    assert seen == [200, 200, 204, 404, 422, 429, 401]


async def test_rate_limited_requests_count_against_the_budget_when_switched_on() -> None:
    """count_rate_limited: every 429 is logged too, so hammering keeps the minute full and
    spends the hour; retry-after names the moment the window really has room."""
    async with simulator(per_minute=2, per_hour=100, count_rate_limited=True) as client:
        t0 = anyio.current_time()
        for _ in range(2):
            async with client[1].get("/v2/images") as response:
                assert response.status == 200
        retry_after = []
        for moment in (1, 30):
            await at(t0, moment)
            async with client[1].get("/v2/images") as response:
                assert response.status == 429
                assert response.headers["ratelimit-remaining"] == "0"
                retry_after.append(response.headers["retry-after"])
        await at(t0, 60)
        async with client[1].get("/v2/images") as response:
            assert response.status == 429  # the 429 at 1 s still fills the minute
            retry_after.append(response.headers["retry-after"])
        await at(t0, 61)
        async with client[1].get("/v2/images") as response:
            assert response.status == 429  # the ones at 30 s and 60 s now
        await at(t0, 120)
        async with client[1].get("/v2/images") as response:
            assert response.status == 200
            # 2 served, 4 refused and one served now: 7 of the hour's 100.
            assert response.headers["ratelimit-remaining"] == "93"
    # At 1 s the window holds 0, 0, 1: room when the second 0 expires, at 60 s. At 60 s it
    # holds 1, 30, 60: room at 90 s.
    assert retry_after == ["59", "31", "30"]


async def test_another_client_spends_the_token_before_and_during_the_run() -> None:
    """other_burst fills the minute just before the token's first request, other_per_minute
    keeps spending it: the first request gets a burst 429, later ones share what is left."""
    spender: dict[str, Any] = {"other_burst": 10, "other_per_minute": 2}
    async with simulator(per_minute=10, per_hour=1000, **spender) as client:
        sim, http = client
        t0 = anyio.current_time()
        async with http.get("/v2/images") as response:
            assert response.status == 429
            assert response.headers["retry-after"] == "60"
            assert response.headers["ratelimit-remaining"] == "0"
        await at(t0, 61)
        statuses = []
        remaining = []
        for _ in range(10):
            async with http.get("/v2/images") as response:
                statuses.append(response.status)
                remaining.append(response.headers["ratelimit-remaining"])
                retry_after = response.headers.get("retry-after")
        # Its request at 30 s found the minute full (429); the one at 60 s holds 1 of 10.
        assert statuses == [200] * 9 + [429]
        assert retry_after == "59"
        # The hour holds its burst, its request at 60 s, and ours.
        assert remaining[0] == str(1000 - 10 - 1 - 1)
        assert sim.world.state()["other_client"] == {"sent": 12, "rate_limited": 1}
        assert sum(sim.world.request_counts.values()) == 11  # theirs are not served here


async def test_the_other_client_is_refused_too_when_the_window_is_full() -> None:
    """The other client's requests get 429 like anyone's when the minute has no room."""
    async with simulator(per_minute=3, other_burst=5) as client:
        async with client[1].get("/v2/images") as response:
            assert response.status == 429
        assert client[0].world.state()["other_client"] == {"sent": 5, "rate_limited": 2}


@pytest.mark.parametrize("list_in_progress", [True, False])
async def test_list_lag_hides_new_images_for_a_while(list_in_progress: bool) -> None:
    """list_lag: a new image is listed only list_lag seconds after its creation, on top of
    list_in_progress (an available image too, when its import is quicker than the lag)."""
    timings = {**EXACT, "new_seconds": 1.0, "pending_seconds": 1.0}
    async with simulator(**timings, list_lag=5.0, list_in_progress=list_in_progress) as client:
        t0 = anyio.current_time()
        image = await create(client)
        await at(t0, 1.5)
        assert (await get(client, image["id"]))["status"] == "pending"
        early = await listed_ids(client)
        await at(t0, 4.9)
        assert (await get(client, image["id"]))["status"] == "available"
        still_hidden = await listed_ids(client)
        await at(t0, 5.0)
        shown = await listed_ids(client)
    assert early == still_hidden == []
    assert shown == [image["id"]]


@pytest.mark.parametrize("list_failed", [False, True])
async def test_failed_images_are_purged_after_a_while(list_failed: bool) -> None:
    """purge_failed_after: a failed image reads `deleted` with its message for that long, then
    answers 404 and is unlisted; list_failed lists it (deleted, with the message) until then."""
    async with simulator(
        **EXACT, purge_failed_after=10.0, list_failed=list_failed, list_in_progress=True
    ) as client:
        sim, http = client
        t0 = anyio.current_time()
        image = await create(client, "x-fail-fast.qcow2")  # fails at 0.5 s
        await at(t0, 10.4)
        failed = await get(client, image["id"])
        async with http.get("/v2/images?private=true") as response:
            listed = (await response.json())["images"]
        await at(t0, 10.5)
        async with http.get(f"/v2/images/{image['id']}") as response:
            gone = response.status, (await response.json())["id"]
        async with http.delete(f"/v2/images/{image['id']}") as response:
            assert response.status == 404
        assert await listed_ids(client) == []
        truth = sim.world.state()["images"][0]
    assert failed["status"] == "deleted"
    assert failed["error_message"] == DECOMPRESS_ERROR
    if list_failed:
        assert [(i["id"], i["status"], i["error_message"]) for i in listed] == [
            (image["id"], "deleted", DECOMPRESS_ERROR)
        ]
    else:
        assert listed == []
    assert gone == (404, "not_found")
    assert (truth["status"], truth["error_message"]) == ("deleted", DECOMPRESS_ERROR)


async def test_failed_images_stay_readable_by_default() -> None:
    """Without purge_failed_after, a failed image still reads `deleted` ten hours later."""
    async with simulator(**EXACT) as client:
        image = await create(client, "x-fail-fast.qcow2")
        await anyio.sleep(36_000)
        assert (await get(client, image["id"]))["error_message"] == DECOMPRESS_ERROR


async def test_pagination_links_can_point_to_another_host() -> None:
    """links_base_url: links are absolute URLs on that host (as DigitalOcean's name
    api.digitalocean.com), with the request's path and query and the page."""
    base = "https://api.digitalocean.com"
    async with simulator(**EXACT, links_base_url=base) as client:
        http = client[1]
        for i in range(5):
            await create(client, f"img{i}.qcow2", name=f"img{i}")
        await anyio.sleep(31)
        async with http.get("/v2/images?private=true&per_page=2&page=2") as response:
            pages = (await response.json())["links"]["pages"]
        # Followed against the simulator's address, a link gives the page it names.
        async with http.get(pages["next"].removeprefix(base)) as response:
            last = await response.json()
    assert set(pages) == {"first", "prev", "next", "last"}
    assert all(link.startswith(f"{base}/v2/images?") for link in pages.values())
    assert "page=3" in pages["next"]
    assert "per_page=2" in pages["next"]
    assert "private=true" in pages["next"]
    assert len(last["images"]) == 1
    assert "next" not in last["links"]["pages"]
    assert last["links"]["pages"]["first"].startswith(base)


async def test_answers_turn_slow_after_a_while_even_deletes() -> None:
    """delay_after/delay_seconds: requests arriving 100 s after the first are answered 20 s late;
    the work is done on arrival (a DELETE has deleted before its answer comes)."""
    async with simulator(**EXACT, delay_after=100.0, delay_seconds=20.0) as client:
        sim, http = client
        t0 = anyio.current_time()
        image = await create(client)
        assert anyio.current_time() == pytest.approx(t0)
        await at(t0, 100)
        await get(client, image["id"])
        assert anyio.current_time() - t0 == pytest.approx(120)
        deleted_on_arrival = []

        async def delete() -> None:
            async with http.delete(f"/v2/images/{image['id']}") as response:
                assert response.status == 204

        async with anyio.create_task_group() as tg:
            tg.start_soon(delete)
            await anyio.sleep(1)
            deleted_on_arrival.append(sim.world.images[image["id"]].deleted_by_user)
        assert anyio.current_time() - t0 == pytest.approx(140)
    assert deleted_on_arrival == [True]


@pytest.mark.parametrize("refuse", [True, False])
async def test_delete_of_an_importing_image_is_refused_when_switched_on(refuse: bool) -> None:
    """refuse_delete_importing: DELETE of a NEW or pending image is 422 unprocessable_entity
    and deletes nothing; once available it works. Off (the default), it deletes at once."""
    async with simulator(**EXACT, refuse_delete_importing=refuse) as client:
        http = client[1]
        t0 = anyio.current_time()
        image = await create(client)
        statuses = []
        for moment in (1, 15, 31):  # NEW, pending, available
            await at(t0, moment)
            async with http.delete(f"/v2/images/{image['id']}") as response:
                statuses.append(response.status)
                if response.status == 422:
                    body = await response.json()
                    assert body["id"] == "unprocessable_entity"
                    assert "still being imported" in body["message"]
    assert statuses == ([422, 422, 204] if refuse else [204, 404, 404])


async def test_every_answer_is_recorded_with_its_arrival_and_retry_after() -> None:
    """World.answers: arrival time, route, status and retry-after of each /v2 request."""
    async with simulator(per_minute=1) as client:
        sim, http = client
        t0 = anyio.current_time()
        for moment in (0, 5):
            await at(t0, moment)
            async with http.get("/v2/images"):
                pass
        answers = [(a.route, a.status, a.retry_after) for a in sim.world.answers]
        arrivals = [a.at - t0 for a in sim.world.answers]
    assert answers == [("GET /v2/images", 200, None), ("GET /v2/images", 429, 55.0)]
    assert arrivals == pytest.approx([0, 5])


# -- faults -----------------------------------------------------------------------


@pytest.mark.parametrize("html", [False, True])
async def test_error_rate_answers_5xx_without_doing_anything(html: bool) -> None:
    """error_rate answers 500/502/503 (JSON, or a proxy's HTML page) and creates nothing."""
    fraction = 1.0 if html else 0.0
    async with simulator(error_rate=1.0, html_error_fraction=fraction) as client:
        sim, http = client
        statuses = set()
        for i in range(12):
            body = {"name": f"n{i}", "url": sim.file_url(f"{i}.raw"), "region": "nyc3"}
            async with http.post("/v2/images", json=body) as response:
                statuses.add(response.status)
                if html:
                    assert response.content_type == "text/html"
                    assert "<html>" in await response.text()
                else:
                    assert (await response.json())["id"] in (
                        "server_error",
                        "bad_gateway",
                        "service_unavailable",
                    )
        assert sim.world.images == {}
        assert sim.world.fault_counts["error"] == 12
    assert statuses == {500, 502, 503}


async def test_reset_rate_drops_the_connection() -> None:
    """reset_rate closes the connection without an answer: the client sees a connection error."""
    async with simulator(reset_rate=1.0) as client:
        sim = client[0]
        with pytest.raises(aiohttp.ClientConnectionError):
            await create(client)
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(client, 1)
        assert sim.world.images == {}
        assert sim.world.fault_counts["reset"] >= 2


async def test_lost_create_creates_the_image_but_loses_the_answer() -> None:
    """lost_create_rate performs the create, then drops the connection or answers 5xx."""
    async with simulator(lost_create_rate=1.0, html_error_fraction=0.0) as client:
        sim, http = client
        outcomes = set()
        for i in range(10):
            body = {"name": f"n{i}", "url": sim.file_url(f"{i}.raw"), "region": "nyc3"}
            try:
                async with http.post("/v2/images", json=body) as response:
                    assert response.status >= 500
                    outcomes.add("5xx")
            except aiohttp.ClientConnectionError:
                outcomes.add("reset")
        names = sorted(image.name for image in sim.world.images.values())
        async with http.get(f"/v2/images/{min(sim.world.images)}") as response:
            assert response.status == 200  # GETs are unaffected by lost_create_rate
    assert outcomes == {"5xx", "reset"}
    assert names == [f"n{i}" for i in range(10)]


async def test_slow_rate_delays_the_answer() -> None:
    """slow_rate answers only after slow_seconds of (virtual) time."""
    async with simulator(slow_rate=1.0, slow_seconds=45.0) as client:
        started = anyio.current_time()
        async with client[1].get("/v2/images") as response:
            assert response.status == 200
        assert anyio.current_time() - started == pytest.approx(45.0)


async def test_garbage_rate_garbles_successful_answers_only() -> None:
    """garbage_rate turns 2xx bodies into non-JSON or JSON without id/status; errors stay intact."""
    async with simulator(garbage_rate=1.0) as client:
        sim, http = client
        body = {"name": "n", "url": sim.file_url("x.raw"), "region": "nyc3"}
        async with http.post("/v2/images", json=body) as response:
            assert response.status == 202
        image_id = next(iter(sim.world.images))
        kinds = set()
        for _ in range(12):
            async with http.get(f"/v2/images/{image_id}") as response:
                assert response.status == 200
                text = await response.text()
            try:
                image = json.loads(text)["image"]
            except (ValueError, KeyError):
                kinds.add("not json")
            else:
                assert "id" not in image
                assert "status" not in image
                kinds.add("missing fields")
        async with http.get("/v2/images/1") as response:
            assert (await response.json())["id"] == "not_found"
    assert kinds == {"not json", "missing fields"}


async def test_stuck_and_failure_rates_apply_per_image() -> None:
    """stuck_rate=1 leaves every image NEW or pending; failure_rate=1 fails every one."""
    async with simulator(**EXACT, stuck_rate=1.0) as client:
        ids = [(await create(client, f"{i}.raw", name=str(i)))["id"] for i in range(8)]
        await anyio.sleep(36_000)
        stuck = {(await get(client, i))["status"] for i in ids}
    assert stuck == {"NEW", "pending"}
    async with simulator(**EXACT, failure_rate=1.0) as client:
        ids = [(await create(client, f"{i}.raw", name=str(i)))["id"] for i in range(12)]
        await anyio.sleep(31)
        failed = [await get(client, i) for i in ids]
    assert {image["status"] for image in failed} == {"deleted"}
    assert {image["error_message"] for image in failed} == {DOWNLOAD_ERROR, DECOMPRESS_ERROR}


async def test_faults_never_touch_the_admin_view_or_the_file_host() -> None:
    """With every fault on, /_simulator/state and /_files answer normally, without auth."""
    faults: dict[str, Any] = {
        "error_rate": 1.0,
        "reset_rate": 1.0,
        "garbage_rate": 1.0,
        "revoke_after": 0,
    }
    async with simulator(**faults) as client:
        sim, _ = client
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(f"{sim.base_url}/_simulator/state") as response:
                assert response.status == 200
                assert (await response.json())["images"] == []
            async with anonymous.head(sim.file_url("disk-size-3G.raw")) as response:
                assert response.status == 200
        assert sim.world.fault_counts == {}


# -- reproducibility --------------------------------------------------------------


async def test_outcomes_depend_on_seed_url_and_name_not_on_request_order() -> None:
    """Same seed: same fates in any order and on any host; another seed: other fates."""
    entries = [(f"n{i}", f"https://cdn.example.com/img{i}.qcow2") for i in range(12)]
    knobs = {"failure_rate": 0.4, "stuck_rate": 0.2}

    def fates(seed: int, order: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        world = World(SimulatorConfig.demo(seed=seed, **knobs), FakeClock())
        for name, url in order:
            world.create_image({"name": name, "url": url, "region": "nyc3"})
        return {(image.name, image.url): image.plan for image in world.images.values()}

    forward = fates(7, entries)
    assert fates(7, entries[::-1]) == forward
    elsewhere = [(name, url.replace("cdn.example.com", "127.0.0.1:8080")) for name, url in entries]
    assert list(fates(7, elsewhere).values()) == list(forward.values())
    assert fates(8, entries) != forward
    failures = sum(plan.fail_after is not None for plan in forward.values())
    assert 0 < failures < len(entries)


async def test_fault_decisions_are_reproducible_from_seed() -> None:
    """Two simulators with one seed answer the same request sequence with the same faults."""

    async def statuses(seed: int) -> list[int]:
        async with simulator(seed=seed, error_rate=0.5) as client:
            sim, http = client
            result = []
            for i in range(20):
                # Bodies name files on the simulator's own host, on a new port each run.
                body = {"name": "n", "url": sim.file_url(f"{i % 3}.raw"), "region": "nyc3"}
                async with http.post("/v2/images", json=body) as response:
                    result.append(response.status)
            return result

    first = await statuses(3)
    assert await statuses(3) == first
    assert 202 in first
    assert any(status >= 500 for status in first)
    assert await statuses(4) != first


# -- admin, file host, actions, presets -------------------------------------------


async def test_admin_state_reports_images_requests_and_rate_limiting() -> None:
    """GET /_simulator/state lists every image (query string dropped) and counts requests."""
    async with simulator(**EXACT, per_minute=3) as client:
        sim, http = client
        image = await create(client, "disk.raw?sig=secret", tags=["t"])
        await get(client, image["id"])
        await listed_ids(client)
        async with http.get("/v2/images") as response:
            assert response.status == 429
        async with (
            aiohttp.ClientSession() as anonymous,
            anonymous.get(f"{sim.base_url}/_simulator/state") as response,
        ):
            state = await response.json()
    assert state["requests"] == {
        "POST /v2/images": 1,
        "GET /v2/images/{id}": 1,
        "GET /v2/images": 2,
    }
    assert state["rate_limited"] == 1
    assert state["now"] == pytest.approx(EPOCH, abs=1)
    assert state["images"] == [
        {
            "id": image["id"],
            "name": "image",
            "region": "nyc3",
            "url": sim.file_url("disk.raw"),
            "tags": ["t"],
            "status": "NEW",
            "error_message": "",
            "created_at": EPOCH,
            "available_at": None,
            "deleted_by_user": False,
        }
    ]


async def test_file_host_answers_head_with_a_deterministic_size() -> None:
    """HEAD gives Content-Length from a size marker, else a seeded 0.5-8 GiB; no-head gets 405."""
    async with simulator() as client:
        sim, http = client
        sizes: dict[str, set[int]] = {}
        for name in ("a-size-3G.qcow2", "b-size-512M.raw", "plain.qcow2", "plain.qcow2"):
            async with http.head(sim.file_url(name)) as response:
                assert response.status == 200
                sizes.setdefault(name, set()).add(int(response.headers["Content-Length"]))
        async with http.get(sim.file_url("a-size-3G.qcow2")) as response:
            assert response.status == 200
            assert response.headers["x-simulated-content-length"] == str(3 * GIB)
            assert len(await response.read()) < 200
        async with http.head(sim.file_url("cdn-no-head.raw")) as response:
            assert response.status == 405
    assert sizes["a-size-3G.qcow2"] == {3 * GIB}
    assert sizes["b-size-512M.raw"] == {512 * MIB}
    (plain,) = sizes["plain.qcow2"]
    assert 0.5 * GIB <= plain <= 8 * GIB


async def test_transfer_action_adds_a_region_when_completed() -> None:
    """A transfer answers 201 in-progress, completes later, and the image gains the region."""
    async with simulator(**EXACT, transfer_seconds=60.0, transfer_seconds_per_gib=0.0) as client:
        http = client[1]
        image = await create(client, "disk-size-1G.raw")
        transfer = {"type": "transfer", "region": "ams3"}
        async with http.post(f"/v2/images/{image['id']}/actions", json=transfer) as response:
            assert response.status == 422  # not available yet
        await anyio.sleep(31)
        async with http.post(f"/v2/images/{image['id']}/actions", json=transfer) as response:
            assert response.status == 201
            action = (await response.json())["action"]
        assert action["status"] == "in-progress"
        assert (await get(client, image["id"]))["regions"] == ["nyc3"]
        await anyio.sleep(61)
        async with http.get(f"/v2/actions/{action['id']}") as response:
            done = (await response.json())["action"]
        assert (await get(client, image["id"]))["regions"] == ["nyc3", "ams3"]
    assert done["status"] == "completed"
    assert done["resource_id"] == image["id"]
    assert done["region_slug"] == "ams3"


def test_demo_preset_finishes_five_images_quickly_and_realistic_takes_minutes() -> None:
    """demo: five typical images are available within ~6 s; realistic: several minutes each."""
    names = [f"https://example.com/{d}.qcow2" for d in ("debian", "fedora", "arch", "alma", "rk")]

    def ready_after(config: SimulatorConfig) -> list[float]:
        world = World(config, FakeClock())
        plans = [world.plan_import(name=url, url=url) for url in names]
        return [plan.ready_after or math.inf for plan in plans]

    assert max(ready_after(SimulatorConfig.demo())) < 7.0
    assert min(ready_after(SimulatorConfig.realistic())) > 120.0
    assert SimulatorConfig.realistic(per_minute=10).per_minute == 10


def test_config_rejects_impossible_values() -> None:
    """Rates outside [0, 1], negative durations and empty tokens are refused at construction."""
    for bad in ({"error_rate": 1.5}, {"new_seconds": -1.0}, {"token": ""}, {"per_hour": 0}):
        with pytest.raises(ValueError, match="SimulatorConfig"):
            SimulatorConfig(**bad)


class _Served(Exception):
    """Raised by a stand-in simulator instead of serving forever."""


def test_simulate_command_passes_each_switch_to_the_simulator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each switch of `importer simulate` sets its SimulatorConfig field; unset ones keep
    the defaults."""
    configs: list[SimulatorConfig] = []

    @asynccontextmanager
    async def stand_in(config: SimulatorConfig, **_: Any) -> AsyncIterator[Simulator]:
        configs.append(config)
        raise _Served
        yield  # pragma: no cover - an async generator that never yields

    monkeypatch.setattr(cli, "run_simulator", stand_in)
    flags = [
        "--count-rate-limited", "--other-burst", "250", "--other-per-minute", "30",
        "--list-lag", "3", "--list-failed", "--purge-failed-after", "120",
        "--links-base-url", "https://api.digitalocean.com", "--delay-after", "600",
        "--delay-seconds", "45", "--refuse-delete-importing",
    ]  # fmt: skip
    switched = CliRunner().invoke(cli.main, ["simulate", *flags])
    default = CliRunner().invoke(cli.main, ["simulate"])
    assert isinstance(switched.exception, _Served), switched.output
    assert isinstance(default.exception, _Served), default.output
    assert configs[0] == SimulatorConfig.demo(
        count_rate_limited=True,
        other_burst=250,
        other_per_minute=30.0,
        list_lag=3.0,
        list_failed=True,
        purge_failed_after=120.0,
        links_base_url="https://api.digitalocean.com",
        delay_after=600.0,
        delay_seconds=45.0,
        refuse_delete_importing=True,
    )
    assert configs[1] == SimulatorConfig.demo()
