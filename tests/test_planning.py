"""Largest first: sizes by HEAD, submission order, group tags."""

from __future__ import annotations

import pytest

from importer.api import CreateRequest
from importer.catalog import tag_problem
from importer.manifest import Entry, Manifest
from importer.plan import GROUP_SIZE, group_prefix, make_plan
from importer.simulator import SimulatorConfig, run_simulator
from importer.sizing import HeadSizer
from tests.helpers import image_urls, manifest_of

GIB = 1024**3


def test_largest_first_with_unsized_in_manifest_order_ahead() -> None:
    """Unknown sizes keep manifest order at the front; known ones follow, largest first."""
    manifest = manifest_of(*image_urls(5))
    sizes = {0: 1 * GIB, 1: None, 2: 8 * GIB, 3: None, 4: 3 * GIB}
    plan = make_plan(manifest, sizes)
    assert [item.index for item in plan] == [1, 3, 2, 4, 0]
    assert [item.size for item in plan] == [None, None, 8 * GIB, 3 * GIB, 1 * GIB]


def test_without_sizes_the_manifest_order_stands() -> None:
    """No sizing: the plan is the manifest, in order."""
    plan = make_plan(manifest_of(*image_urls(7)))
    assert [item.index for item in plan] == list(range(7))


def test_groups_follow_submission_order_in_pages_of_200() -> None:
    """Consecutive submissions share a group of at most 200; each create carries both tags."""
    plan = make_plan(manifest_of(*image_urls(450)))
    groups = [item.group for item in plan]
    assert groups[0] == groups[GROUP_SIZE - 1] != groups[GROUP_SIZE]
    assert len(set(groups)) == 3
    tags = plan[0].create_request().tags
    assert plan[0].tag in tags
    assert plan[0].group in tags
    assert "test" in tags


@pytest.mark.parametrize(
    "source", ["nightly.yaml", "/etc/importer/Golden Images (v2).yml", "<manifest>", "....json"]
)
def test_group_tags_are_valid_tags(source: str) -> None:
    """Whatever the manifest is called, its group tags obey DigitalOcean's tag rules."""
    tag = group_prefix(source) + "12"
    assert tag_problem(tag) is None


@pytest.mark.anyio
async def test_head_sizer_reads_content_length() -> None:
    """Sizes come from HEAD; a file the host refuses to HEAD has no size."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        entries = (
            Entry(0, "a", sim.file_url("a-size-3G.qcow2"), "nyc3", None, None, ()),
            Entry(1, "b", sim.file_url("b-size-512M.img"), "nyc3", None, None, ()),
            Entry(2, "c", sim.file_url("c-no-head.img"), "nyc3", None, None, ()),
            Entry(3, "d", "http://127.0.0.1:9/nothing-listens.img", "nyc3", None, None, ()),
        )
        sizes = await HeadSizer().sizes(entries)
    assert sizes == {0: 3 * GIB, 1: 512 * 1024**2, 2: None, 3: None}


@pytest.mark.anyio
async def test_head_sizer_can_ask_elsewhere() -> None:
    """A rewrite sends HEAD to another host (the simulator's, under --simulate)."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        url = "https://images.example.com/x/a-size-2G.vmdk"
        manifest = Manifest(1, (Entry(0, "a", url, "nyc3", None, None, ()),), "m")
        sizer = HeadSizer(rewrite=lambda url: sim.file_url(url.rsplit("/", 1)[-1]))
        sizes = await sizer.sizes(manifest.entries)
    assert sizes == {0: 2 * GIB}


def test_a_create_is_derived_from_its_entry() -> None:
    """The create carries the entry's fields, its tags first, then the run's tags, each once."""
    entry = Entry(
        3, "web", "https://images.example.com/web.qcow2", "ams3", "Debian", "d", ("a", "b")
    )
    create = CreateRequest.from_entry(entry, ("importer:0123", "b"))
    assert create.body() == {
        "name": "web",
        "url": "https://images.example.com/web.qcow2",
        "region": "ams3",
        "distribution": "Debian",
        "description": "d",
        "tags": ["a", "importer:0123", "b"],
    }
    bare = CreateRequest.from_entry(Entry(0, "n", "https://h/x.img", "nyc3", None, None, ()))
    assert bare.body() == {"name": "n", "url": "https://h/x.img", "region": "nyc3"}
