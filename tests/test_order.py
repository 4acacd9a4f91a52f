"""Submission order: the largest known file first, while sources are still being probed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aiohttp import web

from importer.clock import LoopClock
from importer.order import GRACE, LargestFirst
from importer.pipeline import run_import
from importer.report import Outcome
from importer.simulator import SimulatorConfig, World, run_simulator
from importer.sources import SourceProber
from tests.helpers import manifest_of, settings_for

GIB = 2**30


@pytest.mark.anyio
async def test_the_largest_known_goes_first_unsized_before_all() -> None:
    """Sizes 1, 5, 3 GiB and one unknown: the unknown first (it may be the largest), then
    5, 3, 1; equal sizes in rank order."""
    queue: LargestFirst[str] = LargestFirst(LoopClock(), expected=5, grace=0.0)
    queue.add("one", GIB, rank=0)
    queue.add("five", 5 * GIB, rank=1)
    queue.add("three-b", 3 * GIB, rank=4)
    queue.add("three-a", 3 * GIB, rank=2)
    queue.add("unknown", None, rank=3)
    assert [await queue.next() for _ in range(5)] == [
        "unknown", "five", "three-a", "three-b", "one"
    ]  # fmt: skip
    assert await queue.next() is None


@pytest.mark.anyio
async def test_manifest_order_when_not_by_size() -> None:
    """Without size order: by rank alone, whatever the sizes."""
    queue: LargestFirst[int] = LargestFirst(LoopClock(), expected=3, grace=0.0, by_size=False)
    for rank, size in ((2, 9 * GIB), (0, GIB), (1, None)):
        queue.add(rank, size, rank=rank)
    assert [await queue.next() for _ in range(3)] == [0, 1, 2]


@pytest.mark.anyio
async def test_the_first_waits_a_short_grace_then_takes_the_largest_known() -> None:
    """Probes still running: the first item waits the grace (2 s) for more sizes, and takes
    the largest of those known then; the next ones go at once."""
    clock = LoopClock()
    queue: LargestFirst[str] = LargestFirst(clock, expected=10, grace=2.0)
    start = clock.monotonic()

    async def probes() -> None:
        for i, size in enumerate((1, 2, 7, 3)):
            await anyio.sleep(0.5)
            queue.add(f"{size}G", size * GIB, rank=i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probes)
        first = await queue.next()
        assert clock.monotonic() - start == pytest.approx(2.0)
        assert first == "7G"
        assert await queue.next() == "3G"
        assert clock.monotonic() - start == pytest.approx(2.0)


@pytest.mark.anyio
async def test_it_waits_only_while_nothing_is_known_and_probes_run() -> None:
    """Nothing known: wait for the next answer; every item out and none to come: ``None``."""
    clock = LoopClock()
    queue: LargestFirst[str] = LargestFirst(clock, expected=2, grace=0.0)
    start = clock.monotonic()

    async def later() -> None:
        await anyio.sleep(30)
        queue.add("a", GIB)
        await anyio.sleep(30)
        queue.expect_fewer()  # the other one needs no create after all

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        assert await queue.next() == "a"
        assert clock.monotonic() - start == pytest.approx(30.0)
        assert queue.left == 1
        assert await queue.next() is None
        assert clock.monotonic() - start == pytest.approx(60.0)


@pytest.mark.anyio
async def test_closing_ends_the_wait() -> None:
    """Sources that stop answering (the run stops probing): what is known goes, then None."""
    queue: LargestFirst[str] = LargestFirst(LoopClock(), expected=3, grace=0.0)
    queue.add("a", None)
    queue.close()
    assert await queue.next() == "a"
    assert await queue.next() is None
    with pytest.raises(RuntimeError, match="closed"):
        queue.add("b", None)


@asynccontextmanager
async def slow_file_host(
    world: World, latency: float
) -> AsyncIterator[tuple[str, list[tuple[str, float]]]]:
    """A file host answering each ``HEAD`` after ``latency`` seconds, with the simulator's
    sizes; yields its URL and the (file name, time) of each answer."""
    answered: list[tuple[str, float]] = []
    clock = LoopClock()

    async def head(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        await anyio.sleep(latency)
        answered.append((name, clock.wall()))
        size = world.file_size(name)
        return web.Response(headers={"Content-Length": str(size), "ETag": f'"{name}"'})

    app = web.Application()
    app.router.add_route("HEAD", "/{name}", head)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", answered
    finally:
        await runner.cleanup()


@pytest.mark.anyio
async def test_creates_start_before_the_last_head_and_take_the_largest_known() -> None:
    """240 sources answering HEAD in 2 s each, 16 at a time (30 s in all): the first create
    leaves after the 10 s grace, not after the last answer, and every create takes the
    largest file known and not yet submitted when it leaves."""
    config = SimulatorConfig.demo(seed=3, per_minute=10_000, per_hour=100_000)
    clock = LoopClock()
    async with run_simulator(config, clock) as sim:
        names = [f"img-{i:03d}.qcow2" for i in range(240)]
        manifest = manifest_of(*(f"https://images.example.com/{name}" for name in names))
        async with slow_file_host(sim.world, latency=2.0) as (host, answered):
            prober = SourceProber(clock, rewrite=lambda url: f"{host}/{url.rsplit('/', 1)[-1]}")
            settings = settings_for(sim.base_url, per_minute=10_000, per_hour=100_000)
            started = clock.wall()
            report = await run_import(manifest, settings, clock=clock, prober=prober, seed=1)
        world = sim.world
    assert {result.outcome for result in report.images} == {Outcome.AVAILABLE}
    known_at = dict(answered)
    created = sorted(world.images.values(), key=lambda image: (image.created_at, image.id))
    assert created[0].created_at - started == pytest.approx(GRACE, abs=1.0)
    assert max(known_at.values()) - started > 28.0
    # Creates that leave together may reach the API in any order: what counts is that no
    # larger file, known before, was still waiting when a create left.
    created_by = {image.url.rsplit("/", 1)[-1]: image.created_at for image in created}
    for image in created:
        name = image.url.rsplit("/", 1)[-1]
        size = world.file_size(name)
        larger = [
            other
            for other, when in known_at.items()
            if when < image.created_at < created_by[other] and world.file_size(other) > size
        ]
        assert not larger, (name, image.created_at - started, larger[:3])
