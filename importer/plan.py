"""From a validated manifest to the ordered list of imports to make.

Every image the importer creates carries two tags:

* its *entry tag*, ``importer:`` followed by 16 hex digits of a SHA-256 over the
  entry's name, region and URL (without its query string, which presigned URLs
  change on every run). It is stable across runs of the same entry, so the
  account does not collect a new tag per run, and it finds the entry's image
  again without trusting image names, which are not unique.
* its *group tag*, ``importer-group:<manifest>-<n>``, shared by at most 200 images
  submitted one after the other: one ``GET /v2/images?tag_name=...`` page tells
  the status of the whole group. Groups follow the submission order, so the
  images of a group finish at about the same time.

Imports are ordered longest first when sizes are known: an import's duration
grows with its file, and starting the longest ones first keeps the last image
from starting last.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import urlsplit, urlunsplit

from importer.api import CreateRequest
from importer.catalog import PER_PAGE_MAX, TAG_MAX_LENGTH
from importer.manifest import Entry, Manifest

ENTRY_TAG_PREFIX = "importer:"
GROUP_TAG_PREFIX = "importer-group:"
GROUP_SIZE = PER_PAGE_MAX


def entry_tag(name: str, region: str, url: str) -> str:
    parts = urlsplit(url)
    stable_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    digest = hashlib.sha256("\0".join((name, region, stable_url)).encode()).hexdigest()
    return ENTRY_TAG_PREFIX + digest[:16]


def group_prefix(source: str) -> str:
    """``importer-group:<manifest stem>-``, the stem cut to the tag alphabet."""
    stem = re.sub(r"[^a-zA-Z0-9_-]+", "-", PurePath(source).stem).strip("-") or "manifest"
    return f"{GROUP_TAG_PREFIX}{stem[: TAG_MAX_LENGTH - len(GROUP_TAG_PREFIX) - 8]}-"


@dataclass(frozen=True)
class PlannedImport:
    """One manifest entry, ready to submit."""

    entry: Entry
    tag: str
    group: str
    #: Size of the source file in bytes, when known.
    size: int | None = None

    @property
    def index(self) -> int:
        return self.entry.index

    def create_request(self) -> CreateRequest:
        return CreateRequest.from_entry(self.entry, (self.tag, self.group))


def make_plan(
    manifest: Manifest, sizes: Mapping[int, int | None] | None = None
) -> tuple[PlannedImport, ...]:
    """The imports to make, in submission order: unsized first, then largest first."""
    sizes = sizes or {}
    # Stable sort: equal keys keep manifest order.
    ordered = sorted(
        manifest.entries,
        key=lambda e: (sizes.get(e.index) is not None, -(sizes.get(e.index) or 0)),
    )
    prefix = group_prefix(manifest.source)
    return tuple(
        PlannedImport(
            entry=entry,
            tag=entry_tag(entry.name, entry.region, entry.url),
            group=f"{prefix}{position // GROUP_SIZE}",
            size=sizes.get(entry.index),
        )
        for position, entry in enumerate(ordered)
    )
