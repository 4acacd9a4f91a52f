"""The manifest keys of nightly runs: ``set``, ``checksum``, ``checksums_url`` and ``keep``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.errors import ManifestError, Problem
from importer.identity import SET_MAX_LENGTH, default_set
from importer.manifest import DEFAULT_KEEP, Manifest, load_manifest, parse_manifest

GOOD = {"name": "web-base", "url": "https://images.example.com/web-base.qcow2", "region": "nyc3"}
DIGEST = "0123456789abcdef" * 4
SUMS = "https://images.example.com/releases/SHA256SUMS"


def doc(*images: object, **top: Any) -> str:
    return yaml.safe_dump({"version": 1, **top, "images": list(images)}, sort_keys=False)


def image(**fields: Any) -> dict[str, Any]:
    return {**GOOD, **fields}


def only_problem(text: str) -> Problem:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    problems = caught.value.problems
    assert len(problems) == 1, problems
    return problems[0]


# --- set --------------------------------------------------------------------------------------


def test_set_is_read_from_the_manifest() -> None:
    """A top-level ``set`` becomes ``Manifest.set``."""
    assert parse_manifest(doc(image(), set="web_images-2")).set == "web_images-2"


def test_set_defaults_to_the_file_stem_cut_to_the_set_alphabet(tmp_path: Path) -> None:
    """Without ``set``, the set is the file's stem with other characters turned into '-'."""
    path = tmp_path / "nightly images (prod).yaml"
    path.write_text(doc(image()))
    assert load_manifest(path).set == "nightly-images-prod"
    assert parse_manifest(doc(image())).set == "manifest"


def test_default_set_of_odd_file_names() -> None:
    """Stems of only symbols fall back to ``manifest``; long stems are cut to the limit."""
    assert default_set("---.yaml") == "manifest"
    assert default_set("<test>") == "test"
    long = default_set("a" * 300 + ".yaml")
    assert long == "a" * SET_MAX_LENGTH


def test_manifest_built_in_code_gets_the_default_set() -> None:
    """``Manifest(...)`` without a set (tests, Python callers) still has a valid one."""
    assert Manifest(version=1, entries=(), source="jobs/base.yaml").set == "base"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("web images", "only letters, digits"),
        ("prod:web", "only letters, digits"),
        ("", "'set' is empty"),
        ("a" * (SET_MAX_LENGTH + 1), f"at most {SET_MAX_LENGTH} characters"),
    ],
)
def test_bad_set_is_a_problem(value: str, words: str) -> None:
    """A set outside ``[a-zA-Z0-9_-]``, empty or too long is one problem on field ``set``."""
    problem = only_problem(doc(image(), set=value))
    assert problem.field == "set"
    assert problem.index is None
    assert words in problem.message


def test_set_must_be_a_string() -> None:
    """``set: 2024`` (a YAML number) is a problem that says to quote it."""
    problem = only_problem(doc(image(), set=2024))
    assert problem.field == "set"
    assert "quotes" in problem.message


# --- checksum ---------------------------------------------------------------------------------


def test_checksum_is_kept_in_lowercase() -> None:
    """``sha256:<HEX>`` is accepted in any case of the digits and stored in lowercase."""
    entry = parse_manifest(doc(image(checksum=f"sha256:{DIGEST.upper()}"))).entries[0]
    assert entry.checksum == f"sha256:{DIGEST}"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (f"md5:{DIGEST[:32]}", "only SHA-256 checksums are supported, not 'md5'"),
        (f"sha512:{DIGEST}{DIGEST}", "not 'sha512'"),
        (f"SHA256:{DIGEST}", "prefix in lowercase"),
        (DIGEST, "needs its algorithm: write sha256:01234567..."),
        (f"sha256:{DIGEST[:-1]}", "has 64 hex digits (this one has 63)"),
        (f"sha256:{DIGEST[:-1]}g", "hex digits (0-9, a-f) only"),
        ("", "'checksum' is empty"),
    ],
)
def test_bad_checksum_is_a_clear_problem(value: str, words: str) -> None:
    """Anything but ``sha256:`` and 64 hex digits is refused, saying what to write."""
    problem = only_problem(doc(image(checksum=value)))
    assert problem.field == "checksum"
    assert words in problem.message


# --- checksums_url ----------------------------------------------------------------------------


def test_checksums_url_is_kept() -> None:
    """An absolute https URL naming a file is accepted as is (query string included)."""
    url = SUMS + "?X-Amz-Signature=abc"
    assert parse_manifest(doc(image(checksums_url=url))).entries[0].checksums_url == url


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("releases/SHA256SUMS", "absolute http:// or https://"),
        ("ftp://images.example.com/SHA256SUMS", "absolute http:// or https://"),
        ("https:///SHA256SUMS", "has no host"),
        ("https://images.example.com/releases/", "must name the checksums file"),
        ("https://images.example.com/a b/SHA256SUMS", "whitespace"),
        ("https://images.example.com:port/SHA256SUMS", "not a valid URL"),
    ],
)
def test_bad_checksums_url_is_a_problem(value: str, words: str) -> None:
    """A relative, non-http, host-less, file-less or malformed URL is refused."""
    problem = only_problem(doc(image(checksums_url=value)))
    assert problem.field == "checksums_url"
    assert words in problem.message


def test_checksums_url_problem_hides_the_query_string() -> None:
    """A presigned checksums URL's signature never appears in a message."""
    problem = only_problem(doc(image(checksums_url="ftp://h/SUMS?X-Amz-Signature=s3cr3t")))
    assert "s3cr3t" not in str(problem)
    assert "?REDACTED" in problem.message


# --- keep -------------------------------------------------------------------------------------


def test_keep_defaults_to_two() -> None:
    """Without ``keep`` anywhere, an entry keeps the documented default of 2 versions."""
    assert DEFAULT_KEEP == 2
    assert parse_manifest(doc(image())).entries[0].keep == DEFAULT_KEEP


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "at least 1"),
        (-3, "at least 1"),
        (1.5, "must be a whole number, not a number (1.5)"),
        (True, "must be a whole number, not true/false"),
        ("2", "must be a whole number, not a string"),
    ],
)
def test_bad_keep_is_a_problem(value: object, words: str) -> None:
    """``keep`` below 1 or not an integer (YAML's true, a float, a quoted number) is refused."""
    problem = only_problem(doc(image(keep=value)))
    assert problem.field == "keep"
    assert words in problem.message


# --- defaults and merging ---------------------------------------------------------------------


def test_defaults_give_checksums_url_and_keep_and_entries_win() -> None:
    """Entries inherit ``checksums_url``, ``keep`` and ``checksum``; their own values win."""
    other = "https://mirror.example.com/SHA256SUMS"
    defaults = {"checksums_url": SUMS, "keep": 3, "checksum": f"sha256:{DIGEST}"}
    own_digest = "f" * 64
    text = doc(
        image(name="a"),
        image(name="b", checksums_url=other, keep=1, checksum=f"sha256:{own_digest}"),
        defaults=defaults,
    )
    first, second = parse_manifest(text).entries
    assert (first.checksums_url, first.keep, first.checksum) == (SUMS, 3, f"sha256:{DIGEST}")
    assert (second.checksums_url, second.keep, second.checksum) == (
        other,
        1,
        f"sha256:{own_digest}",
    )


def test_bad_default_is_reported_once_under_defaults() -> None:
    """A bad ``defaults.keep`` is one problem on ``defaults.keep``, not one per image."""
    problem = only_problem(doc(image(name="a"), image(name="b"), defaults={"keep": 0}))
    assert problem.field == "defaults.keep"
    assert problem.index is None


def test_all_new_key_problems_are_reported_at_once() -> None:
    """Problems in set, checksum, checksums_url and keep come together, each on its field."""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc(image(checksum="md5:x", checksums_url="nope", keep=0), set="bad set"))
    fields = {problem.field for problem in caught.value.problems}
    assert fields == {"set", "checksum", "checksums_url", "keep"}


def test_unknown_key_suggests_the_new_keys() -> None:
    """A misspelt ``checksum`` is an unknown key with the right spelling suggested."""
    problem = only_problem(doc(image(chekcsum=f"sha256:{DIGEST}")))
    assert "did you mean 'checksum'?" in problem.message


def test_new_fields_are_frozen_and_have_defaults_for_code_built_entries() -> None:
    """Entries built in code (as tests do) need no new argument, and stay frozen."""
    manifest = parse_manifest(doc(image()))
    entry = manifest.entries[0]
    assert (entry.checksum, entry.checksums_url) == (None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.keep = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.set = "other"  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["set", "checksum", "checksums_url", "keep"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=80)),
    )
)
def test_any_value_of_the_new_keys_gives_a_manifest_or_problems(values: dict[str, Any]) -> None:
    """Whatever the new keys hold, the result is a manifest or a ManifestError, never a crash."""
    top = {"set": values.pop("set")} if "set" in values else {}
    problems: tuple[Problem, ...] = ()
    try:
        parse_manifest(doc(image(**values), **top))
    except ManifestError as error:
        problems = error.problems
        assert problems
    assert all(problem.message for problem in problems)
