"""Finding out what a create whose answer was lost did: never a blind retry.

A create that got no usable answer (a reset, a timeout, a 5xx) may have made
the image or not. Sending it again could make a duplicate; not sending it could
lose the entry. :class:`Reconciler` looks for the image by the entry's tag
(see :mod:`importer.plan`) and says which: the image it found, or that it surely
does not exist. It also removes extra copies, should a duplicate appear anyway.

Absence needs evidence. A listing may miss an image for two reasons besides
its absence: DigitalOcean may hide images still importing, and listings may lag
behind creates. So "not listed" proves absence only in a listing asked for
long enough after the create left (the journal's ``last_sent_at``, so that a
rerun goes on waiting where the last run stopped, rather than from its start):

* once listings are known to show importing images, the listing lag's bound
  after it (:class:`~importer.poller.ListingLag`: twice the longest lag seen on
  this run's own creates, at least one interval; before any is seen, as below);
* whether or not they do (a finished image is listed either way): once an
  import of its size would be done, by a wide margin over the longest seen in
  this run (:class:`HiddenBound`);
* and at the latest ``window`` after it, the wait before anything is learned:
  by then any image the create made has finished, and is listed if it lives (a
  failed image is no duplicate).

The hidden bound is evidence from this run's imports, not a promise of the
API's: an import could stay hidden longer than any seen. So when absence was
concluded on it, before ``window``, :meth:`Reconciler.linger` keeps looking for a late
copy after the entry has ended, until ``window`` after that create left (or
until every create is accounted for), and deletes it: the entry's image stays
the one it ended with, and the copy is reported under ``duplicates_deleted``.

Deletions are journaled before each ``DELETE`` leaves and after it answers, so
that the report names every image deleted, even by a run killed mid-request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import anyio
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
from importer.journal import DeletionState, Journal
from importer.plan import PlannedImport
from importer.poller import DurationModel, StatusPoller

Log = structlog.typing.FilteringBoundLogger
#: How far DigitalOcean's clock may be from ours when comparing creation times.
CLOCK_SKEW = 300.0
#: Probes that found listings hiding importing images, and looks for a late copy, come at
#: most this many intervals apart.
PROBE_BACKOFF = 16


@dataclass(frozen=True)
class HiddenBound:
    """How long a hidden import of a given size may stay out of listings, from this run.

    An import is seen done ``fit(size) * ratio`` after it was sent, where ``ratio``
    is at most the longest seen relative to the fit (the model's durations run
    from the send to the listing that showed it done, so they include the
    listing's lag and the polling delay). The bound is ``FACTOR`` times that,
    counting a ratio of at least ``MIN_RATIO`` (the first imports seen finishing
    are the quickest), once ``MIN_SAMPLES`` imports have been seen finishing,
    plus one poll interval; before that there is none, nor for a file of unknown size
    (it could be the largest of all).
    """

    FACTOR = 1.5
    MIN_RATIO = 1.25
    MIN_SAMPLES = 10

    @classmethod
    def of(cls, model: DurationModel, size: int | None, interval: float) -> float | None:
        if size is None or model.samples < cls.MIN_SAMPLES:
            return None
        longest = model.fit(size) * max(model.slowest_ratio, cls.MIN_RATIO)
        return cls.FACTOR * longest + interval


@dataclass(frozen=True)
class Swept:
    """What :meth:`Reconciler.sweep` left of an entry's copies."""

    #: The one live copy the entry keeps (available first, then the oldest);
    #: ``None`` when none lives.
    kept: Image | None
    #: Every copy deleted, or whose ``DELETE`` left (the report names them all).
    deleted: tuple[int, ...]
    #: Extra live copies the API would not delete (still importing) before the
    #: time they had to finish: left in the account, and reported.
    left: tuple[int, ...]


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
        # One probe per interval at most serves every entry being reconciled.
        self._probed_at = -math.inf
        self._probe_every = interval
        # Entries whose absence was concluded before ``window`` (a learned bound): a
        # hidden copy could still turn up until this wall time (see linger).
        # ...and the group tag its creates carried (None: several, or not known).
        self._late_until: dict[str, tuple[float, str | None]] = {}
        # Entries lingering per group, and the group's latest listing while any does.
        self._lingering: dict[str, int] = {}
        self._group_seen: dict[str, tuple[float, list[Image]]] = {}
        self._group_locks: dict[str, anyio.Lock] = {}

    async def find(self, item: PlannedImport, log: Log) -> Image | None:
        """The image an uncertain create made, or ``None`` once it surely does not exist.

        A live image found is adopted at once (extra copies are deleted). Absence
        is concluded only from a listing asked for late enough after the create
        left (see the module's doc). Then a failed image of the entry, if one was
        listed, is the create's: it is returned, so that its error message is
        reported rather than the entry being imported again. Errors prove
        nothing: it asks again, however long the API takes to answer.
        """
        delay = self._interval
        while True:
            asked_at = self._clock.wall()
            proven_at: float | None = None
            try:
                images = await self._ours(item)
                self._poller.learn(images)
                live = [image for image in images if not image.has_failed]
                if live:
                    keep = self._choose(item, live)
                    await self._delete_extras(item, keep=keep.id, live=live, log=log)
                    return keep
                failed = [image for image in images if image.has_failed]
                proven_at = self._absence_proven_at(item)
                unsure = asked_at < proven_at and not self._poller.lists_in_progress
                if unsure and await self._probe_listing():
                    proven_at = self._absence_proven_at(item)
                if failed and (asked_at >= proven_at or self._accounted_for(item, images)):
                    # Every create is accounted for, or nothing else can be hiding:
                    # the newest failure is what the create made.
                    return max(failed, key=_age)
                if asked_at >= proven_at:
                    sent = self._sent_at(item)
                    if asked_at < sent + min(self._window, self._listed_wait()):
                        # Concluded on the imports seen, which a hidden import could outlast.
                        self._judged_early(item, sent + self._window)
                    log.info("image.absent", tag=item.tag, since_sent=round(asked_at - sent, 3))
                    return None
            except (AuthenticationError, ApiUnreachableError):
                raise
            except ApiError as exc:
                # An error proves nothing either way: ask again.
                log.warning("image.reconcile_failed", error=exc.safe_message)
            else:
                log.info("image.reconciling", tag=item.tag, absent_from=proven_at)
            pause = delay
            if proven_at is not None:
                # No sooner than needed, and no later than when evidence can be had.
                now = self._clock.wall()
                pause = min(delay, max(0.0, proven_at - now))
                if not self._poller.lists_in_progress:
                    # Listings may hide importing images: the image can show no sooner
                    # than the quickest import of its size is done.
                    soonest = self._soonest_shown(item)
                    pause = min(max(pause, soonest - now), max(0.0, proven_at - now))
            await self._clock.sleep(pause)
            # The answer may be an hour away: ask less often as time goes by.
            delay = min(delay * 1.5, 8 * self._interval)

    async def sweep(self, item: PlannedImport, *, polled: Image, log: Log) -> Swept:
        """After an uncertain create, leave the entry with one live copy.

        ``polled`` is the entry's image as last seen (finished, failed, or still
        importing at its timeout). Of every live copy (``polled`` among them, if
        it lives), the one kept is available first, then the oldest; the others
        are deleted. One the API refuses to delete yet (still importing) is
        tried again every interval until the time every copy must have finished
        (``window`` after the last create left), then left and reported. Other
        errors prove nothing: it asks until the API answers. (A stop cancels the
        wait; the entry stays unfinished in the journal, and the next run sweeps.)
        """
        until = self._sent_at(item) + self._window
        while True:
            try:
                images = await self._ours(item)
                self._poller.learn(images)
                live = {image.id: image for image in images if not image.has_failed}
                if polled.has_failed:
                    live.pop(polled.id, None)
                else:
                    # The polled image as the run last saw it (listings may lag or hide it).
                    live[polled.id] = polled
                if not live:
                    return Swept(None, self._deleted(item), ())
                keep = self._choose(item, list(live.values()))
                refused = await self._delete_extras(item, keep=keep.id, live=live.values(), log=log)
                if not refused or self._clock.wall() >= until:
                    if refused:
                        log.warning("image.duplicates_left", image_ids=list(refused), kept=keep.id)
                    return Swept(keep, self._deleted(item), refused)
                log.info("image.duplicate_delete_later", image_ids=list(refused), kept=keep.id)
            except (AuthenticationError, ApiUnreachableError):
                raise
            except ApiError as exc:
                log.warning("image.duplicate_check_failed", error=exc.safe_message)
            await self._clock.sleep(self._interval)

    async def linger(self, item: PlannedImport, *, keep: int, log: Log) -> tuple[int, ...]:
        """After the entry ended with ``keep``, delete a late copy of a create judged absent.

        Only for an entry whose absence was concluded on a learned bound (before
        ``window``): until ``window`` after that create left, its image could still
        show up (an import hidden longer than any seen). Looks in the group's
        listing at growing intervals (one listing serves the group's lingering
        entries), and stops early once every create is accounted for. ``keep`` stays the
        entry's image whatever the others are; the ids deleted are returned.
        """
        late = self._late_until.pop(item.tag, None)
        if late is None:
            return ()
        until, group = late
        log.info("image.lingering", seconds=round(max(0.0, until - self._clock.wall()), 3))
        if group is None:
            # Creates with other group tags (an earlier run's): the entry's own listing.
            group = item.tag
        self._lingering[group] = self._lingering.get(group, 0) + 1
        step = self._interval
        try:
            while True:
                try:
                    # The group's listing shows a late copy too (the create carried the
                    # group's tag), and one listing serves every entry of it that lingers.
                    # (``_mine`` keeps the entry's images of any listing, its own too.)
                    images = self._mine(item, await self._group_listing(group))
                    live = [image for image in images if not image.has_failed]
                    extras = [image for image in live if image.id != keep]
                    if extras:
                        await self._delete_extras(item, keep=keep, live=extras, log=log)
                    if self._accounted_for(item, images):
                        break
                except (AuthenticationError, ApiUnreachableError):
                    raise
                except ApiError as exc:
                    log.warning("image.duplicate_check_failed", error=exc.safe_message)
                now = self._clock.wall()
                if now >= until:
                    break
                # A late copy grows less likely as time goes by: look less often (the
                # budget is the creates' too), at moments shared with the group's other
                # lingering entries (multiples of the step), so that they share listings.
                step = min(2 * step, PROBE_BACKOFF * self._interval)
                tick = self._clock.monotonic()
                pause = (math.floor(tick / step) + 1) * step - tick
                if pause < 1.0:  # at a multiple already (give or take a rounding)
                    pause += step
                await self._clock.sleep(min(pause, until - now))
        finally:
            self._lingering[group] -= 1
            if not self._lingering[group]:
                del self._lingering[group]
                self._group_seen.pop(group, None)
        return self._deleted(item)

    # -- keeping one copy -----------------------------------------------------------

    def _choose(self, item: PlannedImport, live: Sequence[Image]) -> Image:
        """The copy to keep: available first, then the oldest.

        A copy this entry already set out to delete is kept only when no other
        lives: its ``DELETE`` may have landed (a run killed while it was on the wire).
        """
        doomed = {deletion.image_id for deletion in self._journal.deletions(item.tag)}
        candidates = [image for image in live if image.id not in doomed] or list(live)
        return min(candidates, key=lambda image: (not image.is_available, *_age(image)))

    async def _delete_extras(
        self, item: PlannedImport, *, keep: int, live: Iterable[Image], log: Log
    ) -> tuple[int, ...]:
        """Delete every live copy but image ``keep``; the ids the API refused to delete yet.

        Each ``DELETE`` is journaled before it leaves and after it answers.
        """
        extras = sorted({image.id for image in live} - {keep})
        refused: list[int] = []
        deleted: list[int] = []
        for image_id in extras:
            log.warning("image.duplicate", image_id=image_id, kept=keep)
            self._journal.deleting(item.tag, image_id, self._clock.wall())
            try:
                await self._client.delete(image_id)
            except RejectedError as exc:
                if exc.status == 404:  # already gone is what we wanted
                    self._journal.deletion_result(image_id, DeletionState.GONE, self._clock.wall())
                    deleted.append(image_id)
                    continue
                # Refused (a copy still importing cannot be deleted yet): not deleted.
                self._journal.deletion_result(
                    image_id, DeletionState.REFUSED, self._clock.wall(), exc.safe_message
                )
                log.warning("image.duplicate_refused", image_id=image_id, error=exc.safe_message)
                refused.append(image_id)
                continue
            self._journal.deletion_result(image_id, DeletionState.DELETED, self._clock.wall())
            deleted.append(image_id)
        if deleted:
            log.warning("image.duplicates_deleted", image_ids=deleted, kept=keep)
        return tuple(refused)

    def _deleted(self, item: PlannedImport) -> tuple[int, ...]:
        state = self._journal.get(item.tag)
        return state.duplicates if state is not None else ()

    # -- evidence -------------------------------------------------------------------

    def _sent_at(self, item: PlannedImport) -> float:
        """When the entry's latest create left (wall time), as the journal says."""
        state = self._journal.get(item.tag)
        if state is not None:
            for sent in (state.last_sent_at, state.first_sent_at):
                if sent is not None:
                    return sent
        return self._clock.wall()

    def _absence_proven_at(self, item: PlannedImport) -> float:
        """From when (wall time) a listing without the entry's image proves it absent."""
        return self._sent_at(item) + min(self._listed_wait(), self._hidden_wait(item))

    def _listed_wait(self) -> float:
        """How long after a create a listing may miss its image while it imports."""
        if not self._poller.lists_in_progress:
            return self._window
        # Never sooner than an interval: a few quick listings say little of a slow one,
        # and a create whose answer was lost may have been processed late.
        return max(min(self._interval, self._window), self._poller.lag.bound(self._window))

    def _hidden_wait(self, item: PlannedImport) -> float:
        """How long after a create its image may stay hidden, if importing ones are: by the
        imports seen finishing in this run (whether or not listings show importing images,
        a finished one shows)."""
        hidden = HiddenBound.of(self._poller.model, item.size, self._interval)
        return self._window if hidden is None else min(self._window, hidden)

    def _soonest_shown(self, item: PlannedImport) -> float:
        """When (wall time) an image the create made can first be listed if importing ones
        are hidden: once the quickest import of its size seen in this run would be done."""
        model = self._poller.model
        if not model.ready:
            return -math.inf
        return self._sent_at(item) + model.early(item.size)

    def _accounted_for(self, item: PlannedImport, listed: Sequence[Image]) -> bool:
        """Whether every create that may have been processed has an image in sight.

        Each create makes at most one image: as many images seen (listed, or
        deleted by this entry) as creates sent leaves none hidden.
        """
        state = self._journal.get(item.tag)
        if state is None:
            return False
        seen = {image.id for image in listed} | {
            deletion.image_id for deletion in self._journal.deletions(item.tag)
        }
        return len(seen) >= state.creates_sent

    def _judged_early(self, item: PlannedImport, until: float) -> None:
        """The entry's create was judged absent before ``window``: watch for a late copy
        until ``until``, in the listing of the group tag that create carried."""
        state = self._journal.get(item.tag)
        group = state.group if state is not None else None
        earlier = self._late_until.get(item.tag)
        if earlier is not None:
            until = max(until, earlier[0])
            if earlier[1] != group:
                group = None
        self._late_until[item.tag] = (until, group)

    async def _group_listing(self, group: str) -> list[Image]:
        """The listing of ``group``, shared by the entries lingering at the same moment."""
        lock = self._group_locks.setdefault(group, anyio.Lock())
        async with lock:
            seen = self._group_seen.get(group)
            now = self._clock.monotonic()
            if seen is not None and now - seen[0] < 1.0:
                return seen[1]
            images = await self._client.list(tag_name=group)
            self._poller.learn(images, tag=group)
            if group in self._lingering:
                self._group_seen[group] = (now, images)
            return images

    async def _ours(self, item: PlannedImport) -> list[Image]:
        """The images with the entry's tags that this entry's creates may have made (see
        :meth:`_mine`), listed by the entry's tag."""
        return self._mine(item, await self._client.list(tag_name=item.tag))

    def _mine(self, item: PlannedImport, listed: Sequence[Image]) -> list[Image]:
        """Of ``listed``, the images with the entry's (and set's) tags that this entry's
        creates may have made.

        Only images of the version the creates were for: the entry's other
        versions are rotation's business. An earlier import of the same entry and
        version (with another state file) carries the same tags; it was created
        before this entry's first create left, and is neither adopted nor deleted.
        """
        images = [
            image
            for image in listed
            # Images without the set's tag are never the importer's to adopt or delete.
            if item.tag in (image.tags or ()) and item.set_tag in (image.tags or ())
        ]
        vtag = item.version_tag
        if vtag is not None:
            images = [image for image in images if vtag in (image.tags or ())]
        state = self._journal.get(item.tag)
        if state is None or state.first_sent_at is None:
            return images
        since = state.first_sent_at - CLOCK_SKEW
        return [image for image in images if _created(image) >= since]

    async def _probe_listing(self) -> bool:
        """Whether listings show importing images, asked of a group known to be importing."""
        now = self._clock.monotonic()
        # The group is looked for only when a probe is due: finding it reads every entry.
        group = self._importing_group() if now - self._probed_at >= self._probe_every else None
        if group is not None:
            self._probed_at = now
            self._poller.learn(await self._client.list(tag_name=group), tag=group)
            if not self._poller.lists_in_progress:
                # Whether listings show importing images does not change: ask less often
                # (a run that reconciles all along would probe every interval for hours).
                self._probe_every = min(2 * self._probe_every, PROBE_BACKOFF * self._interval)
        return self._poller.lists_in_progress


def _created(image: Image) -> float:
    """When the API says the image was created (Unix time); +inf when it does not say."""
    if not image.created_at:
        return math.inf
    try:
        return datetime.fromisoformat(image.created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf


def _age(image: Image) -> tuple[float, int]:
    """Sorts images oldest first: by creation time, then by id (ids grow with time)."""
    return (_created(image), image.id)
