"""The manifest: every rule, all problems at once, and no input that makes it crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from importer import strict_yaml
from importer.catalog import DISTRIBUTIONS, REGIONS
from importer.errors import ManifestError, Problem
from importer.manifest import (
    MAX_TAGS,
    NAME_MAX_LENGTH,
    Entry,
    Manifest,
    load_manifest,
    parse_manifest,
)
from importer.plan import make_plan
from tests.examples import example_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
MODEST = settings(max_examples=200, deadline=None)


@pytest.fixture(autouse=True, scope="module", params=["libyaml", "pure-python"])
def yaml_loader(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module runs twice: on libyaml's parser and on the pure-Python one."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "pure-python":
            patch.setattr(strict_yaml, "_C_LOADER", None)
        elif strict_yaml._C_LOADER is None:
            pytest.skip("PyYAML is built without libyaml here")
        yield str(request.param)


GOOD = {"name": "web-base", "url": "https://images.example.com/web-base.qcow2", "region": "nyc3"}


def doc(*images: object, **top: Any) -> str:
    """A YAML manifest of ``images`` (plus top-level keys such as ``defaults``)."""
    return yaml.safe_dump({"version": 1, **top, "images": list(images)}, sort_keys=False)


def image(**fields: Any) -> dict[str, Any]:
    """A valid image with ``fields`` replaced; a field set to ``...`` is left out."""
    merged = {**GOOD, **fields}
    return {k: v for k, v in merged.items() if v is not ...}


def problems_of(text: str, **kwargs: Any) -> tuple[Problem, ...]:
    """The problems ``text`` is rejected with (failing the test if it is accepted)."""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, **kwargs)
    return caught.value.problems


def only_problem(text: str, **kwargs: Any) -> Problem:
    """The one problem ``text`` is rejected with."""
    problems = problems_of(text, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid manifests -------------------------------------------------------------------------


def test_minimal_manifest_parses_to_entries() -> None:
    """A valid entry becomes an Entry with its index, values, and None/() for what is absent."""
    manifest = parse_manifest(doc(GOOD), source="m.yaml")
    assert manifest == Manifest(
        version=1,
        entries=(Entry(0, "web-base", GOOD["url"], "nyc3", None, None, ()),),
        source="m.yaml",
    )


def test_all_fields_are_kept() -> None:
    """distribution, description and tags reach the Entry unchanged."""
    text = doc(image(distribution="Debian", description="Base image", tags=["web", "prod"]))
    entry = parse_manifest(text).entries[0]
    assert (entry.distribution, entry.description, entry.tags) == (
        "Debian",
        "Base image",
        ("web", "prod"),
    )


def test_defaults_fill_missing_fields() -> None:
    """Defaults supply region, distribution, description and tags to entries without them."""
    defaults = {"region": "ams3", "distribution": "Ubuntu", "description": "d", "tags": ["gold"]}
    entry = parse_manifest(doc(image(region=...), defaults=defaults)).entries[0]
    assert (entry.region, entry.distribution, entry.description, entry.tags) == (
        "ams3",
        "Ubuntu",
        "d",
        ("gold",),
    )


def test_entry_values_win_over_defaults() -> None:
    """An entry's own region/distribution/description replace the defaults'."""
    defaults = {"region": "ams3", "distribution": "Ubuntu", "description": "d"}
    text = doc(image(region="fra1", distribution="Debian", description="own"), defaults=defaults)
    entry = parse_manifest(text).entries[0]
    assert (entry.region, entry.distribution, entry.description) == ("fra1", "Debian", "own")


def test_tags_are_defaults_then_entry_without_repeats() -> None:
    """Tags are the defaults' followed by the entry's, de-duplicated, order kept."""
    text = doc(image(tags=["web", "golden", "prod", "web"]), defaults={"tags": ["golden", "base"]})
    assert parse_manifest(text).entries[0].tags == ("golden", "base", "web", "prod")


def test_null_value_means_not_given() -> None:
    """``region:`` with nothing after it falls back to the default, like a missing key."""
    text = "defaults: {region: sgp1}\nimages:\n  - name: a\n    url: https://h/a.img\n    region:\n"
    assert parse_manifest(text).entries[0].region == "sgp1"


def test_missing_version_means_1() -> None:
    """A manifest without ``version`` is read as version 1."""
    assert parse_manifest(yaml.safe_dump({"images": [GOOD]})).version == 1


def test_json_manifest_parses_like_yaml() -> None:
    """The same document as JSON (explicit or auto-detected) gives the same entries."""
    data = {"version": 1, "defaults": {"tags": ["t"]}, "images": [GOOD]}
    from_yaml = parse_manifest(yaml.safe_dump(data))
    assert parse_manifest(json.dumps(data), fmt="json") == from_yaml
    assert parse_manifest(json.dumps(data)) == from_yaml


def test_yaml_merge_keys_are_allowed() -> None:
    """A YAML ``<<`` merge may be overridden by the entry without counting as a duplicate key."""
    text = (
        "images:\n  - &a {name: a, url: 'https://h/a.img', region: nyc3}\n  - {<<: *a, name: b}\n"
    )
    assert [e.name for e in parse_manifest(text).entries] == ["a", "b"]


def test_entries_are_frozen() -> None:
    """Entries and manifests cannot be changed after validation."""
    entry = parse_manifest(doc(GOOD)).entries[0]
    with pytest.raises(AttributeError):
        entry.region = "ams3"  # type: ignore[misc]


# --- reading ---------------------------------------------------------------------------------


def test_yaml_syntax_error_gives_line_and_column() -> None:
    """Broken YAML is one problem that says where, with no entry or field."""
    problem = only_problem("version: 1\nimages:\n  - name: [a, b\n")
    assert "not valid YAML" in problem.message
    assert "line 4, column 1" in problem.message
    assert "line 3" in problem.message  # where the unclosed list began
    assert (problem.index, problem.field) == (None, None)


def test_json_syntax_error_gives_line_and_column() -> None:
    """Broken JSON is one problem with its line and column."""
    problem = only_problem('{"version": 1,\n  "images" []}', fmt="json")
    assert "not valid JSON" in problem.message
    assert "line 2, column 12" in problem.message


def test_yaml_only_syntax_is_not_json() -> None:
    """With fmt="json", YAML syntax is a JSON error, not silently accepted."""
    assert "not valid JSON" in only_problem(doc(GOOD), fmt="json").message


def test_duplicate_yaml_key_is_a_problem_with_position() -> None:
    """A key written twice in one mapping is reported where the second one is."""
    text = "images:\n  - name: a\n    url: https://h/a.img\n    name: b\n    region: nyc3\n"
    problem = only_problem(text)
    assert "'name' twice" in problem.message
    assert "line 4, column 5" in problem.message


def test_duplicate_json_key_is_a_problem() -> None:
    """JSON would keep the last of two equal keys; we refuse instead."""
    assert (
        "'url' appears twice"
        in only_problem('{"images": [{"url": "a", "url": "b"}]}', fmt="json").message
    )


def test_invalid_date_is_a_problem_not_a_traceback() -> None:
    """A value YAML takes for an impossible date is reported with its position."""
    problem = only_problem("images:\n  - name: 2024-13-45\n")
    assert "line 2, column 11" in problem.message


@pytest.mark.parametrize(
    "text", ["!!int ", "!!bool ", "!!map images:", "a: !!binary x", "a: !foo x"]
)
def test_odd_yaml_values_are_problems_not_tracebacks(text: str) -> None:
    """Explicit YAML tags PyYAML chokes on (IndexError, KeyError...) become one YAML problem."""
    assert "not valid YAML" in only_problem(text).message


def test_forbidden_character_is_a_problem_with_position() -> None:
    """A control character YAML refuses is located by line and column."""
    assert "line 2, column 4" in only_problem("a: 1\nb: \x00\n").message


def test_deep_nesting_is_a_problem() -> None:
    """A document nested deeper than the parser can go is a problem, not a RecursionError."""
    assert "nested too deeply" in only_problem("[" * 1500).message
    assert "nested too deeply" in only_problem("[" * 1500, fmt="json").message


def test_load_manifest_picks_format_by_suffix(tmp_path: Path) -> None:
    """.json is read as JSON, .yaml/.yml as YAML, anything else as YAML (which reads JSON)."""
    data = {"images": [GOOD]}
    for name, text in [
        ("m.json", json.dumps(data)),
        ("m.yaml", yaml.safe_dump(data)),
        ("m.YML", yaml.safe_dump(data)),
        ("m.txt", json.dumps(data)),
    ]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        manifest = load_manifest(path)
        assert manifest.source == str(path)
        assert manifest.entries[0].name == "web-base"
    (tmp_path / "yaml.json").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path / "yaml.json")


def test_load_manifest_accepts_byte_order_mark(tmp_path: Path) -> None:
    """A UTF-8 BOM (as some editors write) does not break JSON parsing."""
    path = tmp_path / "m.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [GOOD]}).encode())
    assert len(load_manifest(path).entries) == 1


@pytest.mark.parametrize("make", ["missing", "directory", "not-utf8"])
def test_unreadable_file_is_one_clear_problem(tmp_path: Path, make: str) -> None:
    """A file that cannot be read gives one problem naming the file, never a traceback."""
    path = tmp_path / "m.yaml"
    if make == "directory":
        path.mkdir()
    elif make == "not-utf8":
        path.write_bytes(b"images: \xff\xfe\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.source == str(path)
    (problem,) = caught.value.problems
    expected = "not UTF-8" if make == "not-utf8" else "cannot read"
    assert expected in problem.message


# --- document structure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"), [("", "empty"), ("- a\n", "a list"), ("just text\n", "a string")]
)
def test_top_level_must_be_a_mapping(text: str, words: str) -> None:
    """An empty document, a list or a scalar at the top is one problem saying what it is."""
    problem = only_problem(text)
    assert "must be a mapping" in problem.message
    assert words in problem.message


def test_missing_images_is_a_problem() -> None:
    """No ``images`` key is a problem on field ``images``."""
    assert only_problem("version: 1\n").field == "images"


def test_images_not_a_list_is_a_problem() -> None:
    """``images`` given as a mapping is a problem on field ``images``."""
    problem = only_problem("images: {name: a}\n")
    assert (problem.field, problem.index) == ("images", None)
    assert "must be a list" in problem.message


def test_empty_images_is_a_problem() -> None:
    """An empty ``images`` list is a problem: there is nothing to import."""
    problem = only_problem("images: []\n")
    assert problem.field == "images"
    assert "empty" in problem.message


@pytest.mark.parametrize("version", [2, 0, "1", True, 1.5])
def test_unsupported_version_is_a_problem(version: object) -> None:
    """Any version other than the integer 1 is a problem on field ``version``."""
    problem = only_problem(yaml.safe_dump({"version": version, "images": [GOOD]}))
    assert (problem.field, problem.index) == ("version", None)


def test_unsupported_version_stops_before_entries() -> None:
    """With an unknown version, entries are not judged by version 1's rules."""
    problem = only_problem(yaml.safe_dump({"version": 2, "images": [{"bogus": 1}]}))
    assert problem.field == "version"


def test_unknown_top_level_key_is_a_problem() -> None:
    """A misspelt top-level key is named, with a suggestion."""
    problems = problems_of("imagse: []\n")
    assert [p.field for p in problems] == ["imagse", "images"]
    assert "did you mean 'images'" in problems[0].message


def test_image_not_a_mapping_is_a_problem() -> None:
    """An entry that is a bare string is a problem on that index."""
    problem = only_problem(yaml.safe_dump({"images": [GOOD, "https://h/a.img"]}))
    assert (problem.index, problem.field) == (1, None)
    assert "a string" in problem.message
    assert "https" not in problem.message  # described by type, never quoted


def test_defaults_not_a_mapping_is_reported_once() -> None:
    """A ``defaults`` list is one problem; entries relying on it are not blamed again."""
    problem = only_problem(doc(image(region=...), defaults=["nyc3"]))
    assert (problem.field, problem.index) == ("defaults", None)


# --- fields of an entry ----------------------------------------------------------------------


def test_unknown_key_in_entry_names_it_and_suggests() -> None:
    """An unknown entry key is a problem on that key, suggesting the closest real one."""
    problem = only_problem(doc(image(tag=["web"])))
    assert (problem.index, problem.name, problem.field) == (0, "web-base", "tag")
    assert "did you mean 'tags'" in problem.message


def test_unknown_key_in_defaults_is_reported_under_defaults() -> None:
    """An unknown key in defaults is field ``defaults.<key>`` with no index."""
    problem = only_problem(doc(GOOD, defaults={"name": "x"}))
    assert (problem.index, problem.field) == (None, "defaults.name")


def test_non_string_key_is_a_problem() -> None:
    """A key YAML reads as a number is reported, not crashed on."""
    problem = only_problem(doc(image(**{"1": "x"})).replace("'1'", "1"))
    assert problem.index == 0
    assert "keys must be strings" in problem.message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("name", 2024, "a number (2024)"),
        ("region", True, "true/false"),
        ("url", ["https://h/a.img"], "a list"),
        ("description", {"a": 1}, "a mapping"),
        ("tags", "web", "must be a list"),
    ],
)
def test_wrong_type_is_a_problem_on_that_field(field: str, value: object, words: str) -> None:
    """A value of the wrong type is one problem on its field, saying what it got."""
    problem = only_problem(doc(image(**{field: value})))
    assert (problem.index, problem.field) == (0, field)
    assert words in problem.message


def test_yaml_typed_tag_is_a_problem_on_that_tag() -> None:
    """``tags: [on]`` (a YAML boolean) is a problem on ``tags.0`` suggesting quotes."""
    problem = only_problem(
        "images:\n  - {name: a, url: 'https://h/a.img', region: nyc3, tags: [on]}\n"
    )
    assert (problem.index, problem.field) == (0, "tags.0")
    assert "quotes" in problem.message


def test_wrong_type_does_not_hide_other_problems() -> None:
    """A bad type on one field still lets the other fields be checked."""
    problems = problems_of(doc(image(name=5, region="nyc9")))
    assert {p.field for p in problems} == {"name", "region"}


@pytest.mark.parametrize("field", ["name", "url", "region"])
def test_missing_required_field_is_a_problem(field: str) -> None:
    """Without name, url or region (and no default), the entry has a problem on that field."""
    problem = only_problem(doc(image(**{field: ...})))
    assert (problem.index, problem.field) == (0, field)
    assert "missing" in problem.message


@pytest.mark.parametrize("field", ["name", "url", "region"])
@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_required_field_counts_as_missing(field: str, empty: str) -> None:
    """An empty (or blank) required value is a problem on that field."""
    problem = only_problem(doc(image(**{field: empty})))
    assert (problem.index, problem.field) == (0, field)
    assert "empty" in problem.message


def test_empty_region_does_not_fall_back_to_default() -> None:
    """``region: ""`` is a problem even when defaults have a region: no silent fallback."""
    problem = only_problem(doc(image(region=""), defaults={"region": "nyc3"}))
    assert (problem.index, problem.field) == (0, "region")


def test_problem_carries_name_when_known() -> None:
    """Problems name the entry when it has a name, and leave name None when it has none."""
    named = only_problem(doc(image(region="nowhere")))
    unnamed = only_problem(doc(image(name=..., url="https://h/x.img")))
    assert (named.name, unnamed.name) == ("web-base", None)


def test_name_too_long_is_a_problem() -> None:
    """A name over the length limit is a problem on ``name``."""
    problem = only_problem(doc(image(name="n" * (NAME_MAX_LENGTH + 1))))
    assert (problem.index, problem.field) == (0, "name")
    assert str(NAME_MAX_LENGTH) in problem.message
    parse_manifest(doc(image(name="n" * NAME_MAX_LENGTH)))


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://h/a.img", "http:// or https://"),
        ("images/a.img", "http:// or https://"),
        ("https:///a.img", "no host"),
        ("https://h", "must name the image file"),
        ("https://h/images/", "must name the image file"),
        ("https://h/my image.img", "whitespace"),
        ("https://h:port/a.img", "not a valid URL"),
        ("https://[::1/a.img", "not a valid URL"),
    ],
)
def test_bad_url_is_a_problem(url: str, words: str) -> None:
    """A URL that is not absolute http(s) with a host and a file name is a problem on ``url``."""
    problem = only_problem(doc(image(url=url)))
    assert (problem.index, problem.field) == (0, "url")
    assert words in problem.message


@pytest.mark.parametrize(
    "path", ["a.xz", "a.img.xz", "a.zip", "a.tar.gz", "A.ISO", "a.tgz", "a.7z", "a.rar"]
)
def test_rejected_format_is_a_problem_listing_accepted_ones(path: str) -> None:
    """A format DigitalOcean rejects is a problem naming the rejected and accepted formats."""
    problem = only_problem(doc(image(url=f"https://h/{path}")))
    assert (problem.index, problem.field) == (0, "url")
    for word in (".xz", ".zip", ".tar.gz", ".iso", "raw", "qcow2", "vhdx", "vdi", "vmdk", "gzip"):
        assert word in problem.message


@pytest.mark.parametrize("ok", ["a.qcow2", "a.img.gz", "a.raw.bz2", "a.vmdk", "a.vhdx", "a.vdi"])
def test_accepted_formats_pass(ok: str) -> None:
    """Formats DigitalOcean takes, compressed or not, pass."""
    parse_manifest(doc(image(url=f"https://h/{ok}")))


def test_rejected_format_is_judged_on_the_path_only() -> None:
    """A query string neither hides a rejected format nor invents one."""
    parse_manifest(doc(image(url="https://h/a.qcow2?filename=a.zip")))
    problem = only_problem(doc(image(url="https://h/a.zip?filename=a.qcow2")))
    assert problem.field == "url"


def test_percent_encoded_rejected_suffix_is_caught() -> None:
    """``a%2Ezip`` is still a .zip file once the path is decoded."""
    assert only_problem(doc(image(url="https://h/a%2Ezip"))).field == "url"


def test_unknown_region_lists_valid_ones_and_suggests() -> None:
    """An unknown region is a problem listing the sorted valid regions and the closest one."""
    problem = only_problem(doc(image(region="nyc4")))
    assert (problem.index, problem.field) == (0, "region")
    assert ", ".join(sorted(REGIONS)) in problem.message
    assert "did you mean 'nyc" in problem.message


def test_region_in_wrong_case_is_a_problem_with_suggestion() -> None:
    """``NYC3`` is not ``nyc3``: a problem, suggesting the exact spelling."""
    problem = only_problem(doc(image(region="NYC3")))
    assert problem.field == "region"
    assert "did you mean 'nyc3'" in problem.message


def test_region_without_close_match_has_no_suggestion() -> None:
    """A region nothing resembles gets the list but no guess."""
    assert "did you mean" not in only_problem(doc(image(region="mars-base-alpha"))).message


def test_unknown_distribution_lists_valid_ones_and_suggests() -> None:
    """A misspelt distribution is a problem with the closest valid one and the full list."""
    problem = only_problem(doc(image(distribution="Debain")))
    assert (problem.index, problem.field) == (0, "distribution")
    assert "did you mean 'Debian'" in problem.message
    assert all(d in problem.message for d in DISTRIBUTIONS)


def test_distribution_case_difference_is_a_problem() -> None:
    """``ubuntu`` would silently become Unknown at DigitalOcean: a problem suggesting 'Ubuntu'."""
    problem = only_problem(doc(image(distribution="ubuntu")))
    assert (problem.index, problem.name, problem.field) == (0, "web-base", "distribution")
    assert "did you mean 'Ubuntu'" in problem.message
    assert "Unknown" in problem.message


def test_empty_distribution_is_a_problem() -> None:
    """``distribution: ""`` is a problem rather than a silent Unknown."""
    assert only_problem(doc(image(distribution=""))).field == "distribution"


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_every_catalog_distribution_passes(distribution: str) -> None:
    """Each distribution of the enum, ``Unknown`` included, is accepted as written."""
    assert (
        parse_manifest(doc(image(distribution=distribution))).entries[0].distribution
        == distribution
    )


def test_invalid_tag_is_a_problem_on_that_tag() -> None:
    """A tag DigitalOcean would refuse is a problem on ``tags.<position>``."""
    problem = only_problem(doc(image(tags=["ok", "not ok"])))
    assert (problem.index, problem.field) == (0, "tags.1")


def test_invalid_default_tag_is_reported_once_under_defaults() -> None:
    """A bad tag in defaults is field ``defaults.tags.N`` with no index, not one per entry."""
    text = doc(GOOD, image(name="other"), defaults={"tags": ["fine", "", "x" * 256]})
    problems = problems_of(text)
    assert [(p.index, p.field) for p in problems] == [
        (None, "defaults.tags.1"),
        (None, "defaults.tags.2"),
    ]


def test_too_many_tags_is_a_problem() -> None:
    """More tags than the limit, counting the defaults', is a problem on ``tags``."""
    own = [f"t{i}" for i in range(MAX_TAGS)]
    problem = only_problem(doc(image(tags=own), defaults={"tags": ["extra"]}))
    assert (problem.index, problem.field) == (0, "tags")
    parse_manifest(doc(image(tags=own)))


def test_too_many_default_tags_is_a_problem() -> None:
    """Defaults alone over the limit are a problem on ``defaults.tags``."""
    tags = [f"t{i}" for i in range(MAX_TAGS + 1)]
    problems = problems_of(doc(GOOD, defaults={"tags": tags}))
    assert (None, "defaults.tags") in [(p.index, p.field) for p in problems]


def test_same_name_and_region_is_a_problem_on_the_later_entry() -> None:
    """A second image with an earlier one's name and region is a problem naming the first."""
    text = doc(GOOD, image(name="other"), image(url="https://h/again.img"))
    problem = only_problem(text)
    assert (problem.index, problem.name, problem.field) == (2, "web-base", "name")
    assert "images[0]" in problem.message


def test_same_name_in_another_region_is_fine() -> None:
    """One name in two regions makes two distinct images: allowed."""
    assert len(parse_manifest(doc(GOOD, image(region="ams3"))).entries) == 2


def test_duplicate_found_through_defaults() -> None:
    """The duplicate check uses the region after merging defaults."""
    text = doc(image(region=...), image(region="nyc3"), defaults={"region": "nyc3"})
    assert only_problem(text).index == 1


def test_default_problems_are_reported_once_with_field_and_no_index() -> None:
    """A bad default region is one problem on ``defaults.region``, not one per entry."""
    text = doc(image(region=...), image(name="b", region=...), defaults={"region": "mars1"})
    problem = only_problem(text)
    assert (problem.index, problem.name, problem.field) == (None, None, "defaults.region")


def test_default_distribution_in_wrong_case_is_a_problem() -> None:
    """Defaults get the same exact-distribution rule as entries."""
    assert (
        only_problem(doc(GOOD, defaults={"distribution": "debian"})).field
        == "defaults.distribution"
    )


# --- all at once, and secrets ----------------------------------------------------------------


def test_all_problems_are_reported_at_once() -> None:
    """Several bad entries and bad defaults yield every problem in one error, in order."""
    text = doc(
        image(region="NYC3"),
        GOOD,
        image(name=..., url="https://h/a.iso"),
        "not a mapping",
        image(name="d", distribution="ubuntu", tags=["bad tag"]),
        image(name="e", url="https://h/e.img", region=...),
        defaults={"tags": ["bad!"]},
    )
    located = [(p.index, p.field) for p in problems_of(text)]
    assert located == [
        (None, "defaults.tags.0"),
        (0, "region"),
        (2, "name"),
        (2, "url"),
        (3, None),
        (4, "distribution"),
        (4, "tags.0"),
        (5, "region"),
    ]


def test_error_message_lists_every_problem() -> None:
    """The ManifestError's text shows each problem, so a CLI can just print it."""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(
            doc(image(region="x"), image(name="b", url="ftp://h/b.img")), source="m.yaml"
        )
    text = str(caught.value)
    assert text.startswith("m.yaml: 2 problems")
    assert "images[0] ('web-base'): region" in text
    assert "images[1] ('b'): url" in text


def test_query_strings_never_appear_in_problems() -> None:
    """A presigned URL's signature is not quoted in any problem, whatever the field."""
    secret = "X-Amz-Signature=SECRET123"
    text = doc(
        image(url=f"https://bucket.example/a.zip?{secret}"),
        image(name=f"https://bucket.example/x.img?{secret}", url=f"ftp://h/x.img?{secret}"),
        image(name="c", **{f"https://bucket.example/y?{secret}": 1}),
    )
    problems = problems_of(text)
    assert len(problems) == 3
    for problem in problems:
        assert "SECRET123" not in f"{problem.message} {problem.name} {problem.field}"
    assert "a.zip?REDACTED" in problems[0].message


def test_url_password_never_appears_in_problems() -> None:
    """A password before the host is masked when the URL is quoted."""
    problem = only_problem(doc(image(url="https://bob:hunter2@h/a.zip")))
    assert "hunter2" not in problem.message


# --- example manifests -----------------------------------------------------------------------


def test_example_manifest_loads_cleanly() -> None:
    """manifests/example.yaml: five images in the spec's regions, in accepted formats."""
    manifest = load_manifest(MANIFESTS / "example.yaml")
    assert len(manifest.entries) == 5
    assert {e.region for e in manifest.entries} == {"nyc3", "ams3", "fra1", "sfo3", "sgp1"}
    assert all(e.url.startswith("https://images.example.com/") for e in manifest.entries)
    assert not any("fail-" in e.url for e in manifest.entries)


def test_example_json_is_the_twin_of_example_yaml() -> None:
    """manifests/example.json holds the same entries as example.yaml."""
    assert (
        load_manifest(MANIFESTS / "example.json").entries
        == load_manifest(MANIFESTS / "example.yaml").entries
    )


def test_failures_example_loads_and_has_each_marker_once() -> None:
    """manifests/example-failures.yaml is valid, with one of each failure and two good images."""
    manifest = load_manifest(MANIFESTS / "example-failures.yaml")
    files = [e.url.rsplit("/", 1)[-1] for e in manifest.entries]
    for marker in ("fail-decompress", "fail-download", "fail-fast"):
        assert sum(marker in f for f in files) == 1, marker
    assert sum("fail-" not in f for f in files) == 2


def test_generated_example_matches_its_generator() -> None:
    """manifests/generated-200.yaml is exactly example_manifest(200)'s output, and valid."""
    path = MANIFESTS / "generated-200.yaml"
    assert path.read_text(encoding="utf-8") == example_manifest(200) + "\n"
    assert len(load_manifest(path).entries) == 200


@pytest.mark.parametrize("count", [1, 7, 50])
def test_example_manifest_is_valid_and_reproducible(count: int) -> None:
    """example_manifest gives valid manifests of the asked size, the same for the same seed."""
    text = example_manifest(count, seed=3, base_url="https://cdn.example.org/")
    manifest = parse_manifest(text)
    assert len(manifest.entries) == count
    assert all(e.url.startswith("https://cdn.example.org/") for e in manifest.entries)
    assert text == example_manifest(count, seed=3, base_url="https://cdn.example.org/")
    assert text != example_manifest(count, seed=4, base_url="https://cdn.example.org/")


# --- properties ------------------------------------------------------------------------------

MANIFEST_KEYS = ["version", "defaults", "images", "name", "url", "region", "distribution", "tags"]

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from([*sorted(REGIONS), *DISTRIBUTIONS, "https://h/a.img", "https://h/a.zip?s=1"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(MANIFEST_KEYS) | st.text(max_size=8), children, max_size=5
        )
    ),
    max_leaves=25,
)


def accepted_or_manifest_error(text: str, fmt: str | None) -> None:
    """Assert the one contract for any input: a Manifest, or a ManifestError with problems."""
    problems: tuple[Problem, ...] = ()
    try:
        assert isinstance(parse_manifest(text, fmt=fmt), Manifest)  # type: ignore[arg-type]
    except ManifestError as exc:
        problems = exc.problems
        assert problems
    assert all(isinstance(p, Problem) and p.message for p in problems)


@MODEST
@given(text=st.text(), fmt=st.sampled_from([None, "yaml", "json"]))
def test_any_text_gives_manifest_or_manifest_error(text: str, fmt: str | None) -> None:
    """Arbitrary text never makes parse_manifest raise anything but ManifestError."""
    accepted_or_manifest_error(text, fmt)


@MODEST
@given(
    top=st.dictionaries(
        st.sampled_from(MANIFEST_KEYS) | st.text(max_size=8), json_like, max_size=4
    ),
    images=st.lists(json_like, max_size=4),
    fmt=st.sampled_from(["yaml", "json"]),
)
def test_any_structure_gives_manifest_or_manifest_error(
    top: dict[str, Any], images: list[Any], fmt: str
) -> None:
    """Arbitrary JSON-like documents, as YAML or JSON, give a Manifest or a ManifestError."""
    document = {**top, "images": images}
    text = json.dumps(document) if fmt == "json" else yaml.safe_dump(document)
    accepted_or_manifest_error(text, fmt)
    accepted_or_manifest_error(json.dumps(top) if fmt == "json" else yaml.safe_dump(top), fmt)


names = st.from_regex(r"[a-z][a-z0-9.-]{0,40}", fullmatch=True)
tags = st.lists(st.from_regex(r"[A-Za-z0-9_:-]{1,20}", fullmatch=True), max_size=4)
required_fields: dict[str, st.SearchStrategy[Any]] = {
    "name": names,
    "url": st.builds(
        lambda host, file, ext: f"https://{host}.example.com/{file}.{ext}",
        st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
        names,
        st.sampled_from(["qcow2", "qcow2.gz", "img", "img.bz2", "raw", "vmdk", "vhdx", "vdi"]),
    ),
    "region": st.sampled_from(sorted(REGIONS)),
}
optional_fields: dict[str, st.SearchStrategy[Any]] = {
    "distribution": st.sampled_from(DISTRIBUTIONS),
    # Surrogates cannot be written as YAML or UTF-8; a real manifest file cannot hold them.
    "description": st.text(st.characters(codec="utf-8"), max_size=40),
    "tags": tags,
}
valid_images = st.fixed_dictionaries(required_fields, optional=optional_fields)


@settings(max_examples=100, deadline=None)
@given(
    images=st.lists(
        valid_images, min_size=1, max_size=8, unique_by=lambda i: (i["name"], i["region"])
    ),
    default_tags=tags,
    fmt=st.sampled_from(["yaml", "json"]),
)
def test_valid_manifests_round_trip(
    images: list[dict[str, Any]], default_tags: list[str], fmt: str
) -> None:
    """Generated valid manifests parse to exactly the entries they describe."""
    document = {"version": 1, "defaults": {"tags": default_tags}, "images": images}
    text = json.dumps(document) if fmt == "json" else yaml.safe_dump(document)
    manifest = parse_manifest(text, fmt=fmt)  # type: ignore[arg-type]
    expected = tuple(
        Entry(
            index=index,
            name=raw["name"],
            url=raw["url"],
            region=raw["region"],
            distribution=raw.get("distribution"),
            description=raw.get("description"),
            tags=tuple(dict.fromkeys([*default_tags, *raw.get("tags", [])])),
        )
        for index, raw in enumerate(images)
    )
    assert manifest.entries == expected


def test_tags_leave_room_for_the_importers_own() -> None:
    """The manifest's tags and the importer's four stay within 50 per image."""
    assert MAX_TAGS + len(make_plan(parse_manifest(doc(GOOD)))[0].own_tags()) == 50


def test_a_tag_with_an_importer_prefix_is_refused() -> None:
    """`importer:...` and the like would pass for the importer's own tags: a problem."""
    problem = only_problem(doc(image(tags=["web", "importer-set:other"])))
    assert (problem.index, problem.field) == (0, "tags.1")
    assert "own prefixes" in problem.message
