"""The API client: each retry path, and no blind retry of a create."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from importer.api import CreateRequest, Image, ImageEnvelope, RateLimit
from importer.client import ImagesClient, interpret
from importer.clock import LoopClock
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RateLimitedError,
    RejectedError,
    TransientApiError,
    UncertainCreateError,
)
from importer.governor import Governor, Window
from tests.helpers import settings_for

IMAGE = {"id": 42, "name": "a", "status": "NEW", "error_message": "", "regions": [], "tags": []}
CREATE = CreateRequest(name="a", url="https://images.example.com/a.qcow2", region="nyc3")

Reply = Callable[[web.Request], Any]


def ok(status: int = 200, image: dict[str, Any] | None = None) -> Reply:
    async def reply(request: web.Request) -> web.Response:
        return web.json_response({"image": image or IMAGE}, status=status)

    return reply


def error(status: int, error_id: str = "server_error", **headers: str) -> Reply:
    async def reply(request: web.Request) -> web.Response:
        body = {"id": error_id, "message": f"error {status}"}
        return web.json_response(body, status=status, headers=headers)

    return reply


def raw(status: int, body: bytes, content_type: str = "application/json") -> Reply:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    return reply


def reset() -> Reply:
    async def reply(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)

    return reply


def slow(seconds: float) -> Reply:
    async def reply(request: web.Request) -> web.Response:
        await anyio.sleep(seconds)
        return web.json_response({"image": IMAGE})

    return reply


@dataclass
class Script:
    """A server that answers each request with the next scripted reply."""

    replies: list[Reply] = field(default_factory=list)
    received: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(f"{request.method} {request.path}")
        reply = self.replies.pop(0) if self.replies else ok()
        response: web.StreamResponse = await reply(request)
        return response


@dataclass
class Harness:
    script: Script
    client: ImagesClient
    governor: Governor


@asynccontextmanager
async def serving(windows: tuple[Window, ...] = (Window(250, 60.0),)) -> AsyncIterator[Harness]:
    """A scripted server on loopback, and a client of it under a governor of ``windows``."""
    script = Script()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    clock = LoopClock(epoch=1_700_000_000.0)
    config = settings_for(f"http://{host}:{port}", request_timeout=30.0, max_attempts=4)
    governor = Governor(clock, concurrency=4, windows=windows)
    async with ImagesClient.open(config, governor, clock) as client:
        yield Harness(script, client, governor)
    await runner.cleanup()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with serving() as harness:
        yield harness


@pytest.mark.anyio
@pytest.mark.parametrize(
    "first",
    [
        error(500),
        error(503),
        raw(502, b"<html><body>Bad Gateway</body></html>", "text/html"),
        raw(200, b"not json at all"),
        raw(200, b'{"image": {"name": "no id or status"}}'),
        slow(120.0),
    ],
    ids=["500", "503", "html-502", "not-json", "missing-fields", "timeout"],
)
async def test_get_retries_transient_failures(harness: Harness, first: Reply) -> None:
    """A GET that fails transiently is sent again, logged as request.retry, and succeeds."""
    harness.script.replies = [first, ok()]
    with capture_logs() as logs:
        image = await harness.client.get(42)
    assert image.id == 42
    assert harness.script.received == ["GET /v2/images/42"] * 2
    assert [entry["event"] for entry in logs].count("request.retry") == 1


@pytest.mark.anyio
async def test_get_survives_dropped_connections(harness: Harness) -> None:
    """Resets on GET are retried until an answer comes (aiohttp itself retries one of them)."""
    harness.script.replies = [reset(), reset(), reset(), ok()]
    image = await harness.client.get(42)
    assert image.id == 42
    assert harness.script.received == ["GET /v2/images/42"] * 4


@pytest.mark.anyio
async def test_get_gives_up_after_max_attempts(harness: Harness) -> None:
    """Persistent 5xx: exactly max_attempts GETs, then a TransientApiError."""
    harness.script.replies = [error(500)] * 10
    with pytest.raises(TransientApiError):
        await harness.client.get(42)
    assert len(harness.script.received) == 4


@pytest.mark.anyio
@pytest.mark.parametrize(
    "failure",
    [error(500), raw(502, b"<html/>", "text/html"), reset(), raw(202, b"{truncated"), slow(120.0)],
    ids=["500", "html-502", "reset", "garbage", "timeout"],
)
async def test_create_is_never_retried_blindly(harness: Harness, failure: Reply) -> None:
    """A create whose outcome is unknown raises UncertainCreateError after exactly one POST."""
    harness.script.replies = [failure, ok(202)]
    with pytest.raises(UncertainCreateError):
        await harness.client.create(CREATE)
    assert harness.script.received == ["POST /v2/images"]


@pytest.mark.anyio
async def test_create_retries_429_after_retry_after(harness: Harness) -> None:
    """A 429 means not processed: the create is sent again once retry-after has passed."""
    harness.script.replies = [error(429, "too_many_requests", **{"retry-after": "7"}), ok(202)]
    start = anyio.current_time()
    image = await harness.client.create(CREATE)
    assert image.status == "NEW"
    assert harness.script.received == ["POST /v2/images"] * 2
    assert anyio.current_time() - start >= 7.0
    assert harness.governor.rate_limited == 1


@pytest.mark.anyio
async def test_429_without_retry_after_probes_again_soon(harness: Harness) -> None:
    """A 429 without retry-after (remaining 0, a reset 300 s away) is retried after a short
    pause, not at ratelimit-reset: remaining 0 on a 429 does not mean the hour is spent."""
    reset_at = str(int(1_700_000_000 + anyio.current_time() + 300))
    harness.script.replies = [
        error(
            429, "too_many_requests", **{"ratelimit-remaining": "0", "ratelimit-reset": reset_at}
        ),
        ok(),
    ]
    start = anyio.current_time()
    await harness.client.get(42)
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert harness.script.received == ["GET /v2/images/42"] * 2


@pytest.mark.anyio
async def test_rejections_are_not_retried(harness: Harness) -> None:
    """A 422 is a RejectedError carrying the API's message, after one request."""
    harness.script.replies = [error(422, "unprocessable_entity")]
    with pytest.raises(RejectedError) as caught:
        await harness.client.create(CREATE)
    assert caught.value.status == 422
    assert caught.value.error_id == "unprocessable_entity"
    assert len(harness.script.received) == 1


@pytest.mark.anyio
async def test_after_401_nothing_more_is_sent(harness: Harness) -> None:
    """A 401 raises AuthenticationError, and later calls raise it without sending anything."""
    harness.script.replies = [error(401, "unauthorized")]
    with pytest.raises(AuthenticationError):
        await harness.client.get(1)
    with pytest.raises(AuthenticationError):
        await harness.client.create(CREATE)
    assert harness.script.received == ["GET /v2/images/1"]


@pytest.mark.anyio
async def test_list_follows_pages_by_count(harness: Harness) -> None:
    """Listing asks page after page until meta.total images are read, with tag_name and private."""
    pages = [
        {"images": [{**IMAGE, "id": i} for i in range(1, 3)], "links": {}, "meta": {"total": 3}},
        {"images": [{**IMAGE, "id": 3}], "links": {}, "meta": {"total": 3}},
    ]
    seen: list[dict[str, str]] = []

    def page(body: dict[str, Any]) -> Reply:
        async def reply(request: web.Request) -> web.Response:
            seen.append(dict(request.query))
            return web.json_response(body)

        return reply

    harness.script.replies = [page(p) for p in pages]
    images = await harness.client.list(tag_name="importer:abc", per_page=2)
    assert [i.id for i in images] == [1, 2, 3]
    assert [q["page"] for q in seen] == ["1", "2"]
    assert all(q["private"] == "true" and q["tag_name"] == "importer:abc" for q in seen)


@pytest.mark.anyio
async def test_connection_refused_is_unreachable() -> None:
    """Nothing listening: creates are retried (nothing was sent), then ApiUnreachableError."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=2, windows=(Window(250, 60.0),))
    config = settings_for("http://127.0.0.1:9", max_attempts=3)
    async with ImagesClient.open(config, governor, clock) as client:
        with pytest.raises(ApiUnreachableError):
            await client.create(CREATE)


@pytest.mark.anyio
async def test_attempts_that_never_connected_are_not_requests() -> None:
    """Nothing listening: however many attempts, no request was sent, and none is counted."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=2, windows=(Window(250, 60.0),))
    config = settings_for("http://127.0.0.1:9", max_attempts=3)
    async with ImagesClient.open(config, governor, clock) as client:
        with pytest.raises(ApiUnreachableError):
            await client.get(42)
    assert client.requests_sent == 0
    assert dict(client.sent) == {}


@pytest.mark.anyio
async def test_a_request_aiohttp_resends_is_counted_and_charged() -> None:
    """aiohttp resends a GET once when its connection drops: both sends count, in the budget too."""
    async with serving(windows=(Window(3, 60.0),)) as harness:
        harness.script.replies = [reset(), ok(), ok(), ok()]
        start = anyio.current_time()
        await harness.client.get(42)
        assert harness.script.received == ["GET /v2/images/42"] * 2
        assert harness.client.requests_sent == 2
        assert dict(harness.client.sent) == {"GET /v2/images/{id}": 2}
        await harness.client.get(42)
        assert anyio.current_time() - start < 1.0
        # Three sends in the minute, so the fourth waits for the first to expire.
        await harness.client.get(42)
        assert anyio.current_time() - start >= 60.0
        assert harness.client.requests_sent == 4


def test_status_casing_is_canonical() -> None:
    """`new`, `New` and `NEW` all read as NEW; `Available` as available."""
    for raw_status, canonical in (("new", "NEW"), ("New", "NEW"), ("Available", "available")):
        assert Image.model_validate({"id": 1, "status": raw_status}).status == canonical


header_values = st.one_of(
    st.text(max_size=20), st.integers().map(str), st.floats().map(str), st.just("")
)


@given(
    headers=st.dictionaries(
        st.sampled_from(
            ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after"]
        ),
        header_values,
    )
)
@settings(max_examples=300)
def test_rate_limit_headers_never_crash(headers: dict[str, str]) -> None:
    """Any header values parse to numbers or None, never an exception or NaN."""
    rate = RateLimit.from_headers(headers)
    for value in (rate.limit, rate.remaining, rate.reset, rate.retry_after):
        assert value is None or value == value


@given(
    status=st.integers(100, 599),
    body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
)
@settings(max_examples=500, deadline=None)
def test_any_answer_is_a_value_or_an_api_error(status: int, body: bytes) -> None:
    """Whatever status and body come back, the client returns a model or raises an ApiError."""
    for idempotent in (True, False):
        try:
            result = interpret(
                ImageEnvelope, status, body, idempotent=idempotent, context={"method": "GET"}
            )
        except ApiError:
            continue
        assert isinstance(result, ImageEnvelope)


def test_json_bodies_parse_or_fail_cleanly() -> None:
    """A well-formed body parses; a structurally wrong one is an ApiError, not a crash."""
    good = json.dumps({"image": IMAGE}).encode()
    assert interpret(ImageEnvelope, 200, good, idempotent=True, context={}).image.id == 42
    with pytest.raises(TransientApiError):
        interpret(ImageEnvelope, 200, b'{"image": []}', idempotent=True, context={})


@pytest.mark.parametrize(
    ("status", "body", "idempotent", "expected"),
    [
        (401, b'{"id": "unauthorized", "message": "Unable to authenticate you."}', True,
         AuthenticationError),
        (429, b'{"id": "too_many_requests", "message": "API rate limit exceeded."}', False,
         RateLimitedError),
        (500, b'{"id": "server_error", "message": "oops"}', True, TransientApiError),
        (500, b'{"id": "server_error", "message": "oops"}', False, UncertainCreateError),
        (502, b"<html>Bad Gateway</html>", True, TransientApiError),
        (202, b"{truncated", False, UncertainCreateError),
        (404, b'{"id": "not_found", "message": "gone"}', True, RejectedError),
    ],
)  # fmt: skip
def test_interpretation_alone(
    status: int, body: bytes, idempotent: bool, expected: type[ApiError]
) -> None:
    """Each kind of answer is the error it amounts to, with the request's context, no client."""
    with pytest.raises(expected) as caught:
        interpret(
            ImageEnvelope,
            status,
            body,
            idempotent=idempotent,
            context={"method": "GET", "path": "/v2/images/{id}"},
        )
    assert caught.value.status == status
    assert caught.value.method == "GET"
    assert caught.value.path == "/v2/images/{id}"


def test_an_answer_without_a_model_is_none() -> None:
    """A 204 to a DELETE reads as None, whatever its body."""
    assert interpret(None, 204, b"", idempotent=True, context={}) is None


@pytest.mark.anyio
async def test_a_session_that_does_not_count_sends_is_refused() -> None:
    """A client on a session without its send tracing would count nothing: refused at once."""
    clock = LoopClock()
    governor = Governor(clock, concurrency=2, windows=(Window(250, 60.0),))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match=r"ImagesClient\.open"):
            ImagesClient(session, settings_for("http://127.0.0.1:9"), governor, clock)
