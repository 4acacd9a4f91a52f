"""The simulator's file host, its admin calls, ``PUT /v2/images/{id}`` and its state file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from openapi_core import OpenAPI

from importer.catalog import DECOMPRESS_ERROR
from importer.clock import LoopClock
from importer.simulator import (
    Simulator,
    SimulatorConfig,
    SimulatorStateError,
    World,
    create_app,
    run_simulator,
)
from importer.simulator.app import _change_file
from importer.simulator.world import DOWNLOAD_ERROR, FILE_EPOCH, GIB, MIB
from tests.conftest import OPENAPI_PATH
from tests.fakes import FakeClock
from tests.test_contract import contract, new_image

pytestmark = pytest.mark.anyio

TOKEN = "dop_v1_simulator_files"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EPOCH = 1_700_000_000.0
#: NEW 10 s, pending 20 s, no growth with size, no noise.
EXACT: dict[str, Any] = {
    "new_seconds": 10.0,
    "pending_seconds": 20.0,
    "seconds_per_gib": 0.0,
    "duration_noise": 0.0,
}

Client = tuple[Simulator, aiohttp.ClientSession]


@asynccontextmanager
async def simulator(clock: LoopClock | None = None, **overrides: Any) -> AsyncIterator[Client]:
    config = SimulatorConfig.demo(**{"token": TOKEN, **EXACT, **overrides})
    async with (
        run_simulator(config, clock or LoopClock(epoch=EPOCH)) as sim,
        aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as http,
    ):
        yield sim, http


async def head(client: Client, filename: str) -> aiohttp.ClientResponse:
    async with client[1].head(f"/_files/{filename}") as response:
        return response


async def ranged(client: Client, filename: str, spec: str = "bytes=0-0") -> tuple[int, Any, bytes]:
    async with client[1].get(f"/_files/{filename}", headers={"Range": spec}) as response:
        return response.status, response.headers, await response.read()


async def create(client: Client, filename: str, name: str = "image") -> dict[str, Any]:
    sim, http = client
    body = {"name": name, "url": sim.file_url(filename), "region": "nyc3"}
    async with http.post("/v2/images", json=body) as response:
        assert response.status == 202, await response.text()
        image: dict[str, Any] = (await response.json())["image"]
        return image


async def status_of(client: Client, image_id: int) -> str:
    async with client[1].get(f"/v2/images/{image_id}") as response:
        assert response.status == 200, await response.text()
        status: str = (await response.json())["image"]["status"]
        return status


async def admin(
    client: Client, method: str, path: str, body: Any = None, *, status: int = 200
) -> Any:
    async with client[1].request(method, f"/_simulator/{path}", json=body) as response:
        assert response.status == status, await response.text()
        return await response.json()


# -- the file host ----------------------------------------------------------------


async def test_head_answers_size_etag_and_last_modified() -> None:
    """HEAD: Content-Length, a quoted ETag and a Last-Modified that are stable between calls."""
    async with simulator() as client:
        first = await head(client, "disk-size-3G.qcow2")
        again = await head(client, "disk-size-3G.qcow2")
        other = await head(client, "other-size-3G.qcow2")
    assert first.status == 200
    assert first.headers["Content-Length"] == str(3 * GIB)
    assert first.headers["Accept-Ranges"] == "bytes"
    etag = first.headers["ETag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert len(etag) == 34
    assert first.headers["Last-Modified"] == formatdate(FILE_EPOCH, usegmt=True)
    assert again.headers["ETag"] == etag
    assert other.headers["ETag"] != etag


async def test_ranged_get_answers_206_with_content_range_and_the_same_version() -> None:
    """``Range: bytes=0-0`` gets one byte, ``Content-Range: bytes 0-0/<size>``, HEAD's ETag."""
    async with simulator() as client:
        reference = await head(client, "disk-size-512M.raw")
        status, headers, body = await ranged(client, "disk-size-512M.raw")
        tail = await ranged(client, "disk-size-512M.raw", "bytes=-10")
        middle = await ranged(client, "disk-size-512M.raw", "bytes=100-")
    assert status == 206
    assert body == b"\0"
    assert headers["Content-Range"] == f"bytes 0-0/{512 * MIB}"
    assert headers["Content-Length"] == "1"
    assert headers["ETag"] == reference.headers["ETag"]
    assert headers["Last-Modified"] == reference.headers["Last-Modified"]
    assert (tail[0], tail[1]["Content-Range"], len(tail[2])) == (
        206,
        f"bytes {512 * MIB - 10}-{512 * MIB - 1}/{512 * MIB}",
        10,
    )
    # Longer than the simulator serves: the whole-file answer, which HTTP allows.
    assert middle[0] == 200
    assert middle[1]["x-simulated-content-length"] == str(512 * MIB)


async def test_range_past_the_end_is_416_with_the_size() -> None:
    """A range starting at or past the end answers 416 with ``Content-Range: bytes */<size>``."""
    async with simulator() as client:
        status, headers, _ = await ranged(client, "tiny-size-1M.raw", f"bytes={MIB}-{MIB + 5}")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{MIB}"


async def test_full_get_is_short_and_carries_the_version() -> None:
    """A GET of the whole file is a short text with the simulated size, ETag and date."""
    async with simulator() as client:
        reference = await head(client, "disk-size-2G.qcow2")
        async with client[1].get("/_files/disk-size-2G.qcow2") as response:
            body = await response.read()
            headers = response.headers
    assert len(body) < 200
    assert headers["x-simulated-content-length"] == str(2 * GIB)
    assert headers["ETag"] == reference.headers["ETag"]


async def test_no_head_marker_refuses_head_but_answers_ranged_get() -> None:
    """``no-head`` files get 405 on HEAD (as before) and 206 on a ranged GET."""
    async with simulator() as client:
        refused = await head(client, "cdn-no-head-size-1G.raw")
        status, headers, _ = await ranged(client, "cdn-no-head-size-1G.raw")
    assert refused.status == 405
    assert refused.headers["Allow"] == "GET"
    assert status == 206
    assert headers["Content-Range"] == f"bytes 0-0/{GIB}"


# -- admin: change a file, refuse HEAD, checksums lists ----------------------------


async def test_changing_a_file_gives_new_etag_date_digest_and_maybe_size() -> None:
    """After a change: new ETag, a Last-Modified at the change, a new digest; old one gone."""
    async with simulator() as client:
        before = await admin(client, "GET", "files/nightly.qcow2")
        start = client[0].world.clock.wall()
        await anyio.sleep(3600)
        changed = await admin(client, "POST", "files/nightly.qcow2/change", {"size": 5 * MIB})
        answered = await head(client, "nightly.qcow2")
        unchanged_size = await admin(client, "POST", "files/nightly.qcow2/change")
    assert before["revision"] == 0
    assert before["last_modified"] == FILE_EPOCH
    assert changed["revision"] == 1
    assert changed["etag"] != before["etag"]
    assert changed["sha256"] != before["sha256"]
    assert changed["size"] == 5 * MIB
    assert start == EPOCH
    assert changed["last_modified"] == EPOCH + 3600
    assert answered.headers["ETag"] == changed["etag"]
    assert answered.headers["Content-Length"] == str(5 * MIB)
    assert parsedate_to_datetime(answered.headers["Last-Modified"]).timestamp() == EPOCH + 3600
    # A change without a size keeps it; two changes within one second still differ in date.
    assert unchanged_size["size"] == 5 * MIB
    assert unchanged_size["last_modified"] == EPOCH + 3601
    assert unchanged_size["etag"] not in (before["etag"], changed["etag"])


async def test_a_defect_fails_later_imports_and_a_fix_lets_them_succeed() -> None:
    """A change with a defect fails the imports made after it; the next, sound change heals."""
    async with simulator() as client:
        good = await create(client, "base.qcow2", "before")
        await admin(client, "POST", "files/base.qcow2/change", {"defect": "decompress"})
        broken = await create(client, "base.qcow2", "during")
        await admin(client, "POST", "files/other.qcow2/change", {"defect": "download"})
        unreachable = await create(client, "other.qcow2", "download")
        await anyio.sleep(60)
        await admin(client, "POST", "files/base.qcow2/change")
        fixed = await create(client, "base.qcow2", "after")
        await anyio.sleep(60)
        statuses = [await status_of(client, image["id"]) for image in (good, broken, fixed)]
        sim = client[0]
        messages = [sim.world.images[i["id"]].error_message for i in (broken, unreachable)]
    assert statuses == ["available", "deleted", "available"]
    assert messages == [DECOMPRESS_ERROR, DOWNLOAD_ERROR]


async def test_a_file_can_be_made_to_refuse_head_and_to_answer_it_again() -> None:
    """``PUT files/NAME/head {"answers": false}``: HEAD 405, GET 206, content unchanged.

    Meanwhile, imports of the file fail to download, as DigitalOcean needs HEAD.
    """
    async with simulator() as client:
        before = await head(client, "presigned.qcow2")
        refused_state = await admin(client, "PUT", "files/presigned.qcow2/head", {"answers": False})
        refused = await head(client, "presigned.qcow2")
        status, headers, _ = await ranged(client, "presigned.qcow2")
        failing = await create(client, "presigned.qcow2")
        await admin(client, "PUT", "files/presigned.qcow2/head", {"answers": True})
        again = await head(client, "presigned.qcow2")
        working = await create(client, "presigned.qcow2")
        await anyio.sleep(60)
        assert await status_of(client, failing["id"]) == "deleted"
        assert await status_of(client, working["id"]) == "available"
        assert client[0].world.images[failing["id"]].error_message == DOWNLOAD_ERROR
    assert refused_state["answers_head"] is False
    assert refused_state["revision"] == 0
    assert refused.status == 405
    assert status == 206
    assert headers["ETag"] == before.headers["ETag"]
    assert again.status == 200


async def test_checksums_list_is_served_with_current_digests() -> None:
    """``PUT checksums/NAME`` serves ``/_files/NAME`` as SHA256SUMS; a change updates a line."""
    async with simulator() as client:
        defined = await admin(
            client, "PUT", "checksums/SHA256SUMS", {"files": ["a.qcow2", "b.img"]}
        )
        async with client[1].get("/_files/SHA256SUMS") as response:
            first = await response.text()
        changed = await admin(client, "POST", "files/b.img/change")
        async with client[1].get("/_files/SHA256SUMS") as response:
            second = await response.text()
        a = await admin(client, "GET", "files/a.qcow2")
    assert defined["path"] == "/_files/SHA256SUMS"
    lines = first.splitlines()
    assert lines[0] == f"{a['sha256']}  a.qcow2"
    assert lines[1].endswith("  b.img")
    assert second.splitlines() == [lines[0], f"{changed['sha256']}  b.img"]


async def test_digest_is_sha256_of_a_stable_description_of_the_content() -> None:
    """The digest depends on seed, name and revision only, so runs agree on it."""
    world = World(SimulatorConfig.demo(seed=5), FakeClock())
    expected = hashlib.sha256(b"5|file|x.raw|0").hexdigest()
    assert world.file_version("x.raw").sha256 == expected
    assert World(SimulatorConfig.demo(seed=6), FakeClock()).file_version("x.raw").sha256 != (
        expected
    )


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "files/a.raw/change", {"size": -1}),
        ("POST", "files/a.raw/change", {"size": 1.5}),
        ("POST", "files/a.raw/change", {"defect": "melted"}),
        ("POST", "files/a.raw/change", {"sise": 3}),
        ("POST", "files/a.raw/change", [1]),
        ("PUT", "files/a.raw/head", {"answers": "no"}),
        ("PUT", "files/a.raw/head", {}),
        ("PUT", "checksums/SUMS", {"files": "a.raw"}),
        ("PUT", "checksums/SUMS", {"files": [""]}),
    ],
)
async def test_bad_admin_bodies_are_400(method: str, path: str, body: Any) -> None:
    """Admin calls check their bodies and change nothing when refused."""
    async with simulator() as client:
        answer = await admin(client, method, path, body, status=400)
        assert "error" in answer
        assert client[0].world.files == {}
        assert client[0].world.checksum_lists == {}


async def test_admin_changes_answer_loopback_clients_only() -> None:
    """A client from another address gets 403 and the file stays as it was."""
    world = World(SimulatorConfig.demo(), FakeClock())
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        ("10.1.2.3", 40000) if key == "peername" else default
    )
    request = make_mocked_request(
        "POST", "/_simulator/files/a.raw/change", app=create_app(world), transport=transport
    )
    with pytest.raises(web.HTTPForbidden):
        await _change_file(request)
    assert world.files == {}


# -- PUT /v2/images/{id} -----------------------------------------------------------


async def put(client: Client, image_id: int | str, body: Any) -> tuple[int, Any]:
    async with client[1].put(f"/v2/images/{image_id}", data=json.dumps(body)) as response:
        return response.status, await response.json()


async def test_put_renames_and_updates_description_and_distribution() -> None:
    """200 with the image; only the given fields change; an unknown distribution is Unknown."""
    async with simulator() as client:
        image = await create(client, "a.qcow2", "web")
        status, renamed = await put(client, image["id"], {"name": "web@0123"})
        _, described = await put(client, image["id"], {"description": "old", "distribution": "x"})
        counts = dict(client[0].world.request_counts)
    assert status == 200
    assert renamed["image"]["name"] == "web@0123"
    assert renamed["image"]["status"] == "NEW"
    assert described["image"]["name"] == "web@0123"
    assert described["image"]["description"] == "old"
    assert described["image"]["distribution"] == "Unknown"
    assert counts["PUT /v2/images/{id}"] == 2


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"name": ""}, 422, "name must be a non-empty string"),
        ({"name": 5}, 422, "name must be a non-empty string"),
        ({"description": None}, 422, "description must be a string"),
        ({"distribution": ["Ubuntu"]}, 422, "distribution must be a string"),
        ({"region": "ams3"}, 422, "give at least one of"),
        ([], 400, "JSON object"),
    ],
)
async def test_put_refuses_bad_bodies(body: Any, status: int, words: str) -> None:
    """Bad values, nothing to update and non-objects are refused; the image is unchanged."""
    async with simulator() as client:
        image = await create(client, "a.qcow2", "web")
        answered, error = await put(client, image["id"], body)
        assert client[0].world.images[image["id"]].name == "web"
    assert answered == status
    assert words in error["message"]


async def test_put_on_unknown_or_deleted_images_is_404_and_needs_a_token() -> None:
    """Unknown ids and images the user deleted are 404; without a token, 401."""
    async with simulator() as client:
        image = await create(client, "a.qcow2")
        async with client[1].delete(f"/v2/images/{image['id']}") as response:
            assert response.status == 204
        gone, _ = await put(client, image["id"], {"name": "b"})
        unknown, _ = await put(client, 999, {"name": "b"})
        async with aiohttp.ClientSession() as anonymous:
            url = f"{client[0].base_url}/v2/images/{image['id']}"
            async with anonymous.put(url, json={"name": "b"}) as response:
                unauthenticated = response.status
    assert (gone, unknown, unauthenticated) == (404, 404, 401)


@pytest.mark.skipif(not OPENAPI_PATH.exists(), reason=f"no OpenAPI description at {OPENAPI_PATH}")
async def test_put_answers_match_the_openapi_description() -> None:
    """images_update: the 200, the 404 and the 422 fit DigitalOcean's OpenAPI description."""
    openapi = OpenAPI.from_file_path(str(OPENAPI_PATH))
    async with contract(openapi) as api:
        created = await api.call("POST", "/v2/images", body=new_image("p"), status=202)
        image_id = created.json()["image"]["id"]
        update = {"name": "p@old", "distribution": "Debian", "description": "kept"}
        renamed = await api.call("PUT", f"/v2/images/{image_id}", body=update, status=200)
        assert renamed.json()["image"]["name"] == "p@old"
        await api.call("PUT", "/v2/images/12345", body={"name": "x"}, status=404)
        await api.call(
            "PUT", f"/v2/images/{image_id}", body={"name": ""}, status=422, valid_request=False
        )


# -- the state file ----------------------------------------------------------------


async def test_a_saved_world_is_served_again_with_statuses_going_on(tmp_path: Path) -> None:
    """Reloaded: images, names, deletions, ids and files persist; imports continue on the clock."""
    state = tmp_path / "sim.json"
    clock = LoopClock(epoch=EPOCH)
    async with simulator(clock, state_file=state) as client:
        t0 = anyio.current_time()
        ready = await create(client, "ready.qcow2", "ready")
        deleted = await create(client, "gone.qcow2", "gone")
        await anyio.sleep(5)
        importing = await create(client, "slow-size-1G.qcow2?sig=secret", "importing")
        failing = await create(client, "bad-fail-fast.qcow2", "failing")
        stuck = await create(client, "x-stuck-pending.qcow2", "stuck")
        async with client[1].delete(f"/v2/images/{deleted['id']}") as response:
            assert response.status == 204
        await put(client, ready["id"], {"name": "ready@old"})
        changed = await admin(client, "POST", "files/ready.qcow2/change", {"size": 7})
        await admin(client, "PUT", "checksums/SUMS", {"files": ["ready.qcow2"]})
        await anyio.sleep(31 - 5)
        # "importing" is slow (NEW 100 s, then pending 200 s): 26 s in, it is NEW.
        assert await status_of(client, importing["id"]) == "NEW"
    assert "secret" not in state.read_text()
    await anyio.sleep(100)  # the simulator is down; its imports go on
    async with simulator(clock, state_file=state) as client:
        assert await status_of(client, ready["id"]) == "available"
        assert await status_of(client, failing["id"]) == "deleted"
        assert await status_of(client, stuck["id"]) == "pending"
        assert await status_of(client, importing["id"]) == "pending"  # 126 s in
        async with client[1].get(f"/v2/images/{deleted['id']}") as response:
            assert response.status == 404
        async with client[1].get("/v2/images?per_page=200") as response:
            listed = {image["id"]: image["name"] for image in (await response.json())["images"]}
        next_image = await create(client, "next.qcow2", "next")
        version = await admin(client, "GET", "files/ready.qcow2")
        async with client[1].get("/_files/SUMS") as response:
            sums = await response.text()
        importing_done_at = client[0].world.images[importing["id"]].plan.ready_after
        assert importing_done_at is not None
        await anyio.sleep(t0 + 5 + importing_done_at - anyio.current_time() + 0.01)
        assert await status_of(client, importing["id"]) == "available"
    assert listed == {ready["id"]: "ready@old"}
    assert next_image["id"] == stuck["id"] + 1
    assert version == changed
    assert sums == f"{changed['sha256']}  ready.qcow2\n"


async def test_the_state_file_is_written_after_each_change_not_only_at_the_end(
    tmp_path: Path,
) -> None:
    """A create is on disk before the simulator stops: a killed process loses nothing."""
    state = tmp_path / "sim.json"
    async with simulator(state_file=state) as client:
        image = await create(client, "a.qcow2")
        saved = json.loads(state.read_text())
        assert [saved_image["id"] for saved_image in saved["images"]] == [image["id"]]
        assert saved["next_image_id"] == image["id"] + 1
    left = [path.name async for path in anyio.Path(tmp_path).iterdir()]
    assert left == [state.name]  # no temporary file left behind


async def test_an_unreadable_state_file_is_a_clear_error(tmp_path: Path) -> None:
    """Garbage or a foreign JSON in the state file stops the start with what to do."""
    state = tmp_path / "sim.json"
    for text in ("{not json", '{"format": 1, "images": 3}', '{"format": 99}'):
        state.write_text(text)
        with pytest.raises(SimulatorStateError) as caught:
            async with simulator(state_file=state):
                pass
        assert str(state) in str(caught.value)
        assert "Delete or move it" in str(caught.value)
        assert caught.value.exit_code == 2
        assert state.read_text() == text  # left as it was


@pytest.mark.anyio
async def test_restored_imports_never_go_back_in_time() -> None:
    """Restored on a clock whose wall time is behind the save, an image keeps its progress."""
    ahead = FakeClock(epoch=EPOCH + 3600)
    world = World(SimulatorConfig.demo(**EXACT), ahead)
    image = world.create_image({"name": "a", "url": "https://h/a.raw", "region": "nyc3"})
    ahead.advance(15)
    assert image.status == "pending"
    behind = FakeClock(epoch=EPOCH)
    restored = World(SimulatorConfig.demo(**EXACT), behind)
    restored.restore(world.snapshot())
    assert restored.images[image.id].status == "pending"
    assert restored.images[image.id].elapsed == pytest.approx(15)
    behind.advance(15)
    assert restored.images[image.id].status == "available"


@pytest.mark.anyio
async def test_restore_keeps_the_world_unchanged_when_the_snapshot_is_bad() -> None:
    """A snapshot that fails half-way replaces nothing."""
    world = World(SimulatorConfig.demo(), FakeClock())
    world.create_image({"name": "a", "url": "https://h/a.raw", "region": "nyc3"})
    snapshot = world.snapshot()
    snapshot["actions"] = [{"id": 1, "image_id": 424242, "region": "ams3"}]
    other = World(SimulatorConfig.demo(), FakeClock())
    other.create_image({"name": "b", "url": "https://h/b.raw", "region": "nyc3"})
    with pytest.raises(ValueError, match="not a simulator snapshot"):
        other.restore(snapshot)
    assert [image.name for image in other.images.values()] == ["b"]
