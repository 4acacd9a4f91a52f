"""The simulator's listings: the same pages as filtering every image, at a cost per page."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.simulator import SimulatorConfig, World
from importer.simulator import world as world_module
from importer.simulator.listing import ListingIndex
from importer.simulator.world import ApiProblem, SimImage

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
    # The account's own images, not copies an index kept from before a restore.
    assert all(world.images.get(image.id) is image for image in images)
    return [image.id for image in images], total


class InstantClock:
    """Time set by hand to exact float instants, for these synchronous tests of a data
    structure (the virtual-time loop moves by sums, which may miss an instant by a ulp)."""

    def __init__(self, now: float = 1_000.0, epoch: float = 1_700_000_000.0) -> None:
        self.now = now
        self.epoch = epoch

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch + self.now

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


RENAMES = (
    {"name": "renamed"},
    {"description": "a new description"},
    {"distribution": "Ubuntu"},
    {"name": "renamed-again", "distribution": "not-a-distribution"},
)

#: Creates of up to 4 images alike at once: accounts large enough for Fenwick trees of
#: several levels.
CREATE = st.tuples(
    st.just("create"),
    st.tuples(st.sets(st.sampled_from(TAGS)), st.integers(1, 4)),
    st.sampled_from(MARKERS),
)
LIST = st.tuples(
    st.just("list"),
    st.tuples(
        st.sampled_from((None, *TAGS)),
        st.booleans(),
        st.integers(1, 4),
        st.integers(1, 5),
    ),
    st.just(""),
)
operations = st.lists(
    st.one_of(
        # Creates and listings drawn more often than the rest: an account of a few images
        # only, untagged or restored away, would seldom reach the large-tag paths.
        CREATE,
        CREATE,
        CREATE,
        LIST,
        LIST,
        st.tuples(st.just("advance"), st.floats(0.0, 6.0), st.just("")),
        st.tuples(st.just("delete"), st.integers(0, 60), st.just("")),
        st.tuples(
            st.just("untag"),
            st.tuples(st.integers(0, 60), st.sampled_from(TAGS)),
            st.just(""),
        ),
        st.tuples(
            st.just("rename"),
            st.tuples(st.integers(0, 60), st.sampled_from(RENAMES)),
            st.just(""),
        ),
        st.tuples(
            st.just("restore"),
            # (into a fresh world, the newest image left off, next_image_id set back to 0)
            st.tuples(st.booleans(), st.booleans(), st.booleans()),
            st.just(""),
        ),
    ),
    # With no minimum, Hypothesis draws lists of about 5: too few to create, rebuild and
    # list again.
    min_size=10,
    max_size=80,
)


def pick(world: World, n: int) -> SimImage | None:
    """The ``n``-th image of the account (modulo its size), deleted ones included."""
    ids = sorted(world.images)
    return world.images[ids[n % len(ids)]] if ids else None


def restored(
    world: World, clock: InstantClock, arg: tuple[bool, bool, bool]
) -> tuple[World, InstantClock]:
    """``world`` after a restore of its own snapshot, as the simulator's state file does it
    (JSON and back), and its clock. Optionally into a fresh world on a new clock (a later
    process: its monotonic time starts elsewhere, its wall time goes on), less the newest
    image (an older save) or with ``next_image_id`` set back (a hand-edited file)."""
    fresh, drop_newest, lower_next_id = arg
    snapshot = json.loads(json.dumps(world.snapshot(), allow_nan=False))
    if drop_newest:
        del snapshot["images"][-1:]
    if lower_next_id:
        snapshot["next_image_id"] = 0
    if fresh:
        clock = InstantClock(now=7.0, epoch=clock.wall() - 7.0)
        world = World(world.config, clock)
    world.restore(snapshot)
    return world, clock


def apply(
    world: World, clock: InstantClock, op: str, arg: Any, marker: str
) -> tuple[World, InstantClock]:
    """One operation, through the world's own methods as the simulator's handlers call them;
    the world and its clock afterwards (a restore into a fresh world replaces both)."""
    if op == "create":
        tags, count = arg
        for _ in range(count):
            before = max(world.images, default=0)
            image = create(world, len(world.images), tuple(sorted(tags)), marker)
            assert image.id > before  # the index appends: ids only grow, restores included
    elif op == "advance":
        clock.advance(arg)
    elif op == "restore":
        return restored(world, clock, arg)
    elif op == "list":
        assert listed(world, *arg) == reference(world, *arg)
    else:
        n, detail = (arg, None) if op == "delete" else arg
        target = pick(world, n)
        if target is None:
            return world, clock
        action: Callable[[], object]
        if op == "delete":
            action = functools.partial(world.delete_image, target.id)
        elif op == "untag":
            action = functools.partial(world.untag_image, target.id, str(detail))
        else:
            action = functools.partial(world.update_image, target.id, detail)
        if target.deleted_by_user:
            # DELETE, PUT and untagging answer 404 for an image the user deleted.
            with pytest.raises(ApiProblem) as problem:
                action()
            assert problem.value.status == 404
        else:
            action()
    return world, clock


@settings(max_examples=150, deadline=None)
@given(ops=operations, direct_max=st.sampled_from([0, 1, 3, 1000]))
def test_pages_match_filtering_every_image(
    ops: list[tuple[str, Any, str]], direct_max: int
) -> None:
    """Creates, deletes, untags, renames, snapshot restores and time passing: every page and
    total is what filtering all gives, on large and small tags alike."""
    # Untagging and restoring build a new index: patched, it keeps this example's threshold,
    # so that the large-tag paths run after rebuilds too.
    small = functools.partial(ListingIndex, direct_max=direct_max)
    with mock.patch.object(world_module, "ListingIndex", small):
        world, clock = new_world(direct_max)
        for op, arg, marker in ops:
            world, clock = apply(world, clock, op, arg, marker)
        # Fails should the patch stop reaching the world's rebuilds (the small thresholds
        # would then be tested only until the first untag or restore).
        assert world._listing._direct_max == direct_max
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
