"""The HTTP face of a :class:`World`: DigitalOcean's image endpoints, a file host and an admin view.

Every ``/v2`` request goes through one middleware, in this order: count it,
authenticate, apply the rate limits, draw faults, then handle it. The file host
(``/_files/{name}``) and the admin view (``/_simulator/state``) sit outside
``/v2``: no auth, no rate limit, no faults.

Admin calls that change the world (``/_simulator/files/...``, ``/_simulator/checksums/...``)
answer loopback clients only: ``importer simulate --host 0.0.0.0`` must not let anyone on the
network rewrite files. With ``state_file`` set, the account is saved after every request that
may change it (see :mod:`importer.simulator.persist`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiohttp import web

from importer.clock import Clock, LoopClock
from importer.simulator.config import SimulatorConfig
from importer.simulator.persist import load_world, save_world
from importer.simulator.world import (
    FILE_DEFECTS,
    NOT_FOUND_MESSAGE,
    Answer,
    ApiProblem,
    FaultPlan,
    FileVersion,
    Json,
    World,
)

WORLD: web.AppKey[World] = web.AppKey("world", World)
CREATE_ROUTE = "POST /v2/images"

_SERVER_ERRORS = {
    500: ("server_error", "Unexpected server-side error"),
    502: ("bad_gateway", "The server received an invalid response from upstream."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
}
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(world: World) -> web.Application:
    """An aiohttp application serving ``world``."""
    app = web.Application(middlewares=[_persist_middleware, _api_middleware])
    app[WORLD] = world
    app.router.add_post("/v2/images", _create_image)
    app.router.add_get("/v2/images", _list_images, allow_head=False)
    app.router.add_get("/v2/images/{id}", _get_image, allow_head=False)
    app.router.add_put("/v2/images/{id}", _update_image)
    app.router.add_delete("/v2/images/{id}", _delete_image)
    app.router.add_post("/v2/images/{id}/actions", _post_image_action)
    app.router.add_get("/v2/actions/{id}", _get_action, allow_head=False)
    app.router.add_get("/_files/{filename}", _file)
    app.router.add_get("/_simulator/state", _state)
    app.router.add_get("/_simulator/answers", _answers, allow_head=False)
    app.router.add_get("/_simulator/files/{filename}", _file_state, allow_head=False)
    app.router.add_post("/_simulator/files/{filename}/change", _change_file)
    app.router.add_put("/_simulator/files/{filename}/head", _set_file_head)
    app.router.add_put("/_simulator/checksums/{listname}", _define_checksums)
    return app


@dataclass(frozen=True)
class Simulator:
    """A simulator listening on loopback."""

    base_url: str
    world: World
    runner: web.AppRunner

    def file_url(self, filename: str) -> str:
        """The URL of ``filename`` on the simulator's file host."""
        return f"{self.base_url}/_files/{filename}"

    def save(self) -> None:
        """Write the state file now (changes made through ``world`` directly wait otherwise)."""
        if self.world.config.state_file is not None:
            save_world(self.world, self.world.config.state_file)


@asynccontextmanager
async def run_simulator(
    config: SimulatorConfig | None = None,
    clock: Clock | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[Simulator]:
    """Serve a :class:`World` on ``host:port`` (0 picks a free port) until the block ends.

    The world is fresh, or the one ``config.state_file`` holds; it is saved there at the end.
    """
    world = World(config or SimulatorConfig.demo(), clock or LoopClock())
    state_file = world.config.state_file
    if state_file is not None:
        load_world(world, state_file)
    # A short shutdown: handlers still sleeping on a `slow` fault are cancelled.
    runner = web.AppRunner(create_app(world), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield Simulator(base_url=f"http://{bound_host}:{bound_port}", world=world, runner=runner)
    finally:
        await runner.cleanup()
        if state_file is not None:
            save_world(world, state_file)


# -- the /v2 pipeline -----------------------------------------------------------


def _route_key(request: web.Request) -> str:
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    # One copy of each route: the world keeps one with every answer it records.
    return sys.intern(f"{request.method} {path}")


@web.middleware
async def _persist_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Save the account after any request that may have changed it, when a state file is set."""
    try:
        return await handler(request)
    finally:
        world = request.app[WORLD]
        state_file = world.config.state_file
        # Also after errors and dropped answers: a lost create still made its image.
        if state_file is not None and request.method not in ("GET", "HEAD"):
            save_world(world, state_file)


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    world = request.app[WORLD]
    if not (request.path == "/v2" or request.path.startswith("/v2/")):
        # The file host and the admin view await nothing but a HEAD's latency (which the
        # handler leaves out): the rest of their time is the simulator's.
        started = time.process_time()
        try:
            return await handler(request)
        finally:
            world.cpu_seconds += time.process_time() - started
    arrived = world.arrive()
    request_id = world.next_request_id()
    route = _route_key(request)
    world.count_request(route)
    body = await request.read()
    # CPU time is charged to the simulator only where nothing awaits, so that no other
    # task's work lands in it: the handlers' own reads return this cached body, and the
    # sleeps (a `slow` fault, a late answer) are left out.
    started = time.process_time()
    try:
        response = await _serve_api(request, handler, world, request_id, route, body)
    finally:
        world.cpu_seconds += time.process_time() - started
    dropped = request.transport is None or request.transport.is_closing()
    retry_after = response.headers.get("retry-after")
    world.record_answer(
        Answer(
            at=arrived,
            route=route,
            status=0 if dropped else response.status,
            retry_after=float(retry_after) if retry_after is not None else None,
        )
    )
    delay = world.answer_delay(arrived)
    if delay > 0 and not dropped:
        # Done already (a DELETE has deleted); only the answer is late.
        await world.clock.sleep(delay)
    return response


async def _serve_api(
    request: web.Request, handler: Handler, world: World, request_id: str, route: str, body: bytes
) -> web.StreamResponse:
    admission = world.admit(request.headers.get("Authorization"))
    headers = {**admission.headers, "x-request-id": request_id}
    if admission.problem is not None:
        return _problem(admission.problem, request_id, headers)

    # The simulator's own address (a random port) leaves the key, so that a body
    # naming a file on its file host draws the same faults on every run.
    own_host = request.host.encode()
    faults = world.draw_faults(request.method, request.path_qs, body.replace(own_host, b""))
    if faults.slow:
        world.record_fault("slow")
        slept = time.process_time()
        await world.clock.sleep(world.config.slow_seconds)
        world.cpu_seconds -= time.process_time() - slept
    if faults.reset:
        world.record_fault("reset")
        return _drop_connection(request)
    if faults.error:
        world.record_fault("error")
        return _server_error(world, faults.status, faults.html, request_id, headers)

    try:
        response = await handler(request)
    except ApiProblem as problem:
        response = _problem(problem, request_id, {})
    except web.HTTPException as exc:
        # Unknown /v2 routes and methods answer in DigitalOcean's JSON shape.
        error_id = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
        message = NOT_FOUND_MESSAGE if exc.status == 404 else exc.reason
        response = _problem(ApiProblem(exc.status, error_id, message), request_id, {})

    if faults.lost_create and route == CREATE_ROUTE and response.status == 202:
        # The image exists now; only the answer is lost.
        world.record_fault("lost_create")
        if faults.lost_as_reset:
            return _drop_connection(request)
        return _server_error(world, faults.status, faults.html, request_id, headers)
    if faults.garbage and response.status in (200, 201, 202) and isinstance(response, web.Response):
        world.record_fault("garbage")
        response = _garbage(response, faults)
    response.headers.update(headers)
    return response


def _problem(problem: ApiProblem, request_id: str, headers: dict[str, str]) -> web.Response:
    body = {"id": problem.error_id, "message": problem.message, "request_id": request_id}
    return web.json_response(body, status=problem.status, headers=headers)


def _server_error(
    world: World, status: int, html: bool, request_id: str, headers: dict[str, str]
) -> web.Response:
    if html:
        world.record_fault("html_error")
        reason = _REASONS[status]
        # A proxy's page: no JSON, and no ratelimit headers either, since the
        # API never saw the answer. Clients must cope with both being absent.
        page = (
            f"<html><head><title>{status} {reason}</title></head><body>"
            f"<center><h1>{status} {reason}</h1></center><hr><center>nginx</center>"
            "</body></html>"
        )
        return web.Response(status=status, text=page, content_type="text/html")
    error_id, message = _SERVER_ERRORS[status]
    return _problem(ApiProblem(status, error_id, message), request_id, headers)


def _drop_connection(request: web.Request) -> web.Response:
    # Abort (not close): nothing is flushed, the client sees the connection die.
    # The response returned afterwards has nowhere to go and is discarded.
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


def _garbage(response: web.Response, faults: FaultPlan) -> web.Response:
    raw = response.body if isinstance(response.body, bytes) else b"{}"
    if faults.garbage_kind == 0:
        body = b"<html><body>Service temporarily overloaded</body></html>"
    elif faults.garbage_kind == 1:
        body = raw[: max(1, len(raw) // 2)]
    else:
        data = json.loads(raw)
        for value in data.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    item.pop("id", None)
                    item.pop("status", None)
        body = json.dumps(data).encode()
    return web.Response(status=response.status, body=body, content_type="application/json")


# -- /v2 handlers ---------------------------------------------------------------


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise ApiProblem(400, "bad_request", "The request body is not valid JSON.") from None


def _id_param(request: web.Request) -> int:
    raw = request.match_info["id"]
    # Private images are reachable by numeric id only; slugs name public images,
    # which are not simulated.
    if not raw.isdigit():
        raise ApiProblem(404, "not_found", NOT_FOUND_MESSAGE)
    return int(raw)


async def _create_image(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    image = world.create_image(await _json_body(request))
    return web.json_response({"image": world.image_json(image)}, status=202)


async def _get_image(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    return web.json_response({"image": world.image_json(world.get_image(_id_param(request)))})


async def _update_image(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    image = world.update_image(_id_param(request), await _json_body(request))
    return web.json_response({"image": world.image_json(image)})


async def _delete_image(request: web.Request) -> web.Response:
    request.app[WORLD].delete_image(_id_param(request))
    return web.Response(status=204)


async def _list_images(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    result = world.list_images(request.query)

    base = world.config.links_base_url

    def link(page: int) -> str:
        url = request.url.update_query(page=page, per_page=result.per_page)
        return str(url) if base is None else base.rstrip("/") + url.path_qs

    pages: dict[str, str] = {}
    if result.page > 1:
        pages["first"] = link(1)
        pages["prev"] = link(min(result.page - 1, result.last_page))
    if result.page < result.last_page:
        pages["next"] = link(result.page + 1)
        pages["last"] = link(result.last_page)
    body: Json = {
        "images": [world.image_json(image) for image in result.images],
        "links": {"pages": pages},
        "meta": {"total": result.total},
    }
    return web.json_response(body)


async def _post_image_action(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    image_id = _id_param(request)
    action = world.transfer_image(image_id, await _json_body(request))
    return web.json_response({"action": world.action_json(action)}, status=201)


async def _get_action(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    return web.json_response({"action": world.action_json(world.get_action(_id_param(request)))})


# -- outside the API --------------------------------------------------------------


#: Longest byte range served with 206; a longer one gets the whole-file answer.
MAX_RANGE_BYTES = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


async def _file(request: web.Request) -> web.Response:
    """A file host for image URLs: sizes, versions and ranges, without gigabytes.

    Every answer carries the file's ``ETag`` and ``Last-Modified``, which change when a
    test changes the file. HEAD announces the simulated size in Content-Length (or answers
    405 for a file refusing HEAD). A GET with one byte range (``Range: bytes=0-0``, as
    clients send when HEAD is refused) answers 206 with those bytes and ``Content-Range:
    bytes 0-0/<size>``; 416 when the range starts past the end. A GET of the whole file
    answers a short text body instead of gigabytes, with the simulated size in
    ``x-simulated-content-length``. A name defined as a checksums list is served as that
    ``SHA256SUMS`` text.
    """
    world = request.app[WORLD]
    filename = request.match_info["filename"]
    if request.method == "HEAD" and world.config.head_latency > 0:
        # The middleware charges this handler's CPU time to the simulator: not the wait's.
        slept = time.process_time()
        await world.clock.sleep(world.config.head_latency)
        world.cpu_seconds -= time.process_time() - slept
    sums = world.checksums_text(filename)
    if sums is not None:
        return _text_file(request, sums)
    version = world.file_version(filename)
    headers = {
        "ETag": version.etag,
        "Last-Modified": formatdate(version.last_modified, usegmt=True),
        "Accept-Ranges": "bytes",
    }
    size = version.size
    if request.method == "HEAD":
        if not version.answers_head:
            return web.Response(status=405, headers={"Allow": "GET"})
        return web.Response(headers={**headers, "Content-Length": str(size)})
    wanted = _byte_range(request.headers.get("Range", ""), size)
    if isinstance(wanted, str):  # "unsatisfiable"
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if wanted is not None:
        first, last = wanted
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return web.Response(status=206, body=bytes(last - first + 1), headers=headers)
    return web.Response(
        text=f"simulated image file {filename}: {size} bytes\n",
        headers={**headers, "x-simulated-content-length": str(size)},
    )


def _byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The one range ``header`` asks for, ``"unsatisfiable"``, or ``None`` for the whole file.

    Several ranges, a malformed header or a range longer than ``MAX_RANGE_BYTES`` are
    answered with the whole file, which HTTP allows a server to do with any range request.
    """
    match = _RANGE.match(header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return None
    start, end = match.group(1), match.group(2)
    if not start:  # "bytes=-N": the last N bytes
        first, last = max(0, size - int(end)), size - 1
        if int(end) == 0:
            return "unsatisfiable"
    else:
        first = int(start)
        last = min(int(end), size - 1) if end else size - 1
        if end and int(end) < first:
            return None
    if first >= size:
        return "unsatisfiable"
    if last - first + 1 > MAX_RANGE_BYTES:
        return None
    return first, last


def _text_file(request: web.Request, text: str) -> web.Response:
    body = text.encode()
    headers = {"ETag": '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"'}
    if request.method == "HEAD":
        return web.Response(headers={**headers, "Content-Length": str(len(body))})
    return web.Response(body=body, content_type="text/plain", headers=headers)


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[WORLD].state())


async def _answers(request: web.Request) -> web.Response:
    """``GET /_simulator/answers``: every ``/v2`` request's arrival, status and retry-after."""
    return web.json_response(request.app[WORLD].answers_json())


def _loopback_only(request: web.Request) -> None:
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise web.HTTPForbidden(text="the simulator's admin calls answer loopback clients only\n")


async def _admin_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise _admin_error("the body must be a JSON object")
    return body


def _admin_error(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _file_answer(version: FileVersion) -> web.Response:
    return web.json_response(version.json())


async def _file_state(request: web.Request) -> web.Response:
    """``GET /_simulator/files/{name}``: the file's current version."""
    _loopback_only(request)
    return _file_answer(request.app[WORLD].file_version(request.match_info["filename"]))


async def _change_file(request: web.Request) -> web.Response:
    """``POST /_simulator/files/{name}/change``: new content (new ETag, date and digest).

    Optional body: ``{"size": <bytes>, "defect": null | "decompress" | "download"}``; a
    missing size keeps the current one, a missing defect means the new content is sound.
    """
    _loopback_only(request)
    body = await _admin_body(request)
    unknown = set(body) - {"size", "defect"}
    size, defect = body.get("size"), body.get("defect")
    if unknown:
        raise _admin_error(f"unknown keys {sorted(unknown)}; allowed: size, defect")
    if size is not None and (type(size) is not int or size < 0):
        raise _admin_error("size must be a whole number of bytes >= 0")
    if defect is not None and defect not in FILE_DEFECTS:
        raise _admin_error(f"defect must be null or one of {list(FILE_DEFECTS)}")
    world = request.app[WORLD]
    return _file_answer(world.change_file(request.match_info["filename"], size=size, defect=defect))


async def _set_file_head(request: web.Request) -> web.Response:
    """``PUT /_simulator/files/{name}/head`` with ``{"answers": false}``: HEAD gets 405."""
    _loopback_only(request)
    body = await _admin_body(request)
    answers = body.get("answers")
    if not isinstance(answers, bool) or set(body) != {"answers"}:
        raise _admin_error('the body must be {"answers": true} or {"answers": false}')
    world = request.app[WORLD]
    return _file_answer(world.set_file_head(request.match_info["filename"], answers))


async def _define_checksums(request: web.Request) -> web.Response:
    """``PUT /_simulator/checksums/{name}`` with ``{"files": [...]}``: serve ``/_files/{name}``.

    The file host then answers ``/_files/{name}`` with a ``SHA256SUMS`` text: one line
    ``<sha256>  <file>`` per listed file, with its current digest.
    """
    _loopback_only(request)
    body = await _admin_body(request)
    files = body.get("files")
    if not (isinstance(files, list) and all(isinstance(f, str) and f for f in files)):
        raise _admin_error('the body must be {"files": ["<file name>", ...]}')
    if set(body) != {"files"}:
        raise _admin_error('the body must be {"files": ["<file name>", ...]}')
    listname = request.match_info["listname"]
    request.app[WORLD].define_checksums(listname, files)
    return web.json_response({"name": listname, "path": f"/_files/{listname}", "files": files})
