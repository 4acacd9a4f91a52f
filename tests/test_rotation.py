"""Rotation alone, on a scripted fake client: each step's answer, journal and report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import pytest
import structlog
from structlog.testing import capture_logs

from importer.api import Image
from importer.client import ImagesClient
from importer.converge import Delete, Rename, Step
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RejectedError,
    TransientApiError,
)
from importer.identity import set_tag
from importer.journal import MEMORY, Deletion, DeletionState, Journal
from importer.lifecycle import EntryLifecycle
from importer.plan import make_plan
from importer.report import ImageResult, OrphanResult
from importer.rotation import Rotated, Rotator
from importer.transfers import Transfers
from tests.fakes import FakeClock
from tests.helpers import image_urls, manifest_of

pytestmark = pytest.mark.anyio

MANIFEST = manifest_of(*image_urls(1))
ITEM = make_plan(MANIFEST)[0]
SET = set_tag(MANIFEST.set)
assert ITEM.version_tag is not None
VTAG = ITEM.version_tag


class ScriptedClient:
    """The writes rotation sends (rename, delete), each answered as scripted by (method, id)."""

    def __init__(self, errors: dict[tuple[str, int], ApiError] | None = None) -> None:
        self.errors = errors or {}
        self.sent: list[tuple[str, int]] = []

    async def update(self, image_id: int, *, name: str) -> Image:
        self._answer("update", image_id)
        return image(image_id, name=name)

    async def delete(self, image_id: int) -> None:
        self._answer("delete", image_id)

    def _answer(self, method: str, image_id: int) -> None:
        self.sent.append((method, image_id))
        error = self.errors.get((method, image_id))
        if error is not None:
            raise error


def image(
    image_id: int,
    *,
    name: str = "img-0",
    version: str = VTAG,
    status: str = "available",
    created_at: str | None = None,
) -> Image:
    """An image of the entry, in the set, of ``version``."""
    return Image(
        id=image_id,
        name=name,
        status=status,
        tags=(SET, ITEM.tag, version),
        created_at=created_at,
    )


@contextmanager
def rotator_for(client: ScriptedClient) -> Iterator[tuple[Rotator, EntryLifecycle, Journal]]:
    """A rotator on ``client`` and an in-memory journal, and the entry it works on."""
    clock = FakeClock()
    fake = cast(ImagesClient, client)
    with Journal(MEMORY) as journal:
        transfers = Transfers(
            fake, journal, clock, first_poll=1.0, poll_interval=1.0, timeout=60.0, max_transfers=1
        )
        log = structlog.get_logger("test")
        rotator = Rotator(fake, journal, clock, transfers, set_tag=SET, log=log)
        entry = EntryLifecycle(ITEM, journal, clock, log)
        yield rotator, entry, journal


@dataclass(frozen=True)
class Applied:
    """What taking some steps did, seen from every side."""

    problems: list[str]
    sent: list[tuple[str, int]]
    deletions: dict[int, Deletion]
    result: ImageResult
    known: set[int]
    warnings: list[tuple[str, int, str]]


async def apply_steps(errors: dict[tuple[str, int], ApiError], *steps: Step) -> Applied:
    """Take ``steps`` for an entry with images 1, 2 and 3 (named ``old``), answered as scripted."""
    client = ScriptedClient(errors)
    with rotator_for(client) as (rotator, entry, journal), capture_logs() as logs:
        rotator.track(ITEM.tag, [image(1), image(2), image(3, name="old")])
        problems = await rotator.apply(entry, steps)
        return Applied(
            problems,
            client.sent,
            {d.image_id: d for d in journal.deletions(ITEM.tag)},
            entry.result,
            {i.id for i in rotator.images(ITEM.tag)},
            [(e["event"], e["image_id"], e["error"]) for e in logs if e["log_level"] == "warning"],
        )


async def test_a_delete_answered_404_is_journaled_gone_and_skipped() -> None:
    """A 404 to a DELETE: journaled gone, forgotten, no problem, and the next step is taken."""
    done = await apply_steps(
        {("delete", 1): RejectedError("not found", status=404)},
        Delete(1, "old_version", "a"),
        Delete(2, "old_version", "b"),
    )
    assert done.problems == []
    assert done.sent == [("delete", 1), ("delete", 2)]
    assert {i: d.state for i, d in done.deletions.items()} == {
        1: DeletionState.GONE,
        2: DeletionState.DELETED,
    }
    assert done.known == {3}
    assert done.result.deleted == (2,)
    assert done.warnings == []


async def test_a_refused_step_is_a_problem_and_the_next_is_still_taken() -> None:
    """A 422 to a DELETE: journaled refused with its message, listed, logged; the rename follows."""
    done = await apply_steps(
        {("delete", 1): RejectedError("image is importing", status=422)},
        Delete(1, "duplicate", "a"),
        Rename(3, "old", "img-0"),
    )
    assert done.problems == ["image 1: image is importing"]
    assert done.sent == [("delete", 1), ("update", 3)]
    refused = done.deletions[1]
    assert (refused.state, refused.error) == (DeletionState.REFUSED, "image is importing")
    assert [r.new for r in done.result.renamed] == ["img-0"]
    assert done.result.duplicates_deleted == ()
    assert done.known == {1, 2, 3}
    assert done.warnings == [("image.rotation_refused", 1, "image is importing")]


async def test_any_other_api_error_ends_the_steps_after_it() -> None:
    """A 500 to a rename: listed and logged, and no later step is sent (they rely on it)."""
    done = await apply_steps(
        {("update", 3): TransientApiError("try later", status=500)},
        Rename(3, "old", "img-0@x"),
        Delete(1, "old_version", "a"),
    )
    assert done.problems == ["image 3: try later"]
    assert done.sent == [("update", 3)]
    assert done.deletions == {}
    assert done.known == {1, 2, 3}
    assert done.warnings == [("image.rotation_failed", 3, "try later")]


async def test_a_refused_token_mid_rotation_is_raised_with_the_delete_journaled_sending() -> None:
    """A 401 to a DELETE ends nothing here: it is raised, the DELETE left journaled as sent."""
    client = ScriptedClient({("delete", 1): AuthenticationError("no", status=401)})
    with rotator_for(client) as (rotator, entry, journal):
        rotator.track(ITEM.tag, [image(1), image(2)])
        with pytest.raises(AuthenticationError):
            await rotator.apply(
                entry, [Delete(1, "old_version", "a"), Delete(2, "old_version", "b")]
            )
        assert client.sent == [("delete", 1)]
        assert [(d.image_id, d.state) for d in journal.deletions(ITEM.tag)] == [
            (1, DeletionState.SENDING)
        ]


async def test_rotate_returns_the_keeper_and_what_it_left_undone() -> None:
    """Older versions beyond ``keep`` go, the newest older one is renamed; a refusal is an error."""
    old = "importer-version:0000000000000001"
    older = "importer-version:0000000000000002"
    client = ScriptedClient({("delete", 1): RejectedError("image is importing", status=422)})
    with rotator_for(client) as (rotator, entry, _journal):
        rotator.track(
            ITEM.tag,
            [
                image(1, name="img-0@a", version=older, created_at="2024-01-01T00:00:00Z"),
                image(2, version=old, created_at="2024-06-01T00:00:00Z"),
            ],
        )
        entry.sending()
        entry.submitted(image(3, status="NEW"))
        # The answer watched lacks the version tag: rotation adds it.
        rotated = await rotator.rotate(entry, image(3).model_copy(update={"tags": (SET,)}))
        assert rotated == Rotated(
            image(3).model_copy(update={"tags": (SET, VTAG)}),
            (
                "names and versions not put right (the next run finishes): "
                "image 1: image is importing",
            ),
        )
        assert client.sent == [("update", 2), ("delete", 1)]
        assert [(r.image_id, r.new) for r in entry.result.renamed] == [
            (2, "img-0@20240601T000000Z")
        ]


async def test_images_without_the_set_tag_are_never_learned_and_failed_ones_are_forgotten() -> None:
    """What the account shows is kept only for the set's live images, by entry."""
    with rotator_for(ScriptedClient()) as (rotator, _entry, _journal):
        rotator.track(ITEM.tag, [image(1)])
        rotator.listed(
            [
                image(2).model_copy(update={"tags": (ITEM.tag,)}),  # the set's tag taken off
                image(1, status="deleted"),
                image(4),
                Image(id=5, status="available", tags=(SET, "importer:other")),  # not followed
            ]
        )
        assert [i.id for i in rotator.images(ITEM.tag)] == [4]
        rotator.forget(ITEM.tag, 4)
        rotator.drop(ITEM.tag)
        with pytest.raises(KeyError):
            rotator.images(ITEM.tag)


async def test_prune_records_each_orphan_and_raises_what_ends_the_run() -> None:
    """404 counts as pruned, a refusal is the orphan's error; an unreachable API stops the rest."""
    client = ScriptedClient(
        {
            ("delete", 1): RejectedError("not found", status=404),
            ("delete", 2): RejectedError("in use", status=422),
            ("delete", 4): ApiUnreachableError("down"),
        }
    )
    orphans = [Image(id=i, name=f"o-{i}", status="available") for i in (1, 2, 3, 4, 5)]
    results = {o.id: OrphanResult(o.id, o.name, "importer:gone", o.status) for o in orphans}
    with (
        rotator_for(client) as (rotator, _entry, _journal),
        capture_logs() as logs,
        pytest.raises(ApiUnreachableError),
    ):
        await rotator.prune(orphans, results)
    assert client.sent == [("delete", i) for i in (1, 2, 3, 4)]
    assert [(r.deleted, r.error) for r in results.values()] == [
        (True, None),
        (False, "in use"),
        (True, None),
        (False, None),
        (False, None),
    ]
    assert [(e["event"], e["image_id"]) for e in logs] == [
        ("image.pruned", 1),
        ("image.prune_failed", 2),
        ("image.pruned", 3),
    ]
