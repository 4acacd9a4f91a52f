"""The manifest's ``regions``: imported into the first region, transferred to the others."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from importer.errors import ManifestError, Problem
from importer.identity import entry_tag
from importer.manifest import Entry, parse_manifest

GOOD = {"name": "web-base", "url": "https://images.example.com/web-base.qcow2", "region": "nyc3"}


def doc(*images: object, **top: Any) -> str:
    return yaml.safe_dump({"version": 1, **top, "images": list(images)}, sort_keys=False)


def image(**fields: Any) -> dict[str, Any]:
    """A valid image with ``fields`` replaced; a field set to ``...`` is left out."""
    merged = {**GOOD, **fields}
    return {k: v for k, v in merged.items() if v is not ...}


def problems_of(text: str) -> tuple[Problem, ...]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    return caught.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


def test_regions_of_an_entry_import_into_the_first() -> None:
    """``regions`` alone: the first is the entry's ``region``, the others its transfers."""
    entry = parse_manifest(doc(image(region=..., regions=["nyc3", "ams3", "sgp1"]))).entries[0]
    assert (entry.region, entry.regions) == ("nyc3", ("nyc3", "ams3", "sgp1"))
    assert entry.transfer_regions == ("ams3", "sgp1")


def test_region_alone_is_one_region() -> None:
    """``region`` stays valid: the entry is in that region only, with nothing to transfer."""
    entry = parse_manifest(doc(GOOD)).entries[0]
    assert (entry.regions, entry.transfer_regions) == (("nyc3",), ())


def test_region_and_regions_that_agree_are_fine() -> None:
    """Both given, ``region`` the first of ``regions``: accepted."""
    entry = parse_manifest(doc(image(regions=["nyc3", "fra1"]))).entries[0]
    assert entry.regions == ("nyc3", "fra1")


def test_region_and_regions_that_disagree_are_a_problem() -> None:
    """Both given, ``region`` not the first of ``regions``: which one imports would be a guess."""
    problem = only_problem(doc(image(region="ams3", regions=["nyc3", "ams3"])))
    assert (problem.index, problem.field) == (0, "region")
    assert "first of 'regions'" in problem.message


def test_regions_in_defaults_apply_to_entries_without_their_own() -> None:
    """Defaults' ``regions`` reach every entry that names neither ``region`` nor ``regions``."""
    text = doc(image(region=...), defaults={"regions": ["sgp1", "syd1"]})
    assert parse_manifest(text).entries[0].regions == ("sgp1", "syd1")


def test_an_entrys_region_replaces_the_defaults_regions() -> None:
    """``region`` and ``regions`` are one setting: an entry's ``region`` wins over both defaults."""
    text = doc(image(region="fra1"), defaults={"regions": ["nyc3", "ams3"], "region": "nyc3"})
    assert parse_manifest(text).entries[0].regions == ("fra1",)


def test_defaults_region_and_regions_must_agree() -> None:
    """The same rule in defaults: one problem on ``defaults.region``, none per entry."""
    text = doc(
        image(region=...),
        image(name="b", region=...),
        defaults={"region": "ams3", "regions": ["nyc3"]},
    )
    problem = only_problem(text)
    assert (problem.index, problem.field) == (None, "defaults.region")


@pytest.mark.parametrize(
    ("regions", "field", "words"),
    [
        (["nyc3", "nyc4"], "regions.1", "unknown region 'nyc4'"),
        (["nyc3", "AMS3"], "regions.1", "did you mean 'ams3'"),
        (["nyc3", ""], "regions.1", "an empty region"),
        (["nyc3", "ams3", "nyc3"], "regions.2", "listed twice"),
        ([], "regions", "'regions' is empty"),
    ],
)
def test_bad_regions_are_problems_on_their_position(
    regions: list[str], field: str, words: str
) -> None:
    """Every region is checked like ``region``; a repeat or an empty list is a problem too."""
    problem = only_problem(doc(image(region=..., regions=regions)))
    assert (problem.index, problem.field) == (0, field)
    assert words in problem.message


def test_bad_default_regions_are_reported_once() -> None:
    """A bad region in defaults is one problem on ``defaults.regions.N``, not one per entry."""
    text = doc(image(region=...), image(name="b", region=...), defaults={"regions": ["mars1"]})
    problem = only_problem(text)
    assert (problem.index, problem.field) == (None, "defaults.regions.0")


def test_regions_must_be_a_list_of_strings() -> None:
    """``regions: nyc3`` (a string, not a list) is a type problem naming the field."""
    problem = only_problem(doc(image(region=..., regions="nyc3")))
    assert (problem.index, problem.field) == (0, "regions")
    assert "list" in problem.message


def test_a_name_twice_in_one_region_through_a_transfer_is_a_problem() -> None:
    """An entry transferred to ams3 and another of the same name imported there: refused."""
    text = doc(image(regions=["nyc3", "ams3"]), image(region="ams3", url="https://h/b.img"))
    problem = only_problem(text)
    assert (problem.index, problem.field) == (1, "name")
    assert "images[0] already puts 'web-base' into ams3" in problem.message


def test_one_name_in_disjoint_regions_is_fine() -> None:
    """The same name imported into nyc3 (copied to ams3) and into sgp1 alone: two images, fine."""
    text = doc(image(regions=["nyc3", "ams3"]), image(region="sgp1", url="https://h/b.img"))
    assert len(parse_manifest(text).entries) == 2


def test_the_identity_keeps_the_import_region_only() -> None:
    """Adding a region to an entry keeps its entry tag: the same image gains a transfer."""
    one = parse_manifest(doc(GOOD), source="m.yaml").entries[0]
    more = parse_manifest(doc(image(regions=["nyc3", "ams3"])), source="m.yaml").entries[0]
    assert entry_tag("s", one.name, one.region) == entry_tag("s", more.name, more.region)


def test_an_entry_built_in_code_has_its_region_as_regions() -> None:
    """``Entry(...)`` without transfer regions (Python callers, tests) is in its one region."""
    entry = Entry(0, "a", "https://h/a.img", "fra1", None, None, ())
    assert entry.regions == ("fra1",)
    more = Entry(0, "a", "https://h/a.img", "fra1", None, None, (), transfer_regions=("lon1",))
    assert more.regions == ("fra1", "lon1")
