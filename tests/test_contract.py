"""Contract test: the simulator's answers validate against DigitalOcean's OpenAPI description.

Each exchange is made over loopback HTTP, then re-addressed to
``https://api.digitalocean.com`` (the spec's server) and checked with openapi-core.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import pytest
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from werkzeug.datastructures import ImmutableMultiDict

from importer.catalog import DEFAULT_API_URL
from importer.clock import LoopClock
from importer.simulator import SimulatorConfig, run_simulator
from tests.conftest import OPENAPI_PATH

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not OPENAPI_PATH.exists(),
        reason=f"no OpenAPI description at {OPENAPI_PATH}: the contract cannot be checked",
    ),
]

TOKEN = "dop_v1_contract"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMINGS: dict[str, Any] = {
    "token": TOKEN,
    "new_seconds": 10.0,
    "pending_seconds": 20.0,
    "seconds_per_gib": 0.0,
    "duration_noise": 0.0,
}


@dataclass
class SpecRequest:
    """openapi-core's Request protocol, for a request made with aiohttp's client.

    Not frozen: the protocol wants ``parameters`` settable (openapi-core writes
    the resolved path parameters there).
    """

    method: str
    path: str
    parameters: RequestParameters
    body: bytes | None
    content_type: str
    host_url: str = DEFAULT_API_URL


@dataclass(frozen=True)
class SpecResponse:
    """openapi-core's Response protocol, for a response aiohttp's client received."""

    status_code: int
    content_type: str
    headers: Mapping[str, str]
    data: bytes


@dataclass(frozen=True)
class Exchange:
    request: SpecRequest
    response: SpecResponse

    def json(self) -> Any:
        return json.loads(self.response.data)


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_file_path(str(OPENAPI_PATH))


class Contract:
    """Makes requests to the simulator and validates each answer against the spec."""

    def __init__(self, http: aiohttp.ClientSession, openapi: OpenAPI) -> None:
        self.http = http
        self.openapi = openapi

    async def call(
        self,
        method: str,
        path: str,
        *,
        status: int | tuple[int, ...],
        body: Any = None,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        valid_request: bool = True,
    ) -> Exchange:
        """One exchange; asserts ``status`` (or one of them) and that the answer fits the spec."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent_headers = {**AUTH, **(headers or {})}
        if data is not None:
            sent_headers["Content-Type"] = "application/json"
        async with self.http.request(method, path, data=data, headers=sent_headers) as response:
            payload = await response.read()
            url = response.url
            exchange = Exchange(
                SpecRequest(
                    method=method.lower(),
                    path=url.path,
                    parameters=RequestParameters(
                        query=ImmutableMultiDict(list(url.query.items())),
                        header=dict(response.request_info.headers),
                    ),
                    body=data,
                    content_type="application/json" if data is not None else "",
                ),
                SpecResponse(
                    status_code=response.status,
                    content_type=response.headers.get("Content-Type", ""),
                    headers=response.headers,
                    data=payload,
                ),
            )
        expected = status if isinstance(status, tuple) else (status,)
        assert exchange.response.status_code in expected, payload
        if valid_request:
            self.openapi.validate_request(exchange.request)
        self.openapi.validate_response(exchange.request, exchange.response)
        return exchange


@asynccontextmanager
async def contract(openapi: OpenAPI, **overrides: Any) -> AsyncIterator[Contract]:
    config = SimulatorConfig.demo(**{**TIMINGS, **overrides})
    async with (
        run_simulator(config, LoopClock(epoch=1_700_000_000.0)) as sim,
        aiohttp.ClientSession(base_url=sim.base_url) as http,
    ):
        yield Contract(http, openapi)


def new_image(name: str, region: str = "nyc3", marker: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "url": f"https://images.example.com/{name}{marker}.qcow2",
        "region": region,
        "distribution": "Ubuntu",
        "description": "contract test",
        "tags": ["contract", "importer:key"],
    }


async def test_create_get_list_and_delete_match_the_spec(openapi: OpenAPI) -> None:
    """202 create, 200 get (NEW, available, failed), paginated 200 lists and 204 delete."""
    async with contract(openapi) as api:
        ids = []
        for name, region in (("a", "nyc3"), ("b", "ams3"), ("c", "sfo3")):
            created = await api.call("POST", "/v2/images", body=new_image(name, region), status=202)
            ids.append(created.json()["image"]["id"])
        failing = await api.call(
            "POST", "/v2/images", body=new_image("d", marker="-fail-decompress"), status=202
        )
        await api.call("GET", f"/v2/images/{ids[0]}", status=200)
        await anyio.sleep(31)
        ready = await api.call("GET", f"/v2/images/{ids[0]}", status=200)
        assert ready.json()["image"]["status"] == "available"
        failed = await api.call("GET", f"/v2/images/{failing.json()['image']['id']}", status=200)
        assert failed.json()["image"]["status"] == "deleted"

        first = await api.call("GET", "/v2/images?private=true&per_page=2", status=200)
        assert set(first.json()["links"]["pages"]) == {"next", "last"}
        second = await api.call("GET", "/v2/images?private=true&per_page=2&page=2", status=200)
        assert set(second.json()["links"]["pages"]) == {"first", "prev"}
        tagged = await api.call("GET", "/v2/images?tag_name=contract", status=200)
        assert tagged.json()["meta"]["total"] == 3

        deleted = await api.call("DELETE", f"/v2/images/{ids[0]}", status=204)
        assert deleted.response.data == b""


async def test_error_answers_match_the_spec(openapi: OpenAPI) -> None:
    """401, 404, 400, 422 and 429 answers have the spec's error shape and rate-limit headers."""
    async with contract(openapi, per_minute=4) as api:
        await api.call(
            "GET", "/v2/images", headers={"Authorization": ""}, status=401, valid_request=False
        )
        await api.call("GET", "/v2/images", headers={"Authorization": "Bearer x"}, status=401)
        await api.call("GET", "/v2/images/12345", status=404)
        await api.call("POST", "/v2/images", raw=b"{oops", status=400, valid_request=False)
        bad_region = new_image("e", region="mars1")
        await api.call("POST", "/v2/images", body=bad_region, status=422, valid_request=False)
        await api.call("GET", "/v2/images", status=200)
        limited = await api.call("GET", "/v2/images", status=429)
        assert limited.response.headers["retry-after"].isdigit()


async def test_server_errors_and_transfer_actions_match_the_spec(openapi: OpenAPI) -> None:
    """JSON 5xx answers fit the spec, and so do a transfer's 201 and its action's 200."""
    async with contract(openapi, error_rate=1.0, html_error_fraction=0.0) as api:
        for _ in range(6):
            await api.call("GET", "/v2/images", status=(500, 502, 503))
    async with contract(openapi) as api:
        created = await api.call("POST", "/v2/images", body=new_image("t"), status=202)
        image_id = created.json()["image"]["id"]
        await anyio.sleep(31)
        transfer = {"type": "transfer", "region": "lon1"}
        action = await api.call("POST", f"/v2/images/{image_id}/actions", body=transfer, status=201)
        await anyio.sleep(3600)
        done = await api.call("GET", f"/v2/actions/{action.json()['action']['id']}", status=200)
        assert done.json()["action"]["status"] == "completed"
        image = await api.call("GET", f"/v2/images/{image_id}", status=200)
        assert image.json()["image"]["regions"] == ["nyc3", "lon1"]


def test_the_harness_rejects_an_answer_outside_the_spec(openapi: OpenAPI) -> None:
    """The check is not vacuous: a bad status, region, id type or rate header fails validation."""
    request = SpecRequest(
        method="get",
        path="/v2/images/1",
        parameters=RequestParameters(header=AUTH),
        body=None,
        content_type="",
    )
    good = {"id": 1, "name": "x", "status": "available", "regions": ["nyc3"]}
    cases: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({**good, "status": "ready"}, {}),
        ({**good, "regions": ["atl1"]}, {}),
        ({**good, "id": "one"}, {}),
        (good, {"ratelimit-remaining": "lots"}),
    ]
    for image, headers in cases:
        response = SpecResponse(
            status_code=200,
            content_type="application/json",
            headers=headers,
            data=json.dumps({"image": image}).encode(),
        )
        with pytest.raises(OpenAPIError):
            openapi.validate_response(request, response)
    fine = SpecResponse(200, "application/json", {}, json.dumps({"image": good}).encode())
    openapi.validate_response(request, fine)


async def test_answers_under_every_switch_match_the_spec(openapi: OpenAPI) -> None:
    """Burst 429 (remaining 0, retry-after), a refused DELETE (422), a purged image (404),
    links on another host, late answers, counted 429s and another client: all fit the spec."""
    switches: dict[str, Any] = {
        "per_minute": 6,
        "count_rate_limited": True,
        "other_burst": 2,
        "other_per_minute": 1.0,
        "list_lag": 2.0,
        "list_failed": True,
        "list_in_progress": True,
        "purge_failed_after": 5.0,
        "links_base_url": DEFAULT_API_URL,
        "delay_after": 40.0,
        "delay_seconds": 3.0,
        "refuse_delete_importing": True,
    }
    async with contract(openapi, **switches) as api:
        created = await api.call("POST", "/v2/images", body=new_image("a"), status=202)
        image_id = created.json()["image"]["id"]
        refused = await api.call("DELETE", f"/v2/images/{image_id}", status=422)
        assert refused.json()["id"] == "unprocessable_entity"
        failing = await api.call(
            "POST", "/v2/images", body=new_image("f", marker="-fail-fast"), status=202
        )
        await api.call("POST", "/v2/images", body=new_image("b"), status=202)
        limited = await api.call("GET", "/v2/images", status=429)
        assert limited.response.headers["ratelimit-remaining"] == "0"
        assert limited.response.headers["retry-after"].isdigit()
        await anyio.sleep(61)
        listed = await api.call("GET", "/v2/images?private=true&per_page=1", status=200)
        assert listed.json()["links"]["pages"]["next"].startswith(f"{DEFAULT_API_URL}/v2/images?")
        await api.call("GET", f"/v2/images/{failing.json()['image']['id']}", status=404)
        await api.call("DELETE", f"/v2/images/{image_id}", status=204)


async def test_transfer_answers_in_every_state_match_the_spec(openapi: OpenAPI) -> None:
    """A transfer's 201, its action in progress, completed and errored, a refused transfer
    (422), an unknown action (404), and an image's regions before and after: all fit the spec."""
    timings = {"transfer_seconds": 60.0, "transfer_seconds_per_gib": 0.0}
    async with contract(openapi, **timings) as api:
        created = await api.call(
            "POST", "/v2/images", body=new_image("r", marker="-fail-transfer-sgp1"), status=202
        )
        image_id = created.json()["image"]["id"]
        await anyio.sleep(31)
        actions = {}
        for region in ("ams3", "sgp1"):
            body = {"type": "transfer", "region": region}
            answer = await api.call("POST", f"/v2/images/{image_id}/actions", body=body, status=201)
            actions[region] = answer.json()["action"]
            assert actions[region]["status"] == "in-progress"
        busy = await api.call("GET", f"/v2/actions/{actions['ams3']['id']}", status=200)
        assert busy.json()["action"]["completed_at"] is None
        listed = await api.call("GET", "/v2/images?tag_name=contract", status=200)
        assert listed.json()["images"][0]["regions"] == ["nyc3"]
        await anyio.sleep(61)
        done = await api.call("GET", f"/v2/actions/{actions['ams3']['id']}", status=200)
        assert done.json()["action"]["status"] == "completed"
        errored = await api.call("GET", f"/v2/actions/{actions['sgp1']['id']}", status=200)
        assert errored.json()["action"]["status"] == "errored"
        listed = await api.call("GET", "/v2/images?tag_name=contract", status=200)
        assert listed.json()["images"][0]["regions"] == ["nyc3", "ams3"]
        again = {"type": "transfer", "region": "ams3"}
        refused = await api.call("POST", f"/v2/images/{image_id}/actions", body=again, status=422)
        assert refused.json()["id"] == "unprocessable_entity"
        await api.call("GET", "/v2/actions/424242", status=404)
