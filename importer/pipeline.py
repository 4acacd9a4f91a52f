"""The run: submit every planned import under the governor, wait for each, report.

One task per image inside one task group. Each task turns its own failures into
an :class:`~importer.report.Outcome`; only bugs and cancellation escape it.

Some failures end the whole run instead, because nothing more can succeed after
them: a 401 (the token is refused; no request is sent after it) and an
unreachable API. A stop asked for from outside (a signal, the deadline) ends it
the same way. Then the other tasks are cancelled, creates already on the wire
are allowed to finish (their answers are journaled), and the report is still
written: images already submitted are ``pending`` (with their ids), the rest
``not_submitted``. A later run with the same state resumes them.

Never a duplicate: a create whose answer is lost is not sent again blindly. The
entry becomes *uncertain*, and the importer looks for the image by the entry's
tag before it sends another create (see :meth:`Importer._reconcile`).
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import anyio
import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock, LoopClock
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RateLimitedError,
    RejectedError,
    TransientApiError,
    UncertainCreateError,
)
from importer.governor import Governor, Window
from importer.journal import MEMORY, EntryState, Journal, Phase
from importer.manifest import Manifest
from importer.plan import GROUP_TAG_PREFIX, PlannedImport, make_plan
from importer.poller import StatusPoller
from importer.reconcile import Reconciler
from importer.redact import redact_text
from importer.report import ImageResult, Outcome, Report
from importer.settings import Settings
from importer.sizing import HeadSizer

Log = structlog.typing.FilteringBoundLogger


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


class _Turn:
    """One entry's turn to submit, handed back exactly once."""

    def __init__(self, semaphore: anyio.Semaphore | None) -> None:
        self._semaphore = semaphore

    def done(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


@dataclass
class _Progress:
    """What is known of one entry so far (mutable: only the run touches it)."""

    result: ImageResult
    done: bool = False


class Importer:
    """Runs one plan against one API; :meth:`run` once, then :meth:`results`."""

    def __init__(
        self,
        plan: Sequence[PlannedImport],
        client: ImagesClient,
        poller: StatusPoller,
        journal: Journal,
        clock: Clock,
        settings: Settings,
    ) -> None:
        self._plan = tuple(plan)
        self._client = client
        self._poller = poller
        self._journal = journal
        self._clock = clock
        self._settings = settings
        self._log: Log = structlog.get_logger("importer.pipeline")
        self._progress = {
            item.index: _Progress(
                ImageResult(
                    index=item.index,
                    name=item.entry.name,
                    region=item.entry.region,
                    tag=item.tag,
                    outcome=Outcome.NOT_SUBMITTED,
                )
            )
            for item in self._plan
        }
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

    # -- running ------------------------------------------------------------------

    async def run(self, stopper: Stopper | None = None) -> None:
        self._log.info("run.started", images=len(self._plan), api_url=self._settings.api_url)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._report_progress)
            outer.start_soon(self._poller.run)
            if stopper is not None:
                outer.start_soon(self._stop_when_asked, stopper)
            if self._settings.deadline is not None:
                outer.start_soon(self._stop_at_deadline, self._settings.deadline)
            with anyio.CancelScope() as self._scope:
                # An image's task starts when its turn to submit comes: thousands of
                # tasks queued inside the client would cost memory and nothing else.
                turns = anyio.Semaphore(self._settings.concurrency)
                async with anyio.create_task_group() as images:
                    # Entries an earlier run submitted or finished need no turn.
                    to_submit = []
                    for item in self._plan:
                        state = self._journal.get(item.tag)
                        if state is not None and state.phase in (Phase.SUBMITTED, Phase.FINISHED):
                            images.start_soon(self._import_one, item, _Turn(None))
                        else:
                            to_submit.append(item)
                    for item in to_submit:
                        await turns.acquire()
                        images.start_soon(self._import_one, item, _Turn(turns))
            outer.cancel_scope.cancel()
        self._finish_unfinished()
        counts = Counter(p.result.outcome.value for p in self._progress.values())
        self._log.info("run.finished", stopped=self.stopped, **counts)

    def stop(self, reason: str) -> None:
        """End the run early: no new request; unfinished images are reported as such."""
        if self.stopped is None:
            self.stopped = reason
            self._log.warning("run.stopping", reason=reason)
        if self._scope is not None:
            self._scope.cancel()

    async def _stop_when_asked(self, stopper: Stopper) -> None:
        self.stop(await stopper.wait())

    async def _stop_at_deadline(self, seconds: float) -> None:
        await self._clock.sleep(seconds)
        self.stop("deadline")

    async def _import_one(self, item: PlannedImport, turn: _Turn) -> None:
        try:
            await self._import(item, turn)
        finally:
            turn.done()

    async def _import(self, item: PlannedImport, turn: _Turn) -> None:
        log = self._log.bind(index=item.index, name=item.entry.name, region=item.entry.region)
        state = self._journal.get(item.tag)
        if state is not None and state.phase is Phase.FINISHED:
            self._restore(item, state)
            log.info("image.resumed", outcome=state.outcome, image_id=state.image_id)
            return
        try:
            submitted = await self._ensure_submitted(item, state, log, turn)
            if submitted is None:
                return
            image_id, fresh, group = submitted
            while True:
                lost: str | None = None
                try:
                    final = await self._wait_for(item, image_id, fresh, group, log)
                except (AuthenticationError, ApiUnreachableError):
                    raise
                except ApiError as exc:
                    # Polling gave up on this image (e.g. it vanished), or an answer no
                    # rule foresaw: this image's failure, not the run's.
                    final, lost = None, exc.safe_message
                left: tuple[int, ...] = ()
                if self._journal_uncertain(item) > 0:
                    # Whatever the outcome, the entry must not end with a second live
                    # image, and keeps the best copy its creates made.
                    polled = self._polled(item, image_id, final, lost)
                    swept = await self._reconciler.sweep(item, polled=polled, log=log)
                    self._update(item, duplicates_deleted=swept.deleted)
                    left = swept.left
                    kept = swept.kept
                    if kept is not None and kept.id != image_id:
                        self._kept(item, kept, log)
                        image_id, fresh, lost = kept.id, False, None
                        group = _group_of(kept, item)
                        if not kept.is_available:
                            continue  # watch the copy kept, within the same timeout
                        final = kept
                break
            if lost is not None:
                self._finish(item, Outcome.FAILED, error=lost)
                log.warning("image.failed", image_id=image_id, error=lost)
            elif final is None:
                error = _left_note("timed out waiting for the import", left)
                self._finish(item, Outcome.TIMED_OUT, error=error)
                log.warning(
                    "image.timed_out", image_id=image_id, timeout=self._settings.image_timeout
                )
            else:
                self._finished_with(item, final, log, left=left)
        except AuthenticationError as exc:
            self._fail_run(item, "authentication_failed", exc)
        except ApiUnreachableError as exc:
            self._fail_run(item, "api_unreachable", exc)
        except ApiError as exc:
            # Polling gave up on this image (e.g. it vanished), or an answer no rule
            # foresaw: this image's failure, not the run's.
            self._finish(item, Outcome.FAILED, error=exc.safe_message)
            log.warning("image.failed", error=exc.safe_message)

    async def _wait_for(
        self, item: PlannedImport, image_id: int, fresh: bool, group: str, log: Log
    ) -> Image | None:
        """The image once it finished, or ``None`` at its timeout (counted from submission)."""
        submitted_at = self._progress[item.index].result.submitted_at
        elapsed = self._clock.wall() - submitted_at if submitted_at is not None else 0.0
        with self._clock.move_on_after(max(0.0, self._settings.image_timeout - elapsed)):
            state = self._journal.get(item.tag)
            return await self._poller.wait(
                image_id,
                lambda i: self._saw(item, i, log),
                group=group,
                size=item.size,
                submitted_at=submitted_at,
                fresh=fresh,
                sent_at=state.last_sent_at if state is not None else None,
            )
        # Time is up (perhaps between runs): one last look, so that an import that
        # finished or failed meanwhile is reported as what it is (a failed image
        # purged since is reported with the message seen, if any was).
        try:
            image = await self._poller.look(image_id)
        except (TransientApiError, RateLimitedError):
            return None
        self._saw(item, image, log)
        return image if image.is_available or image.has_failed else None

    def _polled(
        self, item: PlannedImport, image_id: int, final: Image | None, lost: str | None
    ) -> Image:
        """The entry's image as last seen, for the sweep: finished, gone, or still importing."""
        if final is not None:
            return final
        if lost is not None:
            return Image(id=image_id, status="deleted", error_message=lost)
        return Image(id=image_id, status=self._progress[item.index].result.status or "NEW")

    def _kept(self, item: PlannedImport, image: Image, log: Log) -> None:
        """Another copy of the entry's (available first, then the oldest) is its image now."""
        self._journal.submitted(item.tag, image.id, image.status, self._clock.wall())
        self._update(item, image_id=image.id, status=image.status)
        log.info("image.kept", image_id=image.id, status=image.status)

    # -- submitting, without ever making a duplicate --------------------------------

    async def _ensure_submitted(
        self, item: PlannedImport, state: EntryState | None, log: Log, turn: _Turn
    ) -> tuple[int, bool, str] | None:
        """The entry's image id, creating the image if (and only if) it does not exist.

        Also says whether this run created it just now, and the group tag the
        image carries. ``turn`` is handed back once the first create has an
        answer (or none is needed), so that the next entry may start.
        """
        if state is not None and state.phase is Phase.SUBMITTED and state.image_id is not None:
            turn.done()
            self._update(
                item, image_id=state.image_id, status=state.status, submitted_at=state.submitted_at
            )
            log.info("image.resumed", image_id=state.image_id, status=state.status)
            return state.image_id, False, state.group or item.group
        uncertain = state is not None and state.phase is Phase.CREATING
        if state is not None and uncertain and state.uncertain < state.creates_sent:
            # A previous run sent a create and was stopped (or killed) before it
            # learned the outcome: count that create as uncertain, once.
            self._journal.uncertain(item.tag, self._clock.wall())
        creates = self._journal_uncertain(item)
        while True:
            if uncertain:
                turn.done()  # reconciling may take long; let the next entry go
                found = await self._reconciler.find(item, log)
                self._update(item, duplicates_deleted=self._journal_duplicates(item))
                if found is not None:
                    group = _group_of(found, item)
                    return self._submitted(item, found, log, adopted=True), False, group
            if creates >= self._settings.max_creates:
                error = f"gave up after {creates} creates whose outcome stayed unknown"
                self._finish(item, Outcome.FAILED, error=error)
                log.error("image.abandoned", creates=creates)
                return None
            creates += 1
            try:
                image = await self._client.create(
                    item.create_request(),
                    on_send=lambda: self._journal.creating(
                        item.tag,
                        item.entry.name,
                        item.entry.region,
                        self._clock.wall(),
                        group=item.group,
                    ),
                    on_not_sent=lambda: self._journal.not_sent(item.tag),
                )
            except RateLimitedError as exc:
                # Never processed, so never created: the entry stays to be submitted.
                turn.done()
                self._update(item, error=exc.safe_message)
                log.warning("image.not_submitted", error=exc.safe_message)
                return None
            except RejectedError as exc:
                turn.done()
                self._finish(item, Outcome.REJECTED, error=exc.safe_message)
                log.warning("image.rejected", status=exc.status, error=exc.safe_message)
                return None
            except UncertainCreateError as exc:
                turn.done()
                self._journal.uncertain(item.tag, self._clock.wall())
                log.warning("image.uncertain", error=exc.safe_message, creates=creates)
                uncertain = True
                continue
            turn.done()
            return self._submitted(item, image, log, adopted=False), True, item.group

    def _journal_uncertain(self, item: PlannedImport) -> int:
        state = self._journal.get(item.tag)
        return state.uncertain if state is not None else 0

    def _journal_duplicates(self, item: PlannedImport) -> tuple[int, ...]:
        state = self._journal.get(item.tag)
        return state.duplicates if state is not None else ()

    def _submitted(self, item: PlannedImport, image: Image, log: Log, *, adopted: bool) -> int:
        now = self._clock.wall()
        self._journal.submitted(item.tag, image.id, image.status, now)
        self._update(item, image_id=image.id, status=image.status, submitted_at=now)
        log.info("image.adopted" if adopted else "image.submitted", image_id=image.id, tag=item.tag)
        return image.id

    def _importing_group(self) -> str | None:
        for item in self._plan:
            result = self._progress[item.index].result
            if result.image_id is not None and result.status in ("NEW", "pending"):
                return item.group
        return None

    # -- watching -------------------------------------------------------------------

    def _saw(self, item: PlannedImport, image: Image, log: Log) -> None:
        if self._progress[item.index].result.status != image.status:
            log.info("image.status", image_id=image.id, status=image.status)
            self._journal.status(item.tag, image.status, self._clock.wall())
        self._update(item, status=image.status)

    def _finished_with(
        self, item: PlannedImport, image: Image, log: Log, *, left: tuple[int, ...] = ()
    ) -> None:
        if image.is_available:
            self._finish(item, Outcome.AVAILABLE, error=_left_note(None, left))
            log.info("image.available", image_id=image.id)
        else:
            error = redact_text(image.error_message) or f"the image turned {image.status}"
            self._finish(item, Outcome.FAILED, error=_left_note(error, left))
            log.warning("image.failed", image_id=image.id, status=image.status, error=error)

    def _fail_run(self, item: PlannedImport, reason: str, exc: ApiError) -> None:
        # Every image task that was waiting learns of the one event: it is logged once.
        if reason not in self._run_failures:
            self._run_failures.add(reason)
            self._log.error(f"run.{reason}", error=str(exc))
        self._update(item, error=exc.safe_message)
        self.stop(reason)

    # -- bookkeeping --------------------------------------------------------------

    def _update(self, item: PlannedImport, **changes: object) -> None:
        progress = self._progress[item.index]
        progress.result = replace(progress.result, **changes)  # type: ignore[arg-type]

    def _finish(self, item: PlannedImport, outcome: Outcome, *, error: str | None = None) -> None:
        progress = self._progress[item.index]
        now = self._clock.wall()
        progress.result = replace(progress.result, outcome=outcome, error=error, finished_at=now)
        progress.done = True
        self._journal.finished(
            item.tag, item.entry.name, item.entry.region, outcome.value, error, now
        )

    def _restore(self, item: PlannedImport, state: EntryState) -> None:
        progress = self._progress[item.index]
        progress.result = replace(
            progress.result,
            outcome=Outcome(state.outcome or Outcome.FAILED),
            image_id=state.image_id,
            status=state.status,
            error=state.error,
            submitted_at=state.submitted_at,
            finished_at=state.finished_at,
            duplicates_deleted=state.duplicates,
        )
        progress.done = True

    def _finish_unfinished(self) -> None:
        """What a stopped run reports of the entries it did not finish: the journal's word."""
        for item in self._plan:
            progress = self._progress[item.index]
            if progress.done:
                continue
            state = self._journal.get(item.tag)
            if state is None:
                continue  # not_submitted, with the reason if there is one
            if state.phase is Phase.FINISHED:
                self._restore(item, state)
            elif state.phase is Phase.SUBMITTED:
                progress.result = replace(
                    progress.result,
                    outcome=Outcome.PENDING,
                    image_id=state.image_id,
                    status=state.status,
                    submitted_at=state.submitted_at,
                    duplicates_deleted=state.duplicates,
                )
            else:
                error = "the create's outcome is not known yet; a run with the same state finds out"
                progress.result = replace(
                    progress.result,
                    outcome=Outcome.PENDING,
                    error=error,
                    duplicates_deleted=state.duplicates,
                )

    async def _report_progress(self) -> None:
        while True:
            await self._clock.sleep(self._settings.progress_interval)
            counts = Counter(
                p.result.outcome.value
                if p.done
                else ("importing" if p.result.image_id is not None else "queued")
                for p in self._progress.values()
            )
            self._log.info(
                "run.progress",
                total=len(self._progress),
                requests=self._client.requests_sent,
                **counts,
            )

    def results(self) -> tuple[ImageResult, ...]:
        """One result per entry, in manifest order."""
        return tuple(self._progress[index].result for index in sorted(self._progress))


def _group_of(image: Image, item: PlannedImport) -> str:
    """The group tag ``image`` carries (the entry's own if it carries none)."""
    return next((t for t in image.tags or () if t.startswith(GROUP_TAG_PREFIX)), item.group)


def _left_note(error: str | None, left: tuple[int, ...]) -> str | None:
    """``error``, plus the extra copies the API would not delete, if any."""
    if not left:
        return error
    ids = ", ".join(str(image_id) for image_id in left)
    note = (
        f"extra copies {ids} could not be deleted (the API refused while they imported): "
        "delete them by hand"
    )
    return f"{error}; {note}" if error else note


async def run_import(
    manifest: Manifest,
    settings: Settings,
    *,
    clock: Clock | None = None,
    stopper: Stopper | None = None,
    journal: Journal | None = None,
    sizer: HeadSizer | None = None,
    seed: int | None = None,
) -> Report:
    """Import every image of ``manifest``; the report says how each ended.

    Raises only for bugs, cancellation, and a state file that cannot be used
    (:class:`~importer.errors.StateLockedError` when another process holds it).
    ``journal`` is an already open journal (the caller closes it); without one,
    ``settings.state_path`` is opened for the run. With a ``sizer``, the source
    files are sized first (``HEAD``, no API budget) and the longest imports go first.
    Every API failure becomes part of the report; ``report.stopped`` says whether
    the run ended early, and why.
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
    sizes = await sizer.sizes(manifest.entries) if sizer is not None else None
    with contextlib.ExitStack() as stack:
        if journal is None:
            journal = stack.enter_context(Journal(settings.state_path or MEMORY))
        async with ImagesClient.open(settings, governor, clock, rng=rng) as client:
            poller = StatusPoller(
                client,
                clock,
                first_poll=settings.first_poll,
                poll_interval=settings.poll_interval,
                image_timeout=settings.image_timeout,
                rng=rng,
            )
            plan = make_plan(manifest, sizes)
            importer = Importer(plan, client, poller, journal, clock, settings)
            await importer.run(stopper)
    return Report(
        manifest=manifest.source,
        api_url=settings.api_url,
        started_at=started,
        finished_at=clock.wall(),
        images=importer.results(),
        requests=client.requests_sent,
        rate_limited=governor.rate_limited,
        stopped=importer.stopped,
        requests_by_endpoint=dict(client.sent),
    )
