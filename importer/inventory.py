"""Reading the account: every image of the set, before anything is sent.

The account is the truth: a run decides what each entry needs from the images
that carry the set's tag (``GET /v2/images?private=true&tag_name=<set tag>``,
200 a page, every page), never from a local file alone. One listing costs
``ceil(images / 200)`` requests, however many entries the manifest holds.

The listing may not show everything: an image still importing may be hidden
(DigitalOcean does not say whether ``NEW``/``pending`` images are listed), and
a failed one drops out. The journal fills that gap for the images this state
file knows (see :func:`importer.converge.decide`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from importer.api import Image
from importer.client import ImagesClient
from importer.governor import Priority
from importer.identity import ENTRY_TAG_PREFIX, VERSION_TAG_PREFIX

GROUP_TAG_PREFIX = "importer-group:"


def tag_with_prefix(image: Image, prefix: str) -> str | None:
    """The image's first tag starting with ``prefix``, if any."""
    return next((tag for tag in image.tags or () if tag.startswith(prefix)), None)


def entry_tag_of(image: Image) -> str | None:
    return tag_with_prefix(image, ENTRY_TAG_PREFIX)


def version_tag_of(image: Image) -> str | None:
    return tag_with_prefix(image, VERSION_TAG_PREFIX)


def group_tag_of(image: Image) -> str | None:
    return tag_with_prefix(image, GROUP_TAG_PREFIX)


@dataclass(frozen=True)
class Inventory:
    """The set's images as one listing showed them, indexed by entry tag."""

    set_tag: str
    images: tuple[Image, ...]
    _by_entry: Mapping[str, tuple[Image, ...]] = field(repr=False, compare=False)

    @classmethod
    def of(cls, set_tag: str, images: Sequence[Image]) -> Inventory:
        by_entry: defaultdict[str, list[Image]] = defaultdict(list)
        for image in images:
            if image.has_failed:
                continue  # failed imports never count
            tag = entry_tag_of(image)
            if tag is not None:
                by_entry[tag].append(image)
        return cls(set_tag, tuple(images), {tag: tuple(found) for tag, found in by_entry.items()})

    def entry(self, entry_tag: str) -> tuple[Image, ...]:
        """The live images of one entry, any version."""
        return self._by_entry.get(entry_tag, ())

    def orphans(self, entry_tags: Collection[str]) -> tuple[Image, ...]:
        """Live images of the set whose entry is not in ``entry_tags`` (left the manifest).

        Images of the set without an entry tag were not made by the importer: they
        are never orphans, and never touched.
        """
        return tuple(
            image
            for tag, images in sorted(self._by_entry.items())
            if tag not in entry_tags
            for image in images
        )

    def groups_in_use(self) -> frozenset[str]:
        """Group tags that live images of the set carry."""
        return frozenset(
            tag
            for image in self.images
            if not image.has_failed and (tag := group_tag_of(image)) is not None
        )


async def read_inventory(client: ImagesClient, set_tag: str) -> Inventory:
    """List every image carrying ``set_tag``, all pages, 200 a page."""
    images = await client.list(tag_name=set_tag, priority=Priority.STATUS)
    return Inventory.of(set_tag, images)
