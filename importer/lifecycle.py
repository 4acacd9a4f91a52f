"""The life of one manifest entry during a run, as one explicit state machine.

Every change of an entry's state goes through :class:`EntryLifecycle`, and each
transition does three things together, in this order: it writes the journal row
(write-ahead: the journal must never lag behind what was sent), updates the
report row (:class:`~importer.report.ImageResult`), and logs its event. The run
(:mod:`importer.pipeline`) decides *what* to do next; this module is the only
place that records *what happened*.

States:

==============  ================================================================
``planned``     in the plan, nothing sent for it by this run (yet)
``creating``    a create is on the wire (journaled before it left)
``uncertain``   a create's answer was lost: its image may exist; it is being
                looked for by the entry's tag (:mod:`importer.reconcile`)
``importing``   the image id is known; the image is being watched
``finished``    final, with an outcome the journal keeps: ``available``,
                ``failed``, ``timed_out`` or ``rejected``
``unfinished``  final for this run only: the run ended (a stop, or the API kept
                answering 429) before the entry finished; reported ``pending``
                or ``not_submitted``, and resumed by the next run
==============  ================================================================

Transitions, one method each (anything else raises
:class:`IllegalTransitionError`: a bug, never a condition of the world):

====================  ===============  ==========  ==============  =======================
method                from             to          journal         log event
====================  ===============  ==========  ==============  =======================
``restored``          planned          finished    (has it)        ``image.resumed``
``resumed``           planned          importing   (has it)        ``image.resumed``
``resumed_uncertain`` planned          uncertain   ``uncertain``   -
``sending``           planned,         creating    ``creating``    -
                      uncertain
``not_sent``          creating         planned     ``not_sent``    -
``submitted``         creating         importing   ``submitted``   ``image.submitted``
``uncertain``         creating         uncertain   ``uncertain``   ``image.uncertain``
``rejected``          creating         finished    ``finished``    ``image.rejected``
``adopted``           uncertain        importing   ``submitted``   ``image.adopted``
``abandoned``         uncertain        finished    ``finished``    ``image.abandoned``
``saw``               importing        importing   ``status``      ``image.status``
``available``         importing        finished    ``finished``    ``image.available``
``failed``            importing,       finished    ``finished``    ``image.failed``
                      uncertain
``timed_out``         importing        finished    ``finished``    ``image.timed_out``
``not_submitted``     planned          unfinished  -               ``image.not_submitted``
``stopped``           any but final    unfinished  -               -
====================  ===============  ==========  ==============  =======================

``resumed_uncertain`` journals the create an earlier run left unanswered as
uncertain once (a run stopped while reconciling must not count it twice).
``not_sent`` follows a 429 or a connection that never opened; the client then
sends the create again (``sending``), or gives up (``not_submitted``).
:data:`TRANSITIONS` is this table in code.

The submission turn (at most ``concurrency`` entries submitting at once, see
:mod:`importer.pipeline`) is held while an entry is ``planned`` or
``creating`` and handed back, once, by the first transition to any other state
(or by :meth:`close`, when the entry's task ends however it ends).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import StrEnum
from typing import Any

import anyio
import structlog

from importer.api import Image
from importer.clock import Clock
from importer.journal import EntryState, Journal, Phase
from importer.plan import PlannedImport
from importer.report import ImageResult, Outcome

Log = structlog.typing.FilteringBoundLogger

#: What a stopped run says of a create whose answer it never learned.
UNKNOWN_CREATE = "the create's outcome is not known yet; a run with the same state finds out"


class State(StrEnum):
    """Where one entry stands in this run."""

    PLANNED = "planned"
    CREATING = "creating"
    UNCERTAIN = "uncertain"
    IMPORTING = "importing"
    FINISHED = "finished"
    UNFINISHED = "unfinished"

    @property
    def is_final(self) -> bool:
        return self in (State.FINISHED, State.UNFINISHED)


_LIVE = frozenset(state for state in State if not state.is_final)

#: Every legal transition, by the method that makes it: the states it may
#: start from, and the state it leads to. Anything else is a bug.
TRANSITIONS: Mapping[str, tuple[frozenset[State], State]] = {
    "restored": (frozenset({State.PLANNED}), State.FINISHED),
    "resumed": (frozenset({State.PLANNED}), State.IMPORTING),
    "resumed_uncertain": (frozenset({State.PLANNED}), State.UNCERTAIN),
    "sending": (frozenset({State.PLANNED, State.UNCERTAIN}), State.CREATING),
    "not_sent": (frozenset({State.CREATING}), State.PLANNED),
    "submitted": (frozenset({State.CREATING}), State.IMPORTING),
    "uncertain": (frozenset({State.CREATING}), State.UNCERTAIN),
    "rejected": (frozenset({State.CREATING}), State.FINISHED),
    "adopted": (frozenset({State.UNCERTAIN}), State.IMPORTING),
    "abandoned": (frozenset({State.UNCERTAIN}), State.FINISHED),
    "saw": (frozenset({State.IMPORTING}), State.IMPORTING),
    "available": (frozenset({State.IMPORTING}), State.FINISHED),
    "failed": (frozenset({State.IMPORTING, State.UNCERTAIN}), State.FINISHED),
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

    def __init__(self, semaphore: anyio.Semaphore | None = None) -> None:
        self._semaphore = semaphore

    def hand_back(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


class EntryLifecycle:
    """One entry's state, its report row, and the only way to change either."""

    def __init__(self, item: PlannedImport, journal: Journal, clock: Clock, log: Log) -> None:
        self.item = item
        self._journal = journal
        self._clock = clock
        self.log: Log = log.bind(index=item.index, name=item.entry.name, region=item.entry.region)
        self.state = State.PLANNED
        self._turn = Turn()
        self.result = ImageResult(
            index=item.index,
            name=item.entry.name,
            region=item.entry.region,
            tag=item.tag,
            outcome=Outcome.NOT_SUBMITTED,
        )

    # -- reading --------------------------------------------------------------------

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

    def take_turn(self, turn: Turn) -> None:
        """Hold ``turn`` until the entry leaves the submitting states."""
        self._turn = turn
        if self.state not in _SUBMITTING:
            self._turn.hand_back()

    def close(self) -> None:
        """The entry's task ended (perhaps cancelled): its turn goes back if still held."""
        self._turn.hand_back()

    # -- transitions ----------------------------------------------------------------

    def restored(self, row: EntryState) -> None:
        """An earlier run finished the entry: report what the journal says."""
        self._move(
            "restored",
            event=("info", "image.resumed", {"outcome": row.outcome, "image_id": row.image_id}),
            outcome=Outcome(row.outcome or Outcome.FAILED),
            image_id=row.image_id,
            status=row.status,
            error=row.error,
            submitted_at=row.submitted_at,
            finished_at=row.finished_at,
            duplicates_deleted=row.duplicates,
        )

    def resumed(self, row: EntryState) -> None:
        """An earlier run submitted the entry: watch its image."""
        self._move(
            "resumed",
            event=("info", "image.resumed", {"image_id": row.image_id, "status": row.status}),
            image_id=row.image_id,
            status=row.status,
            submitted_at=row.submitted_at,
        )

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
                item.tag, item.entry.name, item.entry.region, self._clock.wall(), group=item.group
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

    def available(self, image: Image) -> None:
        self._finish(
            Outcome.AVAILABLE,
            None,
            ("info", "image.available", {"image_id": image.id}),
            "available",
        )

    def failed(self, error: str, image: Image | None = None) -> None:
        """The import failed (``image`` turned ``deleted``), or the image is lost to us."""
        fields: dict[str, Any] = {"error": error}
        if image is not None:
            fields = {"image_id": image.id, "status": image.status, **fields}
        self._finish(Outcome.FAILED, error, ("warning", "image.failed", fields), "failed")

    def timed_out(self, timeout: float) -> None:
        fields = {"image_id": self.result.image_id, "timeout": timeout}
        self._finish(
            Outcome.TIMED_OUT,
            "timed out waiting for the import",
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
    ) -> None:
        now = self._clock.wall()
        item = self.item
        self._move(
            via,
            journal=lambda: self._journal.finished(
                item.tag, item.entry.name, item.entry.region, outcome.value, error, now
            ),
            event=event,
            outcome=outcome,
            error=error,
            finished_at=now,
        )

    def _unfinished_report(self, error: str | None) -> dict[str, Any]:
        row = self.row()
        if row is None:
            return {"outcome": Outcome.NOT_SUBMITTED, "error": error}
        if row.phase is Phase.FINISHED:
            # Finished by an earlier run, and this run never got to it.
            return {
                "outcome": Outcome(row.outcome or Outcome.FAILED),
                "image_id": row.image_id,
                "status": row.status,
                "error": row.error,
                "submitted_at": row.submitted_at,
                "finished_at": row.finished_at,
                "duplicates_deleted": row.duplicates,
            }
        if row.phase is Phase.SUBMITTED:
            return {
                "outcome": Outcome.PENDING,
                "image_id": row.image_id,
                "status": row.status,
                "submitted_at": row.submitted_at,
            }
        return {"outcome": Outcome.PENDING, "error": UNKNOWN_CREATE}

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
