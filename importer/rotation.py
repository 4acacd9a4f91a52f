"""Rotation: the entry's name on its newest version, older versions kept or deleted.

A :class:`Rotator` keeps what the account last showed of each entry of the plan
(its live images, by id), from the run's listings and answers, and rotation
decides from that alone (:func:`importer.converge.rotate`): no listing of its
own. Once an entry's image is available, it is copied to the entry's other
regions (:mod:`importer.transfers`), then the steps are taken in order: renames,
then deletions, the keeper taking the name last. Every ``DELETE`` is journaled
before it leaves, and its answer after.

An image without the set's tag is never learned, so never renamed nor deleted:
someone took the tag off to keep it.

What ends a run is not decided here: a 401 or an unreachable API is raised to
the caller (:class:`~importer.errors.AuthenticationError`,
:class:`~importer.errors.ApiUnreachableError`), which stops the run; every other
failure becomes one of the entry's problems, or an orphan's error.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, replace

import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock
from importer.converge import Delete, Rename, Step, rotate
from importer.errors import ApiError, ApiUnreachableError, AuthenticationError, RejectedError
from importer.inventory import entry_tag_of, group_tag_of
from importer.journal import DeletionState, Journal
from importer.lifecycle import EntryLifecycle
from importer.report import OrphanResult
from importer.transfers import Transfers

Log = structlog.typing.FilteringBoundLogger


@dataclass(frozen=True, slots=True)
class Rotated:
    """What an entry ends with once rotated: its image, and what was left undone."""

    #: The version that carries the entry's name, as last seen.
    image: Image
    #: One line per region left out or per rotation left undone (empty: all done).
    errors: tuple[str, ...] = ()


class Rotator:
    """Knows what the account showed of each entry; copies, renames and deletes.

    ``set_tag``: the set's tag; an image without it is never learned. ``log``: the
    run's logger (orphan pruning logs there; an entry's steps log on the entry's).
    """

    def __init__(
        self,
        client: ImagesClient,
        journal: Journal,
        clock: Clock,
        transfers: Transfers,
        *,
        set_tag: str,
        log: Log,
    ) -> None:
        self._client = client
        self._journal = journal
        self._clock = clock
        self._transfers = transfers
        self._set_tag = set_tag
        self._log = log
        #: Every live image of each entry of the plan, as last seen (id -> image).
        self._known: dict[str, dict[int, Image]] = {}

    # -- what the account showed --------------------------------------------------------

    def track(self, tag: str, images: Iterable[Image]) -> None:
        """Start following ``tag``'s entry, from its images in the account's listing."""
        self._known[tag] = {image.id: image for image in images}

    def drop(self, tag: str) -> None:
        """The entry is done: a large run must not keep every image's last answer to the end."""
        self._known.pop(tag, None)

    def images(self, tag: str) -> Collection[Image]:
        """The live images of ``tag``'s entry (which must be followed), as last seen."""
        return self._known[tag].values()

    def listed(self, images: Sequence[Image]) -> None:
        """A group listing: note every image of an entry of the plan (another run's too)."""
        for image in images:
            tag = entry_tag_of(image)
            if tag is not None and tag in self._known:
                self.learn(tag, image)
        self._transfers.observe(images)

    def learn(self, tag: str, image: Image) -> None:
        if self._set_tag not in (image.tags or ()):
            # Not the set's (someone took the tag off to keep it): never renamed nor deleted.
            return
        known = self._known.setdefault(tag, {})
        if image.has_failed:
            known.pop(image.id, None)
        else:
            known[image.id] = image

    def forget(self, tag: str, image_id: int) -> None:
        self._known.get(tag, {}).pop(image_id, None)

    # -- rotation -------------------------------------------------------------------------

    async def rotate(self, entry: EntryLifecycle, image: Image) -> Rotated:
        """Copy the image to the entry's other regions, then put the entry's names and
        versions right, from what the account showed.

        The caller ends the entry with what this returns (its error from ``errors``).
        """
        item = entry.item
        vtag = item.version_tag
        if vtag is None:
            # The source could not be probed: its image is kept as it is, unrotated, but
            # still copied where the manifest needs it.
            undone = await self._transfer(entry, image)
            return Rotated(image, tuple(undone))
        if vtag not in (image.tags or ()):
            # The image this entry watched is of this version, whatever its answer showed.
            image = image.model_copy(update={"tags": (*(image.tags or ()), vtag)})
        self.learn(entry.tag, image)
        known = self._known[entry.tag]
        rotation = rotate(
            name=item.entry.name,
            keep=item.entry.keep,
            version_tag=vtag,
            images=list(known.values()),
        )
        assert rotation is not None  # ``image`` is an available image of this version
        keeper = known[rotation.keeper]
        if keeper.id != entry.result.image_id:
            entry.kept(keeper)
        # Before the name moves: the version that takes it is where it is needed.
        errors = await self._transfer(entry, known.get(keeper.id, keeper))
        problems: list[str] = []
        if rotation.steps:
            entry.rotating(len(rotation.steps))
            problems = await self.apply(entry, rotation.steps)
        if problems:
            errors.append(
                "names and versions not put right (the next run finishes): " + "; ".join(problems)
            )
        return Rotated(known.get(keeper.id, keeper), tuple(errors))

    async def _transfer(self, entry: EntryLifecycle, image: Image) -> list[str]:
        """Copy ``image`` to the entry's regions it is not in; one problem per region left out."""
        missing = tuple(r for r in entry.item.entry.transfer_regions if r not in image.regions)
        if not missing:
            return []
        entry.transferring(missing)
        return await self._transfers.distribute(
            entry,
            image,
            missing,
            group=group_tag_of(image) or entry.item.group,
            size=entry.item.size,
        )

    async def apply(self, entry: EntryLifecycle, steps: Sequence[Step]) -> list[str]:
        """Take ``steps`` in order; one problem per step refused or failed.

        A step already done (404) is skipped; a refused one is noted and the next is
        taken; any other failure ends the steps, since those after it rely on it.
        Raises :class:`~importer.errors.AuthenticationError` and
        :class:`~importer.errors.ApiUnreachableError`: they end the run.
        """
        known = self._known[entry.tag]
        problems: list[str] = []
        for step in steps:
            try:
                if isinstance(step, Rename):
                    renamed = await self._client.update(step.image_id, name=step.new)
                    known[step.image_id] = renamed
                    entry.renamed(step.image_id, step.old, step.new)
                else:
                    # Journaled before it leaves: a kill mid-request still names it.
                    self._journal.deleting(
                        entry.tag, step.image_id, self._clock.wall(), reason=step.reason
                    )
                    await self._client.delete(step.image_id)
                    self._journal.deletion_result(
                        step.image_id, DeletionState.DELETED, self._clock.wall()
                    )
                    known.pop(step.image_id, None)
                    entry.deleted(step.image_id, step.reason)
            except (AuthenticationError, ApiUnreachableError):
                raise
            except RejectedError as exc:
                if exc.status == 404:
                    if isinstance(step, Delete):
                        self._journal.deletion_result(
                            step.image_id, DeletionState.GONE, self._clock.wall()
                        )
                    known.pop(step.image_id, None)  # gone already
                    continue
                if isinstance(step, Delete):
                    self._journal.deletion_result(
                        step.image_id, DeletionState.REFUSED, self._clock.wall(), exc.safe_message
                    )
                # Refused (an image still importing may not be deletable): say so, go on.
                problems.append(f"image {step.image_id}: {exc.safe_message}")
                entry.log.warning(
                    "image.rotation_refused", image_id=step.image_id, error=exc.safe_message
                )
            except ApiError as exc:
                problems.append(f"image {step.image_id}: {exc.safe_message}")
                entry.log.warning(
                    "image.rotation_failed", image_id=step.image_id, error=exc.safe_message
                )
                break  # the steps after it rely on it (the name must be free first)
        return problems

    # -- orphans --------------------------------------------------------------------------

    async def prune(
        self, orphans: Sequence[Image], results: MutableMapping[int, OrphanResult]
    ) -> None:
        """``--prune``: delete the set's images whose entry left the manifest.

        Each orphan's row in ``results`` (by image id) is replaced by what became of it.
        Raises :class:`~importer.errors.AuthenticationError` and
        :class:`~importer.errors.ApiUnreachableError` at once: they end the run.
        """
        for image in orphans:
            result = results[image.id]
            try:
                await self._client.delete(image.id)
            except (AuthenticationError, ApiUnreachableError):
                raise
            except ApiError as exc:
                if not (isinstance(exc, RejectedError) and exc.status == 404):  # 404: gone
                    results[image.id] = replace(result, error=exc.safe_message)
                    self._log.warning(
                        "image.prune_failed", image_id=image.id, error=exc.safe_message
                    )
                    continue
            results[image.id] = replace(result, deleted=True)
            self._log.info("image.pruned", image_id=image.id, name=image.name)
