"""Deciding from the account, and rotating names: pure functions over tables of cases."""

from __future__ import annotations

from typing import Any

import pytest

from importer.api import Image
from importer.converge import Action, Delete, Rename, decide, rotate, time_label
from importer.inventory import Inventory
from importer.journal import EntryState, Phase

ENTRY = "importer:00000000000000e1"
V1 = "importer-version:0000000000000001"
V2 = "importer-version:0000000000000002"
V3 = "importer-version:0000000000000003"
NAME = "web"


def img(
    image_id: int,
    version: str,
    status: str = "available",
    *,
    name: str = NAME,
    day: int = 1,
    entry: str = ENTRY,
) -> Image:
    return Image(
        id=image_id,
        name=name,
        status=status,
        tags=("importer-set:s", entry, version),
        created_at=f"2026-11-{day:02d}T02:00:00Z",
    )


def row(phase: Phase, version: str = V2, image_id: int | None = None, **more: Any) -> EntryState:
    fields: dict[str, Any] = {
        "tag": ENTRY,
        "name": NAME,
        "region": "nyc3",
        "group": None,
        "phase": phase,
        "image_id": image_id,
        "status": None,
        "outcome": None,
        "error": None,
        "creates_sent": 1,
        "uncertain": 0,
        "duplicates": (),
        "first_sent_at": None,
        "submitted_at": None,
        "finished_at": None,
        "version": version,
    }
    fields.update(more)
    return EntryState(**fields)


CASES = [
    # (what it shows, images, row, action, image id, reconcile)
    ("nothing in the account", [], None, Action.CREATE, None, False),
    ("this version available", [img(1, V2)], None, Action.UNCHANGED, 1, False),
    ("this version importing", [img(1, V2, "pending")], None, Action.WATCH, 1, False),
    ("only another version", [img(1, V1)], None, Action.REPLACE, None, False),
    ("another version importing", [img(1, V1, "NEW")], None, Action.REPLACE, None, False),
    ("a failed import does not count", [img(1, V2, "deleted")], None, Action.CREATE, None, False),
    (
        "failed this version, old one live",
        [img(1, V1), img(2, V2, "deleted")],
        None,
        Action.REPLACE,
        None,
        False,
    ),
    (
        "available wins over importing",
        [img(1, V2, "pending", day=1), img(2, V2, day=2)],
        None,
        Action.UNCHANGED,
        2,
        False,
    ),
    (
        "the name carrier wins among available",
        [img(1, V2, name="web@x", day=1), img(2, V2, day=2)],
        None,
        Action.UNCHANGED,
        2,
        False,
    ),
    (
        "then the oldest",
        [img(3, V2, day=3), img(2, V2, day=2)],
        None,
        Action.UNCHANGED,
        2,
        False,
    ),
    (
        "a finished row whose image is gone",
        [],
        row(Phase.FINISHED, image_id=9, outcome="failed"),
        Action.CREATE,
        None,
        False,
    ),
    (
        "a row's image hidden from the listing is watched by id",
        [img(1, V1)],
        row(Phase.SUBMITTED, image_id=9),
        Action.WATCH,
        9,
        False,
    ),
    (
        "an available row's image not listed is read by id",
        [],
        row(Phase.FINISHED, image_id=9, outcome="available"),
        Action.WATCH,
        9,
        False,
    ),
    (
        "a row of another version is history",
        [img(1, V1)],
        row(Phase.SUBMITTED, version=V1, image_id=9),
        Action.REPLACE,
        None,
        False,
    ),
    (
        "a lost create answer is reconciled",
        [],
        row(Phase.CREATING),
        Action.CREATE,
        None,
        True,
    ),
    (
        "the account outranks the journal",
        [img(1, V2)],
        row(Phase.FINISHED, image_id=9, outcome="failed"),
        Action.UNCHANGED,
        1,
        False,
    ),
]


@pytest.mark.parametrize(
    ("images", "journal_row", "action", "image_id", "reconcile"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    images: list[Image],
    journal_row: EntryState | None,
    action: Action,
    image_id: int | None,
    reconcile: bool,
) -> None:
    """Each row of the decision table: the account first, the journal only for what it hides."""
    decision = decide(name=NAME, version_tag=V2, source_error=None, images=images, row=journal_row)
    assert decision.action is action
    assert decision.watched_id == image_id
    assert decision.reconcile is reconcile


def test_a_source_without_version_is_an_error() -> None:
    """No version learned: the entry fails with the source's reason, whatever the account holds."""
    decision = decide(
        name=NAME, version_tag=None, source_error="cannot read", images=[img(1, V1)], row=None
    )
    assert decision.action is Action.ERROR
    assert decision.error == "cannot read"


def test_a_checksum_decides_even_when_the_file_cannot_be_probed() -> None:
    """A version from a checksum stands when the probe failed: the account decides as usual."""
    kwargs: dict[str, Any] = {"name": NAME, "version_tag": V2, "source_error": "404", "row": None}
    assert decide(images=[img(1, V2)], **kwargs).action is Action.UNCHANGED
    assert decide(images=[img(1, V1)], **kwargs).action is Action.REPLACE


# -- rotation -----------------------------------------------------------------------


def test_nothing_to_do_when_the_account_is_right() -> None:
    """The name on the newest, one older version under its own name: no step (idempotent)."""
    images = [img(2, V2, day=2), img(1, V1, name="web@20261101T020000Z")]
    rotation = rotate(name=NAME, keep=2, version_tag=V2, images=images)
    assert rotation is not None
    assert rotation.keeper == 2
    assert rotation.is_empty


def test_a_new_version_takes_the_name_and_the_old_one_is_renamed() -> None:
    """keep 2: the old holder leaves the name first, then the new one takes it."""
    images = [img(1, V1, day=1), img(2, V2, name="web@abc", day=2)]
    rotation = rotate(name=NAME, keep=2, version_tag=V2, images=images)
    assert rotation is not None
    assert rotation.steps == (
        Rename(1, "web", "web@20261101T020000Z"),
        Rename(2, "web@abc", "web"),
    )


def test_keep_one_deletes_the_old_version_before_the_new_takes_the_name() -> None:
    """keep 1: the old version goes, then the new one is named: never two with the name."""
    images = [img(1, V1, day=1), img(2, V2, name="web@abc", day=2)]
    rotation = rotate(name=NAME, keep=1, version_tag=V2, images=images)
    assert rotation is not None
    assert rotation.steps == (Delete(1, "old_version", "web"), Rename(2, "web@abc", "web"))


def test_versions_beyond_keep_are_deleted_newest_kept() -> None:
    """keep 2 with three older versions: the newest older one stays, the two oldest go."""
    images = [
        img(1, V1, name="web@a", day=1),
        img(2, "importer-version:00000000000000ff", name="web@b", day=2),
        img(3, V3, day=3),
        img(4, V2, name="web@new", day=4),
    ]
    rotation = rotate(name=NAME, keep=2, version_tag=V2, images=images)
    assert rotation is not None
    assert [d.image_id for d in rotation.deletes] == [1, 2]
    assert rotation.renames == (
        Rename(3, "web", "web@20261103T020000Z"),
        Rename(4, "web@new", "web"),
    )


def test_duplicates_of_the_current_version_keep_one() -> None:
    """Two live copies of one version: the available name carrier stays, the other goes."""
    images = [img(1, V2, "pending", day=1), img(2, V2, day=2), img(3, V2, name="web@x", day=3)]
    rotation = rotate(name=NAME, keep=2, version_tag=V2, images=images)
    assert rotation is not None
    assert rotation.keeper == 2
    assert rotation.deletes == (Delete(1, "duplicate", "web"), Delete(3, "duplicate", "web@x"))
    assert rotation.renames == ()


def test_no_rotation_until_this_version_is_available() -> None:
    """A pending or failed new version never takes the name nor deletes anything."""
    for status in ("pending", "deleted"):
        images = [img(1, V1), img(2, V2, status, name="web@new", day=2)]
        assert rotate(name=NAME, keep=1, version_tag=V2, images=images) is None


def test_an_older_version_still_importing_is_left_alone() -> None:
    """Only available older versions are sorted in; one still importing is untouched."""
    images = [img(1, V1, "pending", name="web@old", day=1), img(2, V2, day=2)]
    rotation = rotate(name=NAME, keep=1, version_tag=V2, images=images)
    assert rotation is not None
    assert rotation.is_empty


def test_labels_are_unique_per_entry() -> None:
    """Two kept versions created in the same second get distinct names."""
    images = [img(1, V1, day=1), img(3, V3, day=1), img(2, V2, day=2)]
    rotation = rotate(name=NAME, keep=3, version_tag=V2, images=images)
    assert rotation is not None
    names = [r.new for r in rotation.renames if r.image_id != 2]
    assert len(set(names)) == 2
    assert all(n.startswith("web@20261101T020000Z") for n in names)


def test_a_revert_gives_the_name_back_to_the_older_image() -> None:
    """The source went back to an older content still kept: that image takes the name again."""
    images = [img(1, V1, name="web@20261101T020000Z", day=1), img(2, V2, day=2)]
    rotation = rotate(name=NAME, keep=2, version_tag=V1, images=images)
    assert rotation is not None
    assert rotation.steps == (
        Rename(2, "web", "web@20261102T020000Z"),
        Rename(1, "web@20261101T020000Z", "web"),
    )


def test_time_label() -> None:
    """Creation time in UTC, compact."""
    assert time_label(img(1, V1, day=27)) == "20261127T020000Z"


def test_inventory_indexes_entries_and_finds_orphans() -> None:
    """Failed images never count; entries gone from the manifest are orphans; untagged are not."""
    other = "importer:00000000000000e2"
    foreign = Image(id=9, name="x", status="available", tags=("importer-set:s",))
    images = [img(1, V1), img(2, V2, "deleted"), img(3, V1, entry=other), foreign]
    inventory = Inventory.of("importer-set:s", images)
    assert [i.id for i in inventory.entry(ENTRY)] == [1]
    assert [i.id for i in inventory.orphans({ENTRY})] == [3]
