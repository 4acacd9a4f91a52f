"""The run: read the account and the sources, decide, import, rotate, report.

Before anything is sent, the set's images are listed; then each source is probed
for its size and version, and each entry is decided from the account
(:mod:`importer.converge`) as soon as its source has answered: unchanged entries
are settled at once, the others get one task each inside one task group (imports
wait for a submission turn; watching and rotating need none). Imports are handed
their turns largest known file first (:mod:`importer.order`) while the other
sources are still being probed: the first creates do not wait for the last
``HEAD``. The plan is complete, and shown, once every source has answered. Each
task turns its own failures into an :class:`~importer.report.Outcome`; only bugs
and cancellation escape it.

Some failures end the whole run instead, because nothing more can succeed after
them: a 401 (the token is refused; no request is sent after it) and an
unreachable API. A stop asked for from outside (a signal, the deadline) ends it
the same way. Then the other tasks are cancelled, creates already on the wire
are allowed to finish (their answers are journaled), and the report is still
written: images already submitted are ``pending`` (with their ids), the rest
``not_submitted``. A later run resumes them (with the same state, or from the
account alone).

Never a duplicate: a create whose answer is lost is not sent again blindly. The
entry becomes *uncertain*, and the importer looks for the image by the entry's
tag before it sends another create (see :mod:`importer.reconcile`).

Once an entry's image is available, it is copied to the entry's other regions
(:mod:`importer.transfers`), then rotation gives it the entry's name
(:mod:`importer.rotation`, which also keeps what the account showed of each entry).

Each entry's state lives in its :class:`~importer.lifecycle.EntryLifecycle`;
this module only orchestrates.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import anyio
import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock, LoopClock, isoformat
from importer.converge import Action, Decision, created_at, decide
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    ImageVanishedError,
    RateLimitedError,
    RejectedError,
    TransientApiError,
    UncertainCreateError,
)
from importer.governor import Governor, Window
from importer.identity import entry_tag, set_tag
from importer.inventory import Inventory, entry_tag_of, group_tag_of, read_inventory
from importer.journal import MEMORY, PRIVATE, EntryState, Journal, Phase
from importer.lifecycle import EntryLifecycle, State, Turn
from importer.manifest import Entry, Manifest
from importer.order import LargestFirst
from importer.plan import (
    Groups,
    KnownSource,
    PlannedImport,
    RunPlan,
    SourceFacts,
    fallback_version,
    make_plan,
    plan_entry,
)
from importer.poller import StatusPoller
from importer.progress import RunMonitor, Sources, Tally
from importer.reconcile import Reconciler
from importer.redact import redact_text
from importer.report import RUNNING, ImageResult, OrphanResult, Outcome, Report
from importer.rotation import Rotator
from importer.settings import Settings
from importer.sizing import HeadSizer
from importer.sources import SourceProber
from importer.transfers import Transfers

Log = structlog.typing.FilteringBoundLogger
#: The run's report is recorded (journal, and the caller's outputs) this often.
CHECKPOINT_INTERVAL = 60.0


class Stopper:
    """Asks a running import to stop; create it inside the event loop."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.reason: str | None = None

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._event.set()

    async def wait(self) -> str:
        await self._event.wait()
        assert self.reason is not None
        return self.reason


#: How often one entry is decided anew in a run (an image it watched vanished).
MAX_DECISIONS = 3
#: Called with each entry's index and source as they become known.
Found = Callable[[int, SourceFacts], None]
#: Learns the sources of the entries given, telling ``Found`` of each; returns when done.
SourcesFn = Callable[[Sequence[Entry], Found], Awaitable[None]]


async def read_plan(
    manifest: Manifest,
    client: ImagesClient,
    journal: Journal,
    clock: Clock,
    *,
    sources: Mapping[int, SourceFacts] | None = None,
    prune: bool = False,
) -> tuple[RunPlan, Inventory]:
    """Read the account (the set's listing) and decide every entry: sends only GETs.

    Raises :class:`~importer.errors.ApiError` when the account cannot be read:
    nothing may be decided without it.
    """
    the_set = set_tag(manifest.set)
    inventory = await read_inventory(client, the_set)
    items = make_plan(
        manifest,
        sources=sources,
        inventory=inventory,
        journal=journal,
        now=isoformat(clock.wall()),
    )
    own = {item.tag for item in items}
    plan = RunPlan(manifest.set, the_set, items, orphans=inventory.orphans(own), prune=prune)
    return plan, inventory


class Importer:
    """Runs one manifest against one account; :meth:`run` once, then :meth:`results`.

    Orchestration only: what to do next for each entry. What happened is recorded
    by the entry's :class:`~importer.lifecycle.EntryLifecycle`.
    """

    def __init__(
        self,
        manifest: Manifest,
        client: ImagesClient,
        poller: StatusPoller,
        journal: Journal,
        clock: Clock,
        settings: Settings,
        *,
        sources: SourcesFn | None = None,
        prune: bool = False,
        on_plan: Callable[[RunPlan], None] | None = None,
        size_order: bool = True,
        transfers: Transfers,
    ) -> None:
        self._manifest = manifest
        self._set_tag = set_tag(manifest.set)
        self._client = client
        self._poller = poller
        self._journal = journal
        self._clock = clock
        self._settings = settings
        self._sources = sources
        self._prune = prune
        self._on_plan = on_plan
        self._size_order = size_order
        self._by_index = {entry.index: entry for entry in manifest.entries}
        #: The imports waiting for their turn, largest known first.
        self._queue: LargestFirst[EntryLifecycle] | None = None
        # An image's task starts when its turn to submit comes: thousands of
        # tasks queued inside the client would cost memory and nothing else.
        self._turns = anyio.Semaphore(settings.concurrency)
        self._log: Log = structlog.get_logger("importer.pipeline")
        self._entries: dict[int, EntryLifecycle] = {}
        self.plan: RunPlan | None = None
        self.orphans: dict[int, OrphanResult] = {}
        self._transfers = transfers
        #: What the account showed of each entry of the plan; rotation decides from it.
        self._rotator = Rotator(
            client, journal, clock, transfers, set_tag=self._set_tag, log=self._log
        )
        poller.on_listed = self._rotator.listed
        # One listing serves both: the poller hears the transfers' listings, and passes
        # every listing on (see Rotator.listed).
        self._transfers.on_listing = poller.take_listing
        self._reconciler = Reconciler(
            client,
            journal,
            poller,
            clock,
            window=settings.reconcile_after,
            interval=settings.poll_interval,
            importing_group=self._importing_group,
        )
        self._scope: anyio.CancelScope | None = None
        self._run_failures: set[str] = set()
        self.stopped: str | None = None
        #: Set when the run starts stopping early.
        self.stopping = anyio.Event()
        #: Entries by progress label, kept as they change (see :mod:`importer.progress`).
        self.tally = Tally({entry.index: State.PLANNED.value for entry in manifest.entries})
        #: Entries whose report row changed since :meth:`changed_results` last asked (at
        #: first, all of them).
        self._changed: set[int] = {entry.index for entry in manifest.entries}
        #: The interim rows in manifest order, as :meth:`interim_results` last made them,
        #: and the entries changed since (at first, all of them).
        self._interim: dict[int, ImageResult] = {}
        self._interim_changed: set[int] = set(self._changed)

    # -- running ------------------------------------------------------------------

    async def run(self, stopper: Stopper | None = None) -> None:
        self._log.info(
            "run.started",
            images=len(self._manifest.entries),
            set=self._manifest.set,
            api_url=self._settings.api_url,
        )
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._report_progress)
            outer.start_soon(self._poller.run)
            outer.start_soon(self._transfers.run)
            if stopper is not None:
                outer.start_soon(self._stop_when_asked, stopper)
            if self._settings.deadline is not None:
                outer.start_soon(self._stop_at_deadline, self._settings.deadline)
            with anyio.CancelScope() as self._scope:
                inventory = await self._read_account()
                if inventory is not None:
                    await self._plan_and_submit(inventory)
            outer.cancel_scope.cancel()
        for entry in self._entries.values():
            if not entry.done:
                entry.stopped()
            # Deletions an earlier (killed) run left unreported, or whose answer this
            # run never had: the journal names them.
            entry.journaled_deletions(self._journal.unreported_deletions(entry.tag))
        counts = Counter(result.outcome.value for result in self.results())
        self._log.info("run.finished", stopped=self.stopped, **counts)

    def creates_left(self) -> int:
        """About how many creates the run still has to send: the entries waiting for their
        turn (or for their source), and those holding a turn (their create is on its way)."""
        queue = self._queue
        waiting = len(self._manifest.entries) if queue is None else queue.left
        return waiting + self._settings.concurrency - self._turns.value

    def stop(self, reason: str) -> None:
        """End the run early: no new request; unfinished images are reported as such."""
        if self.stopped is None:
            self.stopped = reason
            self._log.warning("run.stopping", reason=reason)
            self.stopping.set()
        if self._scope is not None:
            self._scope.cancel()

    async def _stop_when_asked(self, stopper: Stopper) -> None:
        self.stop(await stopper.wait())

    async def _stop_at_deadline(self, seconds: float) -> None:
        await self._clock.sleep(seconds)
        self.stop("deadline")

    # -- planning -------------------------------------------------------------------

    async def _read_account(self) -> Inventory | None:
        """The set's images, before anything is sent; ``None`` (the run stops) if unreadable."""
        try:
            return await read_inventory(self._client, set_tag(self._manifest.set))
        except AuthenticationError as exc:
            self._fail_run(None, "authentication_failed", exc)
        except ApiUnreachableError as exc:
            self._fail_run(None, "api_unreachable", exc)
        except ApiError as exc:
            # Deciding without the account could only make duplicates.
            self._fail_run(None, "account_unreadable", exc)
        return None

    async def _plan_and_submit(self, inventory: Inventory) -> None:
        """Decide each entry as its source answers; hand imports their turns meanwhile."""
        manifest = self._manifest
        # Not kept in a local: this frame lasts the whole run (a set of 50,000 tags).
        orphans = inventory.orphans(
            {entry_tag(manifest.set, e.name, e.region) for e in manifest.entries}
        )
        self.orphans = {
            image.id: OrphanResult(image.id, image.name, entry_tag_of(image), image.status)
            for image in orphans
        }
        groups = Groups(manifest.set, inventory.groups_in_use())
        queue = self._queue = LargestFirst[EntryLifecycle](
            self._clock, expected=len(manifest.entries), by_size=self._size_order
        )
        now = isoformat(self._clock.wall())
        decided: list[PlannedImport] = []
        turns = self._turns
        # One bound method for every entry, not one each.
        observer = self._entry_changed
        async with anyio.create_task_group() as images:
            if self._prune and orphans:
                images.start_soon(self._prune_orphans, orphans)

            def found(index: int, facts: SourceFacts) -> None:
                entry = self._by_index[index]
                item = plan_entry(
                    manifest.set, entry, facts, inventory=inventory, journal=self._journal, now=now
                )
                if not item.decision.imports and not item.group:
                    item = replace(item, group=groups.first)
                decided.append(item)
                self._rotator.track(item.tag, inventory.entry(item.tag))
                lifecycle = EntryLifecycle(
                    item, self._journal, self._clock, self._log, observer=observer
                )
                self._entries[index] = lifecycle
                self._start(lifecycle, queue, images)

            async def learn_sources() -> None:
                try:
                    if self._sources is None:
                        for entry in manifest.entries:
                            found(entry.index, KnownSource(None, fallback_version(entry)))
                    else:
                        await self._sources(manifest.entries, found)
                finally:
                    queue.close()
                self._planned(decided, orphans)

            images.start_soon(learn_sources)
            while True:
                await turns.acquire()
                lifecycle = await queue.next()
                if lifecycle is None:
                    turns.release()
                    break
                if not lifecycle.item.group:
                    lifecycle.assign_group(groups.next())
                images.start_soon(self._import_one, lifecycle, Turn(turns))

    def _start(
        self,
        entry: EntryLifecycle,
        queue: LargestFirst[EntryLifecycle],
        images: anyio.abc.TaskGroup,
    ) -> None:
        """What an entry needs once decided: a turn to submit, a task, or nothing more."""
        item = entry.item
        decision = item.decision
        if decision.imports:
            queue.add(entry, item.size, rank=item.index)
            return
        queue.expect_fewer()
        if decision.action is Action.ERROR:
            entry.source_failed(decision.error or "the source could not be read")
        elif self._nothing_to_do(item):
            # Most of a nightly run: settled here, without a task.
            assert decision.image is not None
            entry.unchanged(decision.image)
            entry.available(decision.image)
            self._rotator.drop(entry.tag)
        else:
            # Watching or rotating needs no turn to submit.
            images.start_soon(self._import_one, entry, Turn())

    def _planned(self, decided: Sequence[PlannedImport], orphans: Sequence[Image]) -> None:
        """Every source answered: the plan is complete (imports have been under way)."""
        manifest = self._manifest
        imports = sorted(
            (item for item in decided if item.decision.imports),
            key=lambda item: (item.size is not None, -(item.size or 0), item.index),
        )
        others = sorted((item for item in decided if not item.decision.imports), key=_index)
        plan = RunPlan(
            manifest.set,
            set_tag(manifest.set),
            (*imports, *others),
            orphans=tuple(orphans),
            prune=self._prune,
        )
        self.plan = plan
        self._log_plan(plan)
        if self._on_plan is not None:
            self._on_plan(plan)

    def _log_plan(self, plan: RunPlan) -> None:
        counts = plan.counts()
        self._log.info("plan.made", set=plan.set, summary=plan.summary_line(), **counts)
        for fields in plan.entry_events():
            # One line per entry with something to do; ``importer run`` shows the table.
            self._log.debug("plan.entry", **fields)
        for image in plan.orphans:
            self._log.warning("plan.orphan", image_id=image.id, name=image.name, delete=plan.prune)

    # -- executing ------------------------------------------------------------------

    @staticmethod
    def _nothing_to_do(item: PlannedImport) -> bool:
        decision = item.decision
        if decision.action is not Action.UNCHANGED or decision.reconcile or item.transfers:
            return False
        return (
            item.rotation is not None
            and item.rotation.is_empty
            and decision.image is not None
            and decision.image.id == item.rotation.keeper
        )

    async def _import_one(self, entry: EntryLifecycle, turn: Turn) -> None:
        entry.take_turn(turn)
        try:
            await self._import(entry)
        finally:
            entry.close()
            if entry.done:
                # What the account showed of the entry served its decisions; a large
                # run must not keep every image's last answer to the end.
                self._rotator.drop(entry.tag)

    async def _import(self, entry: EntryLifecycle) -> None:
        decision: Decision | None = entry.item.decision
        try:
            for attempt in range(1, MAX_DECISIONS + 1):
                assert decision is not None
                decision = await self._pursue(entry, decision, last=attempt == MAX_DECISIONS)
                if decision is None:
                    return
        except AuthenticationError as exc:
            self._fail_run(entry, "authentication_failed", exc)
        except ApiUnreachableError as exc:
            self._fail_run(entry, "api_unreachable", exc)
        except ApiError as exc:
            # Polling gave up on this image, or an answer no rule foresaw: this
            # entry's failure, not the run's.
            entry.failed(exc.safe_message)

    async def _pursue(
        self, entry: EntryLifecycle, decision: Decision, *, last: bool
    ) -> Decision | None:
        """Carry out one decision; a new one when the entry must be decided again."""
        item = entry.item
        row = entry.row()
        if decision.reconcile and row is not None and row.phase is Phase.CREATING:
            # An earlier run's create whose answer was lost: find its image first.
            entry.resumed_uncertain(row)
            if not decision.imports:
                found = await self._reconciler.find(item, entry.log)
                entry.duplicates_deleted(self._journal_duplicates(entry))
                if found is not None:
                    entry.adopted(found)
                    self._rotator.learn(entry.tag, found)
                    group = group_tag_of(found) or item.group
                    return await self._watch(
                        entry, found.id, group, fresh=False, ours=True, last=last
                    )
        if decision.action is Action.ERROR:
            entry.source_failed(decision.error or "the source could not be read")
            return None
        if decision.action is Action.UNCHANGED:
            assert decision.image is not None
            entry.unchanged(decision.image)
            await self._rotate(entry, decision.image)
            return None
        if decision.action is Action.WATCH:
            return await self._watch_earlier(entry, decision, row, last=last)
        image = await self._submit(entry)
        if image is None:
            return None
        self._rotator.learn(entry.tag, image)
        group = group_tag_of(image) or item.group
        return await self._watch(entry, image.id, group, fresh=True, ours=True, last=last)

    async def _watch_earlier(
        self, entry: EntryLifecycle, decision: Decision, row: EntryState | None, *, last: bool
    ) -> Decision | None:
        """Watch an image an earlier run created, found in the account or the journal."""
        image = decision.image
        if image is not None:
            group = group_tag_of(image) or entry.item.group
            entry.watching(
                image.id,
                image.status,
                submitted_at=created_at(image),
                group=group,
                source="account",
            )
            return await self._watch(entry, image.id, group, fresh=False, ours=False, last=last)
        assert decision.image_id is not None
        group = (row.group if row is not None else None) or entry.item.group
        entry.watching(
            decision.image_id,
            row.status if row is not None else None,
            submitted_at=row.submitted_at if row is not None else None,
            group=group,
            source="journal",
        )
        return await self._watch(
            entry, decision.image_id, group, fresh=False, ours=False, last=last
        )

    async def _watch(
        self,
        entry: EntryLifecycle,
        image_id: int,
        group: str,
        *,
        fresh: bool,
        ours: bool,
        last: bool,
    ) -> Decision | None:
        while True:
            lost: ImageVanishedError | None = None
            try:
                final = await self._wait_for(entry, image_id, fresh, group)
            except ImageVanishedError as exc:
                final, lost = None, exc
            left: tuple[int, ...] = ()
            if self._uncertain_creates(entry) > 0 and entry.state is State.IMPORTING:
                # Whatever the outcome (the image gone too), the entry must not end with
                # a second copy of what its lost creates made, and keeps the best one.
                polled = _polled(image_id, final, lost, entry.result.status)
                swept = await self._reconciler.sweep(entry.item, polled=polled, log=entry.log)
                entry.duplicates_deleted(swept.deleted)
                left = swept.left
                for gone in (*swept.deleted, *left):
                    # Rotation must not delete them again (nor trip over those left).
                    self._rotator.forget(entry.tag, gone)
                kept = swept.kept
                if kept is not None and kept.id != image_id:
                    entry.switched(kept)
                    self._rotator.learn(entry.tag, kept)
                    image_id, fresh, ours, lost = kept.id, False, True, None
                    group = group_tag_of(kept) or entry.item.group
                    if not kept.is_available:
                        continue  # watch the copy kept, within the same timeout
                    final = kept
            break
        if lost is not None:
            if last:
                raise lost
            # Deleted by someone (a person, or another run keeping another copy), or
            # failed and purged before anyone read it.
            return await self._redecide(entry, image_id, lost.safe_message)
        if final is None:
            entry.timed_out(self._settings.image_timeout, note=_left_note(None, left))
            return None
        self._rotator.learn(entry.tag, final)
        if final.is_available:
            await self._rotate(entry, final, left=left)
            await self._linger(entry)
            return None
        error = redact_text(final.error_message) or f"the image turned {final.status}"
        if not ours and not last:
            # An earlier run's import failed: this run imports the entry again.
            return await self._redecide(entry, image_id, error)
        entry.failed(_left_note(error, left) or error, final)
        return None

    async def _linger(self, entry: EntryLifecycle) -> None:
        """A create judged absent on a learned bound may still show a late copy: delete it."""
        keep = entry.result.image_id
        if keep is None or entry.result.outcome is not Outcome.AVAILABLE:
            return
        deleted = await self._reconciler.linger(entry.item, keep=keep, log=entry.log)
        if set(deleted) - set(entry.result.duplicates_deleted):
            entry.duplicates_deleted(deleted)
            for gone in deleted:
                self._rotator.forget(entry.tag, gone)

    async def _redecide(self, entry: EntryLifecycle, image_id: int, error: str) -> Decision:
        """The watched image is gone or failed: decide again from a fresh look at the entry."""
        self._rotator.forget(entry.tag, image_id)
        for image in await self._client.list(tag_name=entry.tag):
            self._rotator.learn(entry.tag, image)
        images = [i for i in self._rotator.images(entry.tag) if i.id != image_id]
        item = entry.item
        decision = decide(
            name=item.entry.name,
            version_tag=item.version_tag,
            source_error=item.source_error,
            images=images,
            row=None,
        )
        entry.lost(error, decision)
        return decision

    async def _wait_for(
        self, entry: EntryLifecycle, image_id: int, fresh: bool, group: str
    ) -> Image | None:
        """The image once it finished, or ``None`` at its timeout (counted from submission)."""
        submitted_at = entry.result.submitted_at
        elapsed = self._clock.wall() - submitted_at if submitted_at is not None else 0.0
        with self._clock.move_on_after(max(0.0, self._settings.image_timeout - elapsed)):
            row = entry.row()
            return await self._poller.wait(
                image_id,
                lambda image: self._saw(entry, image),
                group=group,
                size=entry.item.size,
                submitted_at=submitted_at,
                fresh=fresh,
                sent_at=row.last_sent_at if row is not None else None,
            )
        # Time is up (perhaps between runs): one last look, so that an import that
        # finished or failed meanwhile is reported as what it is (a failed image
        # purged since is reported with the message seen, if any was).
        try:
            image = await self._poller.look(image_id)
        except (TransientApiError, RateLimitedError):
            return None
        self._saw(entry, image)
        return image if image.is_available or image.has_failed else None

    def _saw(self, entry: EntryLifecycle, image: Image) -> None:
        self._rotator.learn(entry.tag, image)
        # A read by id still in flight when a listing ended the watch answers late: the
        # entry has moved on, and the news is only worth the account's view above.
        if entry.state is State.IMPORTING:
            entry.saw(image)

    # -- submitting, without ever making a duplicate --------------------------------

    async def _submit(self, entry: EntryLifecycle) -> Image | None:
        """Create the entry's image, unless the uncertain create before it made one.

        ``None`` when the entry ended without an image.
        """
        item = entry.item
        creates = self._uncertain_creates(entry)
        while True:
            if entry.state is State.UNCERTAIN:
                found = await self._reconciler.find(item, entry.log)
                entry.duplicates_deleted(self._journal_duplicates(entry))
                if found is not None:
                    entry.adopted(found)
                    return found
            if creates >= self._settings.max_creates:
                entry.abandoned(creates)
                return None
            creates += 1
            try:
                image = await self._client.create(
                    item.create_request(), on_send=entry.sending, on_not_sent=entry.not_sent
                )
            except RateLimitedError as exc:
                # Never processed, so never created: the entry stays to be submitted.
                entry.not_submitted(exc.safe_message)
                return None
            except RejectedError as exc:
                entry.rejected(exc.safe_message, exc.status)
                return None
            except UncertainCreateError as exc:
                entry.uncertain(exc.safe_message, creates)
                continue
            entry.submitted(image)
            return image

    def _uncertain_creates(self, entry: EntryLifecycle) -> int:
        row = entry.row()
        return row.uncertain if row is not None else 0

    def _journal_duplicates(self, entry: EntryLifecycle) -> tuple[int, ...]:
        row = entry.row()
        return row.duplicates if row is not None else ()

    def _importing_group(self) -> str | None:
        """The group of the newest import known to be importing: a listing of it, soon
        after its creates, also bounds the listing's lag tightly (see ListingLag)."""
        newest: tuple[float, str] | None = None
        for entry in self._entries.values():
            result = entry.result
            if result.image_id is not None and result.status in ("NEW", "pending"):
                submitted = result.submitted_at or 0.0
                if newest is None or submitted > newest[0]:
                    newest = (submitted, entry.item.group)
        return newest[1] if newest is not None else None

    # -- rotation (see importer.rotation) -------------------------------------------

    async def _rotate(
        self, entry: EntryLifecycle, image: Image, *, left: tuple[int, ...] = ()
    ) -> None:
        """Rotate the entry and end it ``available``.

        ``left``: extra copies the sweep could not delete, named in the entry's error.
        """
        rotated = await self._rotator.rotate(entry, image)
        entry.available(rotated.image, error=_left_note("; ".join(rotated.errors) or None, left))

    async def _prune_orphans(self, orphans: Sequence[Image]) -> None:
        """``--prune``: delete the set's images whose entry left the manifest."""
        try:
            await self._rotator.prune(orphans, self.orphans)
        except AuthenticationError as exc:
            self._fail_run(None, "authentication_failed", exc)
        except ApiUnreachableError as exc:
            self._fail_run(None, "api_unreachable", exc)

    def _fail_run(self, entry: EntryLifecycle | None, reason: str, exc: ApiError) -> None:
        # Every image task that was waiting learns of the one event: it is logged once.
        if reason not in self._run_failures:
            self._run_failures.add(reason)
            self._log.error(f"run.{reason}", error=str(exc))
        if entry is not None:
            entry.note_error(exc.safe_message)
        self.stop(reason)

    # -- reporting ------------------------------------------------------------------

    def _entry_changed(self, entry: EntryLifecycle) -> None:
        """An entry's state or report row changed: count it anew (O(1), not a recount)."""
        index = entry.item.index
        self._changed.add(index)
        self._interim_changed.add(index)
        moved = self.tally.move(index, entry.progress_label)
        if moved and entry.state is State.FINISHED and not entry.result.outcome.is_success:
            self.tally.failed(entry.result)

    async def _report_progress(self) -> None:
        while True:
            await self._clock.sleep(self._settings.progress_interval)
            self._log.info(
                "run.progress",
                total=self.tally.total,
                requests=self._client.requests_sent,
                **dict(self.tally.counts()),
            )

    def results(self) -> tuple[ImageResult, ...]:
        """One result per entry, in manifest order."""
        return tuple(self._result(entry, interim=False) for entry in self._manifest.entries)

    def interim_results(self) -> tuple[ImageResult, ...]:
        """:meth:`results` while the run goes on: an image being imported is ``pending``.

        Only the rows of entries that changed since the last call are made anew; the
        others are the very objects returned then, so that a
        :class:`~importer.report.ReportWriter` renders only the rows that changed.
        """
        rows = self._interim
        if not rows:  # the first call: every entry in manifest order
            for entry in self._manifest.entries:
                rows[entry.index] = self._result(entry, interim=True)
        else:
            for index in self._interim_changed:
                rows[index] = self._result(self._by_index[index], interim=True)
        self._interim_changed = set()
        return tuple(rows.values())

    def changed_results(self) -> tuple[ImageResult, ...]:
        """The interim results of the entries that changed since the last call."""
        changed, self._changed = sorted(self._changed), set()
        return tuple(self._result(self._by_index[index], interim=True) for index in changed)

    def _result(self, entry: Entry, *, interim: bool) -> ImageResult:
        lifecycle = self._entries.get(entry.index)
        if lifecycle is not None:
            return _interim(lifecycle) if interim else lifecycle.result
        # Not decided: the run stopped before the account or the entry's source answered.
        return ImageResult(
            index=entry.index,
            name=entry.name,
            region=entry.region,
            tag=entry_tag(self._manifest.set, entry.name, entry.region),
            outcome=Outcome.NOT_SUBMITTED,
        )


def _index(item: PlannedImport) -> int:
    return item.index


def _polled(
    image_id: int, final: Image | None, lost: ImageVanishedError | None, status: str | None
) -> Image:
    """The watched image as last seen, for the sweep: finished, gone, or still importing."""
    if final is not None:
        return final
    if lost is not None:
        return Image(id=image_id, status="deleted", error_message=lost.safe_message)
    return Image(id=image_id, status=status or "NEW")


def _left_note(error: str | None, left: tuple[int, ...]) -> str | None:
    """``error``, plus the extra copies the API would not delete, if any."""
    # Here, not in importer.rotation: the copies are the reconciler's sweep's, and a
    # timed-out or failed entry names them too; rotation only returns its own errors.
    if not left:
        return error
    ids = ", ".join(str(image_id) for image_id in left)
    note = (
        f"extra copies {ids} could not be deleted (the API refused while they imported): "
        "delete them by hand"
    )
    return f"{error}; {note}" if error else note


def _interim(entry: EntryLifecycle) -> ImageResult:
    if not entry.done and entry.result.image_id is not None:
        return replace(entry.result, outcome=Outcome.PENDING)
    return entry.result


async def run_import(
    manifest: Manifest,
    settings: Settings,
    *,
    clock: Clock | None = None,
    stopper: Stopper | None = None,
    journal: Journal | None = None,
    sizer: HeadSizer | None = None,
    prober: SourceProber | None = None,
    size_order: bool = True,
    prune: bool = False,
    on_plan: Callable[[RunPlan], None] | None = None,
    seed: int | None = None,
    on_start: Callable[[RunMonitor], None] | None = None,
    on_checkpoint: Callable[[Report], None] | None = None,
) -> Report:
    """Make the account hold what ``manifest`` asks for; the report says how each entry ended.

    Raises only for bugs, cancellation, and a state file that cannot be used
    (:class:`~importer.errors.StateLockedError` when another process holds it).
    ``journal`` is an already open journal (the caller closes it); without one,
    ``settings.state_path`` is opened for the run. With a ``prober``, each source is
    asked once (``HEAD``, no API budget) for its size and version; with only a
    ``sizer``, for its size (the version is then the entry's checksum, else its
    URL). Known sizes send the longest imports first, unless ``size_order`` is
    false (the manifest's order then stands). ``prune`` deletes the set's
    images whose entry left the manifest; ``on_plan`` sees the plan before anything
    is sent. Every API failure becomes part of the report; ``report.stopped`` says
    whether the run ended early, and why.

    The run's report so far is recorded in the journal when the run starts, every
    :data:`CHECKPOINT_INTERVAL` of the clock, when it starts stopping, and at the
    end (``importer status`` reads it); ``on_checkpoint`` receives the same report
    at each of those but the first and the last (``stopped`` is ``running`` until
    the run stops), to rewrite outputs that a killed run should leave recent.
    ``on_start`` receives the monitor of the run's progress as the run starts.
    """
    clock = clock or LoopClock()
    rng = random.Random(seed)  # noqa: S311 - jitter, not cryptography
    governor = Governor(
        clock,
        concurrency=settings.concurrency,
        windows=(
            Window(settings.effective_per_minute, settings.minute_window),
            Window(settings.effective_per_hour, 3600.0),
        ),
    )
    started = clock.wall()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_collector_for_a_run())
        if journal is None:
            journal = stack.enter_context(Journal(settings.state_path or PRIVATE))
        async with ImagesClient.open(settings, governor, clock, rng=rng) as client:
            poller = StatusPoller(
                client,
                clock,
                first_poll=settings.first_poll,
                poll_interval=settings.poll_interval,
                image_timeout=settings.image_timeout,
                rng=rng,
            )
            transfers = Transfers(
                client,
                journal,
                clock,
                first_poll=settings.first_poll,
                poll_interval=settings.poll_interval,
                timeout=settings.image_timeout,
                max_transfers=settings.max_transfers,
                # Its own jitter: drawing from the poller's would shift the poller's schedule.
                rng=random.Random(None if seed is None else f"{seed}/transfers"),  # noqa: S311
            )
            importer = Importer(
                manifest,
                client,
                poller,
                journal,
                clock,
                settings,
                sources=source_reader(prober, sizer),
                prune=prune,
                on_plan=on_plan,
                size_order=size_order,
                transfers=transfers,
            )
            # The poller knows what its status checks will need; creates get the rest,
            # and it checks less often when checks would cost creates an hour.
            governor.use_forecast(poller)
            poller.pace_with(governor, importer.creates_left)

            def report(images: tuple[ImageResult, ...], stopped: str | None) -> Report:
                return Report(
                    manifest=manifest.source,
                    api_url=settings.api_url,
                    started_at=started,
                    finished_at=clock.wall(),
                    images=images,
                    requests=client.requests_sent,
                    rate_limited=governor.rate_limited,
                    stopped=stopped,
                    requests_by_endpoint=dict(client.sent),
                    set=manifest.set,
                    orphans=tuple(importer.orphans.values()),
                )

            def interim(images: tuple[ImageResult, ...]) -> Report:
                return report(images, importer.stopped or RUNNING)

            if on_start is not None:
                on_start(
                    RunMonitor(
                        importer.tally,
                        Sources(
                            requests=lambda: client.requests_sent,
                            rate_limited=lambda: governor.rate_limited,
                            hour=governor.hour_usage,
                            expected_end=poller.expected_end,
                            stopping=lambda: importer.stopped,
                        ),
                        clock,
                        started,
                    )
                )
            run_id = journal.run_started(
                _compact(interim(())), _rows(importer.changed_results()), clock.wall()
            )

            def checkpoint() -> None:
                # The journal gets the entries that changed (a 10,000-entry run costs
                # little each minute); the caller's outputs are whole files, rewritten.
                journal.run_recorded(
                    run_id,
                    _compact(interim(())),
                    _rows(importer.changed_results()),
                    clock.wall(),
                    ended=False,
                )
                if on_checkpoint is not None:
                    on_checkpoint(interim(importer.interim_results()))

            async with anyio.create_task_group() as checkpoints:
                checkpoints.start_soon(_checkpoints, importer, clock, checkpoint)
                await importer.run(stopper)
                checkpoints.cancel_scope.cancel()
            final = report(importer.results(), importer.stopped)
            # Every entry has ended (or was never decided): its interim row is its final
            # one, so the rows that changed since the last record complete the journal's
            # copy (rewriting all 50,000 of them cost a second and 20 MB at the end).
            journal.run_recorded(
                run_id, _compact(replace(final, images=())), _rows(importer.changed_results()),
                clock.wall(), ended=True,
            )  # fmt: skip
            journal.deletions_reported(
                [i for r in final.images for i in (*r.duplicates_deleted, *r.deleted)]
            )
    return final


#: The collector's youngest generation is collected after this many allocations (Python's
#: default: 700) while a run lasts.
RUN_GC_THRESHOLD = 10_000


@contextlib.contextmanager
def _collector_for_a_run() -> Iterator[None]:
    """Collect garbage less often while a run lasts, then as before.

    Each request allocates many short-lived objects, and a run keeps one entry's state
    per image: with the default thresholds the collector ran some 3,000 times in a run
    of 10,000 images, promoting short-lived objects and sweeping the long-lived state
    again and again (a fifth of the run's CPU). Collected every 10,000 allocations,
    most of those objects are gone before a collection looks at them.
    """
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], RUN_GC_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _compact(report: Report) -> str:
    """JSON as the journal keeps it: the report file's, without the indentation.

    The run's own fields are kept apart from its images (with ``images=()``: then
    the summary counts nothing, and the reader counts the images it reassembles).
    """
    return json.dumps(report.to_json(), separators=(",", ":"))


def _rows(images: Sequence[ImageResult]) -> list[tuple[int, str]]:
    return [(image.index, json.dumps(image.to_json(), separators=(",", ":"))) for image in images]


async def _checkpoints(importer: Importer, clock: Clock, checkpoint: Callable[[], None]) -> None:
    """Record the report every :data:`CHECKPOINT_INTERVAL`, and once when the run starts stopping.

    A killed run then leaves a report minutes old in the journal and the outputs;
    the one written at the stop remains if a second signal ends the process at once.
    """
    stop_recorded = False
    while True:
        with clock.move_on_after(CHECKPOINT_INTERVAL):
            if stop_recorded:
                await anyio.sleep_forever()
            await importer.stopping.wait()
            stop_recorded = True
        checkpoint()


def source_reader(prober: SourceProber | None, sizer: HeadSizer | None) -> SourcesFn | None:
    """How a run learns its sources: probed (size and version) as each answers, sized
    only (all at once), or not at all (``None``: checksums and URLs are the versions)."""
    if prober is not None:
        probe = prober

        async def probed(entries: Sequence[Entry], found: Found) -> None:
            async with probe.stream(entries) as infos:
                async for info in infos:
                    found(info.index, info)

        return probed
    if sizer is None:
        return None
    known = sizer

    async def sized(entries: Sequence[Entry], found: Found) -> None:
        sizes = await known.sizes(entries)
        for entry in entries:
            found(entry.index, KnownSource(sizes.get(entry.index), fallback_version(entry)))

    return sized


async def plan_only(
    manifest: Manifest,
    settings: Settings,
    *,
    clock: Clock | None = None,
    journal: Journal | None = None,
    prober: SourceProber | None = None,
    prune: bool = False,
) -> RunPlan:
    """``importer plan``: read the sources and the account, decide; send no POST, PUT or DELETE.

    Raises :class:`~importer.errors.ApiError` when the account cannot be read.
    """
    clock = clock or LoopClock()
    governor = Governor(
        clock,
        concurrency=settings.concurrency,
        windows=(
            Window(settings.effective_per_minute, settings.minute_window),
            Window(settings.effective_per_hour, 3600.0),
        ),
    )
    sources = await prober.probe_all(manifest.entries) if prober is not None else None
    with contextlib.ExitStack() as stack:
        if journal is None:
            journal = stack.enter_context(Journal(settings.state_path or MEMORY))
        async with ImagesClient.open(settings, governor, clock) as client:
            plan, _ = await read_plan(
                manifest, client, journal, clock, sources=sources, prune=prune
            )
    return plan
