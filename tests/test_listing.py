"""The simulator's listings: the same pages as filtering every image, at a cost per page."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.simulator import SimulatorConfig, World
from importer.simulator.listing import ListingIndex
from importer.simulator.world import SimImage

TAGS = ("run", "g1", "g2")
MARKERS = ("", "fail-fast-", "fail-decompress-", "stuck-new-", "stuck-pending-", "slow-")


def reference(
    world: World, tag: str | None, in_progress: bool, page: int, per_page: int
) -> tuple[list[int], int]:
    """The listing as the simulator used to compute it: filter every image, in id order."""
    matching = [
        image.id
        for _, image in sorted(world.images.items())
        if not image.deleted_by_user
        and (image.status == "available" or (in_progress and image.status != "deleted"))
        and (tag is None or tag in image.tags)
    ]
    start = (page - 1) * per_page
    return matching[start : start + per_page], len(matching)


def listed(
    world: World, tag: str | None, in_progress: bool, page: int, per_page: int
) -> tuple[list[int], int]:
    images, total = world._listing.page(tag, in_progress, page, per_page, world.clock.monotonic())
    return [image.id for image in images], total


class InstantClock:
    """Time set by hand to exact float instants, for these synchronous tests of a data
    structure (the virtual-time loop moves by sums, which may miss an instant by a ulp)."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - nothing sleeps here
        raise AssertionError("synchronous listing tests never sleep")

    def move_on_after(self, seconds: float) -> Any:  # pragma: no cover
        raise AssertionError("synchronous listing tests set no deadlines")

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_world(direct_max: int, **config: Any) -> tuple[World, InstantClock]:
    clock = InstantClock()
    world = World(SimulatorConfig.demo(**config), clock)
    world._listing = ListingIndex(direct_max=direct_max)
    return world, clock


def create(world: World, n: int, tags: tuple[str, ...], marker: str = "") -> SimImage:
    body = {
        "name": f"img-{n}",
        "url": f"https://h/{marker}img-{n}.qcow2",
        "region": "nyc3",
        "tags": list(tags),
    }
    return world.create_image(body)


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("create"),
            st.sets(st.sampled_from(TAGS)),
            st.sampled_from(MARKERS),
        ),
        st.tuples(st.just("advance"), st.floats(0.0, 6.0), st.just("")),
        st.tuples(st.just("delete"), st.integers(0, 60), st.just("")),
        st.tuples(
            st.just("list"),
            st.tuples(
                st.sampled_from((None, *TAGS)),
                st.booleans(),
                st.integers(1, 4),
                st.integers(1, 5),
            ),
            st.just(""),
        ),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations, direct_max=st.sampled_from([0, 3, 1000]))
def test_pages_match_filtering_every_image(
    ops: list[tuple[str, Any, str]], direct_max: int
) -> None:
    """Creates, deletes and time passing: every page and total is what filtering all gives."""
    world, clock = new_world(direct_max)
    made: list[SimImage] = []
    for op, arg, marker in ops:
        if op == "create":
            made.append(create(world, len(made), tuple(sorted(arg)), marker))
        elif op == "advance":
            clock.advance(arg)
        elif op == "delete" and made:
            image = made[arg % len(made)]
            if not image.deleted_by_user:
                world.delete_image(image.id)
        elif op == "list":
            assert listed(world, *arg) == reference(world, *arg)
    for tag in (None, *TAGS):
        for in_progress in (False, True):
            assert listed(world, tag, in_progress, 1, 200) == reference(
                world, tag, in_progress, 1, 200
            )


def around(value: float) -> Iterator[float]:
    """``value`` and the floats next to it."""
    below = math.nextafter(value, -math.inf)
    yield from (math.nextafter(below, -math.inf), below, value, math.nextafter(value, math.inf))


@pytest.mark.parametrize("direct_max", [0, 1000])
def test_an_image_is_listed_from_the_instant_it_is_available(direct_max: int) -> None:
    """At the float instants around each import's end, listings agree with the status."""
    world, clock = new_world(direct_max, duration_noise=0.3)
    images = [create(world, n, ("run",)) for n in range(20)]
    for image in images:
        ready = image.plan.ready_after
        assert ready is not None
        for instant in around(image.created_mono + ready):
            clock.now = max(clock.now, instant)
            assert listed(world, "run", False, 1, 200) == reference(world, "run", False, 1, 200)


def test_a_large_listing_reads_no_status_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a page of a 3,000-image tag again later reads a page's worth, not every image."""
    world, clock = new_world(1000)
    for n in range(3000):
        create(world, n, ("run",))
    clock.advance(3600.0)
    world.list_images({"tag_name": "run", "per_page": "200"})
    reads = 0
    status = SimImage.status

    def counted(image: SimImage) -> str:
        nonlocal reads
        reads += 1
        return status.fget(image)  # type: ignore[attr-defined, no-any-return]

    monkeypatch.setattr(SimImage, "status", property(counted))
    clock.advance(10.0)
    result = world.list_images({"tag_name": "run", "per_page": "200", "page": "3"})
    assert (result.total, len(result.images), result.images[0].id) == (3000, 200, 150_000_401)
    assert reads <= 200
