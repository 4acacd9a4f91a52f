"""Who an image is and which version of its source it holds, written as tags.

An entry of a manifest is identified by *(set, name, region)*: the URL is not part of it, so a
nightly build that moves to a new date-stamped URL is the same entry with a new version. Every
image the importer creates carries three tags of its own:

* the **set tag**, ``importer-set:<set>``: every image of one manifest's set, found with one
  listing (``tag_name=importer-set:<set>``). Images without it are never the importer's business.
* the **entry tag**, ``importer:`` followed by 16 hex digits of SHA-256 over set, name and
  region: the same on every run, whatever the URL.
* the **version tag**, ``importer-version:`` followed by 16 hex digits of SHA-256 over the
  version's value: which content of the source the image was imported from.

A :class:`Version` is learned, in this order, from the entry's ``checksum``, from its
``checksums_url`` (a ``SHA256SUMS`` file), from the image host's ``ETag``, from its
``Last-Modified`` with the file's length, and, when the host says nothing, from the URL without
its query string. Both checksum sources write the value ``sha256:<hex>``, so moving an entry from
``checksum`` to ``checksums_url`` (or back) does not make a new version; the other sources are
prefixed with their kind, so an ETag that happens to look like a digest is never taken for one.

The set name is limited to :data:`SET_MAX_LENGTH` characters of ``[a-zA-Z0-9_-]``: short enough
that any tag built from it (``importer-set:``, a group prefix, a counter) stays within
DigitalOcean's 255 characters, and ``:`` is left out so a set can never be mistaken for a prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import PurePath
from typing import Final, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

SET_TAG_PREFIX: Final = "importer-set:"
ENTRY_TAG_PREFIX: Final = "importer:"
VERSION_TAG_PREFIX: Final = "importer-version:"
#: Hex digits of SHA-256 kept in entry and version tags: 64 bits, no collision in practice.
TAG_DIGEST_LENGTH: Final = 16

#: A set name: the tag alphabet without ``:``.
SET_PATTERN: Final = re.compile(r"^[a-zA-Z0-9_-]+$")
SET_MAX_LENGTH: Final = 64
#: The set when a manifest's file name gives nothing usable (``<manifest>``, ``---.yaml``).
FALLBACK_SET: Final = "manifest"

#: Longest :attr:`Version.label`; a renamed image is ``<name>@<label>``.
LABEL_LENGTH: Final = 12
#: Longest image name the importer writes (the manifest's own limit).
IMAGE_NAME_MAX_LENGTH: Final = 255

VersionSource = Literal["checksum", "checksums_url", "etag", "last_modified", "url"]
VERSION_SOURCES: Final[tuple[VersionSource, ...]] = get_args(VersionSource)

_SHA256_VALUE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_LABEL_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9._-]+")


def default_set(source: str) -> str:
    """The set of a manifest that names none: its file's stem, cut to the set alphabet.

    ``manifests/nightly images.yaml`` gives ``nightly-images``; text without a file
    (``<manifest>``) gives ``manifest``. Two manifests with the same file name share a set
    unless one names its own.
    """
    stem = re.sub(r"[^a-zA-Z0-9_-]+", "-", PurePath(source).stem).strip("-")
    return stem[:SET_MAX_LENGTH].strip("-") or FALLBACK_SET


def set_problem(value: str) -> str | None:
    """Why ``value`` cannot be a set name, or ``None`` if it can."""
    if not value:
        return "'set' is empty; leave it out to use the manifest's file name"
    if not SET_PATTERN.match(value):
        return (
            f"set {value!r} may contain only letters, digits, '_' and '-' (it becomes part of tags)"
        )
    if len(value) > SET_MAX_LENGTH:
        return f"a set name has at most {SET_MAX_LENGTH} characters (this one has {len(value)})"
    return None


def set_tag(set_name: str) -> str:
    """``importer-set:<set>``: every image of the set carries it."""
    problem = set_problem(set_name)
    if problem is not None:
        raise ValueError(problem)
    # One copy, not one per entry planned (every entry's create carries it).
    return sys.intern(SET_TAG_PREFIX + set_name)


def entry_tag(set_name: str, name: str, region: str) -> str:
    """``importer:<16 hex>``: the entry *(set, name, region)*, the same on every run."""
    # JSON keeps the parts apart whatever characters they hold.
    key = json.dumps([set_name, name, region], ensure_ascii=False)
    return ENTRY_TAG_PREFIX + _digest(key)


def version_tag(version: Version) -> str:
    """``importer-version:<16 hex>``: the source content an image was imported from."""
    return VERSION_TAG_PREFIX + _digest(version.value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:TAG_DIGEST_LENGTH]


@dataclass(frozen=True, slots=True)
class Version:
    """One content of an entry's source: its canonical ``value`` and where it was learned.

    Build one with the ``from_*`` constructors, which write the canonical value. Two versions
    are the same content when their values are equal, whichever source they came from (a
    digest from ``checksum`` and one from ``checksums_url``): compare ``value`` or the tags.
    """

    value: str
    source: VersionSource

    def __post_init__(self) -> None:
        if self.source not in VERSION_SOURCES:
            raise ValueError(f"unknown version source {self.source!r}")
        if self.source in ("checksum", "checksums_url") and not _SHA256_VALUE.match(self.value):
            raise ValueError("a checksum version's value is 'sha256:' and 64 lowercase hex digits")

    @classmethod
    def from_checksum(cls, checksum: str, source: VersionSource = "checksum") -> Version:
        """From ``sha256:<hex>`` or a bare 64-digit hex digest (any case)."""
        digest = checksum.removeprefix("sha256:").lower()
        return cls(f"sha256:{digest}", source)

    @classmethod
    def from_etag(cls, etag: str) -> Version:
        return cls(f"etag:{etag.strip()}", "etag")

    @classmethod
    def from_last_modified(cls, last_modified: str, size: int | None) -> Version:
        length = "unknown" if size is None else str(size)
        return cls(f"last-modified:{last_modified.strip()};length={length}", "last_modified")

    @classmethod
    def from_url(cls, url: str) -> Version:
        """The URL without query, fragment or credentials: presigned URLs change every run."""
        return cls(f"url:{stable_url(url)}", "url")

    @property
    def label(self) -> str:
        """A short name for the version, safe in an image name (``[a-zA-Z0-9._-]``).

        A digest's first 12 hex digits; an ETag's first characters; a ``Last-Modified`` date
        as ``YYYYMMDD-HHMMSS``; else 12 hex digits of the value's SHA-256.
        """
        kind, _, rest = self.value.partition(":")
        if kind == "sha256":
            return rest[:LABEL_LENGTH]
        if kind == "etag":
            cleaned = _LABEL_UNSAFE.sub("", rest.removeprefix("W/"))[:LABEL_LENGTH].strip(".-")
            if cleaned:
                return cleaned
        if kind == "last-modified":
            date = _http_date(rest.rsplit(";length=", 1)[0])
            if date is not None:
                return date
        return hashlib.sha256(self.value.encode()).hexdigest()[:LABEL_LENGTH]

    def __str__(self) -> str:
        return f"{self.label} ({self.source.replace('_', ' ')})"


def retired_name(name: str, version: Version) -> str:
    """``<name>@<label>``: the name an older, kept version of an entry is renamed to.

    The name is shortened when needed so that the result stays within 255 characters.
    """
    suffix = f"@{version.label}"
    return name[: IMAGE_NAME_MAX_LENGTH - len(suffix)] + suffix


def stable_url(url: str) -> str:
    """``url`` without query string, fragment and ``user:password@``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _http_date(text: str) -> str | None:
    try:
        moment = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y%m%d-%H%M%S")
