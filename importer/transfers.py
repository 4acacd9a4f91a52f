"""Copies of an image in its other regions: transfer actions, learned from group listings.

A custom image lives in the one region it was imported into. A manifest entry's
``regions`` asks for more: the image is imported into the first, and reaches each
other one by a *transfer* (``POST /v2/images/{id}/actions`` with ``{"type":
"transfer", "region": R}``, answered ``201`` with an action ``in-progress``). A
transfer is a copy, and a region can never be removed from an image.

When. Once the entry's image of the current version is ``available``, and before
rotation gives it the entry's name (:mod:`importer.pipeline`): the name moves to
a new version only once that version is where the manifest needs it (or its
transfers failed, see below), so that whoever looks the image up by name in
``ams3`` never finds one that is not there. A first import is named at once (there
is no older version to keep the name meanwhile). An unchanged image missing a
region gets only the transfer; older versions that rotation keeps are never
transferred. All of an image's transfers run side by side, and every request
goes through the governor, like any other.

How completion is learned. The image's ``regions`` array shows a region only once
its copy is complete, and every image in a group listing carries it. So no request
is spent per transfer: the image stays watched through its *group's* listing
(``GET /v2/images?tag_name=<group tag>``, 200 images a page), the listing the
status poller (:mod:`importer.poller`) makes anyway while images of that group
import. Whoever lists a group, the poller or :class:`Transfers`, the other hears
of it, so a group is listed at most about once per poll interval for both. When a
transfer is due is learned as imports are: from the transfers seen finishing,
against the image's size (:class:`~importer.poller.DurationModel`).

The listing cannot tell an errored transfer from a slow one: an errored copy never
shows. So a transfer that is still not shown long after it should have finished
(twice the learned late bound plus an interval; eight first polls before anything
is learned), or whose image its group's listing has not shown three times, or near
its timeout, is asked for by its action (``GET /v2/actions/{id}``): the fallback,
not the rule.

Failures. An errored action, a refused transfer (a 4xx other than 401/429, after
which the next listing is read first: the region may be there already) or a
transfer whose answer was lost and whose region never showed is one failed
attempt. A region gets at most ``max_transfers`` attempts in a run (default 3),
then it is reported ``transfer_failed: <why>``; the image itself stays, available
and named, and the entry ends ``available`` with an ``error`` (exit 1): the next
run, finding it unchanged but missing that region, sends the transfer again. A
transfer not done within ``image_timeout`` of its start is left in flight
(``transferring``), also with an ``error``; the next run watches it.

Crash safety. A transfer is journaled before it leaves (``sending``), its action id
as soon as the answer comes (``in-progress``), and how it ended. A rerun finds a
transfer still in flight in the journal and watches it rather than sending a
second one; with the state lost, the account's ``regions`` is the truth (a region
already there needs nothing), and a copy still in flight is sent again (a
duplicate transfer costs a request, never a duplicate image).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import anyio
import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RateLimitedError,
    RejectedError,
    TransientApiError,
    UncertainCreateError,
)
from importer.governor import Priority
from importer.inventory import GROUP_TAG_PREFIX
from importer.journal import Journal
from importer.poller import DurationModel, next_check, overdue
from importer.schedule import (
    LAST_CALL_SHARE,
    DueQueue,
    batch_window,
    last_call_due,
    not_after_last_call,
)

#: The states of a region the image is transferred to, as the report gives them.
TRANSFERRED = "transferred"
TRANSFERRING = "transferring"
NOT_TRANSFERRED = "not_transferred"
TRANSFER_FAILED = "transfer_failed"
#: Listings of its group that may miss an image before its action is asked for.
UNLISTED_CHECKS = 3


def failed_state(error: str) -> str:
    """``transfer_failed: <why>``, the report's word for a region no transfer reached."""
    return f"{TRANSFER_FAILED}: {error}"


class TransferRecorder(Protocol):
    """What :class:`Transfers` records on the entry whose image it copies
    (:class:`importer.lifecycle.EntryLifecycle`: journal, report and log)."""

    @property
    def tag(self) -> str: ...

    def transfer_sending(self, region: str, image_id: int) -> None: ...

    def transfer_not_sent(self, region: str) -> None: ...

    def transfer_started(self, region: str, action_id: int) -> None: ...

    def transfer_resumed(self, region: str, action_id: int | None) -> None: ...

    def transfer_uncertain(self, region: str, error: str) -> None: ...

    def transferred(self, region: str) -> None: ...

    def transfer_errored(self, region: str, error: str, attempt: int) -> None: ...

    def transfer_failed(self, region: str, error: str) -> None: ...

    def transfer_unfinished(self, region: str, error: str) -> None: ...


class Ending(StrEnum):
    """How watching one transfer ended."""

    #: The region shows in the image's ``regions`` (or its action completed).
    COMPLETED = "completed"
    #: Its action errored.
    ERRORED = "errored"
    #: Its answer was lost (no action id) and the region never showed.
    LOST = "lost"
    #: Asked for one listing only (after a refused transfer): the region is not there.
    ABSENT = "absent"
    #: The image is gone (failed, deleted) or its action unknown.
    GONE = "gone"


@dataclass(eq=False)
class _Watch:
    image_id: int
    region: str
    group: str
    size: int | None
    action_id: int | None
    #: Monotonic time the transfer started.
    started: float
    #: Resolve at the first listing of the group, whatever it shows.
    once: bool = False
    due: float = 0.0
    checks: int = 0
    #: The last time a listing showed the image without the region, if one did.
    last_missing: float | None = None
    #: Listings of the group since the watch began that did not show the image.
    unlisted: int = 0
    next_direct: float = 0.0
    directs: int = 0
    result: Ending | BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class Transfers:
    """Sends each entry's transfers, and watches them all through group listings.

    :meth:`run` is one background task for the whole run; each entry's task calls
    :meth:`distribute`. :meth:`observe` hears every group listing, whoever made it.
    """

    def __init__(
        self,
        client: ImagesClient,
        journal: Journal,
        clock: Clock,
        *,
        first_poll: float,
        poll_interval: float,
        timeout: float,
        max_transfers: int,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._journal = journal
        self._clock = clock
        self._first_poll = first_poll
        self._interval = poll_interval
        self._timeout = timeout
        self._max = max_transfers
        # Every transfer's action is asked for once before its timeout: an errored one
        # is reported as errored, never as unfinished.
        self._last_call = LAST_CALL_SHARE * timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log = structlog.get_logger("importer.transfers")
        self._watches: dict[tuple[int, str], _Watch] = {}
        self._queue = DueQueue(
            clock, self._watches, key=lambda watch: (watch.image_id, watch.region), rng=self._rng
        )
        #: The regions the latest listing showed, for each image being distributed.
        self._regions: dict[int, frozenset[str]] = {}
        self.model = DurationModel()
        #: Given each listing this class makes (group, images), instead of
        #: :meth:`observe`: the pipeline hands it to the status poller, which tells
        #: everyone (this class included).
        self.on_listing: Callable[[str, Sequence[Image]], None] | None = None

    # -- the entries' side ----------------------------------------------------------

    async def distribute(
        self,
        entry: TransferRecorder,
        image: Image,
        regions: Sequence[str],
        *,
        group: str,
        size: int | None = None,
    ) -> list[str]:
        """Copy ``image`` to each of ``regions`` it is not in yet, side by side.

        Returns one problem per region that no transfer reached (or that is still in
        flight at its timeout), for the entry's ``error``. Raises only what ends the
        run (a refused token, an unreachable API) and cancellation.
        """
        missing = [region for region in regions if region not in image.regions]
        if not missing:
            return []
        self._regions[image.id] = frozenset(image.regions)
        problems: dict[str, str] = {}
        fatal: list[ApiError] = []
        try:
            async with anyio.create_task_group() as side_by_side:
                for region in missing:
                    side_by_side.start_soon(
                        self._transfer,
                        entry,
                        image.id,
                        region,
                        group,
                        size,
                        problems,
                        (fatal, side_by_side.cancel_scope),
                    )
        finally:
            self._regions.pop(image.id, None)
        if fatal:
            raise fatal[0]
        return [problems[region] for region in missing if region in problems]

    async def _transfer(
        self,
        entry: TransferRecorder,
        image_id: int,
        region: str,
        group: str,
        size: int | None,
        problems: dict[str, str],
        stop: tuple[list[ApiError], anyio.CancelScope],
    ) -> None:
        try:
            problem = await self._reach(entry, image_id, region, group, size)
        except (AuthenticationError, ApiUnreachableError) as exc:
            # The run ends: the other regions' transfers need not go on.
            fatal, scope = stop
            fatal.append(exc)
            scope.cancel()
            return
        except ApiError as exc:
            # An answer no rule foresaw: this region's failure, not the run's.
            entry.transfer_failed(region, exc.safe_message)
            problem = f"failed: {exc.safe_message}"
        if problem is not None:
            problems[region] = f"transfer to {region} {problem}"

    async def _reach(
        self, entry: TransferRecorder, image_id: int, region: str, group: str, size: int | None
    ) -> str | None:
        """Get the image into ``region``; what went wrong if it did not get there
        (``failed: <why>``, or ``not done within ...``)."""
        row = self._journal.transfer(entry.tag, region)
        resume = (
            row if row is not None and row.image_id == image_id and row.phase.in_flight else None
        )
        attempts = 0
        error = "no transfer was sent"
        while True:
            if region in self._regions.get(image_id, frozenset()):
                entry.transferred(region)
                return None
            if resume is not None:
                action_id, started_at = resume.action_id, resume.started_at
                entry.transfer_resumed(region, action_id)
                resume = None
            else:
                if attempts >= self._max:
                    failure = f"{error} ({attempts} attempts)"
                    entry.transfer_failed(region, failure)
                    return f"failed: {failure}"
                attempts += 1
                try:
                    action = await self._client.transfer(
                        image_id,
                        region,
                        on_send=lambda: entry.transfer_sending(region, image_id),
                        on_not_sent=lambda: entry.transfer_not_sent(region),
                    )
                except (AuthenticationError, ApiUnreachableError):
                    raise
                except RejectedError as exc:
                    error = f"refused: {exc.safe_message}"
                    entry.transfer_errored(region, error, attempts)
                    if exc.status == 404:
                        entry.transfer_failed(region, "the image no longer exists")
                        return "failed: the image no longer exists"
                    # Perhaps the region is there already: the next listing tells.
                    check = await self._watch(image_id, region, group, size, None, None, once=True)
                    if check is Ending.COMPLETED:
                        entry.transferred(region)
                        return None
                    continue
                except UncertainCreateError as exc:
                    # The copy may have started: watch for the region, then try again.
                    action_id = None
                    entry.transfer_uncertain(region, exc.safe_message)
                    started_at = self._clock.wall()
                except ApiError as exc:
                    # The API kept answering 429 or failing: certainly not started.
                    error = exc.safe_message
                    entry.transfer_errored(region, error, attempts)
                    continue
                else:
                    # Counted from the answer: the governor may have held the request.
                    action_id = action.id
                    entry.transfer_started(region, action.id)
                    started_at = self._clock.wall()
            remaining = self._timeout - (self._clock.wall() - started_at)
            ending: Ending | None = None
            with self._clock.move_on_after(max(0.0, remaining)):
                ending = await self._watch(image_id, region, group, size, action_id, started_at)
            if ending is None:
                unfinished = (
                    f"not done within {self._timeout:.0f} s of its start (still in flight; "
                    "the next run watches it)"
                )
                entry.transfer_unfinished(region, unfinished)
                return unfinished
            if ending is Ending.COMPLETED:
                entry.transferred(region)
                return None
            if ending is Ending.GONE:
                gone = "the image or its transfer action is gone"
                entry.transfer_failed(region, gone)
                return f"failed: {gone}"
            if ending is Ending.LOST:
                error = f"its answer was lost and {region} never showed"
            else:
                error = "the transfer action errored"
            entry.transfer_errored(region, error, attempts)

    # -- watching -------------------------------------------------------------------

    async def _watch(
        self,
        image_id: int,
        region: str,
        group: str,
        size: int | None,
        action_id: int | None,
        started_at: float | None,
        *,
        once: bool = False,
    ) -> Ending:
        now = self._clock.monotonic()
        started = now
        if started_at is not None:
            started = now - max(0.0, self._clock.wall() - started_at)
        watch = _Watch(image_id, region, group, size, action_id, started, once=once)
        self._watches[(image_id, region)] = watch
        self._queue.set_due(watch, now if once else self._first_check(watch, now))
        try:
            await watch.done.wait()
        finally:
            if self._watches.get((image_id, region)) is watch:
                del self._watches[(image_id, region)]
        if isinstance(watch.result, BaseException):
            raise watch.result
        assert watch.result is not None
        return watch.result

    def observe(self, images: Sequence[Image]) -> None:
        """A group listing: the regions of every image in it (whoever listed it)."""
        if not self._regions and not self._watches:
            return  # most listings, in a run without regions
        now = self._clock.monotonic()
        for listed in images:
            if listed.id in self._regions:
                self._regions[listed.id] = frozenset(listed.regions)
        # A listing of a group shows every live image of it: a watched image of a group
        # this listing was of, missing from it, counts one more listing without it.
        groups = {
            tag for one in images for tag in one.tags or () if tag.startswith(GROUP_TAG_PREFIX)
        }
        next_listing = now + self._interval * self._rng.uniform(0.9, 1.1)
        by_id = {listed.id: listed for listed in images}
        for watch in list(self._watches.values()):
            if watch.done.is_set():
                continue
            image = by_id.get(watch.image_id)
            if image is None:
                if watch.group in groups:
                    watch.unlisted += 1
                    if watch.once:
                        self._resolve(watch, Ending.ABSENT)
                continue
            if image.has_failed:
                self._resolve(watch, Ending.GONE)
            elif watch.region in image.regions:
                if watch.last_missing is not None:
                    # It finished between the listing that last missed it and this one.
                    finished = (watch.last_missing + now) / 2
                    self.model.observe(watch.size, finished - watch.started)
                self._resolve(watch, Ending.COMPLETED)
            elif watch.once:
                self._resolve(watch, Ending.ABSENT)
            else:
                watch.last_missing = now
                watch.unlisted = 0
                if watch.due < next_listing:
                    # Seen this very moment: not due again before the next interval.
                    self._queue.set_due(watch, next_listing)

    # -- the background task --------------------------------------------------------

    async def run(self) -> None:
        """Check due transfers forever (the pipeline cancels this when the run ends)."""
        while True:
            due = self._queue.pop_due(batch_window(self._interval))
            if not due:
                await self._queue.sleep_until_next()
                continue
            async with anyio.create_task_group() as listings:
                for group in sorted({watch.group for watch in due}):
                    listings.start_soon(self._list, group)
            now = self._clock.monotonic()
            async with anyio.create_task_group() as asks:
                for watch in due:
                    if watch.done.is_set():
                        continue
                    if self._should_ask(watch, now):
                        asks.start_soon(self._ask, watch)
                    elif watch.due <= now + batch_window(self._interval):
                        self._queue.schedule(watch, self._next_check(watch, now))

    async def _list(self, group: str) -> None:
        try:
            images = await self._client.list(tag_name=group, priority=Priority.STATUS)
        except (TransientApiError, RateLimitedError, RejectedError) as exc:
            # A listing that failed says nothing: the transfers are checked again later.
            self._log.warning("group.poll_failed", group=group, reason=str(exc))
            return
        except ApiError as exc:
            # A 401 or an unreachable API: each waiting entry receives it, and the run ends.
            for watch in [w for w in self._watches.values() if w.group == group]:
                self._resolve(watch, exc)
            return
        if self.on_listing is not None:
            self.on_listing(group, images)
        else:
            self.observe(images)

    async def _ask(self, watch: _Watch) -> None:
        """The fallback: the transfer's action, by id (``GET /v2/actions/{id}``)."""
        watch.directs += 1
        now = self._clock.monotonic()
        if watch.action_id is None:
            # Its answer was lost: no action to ask for, and the region never showed.
            self._resolve(watch, Ending.LOST)
            return
        try:
            action = await self._client.action(watch.action_id, priority=Priority.STATUS)
        except (TransientApiError, RateLimitedError) as exc:
            self._log.warning("transfer.poll_failed", action_id=watch.action_id, reason=str(exc))
        except RejectedError:
            self._resolve(watch, Ending.GONE)
            return
        except ApiError as exc:
            self._resolve(watch, exc)
            return
        else:
            if action.completed:
                self._resolve(watch, Ending.COMPLETED)
                return
            if action.errored:
                self._resolve(watch, Ending.ERRORED)
                return
        # Asked and still copying: ask that way again only after a while.
        watch.next_direct = now + self._interval * 2 ** min(watch.directs, 6)
        self._queue.schedule(watch, self._next_check(watch, self._clock.monotonic()))

    # -- scheduling ---------------------------------------------------------------------

    def _should_ask(self, watch: _Watch, now: float) -> bool:
        """Whether only the action can tell what became of this transfer."""
        if watch.once or now < watch.next_direct:
            return False
        last_call = watch.started + self._last_call
        if last_call_due(last_call=last_call, asked=watch.directs > 0, now=now):
            return True
        if watch.unlisted >= UNLISTED_CHECKS:
            return True
        return overdue(
            self.model,
            watch.size,
            now - watch.started,
            interval=self._interval,
            first_poll=self._first_poll,
        )

    def _first_check(self, watch: _Watch, now: float) -> float:
        if self.model.ready:
            when = max(now, watch.started + self.model.early(watch.size))
        else:
            when = max(now, watch.started + self._first_poll)
        return self._not_after_last_call(watch, when)

    def _next_check(self, watch: _Watch, now: float) -> float:
        watch.checks += 1
        when = next_check(
            self.model, watch.size, watch.started, now, checks=watch.checks, interval=self._interval
        )
        return self._not_after_last_call(watch, when)

    def _not_after_last_call(self, watch: _Watch, when: float) -> float:
        return not_after_last_call(
            when,
            last_call=watch.started + self._last_call,
            asked=watch.directs > 0,
            now=self._clock.monotonic(),
        )

    def _resolve(self, watch: _Watch, result: Ending | BaseException) -> None:
        if not watch.done.is_set():
            watch.result = result
            watch.done.set()
