"""From a validated manifest to the list of imports to make, each with its own key.

Every image the importer creates carries an *entry tag*, ``importer:`` followed by
16 hex digits of a SHA-256 over the entry's name, region and URL (without its
query string, which presigned URLs change on every run). The tag is stable
across runs of the same entry, so the account does not collect a new tag per
run, and it lets the importer (or a person: ``GET /v2/images?tag_name=...``)
find an entry's image again without trusting image names, which are not unique.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from importer.client import CreateRequest
from importer.manifest import Entry, Manifest

ENTRY_TAG_PREFIX = "importer:"


def entry_tag(name: str, region: str, url: str) -> str:
    parts = urlsplit(url)
    stable_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    digest = hashlib.sha256("\0".join((name, region, stable_url)).encode()).hexdigest()
    return ENTRY_TAG_PREFIX + digest[:16]


@dataclass(frozen=True)
class PlannedImport:
    """One manifest entry, ready to submit."""

    entry: Entry
    tag: str

    @property
    def index(self) -> int:
        return self.entry.index

    def create_request(self) -> CreateRequest:
        tags = (*(t for t in self.entry.tags if t != self.tag), self.tag)
        return CreateRequest(
            name=self.entry.name,
            url=self.entry.url,
            region=self.entry.region,
            distribution=self.entry.distribution,
            description=self.entry.description,
            tags=tags,
        )


def make_plan(manifest: Manifest) -> tuple[PlannedImport, ...]:
    """The imports to make, in manifest order."""
    return tuple(
        PlannedImport(entry, entry_tag(entry.name, entry.region, entry.url))
        for entry in manifest.entries
    )
