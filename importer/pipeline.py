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
tag before it sends another create (see :mod:`importer.reconcile`).

Each entry's state lives in its :class:`~importer.lifecycle.EntryLifecycle`;
this module only orchestrates.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Sequence

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
from importer.lifecycle import EntryLifecycle, State, Turn
from importer.manifest import Manifest
from importer.plan import GROUP_TAG_PREFIX, PlannedImport, make_plan
from importer.poller import StatusPoller
from importer.reconcile import Reconciler
from importer.redact import redact_text
from importer.report import ImageResult, Report
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


class Importer:
    """Runs one plan against one API; :meth:`run` once, then :meth:`results`.

    Orchestration only: what to do next for each entry. What happened is recorded
    by the entry's :class:`~importer.lifecycle.EntryLifecycle`.
    """

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
        self._entries = {
            item.index: EntryLifecycle(item, journal, clock, self._log) for item in self._plan
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
                    for entry in self._entries.values():
                        row = entry.row()
                        if row is not None and row.phase in (Phase.SUBMITTED, Phase.FINISHED):
                            images.start_soon(self._import_one, entry, Turn())
                        else:
                            to_submit.append(entry)
                    for entry in to_submit:
                        await turns.acquire()
                        images.start_soon(self._import_one, entry, Turn(turns))
            outer.cancel_scope.cancel()
        for entry in self._entries.values():
            if not entry.done:
                entry.stopped()
        counts = Counter(entry.result.outcome.value for entry in self._entries.values())
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

    async def _import_one(self, entry: EntryLifecycle, turn: Turn) -> None:
        entry.take_turn(turn)
        try:
            await self._import(entry)
        finally:
            entry.close()

    async def _import(self, entry: EntryLifecycle) -> None:
        row = entry.row()
        if row is not None and row.phase is Phase.FINISHED:
            entry.restored(row)
            return
        try:
            submitted = await self._ensure_submitted(entry, row)
            if submitted is None:
                return
            image_id, fresh, group = submitted
            final = await self._wait_for(entry, image_id, fresh, group)
            if self._uncertain_creates(entry) > 0:
                # Whatever the outcome, the entry must not end with a second live image.
                deleted = await self._reconciler.sweep(entry.item, keep=image_id, log=entry.log)
                entry.duplicates_deleted(deleted)
            if final is None:
                entry.timed_out(self._settings.image_timeout)
            elif final.is_available:
                entry.available(final)
            else:
                error = redact_text(final.error_message) or f"the image turned {final.status}"
                entry.failed(error, final)
        except AuthenticationError as exc:
            self._fail_run(entry, "authentication_failed", exc)
        except ApiUnreachableError as exc:
            self._fail_run(entry, "api_unreachable", exc)
        except ApiError as exc:
            # Polling gave up on this image (e.g. it vanished), or an answer no rule
            # foresaw: this image's failure, not the run's.
            entry.failed(exc.safe_message)

    async def _wait_for(
        self, entry: EntryLifecycle, image_id: int, fresh: bool, group: str
    ) -> Image | None:
        """The image once it finished, or ``None`` at its timeout (counted from submission)."""
        submitted_at = entry.result.submitted_at
        elapsed = self._clock.wall() - submitted_at if submitted_at is not None else 0.0
        with self._clock.move_on_after(max(0.0, self._settings.image_timeout - elapsed)):
            return await self._poller.wait(
                image_id,
                entry.saw,
                group=group,
                size=entry.item.size,
                submitted_at=submitted_at,
                fresh=fresh,
            )
        # Time is up (perhaps between runs): one last look, so that an import that
        # finished or failed meanwhile is reported as what it is.
        try:
            image = await self._client.get(image_id)
        except (TransientApiError, RateLimitedError):
            return None
        entry.saw(image)
        return image if image.is_available or image.has_failed else None

    # -- submitting, without ever making a duplicate --------------------------------

    async def _ensure_submitted(
        self, entry: EntryLifecycle, row: EntryState | None
    ) -> tuple[int, bool, str] | None:
        """The entry's image id, creating the image if (and only if) it does not exist.

        Also says whether this run created it just now, and the group tag the
        image carries. ``None`` when the entry ended without an image.
        """
        item = entry.item
        if row is not None and row.phase is Phase.SUBMITTED and row.image_id is not None:
            entry.resumed(row)
            return row.image_id, False, row.group or item.group
        if row is not None and row.phase is Phase.CREATING:
            entry.resumed_uncertain(row)
        creates = self._uncertain_creates(entry)
        while True:
            if entry.state is State.UNCERTAIN:
                found = await self._reconciler.find(item, entry.log)
                entry.duplicates_deleted(self._journal_duplicates(entry))
                if found is not None:
                    group = next(
                        (t for t in found.tags or () if t.startswith(GROUP_TAG_PREFIX)), item.group
                    )
                    entry.adopted(found)
                    return found.id, False, group
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
            return image.id, True, item.group

    def _uncertain_creates(self, entry: EntryLifecycle) -> int:
        row = entry.row()
        return row.uncertain if row is not None else 0

    def _journal_duplicates(self, entry: EntryLifecycle) -> tuple[int, ...]:
        row = entry.row()
        return row.duplicates if row is not None else ()

    def _importing_group(self) -> str | None:
        for item in self._plan:
            result = self._entries[item.index].result
            if result.image_id is not None and result.status in ("NEW", "pending"):
                return item.group
        return None

    def _fail_run(self, entry: EntryLifecycle, reason: str, exc: ApiError) -> None:
        # Every image task that was waiting learns of the one event: it is logged once.
        if reason not in self._run_failures:
            self._run_failures.add(reason)
            self._log.error(f"run.{reason}", error=str(exc))
        entry.note_error(exc.safe_message)
        self.stop(reason)

    # -- reporting ------------------------------------------------------------------

    async def _report_progress(self) -> None:
        while True:
            await self._clock.sleep(self._settings.progress_interval)
            counts = Counter(entry.progress_label for entry in self._entries.values())
            self._log.info(
                "run.progress",
                total=len(self._entries),
                requests=self._client.requests_sent,
                **counts,
            )

    def results(self) -> tuple[ImageResult, ...]:
        """One result per entry, in manifest order."""
        return tuple(self._entries[index].result for index in sorted(self._entries))


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
            Window(settings.effective_per_minute, 60.0),
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
