"""The HTTP face of a :class:`World`: DigitalOcean's image endpoints, a file host and an admin view.

Every ``/v2`` request goes through one middleware, in this order: count it,
authenticate, apply the rate limits, draw faults, then handle it. The file host
(``/_files/{name}``) and the admin view (``/_simulator/state``) sit outside
``/v2``: no auth, no rate limit, no faults.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from importer.clock import Clock, LoopClock
from importer.simulator.config import SimulatorConfig
from importer.simulator.world import NOT_FOUND_MESSAGE, ApiProblem, FaultPlan, Json, World

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
    app = web.Application(middlewares=[_api_middleware])
    app[WORLD] = world
    app.router.add_post("/v2/images", _create_image)
    app.router.add_get("/v2/images", _list_images, allow_head=False)
    app.router.add_get("/v2/images/{id}", _get_image, allow_head=False)
    app.router.add_delete("/v2/images/{id}", _delete_image)
    app.router.add_post("/v2/images/{id}/actions", _post_image_action)
    app.router.add_get("/v2/actions/{id}", _get_action, allow_head=False)
    app.router.add_get("/_files/{filename}", _file)
    app.router.add_get("/_simulator/state", _state)
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


@asynccontextmanager
async def run_simulator(
    config: SimulatorConfig | None = None,
    clock: Clock | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[Simulator]:
    """Serve a fresh :class:`World` on ``host:port`` (0 picks a free port) until the block ends."""
    world = World(config or SimulatorConfig.demo(), clock or LoopClock())
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


# -- the /v2 pipeline -----------------------------------------------------------


def _route_key(request: web.Request) -> str:
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    return f"{request.method} {path}"


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
    request_id = world.next_request_id()
    route = _route_key(request)
    world.count_request(route)
    body = await request.read()
    # CPU time is charged to the simulator only where nothing awaits, so that no other
    # task's work lands in it: the handlers' own reads return this cached body, and the
    # one sleep (a `slow` fault) is left out.
    started = time.process_time()
    try:
        return await _serve_api(request, handler, world, request_id, route, body)
    finally:
        world.cpu_seconds += time.process_time() - started


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


async def _delete_image(request: web.Request) -> web.Response:
    request.app[WORLD].delete_image(_id_param(request))
    return web.Response(status=204)


async def _list_images(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    result = world.list_images(request.query)

    def link(page: int) -> str:
        return str(request.url.update_query(page=page, per_page=result.per_page))

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


async def _file(request: web.Request) -> web.Response:
    """A file host for image URLs: sizes without bytes.

    HEAD announces the simulated size in Content-Length. GET answers a short
    text body instead of gigabytes, with the simulated size in
    ``x-simulated-content-length``.
    """
    world = request.app[WORLD]
    filename = request.match_info["filename"]
    if request.method == "HEAD" and world.config.head_latency > 0:
        # The middleware charges this handler's CPU time to the simulator: not the wait's.
        slept = time.process_time()
        await world.clock.sleep(world.config.head_latency)
        world.cpu_seconds -= time.process_time() - slept
    if not world.file_answers_head(filename) and request.method == "HEAD":
        return web.Response(status=405, headers={"Allow": "GET"})
    size = str(world.file_size(filename))
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": size})
    return web.Response(
        text=f"simulated image file {filename}: {size} bytes\n",
        headers={"x-simulated-content-length": size},
    )


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[WORLD].state())
