"""Finding out what a create whose answer was lost did: never a blind retry.

A create that got no usable answer (a reset, a timeout, a 5xx) may have made
the image or not. Sending it again could make a duplicate; not sending it could
lose the entry. :class:`Reconciler` looks for the image by the entry's tag
(see :mod:`importer.plan`) and says which: the image it found, or that it surely
does not exist. It also removes extra copies, should a duplicate appear anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime

import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RejectedError,
)
from importer.journal import Journal
from importer.plan import PlannedImport
from importer.poller import StatusPoller

Log = structlog.typing.FilteringBoundLogger
#: How far DigitalOcean's clock may be from ours when comparing creation times.
CLOCK_SKEW = 300.0


class Reconciler:
    """Looks for the images of uncertain creates, and deletes extra copies."""

    def __init__(
        self,
        client: ImagesClient,
        journal: Journal,
        poller: StatusPoller,
        clock: Clock,
        *,
        window: float,
        interval: float,
        importing_group: Callable[[], str | None],
    ) -> None:
        self._client = client
        self._journal = journal
        self._poller = poller
        self._clock = clock
        self._window = window
        self._interval = interval
        # A group tag with an image known to be importing, to learn from.
        self._importing_group = importing_group
        # One probe per interval serves every entry being reconciled.
        self._probed_at = -math.inf

    async def find(self, item: PlannedImport, log: Log) -> Image | None:
        """The image an uncertain create made, or ``None`` once it surely does not exist.

        An image still importing may be missing from listings (DigitalOcean does
        not say), so "not listed" proves absence only once listings are known to
        show importing images, or once ``window`` has passed: by then any image
        the lost create made has finished, and is listed if it lives (failed
        images drop out of listings, and a failed image is no duplicate). Errors
        prove nothing: it asks again, however long the API takes to answer.
        """
        give_up_at = self._clock.monotonic() + self._window
        delay = self._interval
        while True:
            try:
                images = await self._ours(item)
                self._poller.learn(images)
                live = [image for image in images if not image.has_failed]
                if live:
                    keep = min(live, key=lambda i: (not i.is_available, i.id))
                    await self.remove_duplicates(item, keep=keep.id, log=log, live=live)
                    return keep
                if self._poller.lists_in_progress or await self._probe_listing():
                    log.info("image.absent", tag=item.tag)
                    return None
            except (AuthenticationError, ApiUnreachableError):
                raise
            except ApiError as exc:
                # An error proves nothing either way: ask again.
                log.warning("image.reconcile_failed", error=exc.safe_message)
            else:
                if self._clock.monotonic() >= give_up_at:
                    log.info("image.absent", tag=item.tag, waited=self._window)
                    return None
                log.info("image.reconciling", tag=item.tag)
            await self._clock.sleep(delay)
            # The answer may be an hour away: ask less often as time goes by.
            delay = min(delay * 1.5, 8 * self._interval)

    async def sweep(self, item: PlannedImport, *, keep: int, log: Log) -> tuple[int, ...]:
        """After an uncertain create, leave the entry with no live image but ``keep``.

        Asks until the API answers: an entry must not be finished with a duplicate
        left behind. (A stop cancels the wait; the entry stays unfinished in the
        journal, and the next run sweeps.)
        """
        while True:
            try:
                return await self.remove_duplicates(item, keep=keep, log=log)
            except (AuthenticationError, ApiUnreachableError):
                raise
            except ApiError as exc:
                log.warning("image.duplicate_check_failed", error=exc.safe_message)
            await self._clock.sleep(self._interval)

    async def remove_duplicates(
        self, item: PlannedImport, *, keep: int, log: Log, live: Sequence[Image] | None = None
    ) -> tuple[int, ...]:
        """Delete the entry's live images other than ``keep``; all deleted so far."""
        if live is None:
            live = [image for image in await self._ours(item) if not image.has_failed]
        extras = tuple(sorted(image.id for image in live if image.id != keep))
        for image_id in extras:
            log.warning("image.duplicate", image_id=image_id, kept=keep)
            try:
                await self._client.delete(image_id)
            except RejectedError as exc:
                if exc.status != 404:  # already gone is what we wanted
                    raise
        state = self._journal.get(item.tag)
        known = state.duplicates if state is not None else ()
        if not extras:
            return known
        deleted = tuple(sorted({*known, *extras}))
        self._journal.duplicates(item.tag, deleted, self._clock.wall())
        log.warning("image.duplicates_deleted", image_ids=list(extras), kept=keep)
        return deleted

    async def _ours(self, item: PlannedImport) -> list[Image]:
        """The images with the entry's tag that this entry's creates may have made.

        An earlier import of the same entry (with another state file) carries the
        same tag; it was created before this entry's first create left, and is
        neither adopted nor deleted.
        """
        images = await self._client.list(tag_name=item.tag)
        state = self._journal.get(item.tag)
        if state is None or state.first_sent_at is None:
            return images
        since = state.first_sent_at - CLOCK_SKEW
        return [image for image in images if _created(image) >= since]

    async def _probe_listing(self) -> bool:
        """Whether listings show importing images, asked of a group known to be importing."""
        now = self._clock.monotonic()
        group = self._importing_group()
        if group is not None and now - self._probed_at >= self._interval:
            self._probed_at = now
            self._poller.learn(await self._client.list(tag_name=group))
        return self._poller.lists_in_progress


def _created(image: Image) -> float:
    """When the API says the image was created (Unix time); +inf when it does not say."""
    if not image.created_at:
        return math.inf
    try:
        return datetime.fromisoformat(image.created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf
