"""Identity and version tags: stable, in the tag alphabet, and independent of the URL."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from importer.catalog import tag_problem
from importer.identity import (
    SET_MAX_LENGTH,
    Version,
    default_set,
    entry_tag,
    retired_name,
    set_problem,
    set_tag,
    stable_url,
    version_tag,
)

DIGEST = "ab" * 32


def test_entry_tag_is_sha256_over_set_name_and_region() -> None:
    """``importer:`` + the first 16 hex digits of SHA-256 over the JSON of (set, name, region)."""
    expected = hashlib.sha256(json.dumps(["nightly", "web", "nyc3"]).encode()).hexdigest()[:16]
    assert entry_tag("nightly", "web", "nyc3") == f"importer:{expected}"


def test_entry_tag_depends_on_each_part_and_not_on_how_they_split() -> None:
    """Another set, name or region is another entry; ("a-b", "c") is not ("a", "b-c")."""
    base = entry_tag("s", "web", "nyc3")
    assert len({base, entry_tag("t", "web", "nyc3"), entry_tag("s", "api", "nyc3")}) == 3
    assert entry_tag("s", "web", "ams3") != base
    assert entry_tag("s\0web", "", "nyc3") != entry_tag("s", "\0web", "nyc3")


def test_set_tag_and_its_validation() -> None:
    """``importer-set:<set>``; a set outside the alphabet is a bug (ValueError)."""
    assert set_tag("web_images-2") == "importer-set:web_images-2"
    with pytest.raises(ValueError, match="only letters"):
        set_tag("a:b")
    assert set_problem("x" * SET_MAX_LENGTH) is None
    assert set_problem("x" * (SET_MAX_LENGTH + 1)) is not None


@given(st.text(max_size=300))
def test_default_set_is_always_a_valid_set(stem: str) -> None:
    """Any manifest file name gives a set name that makes a valid tag."""
    name = default_set(f"/some/dir/{stem.replace('/', '_')}.yaml")
    assert set_problem(name) is None
    assert tag_problem(set_tag(name)) is None


def test_version_values_per_source() -> None:
    """Each source writes its canonical value; both checksum sources agree on one digest."""
    assert Version.from_checksum(f"sha256:{DIGEST.upper()}").value == f"sha256:{DIGEST}"
    listed = Version.from_checksum(DIGEST, "checksums_url")
    assert listed.value == f"sha256:{DIGEST}"
    assert listed.source == "checksums_url"
    assert version_tag(listed) == version_tag(Version.from_checksum(f"sha256:{DIGEST}"))
    assert Version.from_etag(' "abc" ').value == 'etag:"abc"'
    modified = Version.from_last_modified("Sat, 01 Jun 2024 12:00:00 GMT", 42)
    assert modified.value == "last-modified:Sat, 01 Jun 2024 12:00:00 GMT;length=42"
    assert Version.from_last_modified("x", None).value == "last-modified:x;length=unknown"
    url = Version.from_url("https://u:pw@h.example.com:8443/a/b.qcow2?X-Amz-Signature=s#f")
    assert url.value == "url:https://h.example.com:8443/a/b.qcow2"


def test_an_etag_that_looks_like_a_digest_is_not_the_digest() -> None:
    """Sources other than checksums are prefixed: no collision with a sha256 value."""
    assert version_tag(Version.from_etag(f"sha256:{DIGEST}")) != version_tag(
        Version.from_checksum(DIGEST)
    )


def test_checksum_versions_must_hold_a_digest() -> None:
    """A checksum-sourced Version without 64 hex digits, or an unknown source, is a bug."""
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Version("sha256:abc", "checksum")
    with pytest.raises(ValueError, match="unknown version source"):
        Version("x", "md5")  # type: ignore[arg-type]


def test_version_tag_is_16_hex_of_sha256_over_the_value() -> None:
    """``importer-version:`` + 16 hex digits; the same value gives the same tag."""
    version = Version.from_etag('"v1"')
    expected = hashlib.sha256(b'etag:"v1"').hexdigest()[:16]
    assert version_tag(version) == f"importer-version:{expected}"
    assert version_tag(Version.from_etag('"v2"')) != version_tag(version)


@pytest.mark.parametrize(
    ("version", "label"),
    [
        (Version.from_checksum(DIGEST), "abababababab"),
        (Version.from_etag('"5f3a9c0e-1b2c3d4e5f6a"'), "5f3a9c0e-1b2"),
        (Version.from_etag('"5f3a9c0e1b2-3d4e5f6a"'), "5f3a9c0e1b2"),
        (Version.from_etag('W/"v 1.2"'), "v1.2"),
        (Version.from_last_modified("Sat, 01 Jun 2024 12:30:05 GMT", 1), "20240601-123005"),
        (Version.from_last_modified("Sat, 01 Jun 2024 14:30:05 +0200", 1), "20240601-123005"),
    ],
)
def test_labels_are_short_and_human(version: Version, label: str) -> None:
    """A digest's 12 hex, an ETag's first characters, a Last-Modified date in UTC."""
    assert version.label == label


def test_labels_fall_back_to_a_hash() -> None:
    """An ETag of only symbols, an unreadable date, a URL: 12 hex digits of the value."""
    for version in (
        Version.from_etag('"///"'),
        Version.from_last_modified("yesterday", 3),
        Version.from_url("https://h/a.qcow2"),
    ):
        assert version.label == hashlib.sha256(version.value.encode()).hexdigest()[:12]


@given(st.text(max_size=200))
def test_any_etag_gives_a_label_safe_in_names_and_a_valid_tag(etag: str) -> None:
    """Whatever a host sends as ETag, the label is 1-12 safe characters and the tag is valid."""
    version = Version.from_etag(etag)
    assert 1 <= len(version.label) <= 12
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in version.label)
    assert tag_problem(version_tag(version)) is None


def test_retired_name_appends_the_label_within_255_characters() -> None:
    """``<name>@<label>``; a long name is shortened so the result fits."""
    version = Version.from_checksum(DIGEST)
    assert retired_name("web", version) == "web@abababababab"
    long = retired_name("n" * 255, version)
    assert len(long) == 255
    assert long.endswith("@abababababab")


def test_stable_url_drops_query_fragment_and_credentials() -> None:
    """What identifies a file without its secrets."""
    assert stable_url("http://a:b@h/x.img?q=1#top") == "http://h/x.img"
