"""What each entry needs, decided from the account: pure functions, no I/O.

:func:`decide` turns one entry's facts (its source's version, its live images
as the set's listing showed them, its journal row) into an :class:`Action`:

============  =================================================================
``unchanged`` an available image of this version exists: nothing is imported
``watch``     an image of this version is importing (``NEW``/``pending``), an
              earlier run's whatever the local state says: watch it, create
              nothing. Also an image id the journal holds for this version that
              the listing does not show (listings may hide importing images):
              it is read by id, and created again only if it is gone or failed
``create``    no live image of the entry: imported under the entry's name
``replace``   only other versions are live: the new one is imported under a
              provisional name (``<name>@<label>``) and takes the name only once
              it is available (:func:`rotate`)
``error``     the source's version cannot be learned (``checksums_url`` cannot be
              read or has no line for the file): the entry fails with the reason,
              the others go on, and nothing of the entry is touched. (A host the
              importer cannot reach is no error: see :func:`importer.plan.make_plan`)
============  =================================================================

Failed images (``deleted``, ``retired``) never count: an entry that failed last
night is tried again. A journal row whose create's answer was lost makes a
``create``/``replace`` that first looks for that create's image
(:mod:`importer.reconcile`). The journal never outranks the account: it is
read only for what a listing cannot show.

:func:`rotate` computes, from the entry's images, what makes the account
right once an image of the current version is available: that image carries
the entry's name; up to ``keep`` versions stay (newest first, the current one
counted), older kept ones under ``<name>@<label>``; the rest are deleted, and
so are extra copies of a kept version. It is idempotent: applied to an account
that is already right it asks for nothing, so a run killed mid-rotation is
finished by the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from importer.api import Image
from importer.identity import IMAGE_NAME_MAX_LENGTH
from importer.inventory import version_tag_of
from importer.journal import EntryState, Phase


class Action(StrEnum):
    """What a run does for one entry."""

    CREATE = "create"
    REPLACE = "replace"
    UNCHANGED = "unchanged"
    WATCH = "watch"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Decision:
    """One entry's action, and the image it concerns."""

    action: Action
    #: ``unchanged``: the image kept; ``watch``: the image watched (when listed).
    image: Image | None = None
    #: ``watch`` of an image only the journal knows (not listed): its id.
    image_id: int | None = None
    #: ``create``/``replace``: an earlier create's answer was lost; look for its image first.
    reconcile: bool = False
    error: str | None = None

    @property
    def watched_id(self) -> int | None:
        return self.image.id if self.image is not None else self.image_id

    @property
    def imports(self) -> bool:
        """Whether the action sends a create."""
        return self.action in (Action.CREATE, Action.REPLACE)


def keeper_key(name: str) -> Callable[[Image], tuple[bool, bool, float, int]]:
    """Which of several copies stays: available, then the one named ``name``, then the oldest."""

    def key(image: Image) -> tuple[bool, bool, float, int]:
        return (not image.is_available, image.name != name, created(image), image.id)

    return key


def decide(
    *,
    name: str,
    version_tag: str | None,
    source_error: str | None,
    images: Sequence[Image],
    row: EntryState | None,
) -> Decision:
    """The action for one entry (see the module's table).

    ``images`` are the entry's images from the set's listing; ``row`` its journal
    row, which counts only when it is about this version (``row.version``).
    """
    if version_tag is None:
        return Decision(
            Action.ERROR, error=source_error or "the source's version could not be learned"
        )
    live = [image for image in images if not image.has_failed]
    current = [image for image in live if version_tag in (image.tags or ())]
    # A row without a version (an older schema's) is taken to be about this one.
    about_this = row is not None and row.version in (None, version_tag)
    # A create whose answer was lost: its image is looked for (and adopted) first.
    reconcile = about_this and row is not None and row.phase is Phase.CREATING
    if current:
        keeper = min(current, key=keeper_key(name))
        action = Action.UNCHANGED if keeper.is_available else Action.WATCH
        return Decision(action, image=keeper, reconcile=reconcile)
    if about_this and row is not None:
        shown = {image.id for image in images}
        lost = row.phase is Phase.FINISHED and row.outcome == "failed"
        if row.image_id is not None and row.image_id not in shown and not lost:
            return Decision(Action.WATCH, image_id=row.image_id)
    # A version known despite a source error came from a checksum, which is
    # authoritative: the import goes ahead, and DigitalOcean, which fetches the
    # file itself, says whether it can (the probe only sizes it then).
    action = Action.REPLACE if live else Action.CREATE
    return Decision(action, reconcile=reconcile)


# -- rotation -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rename:
    image_id: int
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class Delete:
    image_id: int
    #: ``old_version`` (beyond ``keep``) or ``duplicate`` (an extra copy of a kept version).
    reason: str
    name: str


Step = Rename | Delete


@dataclass(frozen=True, slots=True)
class Rotation:
    """What makes one entry's images right, as steps in the order to take them.

    Kept older versions leave the name first, then the images to delete go, and
    the keeper takes the name last: at no moment do two images share it.
    """

    #: The image of the current version that carries the entry's name.
    keeper: int
    steps: tuple[Step, ...] = ()

    @property
    def renames(self) -> tuple[Rename, ...]:
        return tuple(step for step in self.steps if isinstance(step, Rename))

    @property
    def deletes(self) -> tuple[Delete, ...]:
        return tuple(step for step in self.steps if isinstance(step, Delete))

    @property
    def is_empty(self) -> bool:
        return not self.steps


def rotate(*, name: str, keep: int, version_tag: str, images: Sequence[Image]) -> Rotation | None:
    """What makes the entry right, or ``None`` while no image of ``version_tag`` is available.

    Only available images of other versions are sorted in; an older version still
    importing is left alone (the next run sorts it in), and a failed or unfinished
    import never takes the name nor causes a deletion.
    """
    live = [image for image in images if not image.has_failed]
    current = [image for image in live if version_tag in (image.tags or ())]
    if not any(image.is_available for image in current):
        return None
    order = keeper_key(name)
    keeper = min(current, key=order)
    deletes = [Delete(i.id, "duplicate", i.name) for i in current if i.id != keeper.id]
    # One image per older version (the others are extra copies), newest first.
    current_ids = {image.id for image in current}
    versions: dict[str, list[Image]] = {}
    for image in live:
        if image.id in current_ids or not image.is_available:
            continue
        versions.setdefault(version_tag_of(image) or f"image:{image.id}", []).append(image)
    older: list[Image] = []
    for copies in versions.values():
        kept = min(copies, key=order)
        older.append(kept)
        deletes.extend(Delete(i.id, "duplicate", i.name) for i in copies if i.id != kept.id)
    older.sort(key=lambda image: (created(image), image.id), reverse=True)
    kept_older, beyond = older[: keep - 1], older[keep - 1 :]
    deletes.extend(Delete(image.id, "old_version", image.name) for image in beyond)
    deletes.sort(key=lambda step: step.image_id)
    steps: list[Step] = [*_renames_away(name, kept_older), *deletes]
    if keeper.name != name:
        steps.append(Rename(keeper.id, keeper.name, name))
    return Rotation(keeper=keeper.id, steps=tuple(steps))


def _renames_away(name: str, kept_older: Sequence[Image]) -> list[Rename]:
    """Give each kept older version a name of its own, ``<name>@<label>``."""
    staying: set[str] = set()
    moving: list[Image] = []
    for image in kept_older:
        if image.name.startswith(f"{name}@") and image.name not in staying:
            staying.add(image.name)  # already renamed, and the name is its own
        else:
            moving.append(image)
    renames: list[Rename] = []
    for image in moving:
        new = label_name(name, time_label(image))
        if new in staying:
            new = label_name(name, f"{time_label(image)}-{image.id}")
        staying.add(new)
        renames.append(Rename(image.id, image.name, new))
    return renames


def label_name(name: str, label: str) -> str:
    """``<name>@<label>``, ``name`` shortened to keep the result within 255 characters."""
    suffix = f"@{label}"
    return name[: IMAGE_NAME_MAX_LENGTH - len(suffix)] + suffix


def time_label(image: Image) -> str:
    """The image's creation time in UTC, as ``20261127T020000Z``."""
    moment = created(image)
    if moment == float("inf"):
        return f"id{image.id}"
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


def created_at(image: Image) -> float | None:
    """When the API says the image was created (Unix time), if it says."""
    moment = created(image)
    return None if moment == float("inf") else moment


def created(image: Image) -> float:
    """When the API says the image was created (Unix time); +inf when it does not say."""
    if not image.created_at:
        return float("inf")
    try:
        return datetime.fromisoformat(image.created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")
