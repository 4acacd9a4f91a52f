"""From a manifest, its sources and the account to the run's plan.

Every image the importer creates carries, besides the manifest's tags, the tags
of :mod:`importer.identity` (the *set tag*, the *entry tag* of (set, name,
region), the *version tag* of its source's content) and a *group tag*,
``importer-group:<set>-<n>``, shared by at most 200 images submitted one after
the other: one ``GET /v2/images?tag_name=...`` page tells the status of the
whole group. A run numbers its groups from the lowest numbers no live image of
the set carries, so a group's listing shows this run's imports rather than
every image ever made, and two runs that see the same account (a rerun after a
lost state, or two runs at once) put an entry's imports in the same group,
where each one sees the other's.

:func:`make_plan` decides each entry from the account
(:func:`importer.converge.decide`) and orders the imports longest first when
sizes are known: an import's duration grows with its file, and starting the
longest ones first keeps the last image from starting last.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from importer.api import CreateRequest, Image
from importer.catalog import PER_PAGE_MAX, TAG_MAX_LENGTH
from importer.converge import (
    Action,
    Decision,
    Delete,
    Rename,
    Rotation,
    created,
    decide,
    rotate,
)
from importer.identity import Version, entry_tag, retired_name, set_tag, version_tag
from importer.inventory import GROUP_TAG_PREFIX, Inventory, group_tag_of, version_tag_of
from importer.journal import EntryState, Journal
from importer.manifest import Entry, Manifest

GROUP_SIZE = PER_PAGE_MAX
#: The counts of a plan, in the order the summary line gives them.
SUMMARY_KEYS = (
    "create",
    "replace",
    "watch",
    "unchanged",
    "error",
    "transfer",
    "rename",
    "delete",
    "orphaned",
)
#: Tags the importer adds to every image it creates: set, entry, version, group.
OWN_TAGS = 4

__all__ = [
    "GROUP_SIZE",
    "GROUP_TAG_PREFIX",
    "OWN_TAGS",
    "PlannedImport",
    "RunPlan",
    "group_prefix",
    "make_plan",
]


def group_prefix(set_name: str) -> str:
    """``importer-group:<set>-``, the name cut to the tag alphabet."""
    stem = re.sub(r"[^a-zA-Z0-9_-]+", "-", set_name).strip("-") or "manifest"
    return f"{GROUP_TAG_PREFIX}{stem[: TAG_MAX_LENGTH - len(GROUP_TAG_PREFIX) - 8]}-"


def fallback_version(entry: Entry) -> Version:
    """The version when the source was not probed: its checksum, else its URL."""
    if entry.checksum is not None:
        return Version.from_checksum(entry.checksum)
    return Version.from_url(entry.url)


@dataclass(frozen=True, slots=True)
class PlannedImport:
    """One manifest entry, its action and what the create carries."""

    entry: Entry
    tag: str
    group: str
    #: Size of the source file in bytes, when known.
    size: int | None = None
    set_tag: str = ""
    version: Version | None = None
    decision: Decision = field(default_factory=lambda: Decision(Action.CREATE))
    #: Why the source could not be probed, if it could not (its version may still be
    #: known, from a checksum).
    source_error: str | None = None
    #: What rotation will do once this version is available, as far as the account
    #: lets one tell now (an import's new image shows as id 0).
    rotation: Rotation | None = None
    #: The regions the entry's image will be transferred to once it is available: those
    #: of the entry's ``regions`` its image is not in (see :mod:`importer.transfers`).
    transfers: tuple[str, ...] = ()
    #: The version tag of the entry's newest live image, taken as its version when the
    #: source could not be probed (``version`` is then ``None``).
    assumed_version_tag: str | None = None

    @property
    def index(self) -> int:
        return self.entry.index

    @property
    def version_tag(self) -> str | None:
        if self.version is None:
            return self.assumed_version_tag
        return version_tag(self.version)

    @property
    def create_name(self) -> str:
        """A first import takes the entry's name; a replacement a provisional one until it
        is available (a failed or unfinished import never takes the name)."""
        if self.decision.action is Action.REPLACE and self.version is not None:
            return retired_name(self.entry.name, self.version)
        return self.entry.name

    def own_tags(self) -> tuple[str, ...]:
        tags = (self.set_tag, self.tag, self.version_tag or "", self.group)
        return tuple(tag for tag in tags if tag)

    def create_request(self) -> CreateRequest:
        request = CreateRequest.from_entry(self.entry, self.own_tags())
        return replace(request, name=self.create_name)


@dataclass(frozen=True)
class RunPlan:
    """Every entry's planned import, in submission order, and the set's orphans."""

    set: str
    set_tag: str
    items: tuple[PlannedImport, ...]
    orphans: tuple[Image, ...] = ()
    #: Whether orphans are deleted (``--prune``).
    prune: bool = False

    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter(item.decision.action.value for item in self.items)
        for item in self.items:
            steps = item.rotation.steps if item.rotation is not None else ()
            counts["rename"] += sum(isinstance(step, Rename) for step in steps)
            counts["delete"] += sum(isinstance(step, Delete) for step in steps)
        counts["orphaned"] = len(self.orphans)
        if self.prune:
            counts["delete"] += len(self.orphans)
        counts["transfer"] = sum(len(item.transfers) for item in self.items)
        return counts

    @property
    def has_regions(self) -> bool:
        """Whether any entry names more than one region (the counts line then says transfers)."""
        return any(item.entry.transfer_regions for item in self.items)

    def summary_line(self) -> str:
        """``2 to create, 1 to replace, 40 unchanged, 1 to rename, 3 to delete, 1 orphaned``.

        With ``regions`` in the manifest, ``N to transfer`` after ``unchanged``.
        """
        counts = self.counts()
        parts = [
            f"{counts['create']} to create",
            f"{counts['replace']} to replace",
            f"{counts['watch']} to watch",
            f"{counts['unchanged']} unchanged",
        ]
        if self.has_regions:
            parts.append(f"{counts['transfer']} to transfer")
        parts += [
            f"{counts['rename']} to rename",
            f"{counts['delete']} to delete",
            f"{counts['orphaned']} orphaned",
        ]
        if counts["error"]:
            parts.append(f"{counts['error']} failing (source)")
        return ", ".join(parts)

    def needs_work(self, item: PlannedImport) -> bool:
        rotation = item.rotation
        return (
            item.decision.action is not Action.UNCHANGED
            or bool(rotation and rotation.steps)
            or bool(item.transfers)
        )

    def table(self, *, every: bool | None = None) -> list[str]:
        """One line per entry (or only those with something to do, when there are many)."""
        every = len(self.items) <= 20 if every is None else every
        lines: list[str] = []
        for item in sorted(self.items, key=lambda i: i.index):
            if not (every or self.needs_work(item)):
                continue
            decision = item.decision
            version = str(item.version) if item.version is not None else "-"
            target = f" image {decision.watched_id}" if decision.watched_id else ""
            note = " (a lost create is looked for first)" if decision.reconcile else ""
            error = f": {decision.error}" if decision.error else ""
            lines.append(
                f"  {decision.action.value:<9} {item.entry.name} ({item.entry.region})"
                f" version {version}{target}{note}{error}"
            )
            for region in item.transfers:
                who = "new image" if decision.imports else "image"
                lines.append(f"      transfer {who} to {region}")
            for step in item.rotation.steps if item.rotation is not None else ():
                if isinstance(step, Rename):
                    who = "new image" if step.image_id == 0 else f"image {step.image_id}"
                    lines.append(f"      rename {who}: {step.old!r} -> {step.new!r}")
                else:
                    lines.append(f"      delete image {step.image_id} ({step.reason})")
        for image in self.orphans:
            verb = "delete" if self.prune else "orphaned"
            lines.append(f"  {verb:<9} {image.name} image {image.id} (its entry left the manifest)")
        return lines

    def entry_events(self) -> list[dict[str, Any]]:
        """The fields of a ``plan.entry`` event for each entry with something to do."""
        events = []
        for item in self.items:
            if not self.needs_work(item):
                continue
            steps = item.rotation.steps if item.rotation is not None else ()
            events.append(
                {
                    "index": item.index,
                    "name": item.entry.name,
                    "region": item.entry.region,
                    "action": item.decision.action.value,
                    "version": str(item.version) if item.version is not None else None,
                    "image_id": item.decision.watched_id,
                    "renames": sum(isinstance(step, Rename) for step in steps),
                    "deletes": sum(isinstance(step, Delete) for step in steps),
                    "transfers": list(item.transfers),
                    "error": item.decision.error,
                }
            )
        return events

    def to_json(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "set": self.set,
            "set_tag": self.set_tag,
            "summary": {key: counts[key] for key in SUMMARY_KEYS},
            "entries": [_item_json(item) for item in sorted(self.items, key=lambda i: i.index)],
            "orphans": [
                {
                    "image_id": image.id,
                    "name": image.name,
                    "status": image.status,
                    "tags": list(image.tags or ()),
                    "delete": self.prune,
                }
                for image in self.orphans
            ],
        }


def _item_json(item: PlannedImport) -> dict[str, Any]:
    decision = item.decision
    steps = item.rotation.steps if item.rotation is not None else ()
    return {
        "index": item.index,
        "name": item.entry.name,
        "region": item.entry.region,
        "tag": item.tag,
        "action": decision.action.value,
        "version": item.version.label if item.version is not None else None,
        "version_source": item.version.source if item.version is not None else None,
        "image_id": decision.watched_id,
        "reconcile": decision.reconcile,
        "error": decision.error,
        "create_name": item.create_name if decision.imports else None,
        "regions": list(item.entry.regions),
        "transfers": list(item.transfers),
        "renames": [
            {"image_id": s.image_id or None, "from": s.old, "to": s.new}
            for s in steps
            if isinstance(s, Rename)
        ],
        "deletes": [
            {"image_id": s.image_id, "reason": s.reason} for s in steps if isinstance(s, Delete)
        ],
    }


class SourceFacts(Protocol):
    """What the plan needs of a probed source (:class:`importer.sources.SourceInfo`)."""

    @property
    def size(self) -> int | None: ...

    @property
    def version(self) -> Version | None: ...

    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class KnownSource:
    """A source known without asking its host (sizes alone, a checksum, the URL)."""

    size: int | None
    version: Version | None
    error: str | None = None


def make_plan(
    manifest: Manifest,
    sizes: Mapping[int, int | None] | None = None,
    *,
    sources: Mapping[int, SourceFacts] | None = None,
    inventory: Inventory | None = None,
    journal: Journal | None = None,
    now: str | None = None,
) -> tuple[PlannedImport, ...]:
    """Every entry's planned import, in submission order: imports first (unsized, then
    largest first), then the entries that import nothing.

    Without ``sources`` an entry's version is its checksum, else its URL; without an
    ``inventory`` the account is taken to be empty. ``now`` (ISO time) dates the new
    image in predicted rotations.
    """
    sizes = dict(sizes or {})
    planned: list[PlannedImport] = []
    for entry in manifest.entries:
        facts = (sources or {}).get(entry.index)
        if facts is None:
            facts = KnownSource(sizes.get(entry.index), fallback_version(entry))
        item = plan_entry(manifest.set, entry, facts, inventory=inventory, journal=journal, now=now)
        if item.size is None and sizes.get(entry.index) is not None:
            item = replace(item, size=sizes[entry.index])
        planned.append(item)
    return _ordered(manifest, planned, inventory.groups_in_use() if inventory else frozenset())


def plan_entry(
    set_name: str,
    entry: Entry,
    facts: SourceFacts,
    *,
    inventory: Inventory | None = None,
    journal: Journal | None = None,
    now: str | None = None,
) -> PlannedImport:
    """One entry decided from its source, the account and its journal row.

    An import's group is left empty (``""``): it is the run's to give, in the order of
    submission (:class:`Groups`). An image being watched, or a lost create's, keeps the
    group it carries.
    """
    the_set = set_tag(set_name)
    tag = entry_tag(set_name, entry.name, entry.region)
    images = inventory.entry(tag) if inventory is not None else ()
    row = journal.get(tag) if journal is not None else None
    version = facts.version
    assumed = None
    if version is None and facts.error is not None and entry.checksums_url is None:
        # Only the importer failed to reach the host (DigitalOcean fetches the file
        # itself, perhaps from another network): an unknown version is no change.
        # The entry goes on with the version its newest live image holds (watched
        # if still importing, kept if available); with none, the URL is the version,
        # the last resort of the order the sources follow.
        assumed = _newest_version_tag(images, row)
        if assumed is None:
            version = Version.from_url(entry.url)
    vtag = version_tag(version) if version is not None else assumed
    decision = decide(
        name=entry.name, version_tag=vtag, source_error=facts.error, images=images, row=row
    )
    item = PlannedImport(
        entry=entry,
        tag=tag,
        group="",
        size=facts.size,
        set_tag=the_set,
        version=version,
        decision=decision,
        source_error=facts.error,
        assumed_version_tag=assumed,
    )
    group = None
    if decision.image is not None:
        group = group_tag_of(decision.image)
    elif row is not None and (decision.reconcile or decision.action is Action.WATCH):
        group = row.group
    return replace(
        item,
        group=group or "",
        rotation=_predicted(item, images, vtag, now),
        transfers=_transfers(entry, decision),
    )


def _transfers(entry: Entry, decision: Decision) -> tuple[str, ...]:
    """The regions the entry's image will be transferred to once it is available.

    An available image (unchanged) needs the regions it is not in; an import, or an
    image still importing (which is in no region yet), all but the import region.
    Older versions are never transferred.
    """
    if decision.action is Action.ERROR:
        return ()
    image = decision.image
    have = set(image.regions) if image is not None and image.is_available else set()
    return tuple(region for region in entry.transfer_regions if region not in have)


def _newest_version_tag(images: Sequence[Image], row: EntryState | None) -> str | None:
    """The version of the entry's newest live image, else of the image its journal row
    watches (listings may hide importing images); ``None`` if neither is known."""
    live = [image for image in images if not image.has_failed and version_tag_of(image)]
    if live:
        return version_tag_of(max(live, key=lambda image: (created(image), image.id)))
    if row is not None and row.image_id is not None and row.outcome != "failed":
        return row.version
    return None


class Groups:
    """This run's group tags, in the order of submission: a new one every ``GROUP_SIZE``
    imports, numbered from the lowest numbers no live image of the set carries."""

    def __init__(self, set_name: str, taken: Collection[str]) -> None:
        prefix = group_prefix(set_name)
        self._free = (f"{prefix}{n}" for n in itertools.count() if f"{prefix}{n}" not in taken)
        self.first = next(self._free)
        self._current = self.first
        self._given = 0

    def next(self) -> str:
        """The group of the next import."""
        if self._given and self._given % GROUP_SIZE == 0:
            self._current = next(self._free)
        self._given += 1
        return self._current


def _predicted(
    item: PlannedImport, images: Sequence[Image], vtag: str | None, now: str | None
) -> Rotation | None:
    if vtag is None or item.decision.action is Action.ERROR:
        return None
    known = list(images)
    if item.decision.imports:
        known.append(
            Image(id=0, name=item.create_name, status="available", tags=(vtag,), created_at=now)
        )
    elif item.decision.action is Action.WATCH:
        watched = item.decision.watched_id
        known = [image for image in known if image.id != watched]
        shown = item.decision.image
        known.append(
            shown.model_copy(update={"status": "available"})
            if shown is not None
            else Image(id=watched or 0, name=item.entry.name, status="available", tags=(vtag,))
        )
    return rotate(name=item.entry.name, keep=item.entry.keep, version_tag=vtag, images=known)


def _ordered(
    manifest: Manifest, planned: list[PlannedImport], taken: Collection[str]
) -> tuple[PlannedImport, ...]:
    imports = [item for item in planned if item.decision.imports]
    others = [item for item in planned if not item.decision.imports]
    # Stable sort: equal keys keep manifest order.
    imports.sort(key=lambda item: (item.size is not None, -(item.size or 0)))
    groups = Groups(manifest.set, taken)
    imports = [replace(item, group=item.group or groups.next()) for item in imports]
    others = [replace(item, group=item.group or groups.first) for item in others]
    return (*imports, *others)
