"""The life of one manifest entry during a run, as one explicit state machine.

Every change of an entry's state goes through :class:`EntryLifecycle`, and each
transition does three things together, in this order: it writes the journal row
(write-ahead: the journal must never lag behind what was sent), updates the
report row (:class:`~importer.report.ImageResult`), and logs its event. The run
(:mod:`importer.pipeline`) decides *what* to do next; this module is the only
place that records *what happened*.

States:

==============  ================================================================
``planned``     in the plan (with its action, see :mod:`importer.converge`);
                nothing sent for it by this run (yet)
``unchanged``   an available image of this version is in the account
``creating``    a create is on the wire (journaled before it left)
``uncertain``   a create's answer was lost: its image may exist; it is being
                looked for by the entry's tag (:mod:`importer.reconcile`)
``importing``   the image id is known; the image is being watched
``transferring`` the image is available; it is being copied to the entry's
                other regions (:mod:`importer.transfers`)
``rotating``    the image is available; names and older versions are being
                put right (:func:`importer.converge.rotate`)
``finished``    final, with an outcome the journal keeps: ``available``,
                ``failed``, ``timed_out`` or ``rejected``
``unfinished``  final for this run only: the run ended (a stop, or the API kept
                answering 429) before the entry finished; reported ``pending``
                or ``not_submitted``, and resumed by the next run
==============  ================================================================

Transitions, one method each (anything else raises
:class:`IllegalTransitionError`: a bug, never a condition of the world):

=====================  ==============  ==========  ==============  =======================
method                 from            to          journal         log event
=====================  ==============  ==========  ==============  =======================
``source_failed``      planned         finished    ``finished``    ``image.source_failed``
``unchanged``          planned,        unchanged   -               ``image.unchanged``
                       uncertain
``watching``           planned,        importing   ``watching``    ``image.watching``
                       uncertain
``resumed_uncertain``  planned         uncertain   ``uncertain``   -
``sending``            planned,        creating    ``creating``    -
                       uncertain
``not_sent``           creating        planned     ``not_sent``    -
``submitted``          creating        importing   ``submitted``   ``image.submitted``
``uncertain``          creating        uncertain   ``uncertain``   ``image.uncertain``
``rejected``           creating        finished    ``finished``    ``image.rejected``
``adopted``            uncertain       importing   ``submitted``   ``image.adopted``
``abandoned``          uncertain       finished    ``finished``    ``image.abandoned``
``saw``                importing       importing   ``status``      ``image.status``
``switched``           importing       importing   ``submitted``   ``image.kept``
``lost``               importing       planned     -               ``image.lost``
``transferring``       unchanged,      transfer-   -               ``image.transferring``
                       importing       ring
``rotating``           unchanged,      rotating    -               ``image.rotating``
                       importing,
                       transferring
``available``          unchanged,      finished    ``finished``    ``image.available``
                       importing,
                       transferring,
                       rotating
``failed``             planned,        finished    ``finished``    ``image.failed``
                       importing,
                       uncertain
``timed_out``          importing       finished    ``finished``    ``image.timed_out``
``not_submitted``      planned         unfinished  -               ``image.not_submitted``
``stopped``            any but final   unfinished  -               -
=====================  ==============  ==========  ==============  =======================

``watching`` takes an image an earlier run created: found in the account, or
known only to the journal (listings may hide importing images). ``lost``: that
image turned out to be gone or failed, so the entry is decided again (and
imported again if nothing of its version lives). Both also follow
``uncertain`` when the lost create made nothing but the account holds an image
of this version. ``switched``: after a lost create, the sweep keeps another
copy than the one watched (available first, then the oldest), which the entry
watches from then on. ``resumed_uncertain``
journals the create an earlier run left unanswered as uncertain once (a run
stopped while reconciling must not count it twice). ``not_sent`` follows a 429
or a connection that never opened; the client then sends the create again
(``sending``), or gives up (``not_submitted``). Renames and deletions while
``rotating`` are recorded by :meth:`EntryLifecycle.renamed` and
:meth:`EntryLifecycle.deleted` (report and log). While ``transferring``, each
region's transfer is recorded by the ``transfer_*`` methods and
:meth:`EntryLifecycle.transferred` (journal, the report's ``regions``, log),
which :mod:`importer.transfers` calls. :data:`TRANSITIONS` is this table in code.

The submission turn (at most ``concurrency`` entries submitting at once, see
:mod:`importer.pipeline`) is held while an entry is ``planned`` or
``creating`` and handed back, once, by the first transition to any other state
(or by :meth:`close`, when the entry's task ends however it ends).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from enum import StrEnum
from typing import Any

import anyio
import structlog

from importer.api import Image
from importer.clock import Clock
from importer.converge import Decision, created_at
from importer.journal import Deletion, EntryState, Journal, Phase, TransferPhase
from importer.plan import PlannedImport
from importer.report import ImageResult, Outcome, Renamed
from importer.transfers import NOT_TRANSFERRED, TRANSFERRED, TRANSFERRING, failed_state

Log = structlog.typing.FilteringBoundLogger

#: What a stopped run says of a create whose answer it never learned.
UNKNOWN_CREATE = "the create's outcome is not known yet; a run with the same state finds out"


class State(StrEnum):
    """Where one entry stands in this run."""

    PLANNED = "planned"
    UNCHANGED = "unchanged"
    CREATING = "creating"
    UNCERTAIN = "uncertain"
    IMPORTING = "importing"
    TRANSFERRING = "transferring"
    ROTATING = "rotating"
    FINISHED = "finished"
    UNFINISHED = "unfinished"

    @property
    def is_final(self) -> bool:
        return self in (State.FINISHED, State.UNFINISHED)


_LIVE = frozenset(state for state in State if not state.is_final)

#: Every legal transition, by the method that makes it: the states it may
#: start from, and the state it leads to. Anything else is a bug.
TRANSITIONS: Mapping[str, tuple[frozenset[State], State]] = {
    "source_failed": (frozenset({State.PLANNED}), State.FINISHED),
    "unchanged": (frozenset({State.PLANNED, State.UNCERTAIN}), State.UNCHANGED),
    "watching": (frozenset({State.PLANNED, State.UNCERTAIN}), State.IMPORTING),
    "resumed_uncertain": (frozenset({State.PLANNED}), State.UNCERTAIN),
    "sending": (frozenset({State.PLANNED, State.UNCERTAIN}), State.CREATING),
    "not_sent": (frozenset({State.CREATING}), State.PLANNED),
    "submitted": (frozenset({State.CREATING}), State.IMPORTING),
    "uncertain": (frozenset({State.CREATING}), State.UNCERTAIN),
    "rejected": (frozenset({State.CREATING}), State.FINISHED),
    "adopted": (frozenset({State.UNCERTAIN}), State.IMPORTING),
    "abandoned": (frozenset({State.UNCERTAIN}), State.FINISHED),
    "saw": (frozenset({State.IMPORTING}), State.IMPORTING),
    "switched": (frozenset({State.IMPORTING}), State.IMPORTING),
    "lost": (frozenset({State.IMPORTING}), State.PLANNED),
    "transferring": (frozenset({State.UNCHANGED, State.IMPORTING}), State.TRANSFERRING),
    "rotating": (
        frozenset({State.UNCHANGED, State.IMPORTING, State.TRANSFERRING}),
        State.ROTATING,
    ),
    "available": (
        frozenset({State.UNCHANGED, State.IMPORTING, State.TRANSFERRING, State.ROTATING}),
        State.FINISHED,
    ),
    "failed": (frozenset({State.PLANNED, State.IMPORTING, State.UNCERTAIN}), State.FINISHED),
    "timed_out": (frozenset({State.IMPORTING}), State.FINISHED),
    "not_submitted": (frozenset({State.PLANNED}), State.UNFINISHED),
    "stopped": (_LIVE, State.UNFINISHED),
}
#: States in which the entry holds its submission turn.
_SUBMITTING = frozenset({State.PLANNED, State.CREATING})


class IllegalTransitionError(RuntimeError):
    """A bug: the run asked an entry for a transition the table does not allow.

    Deliberately not an :class:`~importer.errors.ImporterError`: it is not a
    condition of the world to report, but a defect that must escape the run.
    """

    def __init__(self, tag: str, current: State, wanted: State, via: str) -> None:
        self.tag = tag
        self.current = current
        self.wanted = wanted
        self.via = via
        super().__init__(
            f"bug: entry {tag} cannot go from {current} to {wanted} ({via}); "
            "the run's journal is consistent, please report this"
        )


class Turn:
    """One entry's turn to submit (a slot of a semaphore), handed back at most once."""

    # One per manifest entry, for the whole run.
    __slots__ = ("_semaphore",)

    def __init__(self, semaphore: anyio.Semaphore | None = None) -> None:
        self._semaphore = semaphore

    def hand_back(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


class EntryLifecycle:
    """One entry's state, its report row, and the only way to change either.

    ``observer`` is told of every change of either (after the transition), so that
    the run keeps its progress counts as they change (:mod:`importer.progress`).
    """

    # One per manifest entry, for the whole run: no per-instance dictionary.
    __slots__ = ("_clock", "_journal", "_log", "_observer", "_result", "_turn", "item", "state")

    def __init__(
        self,
        item: PlannedImport,
        journal: Journal,
        clock: Clock,
        log: Log,
        *,
        observer: Callable[[EntryLifecycle], None] | None = None,
    ) -> None:
        # Told of every change of state or report row (the run's progress counts).
        self._observer = observer
        self.item = item
        self._journal = journal
        self._clock = clock
        self._log = log
        self.state = State.PLANNED
        self._turn = Turn()
        version = item.version
        self.result = ImageResult(
            index=item.index,
            name=item.entry.name,
            region=item.entry.region,
            tag=item.tag,
            outcome=Outcome.NOT_SUBMITTED,
            action=item.decision.action.value,
            version=version.label if version is not None else None,
            version_source=version.source if version is not None else None,
            regions=tuple((region, NOT_TRANSFERRED) for region in item.entry.transfer_regions),
        )

    # -- reading --------------------------------------------------------------------

    @property
    def log(self) -> Log:
        """The run's logger, bound to this entry (bound anew each time: a few events per
        entry, and a run of 50,000 entries keeps no logger per entry)."""
        entry = self.item.entry
        return self._log.bind(index=entry.index, name=entry.name, region=entry.region)

    @property
    def result(self) -> ImageResult:
        """The entry's report row."""
        return self._result

    @result.setter
    def result(self, value: ImageResult) -> None:
        self._result = value
        self._changed()

    def _changed(self) -> None:
        if self._observer is not None:
            self._observer(self)

    @property
    def tag(self) -> str:
        return self.item.tag

    @property
    def done(self) -> bool:
        return self.state.is_final

    def row(self) -> EntryState | None:
        """The entry's journal row, as the journal has it now."""
        return self._journal.get(self.tag)

    @property
    def progress_label(self) -> str:
        """The word progress lines count this entry under."""
        return self.result.outcome.value if self.state.is_final else self.state.value

    # -- the submission turn ----------------------------------------------------------

    def assign_group(self, group: str) -> None:
        """Give an import its group tag: the run numbers groups in the order of submission."""
        if self.state is not State.PLANNED:
            raise IllegalTransitionError(self.tag, self.state, self.state, "assign_group")
        self.item = replace(self.item, group=group)

    def take_turn(self, turn: Turn) -> None:
        """Hold ``turn`` until the entry leaves the submitting states."""
        self._turn = turn
        if self.state not in _SUBMITTING:
            self._turn.hand_back()

    def close(self) -> None:
        """The entry's task ended (perhaps cancelled): its turn goes back if still held."""
        self._turn.hand_back()

    # -- transitions ----------------------------------------------------------------

    def source_failed(self, error: str) -> None:
        """The source cannot be read or versioned: nothing is sent for the entry."""
        self._finish(
            Outcome.FAILED,
            error,
            ("warning", "image.source_failed", {"error": error}),
            "source_failed",
        )

    def unchanged(self, image: Image) -> None:
        """An available image of this version is in the account: nothing to import."""
        self._move(
            "unchanged",
            # One line per entry that needs nothing would drown a large nightly run.
            event=("debug", "image.unchanged", {"image_id": image.id}),
            image_id=image.id,
            status=image.status,
            submitted_at=created_at(image),
        )
        self._note_regions(image)

    def watching(
        self,
        image_id: int,
        status: str | None,
        *,
        submitted_at: float | None,
        group: str | None,
        source: str,
    ) -> None:
        """An image an earlier run created (``source``: ``account`` or ``journal``)."""
        since = submitted_at if submitted_at is not None else self._clock.wall()
        item = self.item
        self._move(
            "watching",
            journal=lambda: self._journal.watching(
                item.tag,
                item.entry.name,
                item.entry.region,
                image_id,
                status or "NEW",
                submitted_at=since,
                now=self._clock.wall(),
                group=group,
                version=item.version_tag,
            ),
            event=(
                "info",
                "image.watching",
                {"image_id": image_id, "status": status, "found_in": source},
            ),
            image_id=image_id,
            status=status,
            submitted_at=since,
        )

    def lost(self, error: str, decision: Decision) -> None:
        """The watched image is gone or failed: the entry goes on with a new ``decision``."""
        self.item = replace(self.item, decision=decision)
        self._move(
            "lost",
            event=(
                "warning",
                "image.lost",
                {"image_id": self.result.image_id, "error": error, "action": decision.action},
            ),
            image_id=None,
            status=None,
            submitted_at=None,
            action=decision.action.value,
        )

    # -- transfers (each region of the image beyond the first) ------------------------

    def transferring(self, regions: tuple[str, ...]) -> None:
        """The image is available: copy it to ``regions``, which it is not in yet."""
        self._move(
            "transferring",
            event=(
                "info",
                "image.transferring",
                {"image_id": self.result.image_id, "regions": list(regions)},
            ),
        )

    def transfer_sending(self, region: str, image_id: int) -> None:
        """A transfer is about to leave (the governor admitted it): the copy may start."""
        self._check_transferring()
        self._journal.transfer_sending(self.tag, region, image_id, self._clock.wall())

    def transfer_not_sent(self, region: str) -> None:
        """The transfer just sent was certainly not processed (a 429, no connection)."""
        self._journal.transfer_not_sent(self.tag, region)

    def transfer_started(self, region: str, action_id: int) -> None:
        """The API answered the transfer with its action."""
        self._check_transferring()
        self._journal.transfer_started(self.tag, region, action_id, self._clock.wall())
        self._set_region(region, TRANSFERRING)
        self.log.info("image.transfer_started", region=region, action_id=action_id)

    def transfer_resumed(self, region: str, action_id: int | None) -> None:
        """A transfer an earlier run sent is still in flight (the journal says): watched."""
        self._check_transferring()
        self._set_region(region, TRANSFERRING)
        self.log.info("image.transfer_resumed", region=region, action_id=action_id)

    def transfer_uncertain(self, region: str, error: str) -> None:
        """The transfer's answer was lost: the copy may have started (its region will tell)."""
        self._check_transferring()
        self._set_region(region, TRANSFERRING)
        self.log.warning("image.transfer_uncertain", region=region, error=error)

    def transferred(self, region: str) -> None:
        """The image is in ``region`` now (a listing's ``regions`` showed it, or its action)."""
        self._check_transferring()
        now = self._clock.wall()
        self._journal.transfer_ended(self.tag, region, TransferPhase.COMPLETED, None, now)
        self._set_region(region, TRANSFERRED)
        self.log.info("image.transferred", region=region, image_id=self.result.image_id)

    def transfer_errored(self, region: str, error: str, attempt: int) -> None:
        """One transfer to ``region`` failed (errored, refused, or lost); another may follow."""
        self._check_transferring()
        now = self._clock.wall()
        self._journal.transfer_ended(self.tag, region, TransferPhase.ERRORED, error, now)
        self.log.warning("image.transfer_errored", region=region, error=error, attempt=attempt)

    def transfer_failed(self, region: str, error: str) -> None:
        """No transfer to ``region`` succeeded in this run: reported for that region."""
        self._check_transferring()
        now = self._clock.wall()
        self._journal.transfer_ended(self.tag, region, TransferPhase.FAILED, error, now)
        self._set_region(region, failed_state(error))
        self.log.warning("image.transfer_failed", region=region, error=error)

    def transfer_unfinished(self, region: str, error: str) -> None:
        """The transfer did not finish within its timeout: still in flight, the next run
        watches it (its journal row stays as it is)."""
        self._check_transferring()
        self._set_region(region, TRANSFERRING)
        self.log.warning("image.transfer_timed_out", region=region, error=error)

    def _check_transferring(self) -> None:
        if self.state is not State.TRANSFERRING:
            raise IllegalTransitionError(self.tag, self.state, State.TRANSFERRING, "transfer")

    def _set_region(self, region: str, state: str) -> None:
        regions = tuple(
            (name, state if name == region else current) for name, current in self.result.regions
        )
        self.result = replace(self.result, regions=regions)

    def _note_regions(self, image: Image) -> None:
        """Regions ``image`` is in already count as transferred."""
        for region, state in self.result.regions:
            if region in image.regions and state != TRANSFERRED:
                self._set_region(region, TRANSFERRED)

    # -- rotation -------------------------------------------------------------------

    def rotating(self, steps: int) -> None:
        """The image is available: put names and older versions right."""
        self._move("rotating", event=("info", "image.rotating", {"steps": steps}))

    def renamed(self, image_id: int, old: str, new: str) -> None:
        self.result = replace(
            self.result, renamed=(*self.result.renamed, Renamed(image_id, old, new))
        )
        self.log.info("image.renamed", image_id=image_id, old=old, new=new)

    def deleted(self, image_id: int, reason: str) -> None:
        if reason == "duplicate":
            self.result = replace(
                self.result,
                duplicates_deleted=tuple(sorted({*self.result.duplicates_deleted, image_id})),
            )
        else:
            self.result = replace(self.result, deleted=(*self.result.deleted, image_id))
        self.log.info("image.deleted", image_id=image_id, reason=reason)

    def kept(self, image: Image) -> None:
        """The image the entry ends with, when rotation chose another copy than the watched one."""
        self.result = replace(self.result, image_id=image.id, status=image.status)
        self._note_regions(image)

    def resumed_uncertain(self, row: EntryState) -> None:
        """An earlier run sent a create and stopped before it learned the outcome."""

        def journal() -> None:
            # Count that create as uncertain, once (a stop while reconciling must
            # not count it again).
            if row.uncertain < row.creates_sent:
                self._journal.uncertain(self.tag, self._clock.wall())

        self._move("resumed_uncertain", journal=journal)

    def sending(self) -> None:
        """A create is about to leave (the governor admitted it): from now on it may exist."""
        item = self.item
        self._move(
            "sending",
            journal=lambda: self._journal.creating(
                item.tag,
                item.entry.name,
                item.entry.region,
                self._clock.wall(),
                group=item.group,
                version=item.version_tag,
            ),
        )

    def not_sent(self) -> None:
        """The create just sent was certainly not processed (a 429, no connection)."""
        self._move("not_sent", journal=lambda: self._journal.not_sent(self.tag))

    def submitted(self, image: Image) -> None:
        """The API answered the create."""
        self._took(image, "submitted", "image.submitted")

    def adopted(self, image: Image) -> None:
        """The image of an uncertain create was found by the entry's tag."""
        self._took(image, "adopted", "image.adopted")

    def uncertain(self, error: str, creates: int) -> None:
        """The create's answer was lost: the image may or may not exist."""
        self._move(
            "uncertain",
            journal=lambda: self._journal.uncertain(self.tag, self._clock.wall()),
            event=("warning", "image.uncertain", {"error": error, "creates": creates}),
        )

    def saw(self, image: Image) -> None:
        """A status of the entry's image, from a listing or a read by id."""
        self._check("saw")
        if self.result.status == image.status:
            return
        self._move(
            "saw",
            journal=lambda: self._journal.status(self.tag, image.status, self._clock.wall()),
            event=("info", "image.status", {"image_id": image.id, "status": image.status}),
            status=image.status,
        )

    def duplicates_deleted(self, image_ids: tuple[int, ...]) -> None:
        """Extra copies found by tag and deleted (the reconciler journals them)."""
        self.result = replace(self.result, duplicates_deleted=image_ids)

    def switched(self, image: Image) -> None:
        """After a lost create, another copy is the entry's image (available first, then oldest).

        The copy watched failed, vanished or is a newer duplicate; the journal's row
        points at the copy kept from now on.
        """
        now = self._clock.wall()
        self._move(
            "switched",
            journal=lambda: self._journal.submitted(self.tag, image.id, image.status, now),
            event=("info", "image.kept", {"image_id": image.id, "status": image.status}),
            image_id=image.id,
            status=image.status,
        )

    def journaled_deletions(self, deletions: Sequence[Deletion]) -> None:
        """Deletions the journal holds that no report named yet (a killed run's, say)."""
        duplicates = {d.image_id for d in deletions if d.reason == "duplicate"}
        others = [d.image_id for d in deletions if d.reason != "duplicate"]
        result = self.result
        if duplicates - set(result.duplicates_deleted) or set(others) - set(result.deleted):
            self.result = replace(
                result,
                duplicates_deleted=tuple(sorted({*result.duplicates_deleted, *duplicates})),
                deleted=(*result.deleted, *(i for i in others if i not in result.deleted)),
            )

    def available(self, image: Image, error: str | None = None) -> None:
        """The entry ends with ``image``; ``error`` says what rotation left undone."""
        fields: dict[str, Any] = {"image_id": image.id}
        if error is not None:
            fields["error"] = error
        self._note_regions(image)
        self._finish(
            Outcome.AVAILABLE,
            error,
            ("warning" if error else "info", "image.available", fields),
            "available",
            image_id=image.id,
            status=image.status,
        )

    def failed(self, error: str, image: Image | None = None) -> None:
        """The import failed (``image`` turned ``deleted``), or the image is lost to us."""
        fields: dict[str, Any] = {"error": error}
        if image is not None:
            fields = {"image_id": image.id, "status": image.status, **fields}
        self._finish(Outcome.FAILED, error, ("warning", "image.failed", fields), "failed")

    def timed_out(self, timeout: float, note: str | None = None) -> None:
        """Not available within ``timeout`` of its submission; ``note`` adds to the error."""
        fields = {"image_id": self.result.image_id, "timeout": timeout}
        error = "timed out waiting for the import"
        self._finish(
            Outcome.TIMED_OUT,
            f"{error}; {note}" if note else error,
            ("warning", "image.timed_out", fields),
            "timed_out",
        )

    def rejected(self, error: str, status: int | None) -> None:
        """The API refused the create with a 4xx: not sent again."""
        fields = {"status": status, "error": error}
        self._finish(Outcome.REJECTED, error, ("warning", "image.rejected", fields), "rejected")

    def abandoned(self, creates: int) -> None:
        """Too many creates whose outcome stayed unknown: give the entry up."""
        error = f"gave up after {creates} creates whose outcome stayed unknown"
        self._finish(
            Outcome.FAILED, error, ("error", "image.abandoned", {"creates": creates}), "abandoned"
        )

    def not_submitted(self, error: str) -> None:
        """The API kept answering 429: the entry waits for the next run."""
        self._move(
            "not_submitted",
            event=("warning", "image.not_submitted", {"error": error}),
            **self._unfinished_report(error),
        )

    def stopped(self) -> None:
        """The run ended before the entry finished: report the journal's word."""
        self._move("stopped", **self._unfinished_report(self.result.error))

    def note_error(self, error: str) -> None:
        """An error that ends the run (a 401...), shown on the entry that met it."""
        self.result = replace(self.result, error=error)

    # -- plumbing -------------------------------------------------------------------

    def _took(self, image: Image, via: str, event: str) -> None:
        now = self._clock.wall()
        self._move(
            via,
            journal=lambda: self._journal.submitted(self.tag, image.id, image.status, now),
            event=("info", event, {"image_id": image.id, "tag": self.tag}),
            image_id=image.id,
            status=image.status,
            submitted_at=now,
        )

    def _finish(
        self,
        outcome: Outcome,
        error: str | None,
        event: tuple[str, str, dict[str, Any]],
        via: str,
        **report: Any,
    ) -> None:
        now = self._clock.wall()
        item = self.item
        image_id = report.get("image_id", self.result.image_id)
        self._move(
            via,
            journal=lambda: self._journal.finished(
                item.tag,
                item.entry.name,
                item.entry.region,
                outcome.value,
                error,
                now,
                image_id=image_id,
                version=item.version_tag,
            ),
            event=event,
            outcome=outcome,
            error=error,
            finished_at=now,
            **report,
        )

    def _unfinished_report(self, error: str | None) -> dict[str, Any]:
        if self.result.image_id is not None:
            return {"outcome": Outcome.PENDING, "error": error}
        row = self.row()
        if row is not None and row.version in (None, self.item.version_tag):
            if row.phase is Phase.SUBMITTED and row.image_id is not None:
                # Not reached by this run: the image an earlier run submitted.
                return {
                    "outcome": Outcome.PENDING,
                    "image_id": row.image_id,
                    "status": row.status,
                    "submitted_at": row.submitted_at,
                }
            if row.phase is Phase.CREATING:
                return {"outcome": Outcome.PENDING, "error": UNKNOWN_CREATE}
        return {"outcome": Outcome.NOT_SUBMITTED, "error": error}

    def _check(self, via: str) -> State:
        """The state ``via`` leads to, if it may start from the current one."""
        sources, to = TRANSITIONS[via]
        if self.state not in sources:
            raise IllegalTransitionError(self.tag, self.state, to, via)
        return to

    def _move(
        self,
        via: str,
        *,
        journal: Callable[[], None] | None = None,
        event: tuple[str, str, dict[str, Any]] | None = None,
        **report: Any,
    ) -> None:
        to = self._check(via)
        if journal is not None:
            journal()
        if report:
            self.result = replace(self.result, **report)
        self.state = to
        if to not in _SUBMITTING:
            self._turn.hand_back()
        if event is not None:
            level, name, fields = event
            getattr(self.log, level)(name, **fields)
        self._changed()
