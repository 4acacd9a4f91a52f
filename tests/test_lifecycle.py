"""One entry's state machine: each step records journal, report and log; others are refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from importer.api import Image
from importer.converge import Action, Decision
from importer.errors import ImporterError
from importer.journal import MEMORY, Journal, Phase
from importer.lifecycle import (
    TRANSITIONS,
    EntryLifecycle,
    IllegalTransitionError,
    State,
    Turn,
)
from importer.pipeline import run_import
from importer.plan import make_plan
from importer.poller import StatusPoller
from importer.report import Outcome
from importer.simulator import SimulatorConfig, run_simulator
from tests.fakes import FakeClock
from tests.helpers import image_urls, manifest_of, settings_for

ITEM = make_plan(manifest_of(*image_urls(1)))[0]


def image(status: str = "NEW", image_id: int = 7) -> Image:
    return Image(id=image_id, status=status)


def lifecycle(journal: Journal) -> EntryLifecycle:
    return EntryLifecycle(ITEM, journal, FakeClock(), structlog.get_logger("test"))


@pytest.mark.anyio
async def test_a_create_that_succeeds_writes_journal_report_and_log_at_each_step() -> None:
    """planned -> creating -> importing -> finished: each step is in the journal, report and log."""
    with Journal(MEMORY) as journal, capture_logs() as logs:
        entry = lifecycle(journal)
        entry.sending()
        row = journal.get(ITEM.tag)
        assert entry.state is State.CREATING
        assert row is not None
        assert row.phase is Phase.CREATING
        entry.submitted(image())
        row = journal.get(ITEM.tag)
        assert row is not None
        assert (row.phase, row.image_id) == (Phase.SUBMITTED, 7)
        assert (entry.result.image_id, entry.result.status) == (7, "NEW")
        entry.saw(image("pending"))
        row = journal.get(ITEM.tag)
        assert row is not None
        assert row.status == "pending"
        assert entry.result.status == "pending"
        entry.saw(image("available"))
        entry.available(image("available"))
        row = journal.get(ITEM.tag)
        assert row is not None
        assert (row.phase, row.outcome) == (Phase.FINISHED, "available")
        assert entry.result.outcome is Outcome.AVAILABLE
        assert entry.result.finished_at is not None
        assert entry.done
    events = [e["event"] for e in logs]
    assert events == ["image.submitted", "image.status", "image.status", "image.available"]


@pytest.mark.anyio
async def test_the_same_status_seen_twice_is_recorded_once() -> None:
    """A status that did not change writes nothing and logs nothing."""
    with Journal(MEMORY) as journal, capture_logs() as logs:
        entry = lifecycle(journal)
        entry.sending()
        entry.submitted(image("NEW"))
        entry.saw(image("NEW"))
    assert [e["event"] for e in logs] == ["image.submitted"]


@pytest.mark.parametrize(
    ("steps", "wanted"),
    [
        (["available"], "finished"),  # nothing was ever sent
        (["sending", "adopted"], "importing"),  # only an uncertain create is adopted
        (["sending", "submitted", "sending"], "creating"),  # no second create once submitted
        (["sending", "submitted", "rejected"], "finished"),  # a 4xx answers a create, not a poll
        (["sending", "submitted", "available", "saw"], "importing"),  # nothing after finished
        (["sending", "submitted", "available", "stopped"], "unfinished"),
        (["not_submitted", "sending"], "creating"),  # nothing after unfinished
    ],
)
@pytest.mark.anyio
async def test_illegal_transitions_are_refused_as_bugs(steps: list[str], wanted: str) -> None:
    """A transition the table does not allow raises a bug error and changes nothing."""
    calls = {
        "sending": lambda e: e.sending(),
        "submitted": lambda e: e.submitted(image()),
        "adopted": lambda e: e.adopted(image()),
        "available": lambda e: e.available(image("available")),
        "rejected": lambda e: e.rejected("no", 422),
        "saw": lambda e: e.saw(image("pending")),
        "not_submitted": lambda e: e.not_submitted("429"),
        "stopped": lambda e: e.stopped(),
    }
    with Journal(MEMORY) as journal:
        entry = lifecycle(journal)
        for step in steps[:-1]:
            calls[step](entry)
        before_state, before_row = entry.state, journal.get(ITEM.tag)
        before_result = entry.result
        with pytest.raises(IllegalTransitionError, match="bug") as raised:
            calls[steps[-1]](entry)
        assert raised.value.wanted == State(wanted)
        assert entry.state is before_state
        assert journal.get(ITEM.tag) == before_row
        assert entry.result == before_result


def test_bug_errors_are_not_importer_errors() -> None:
    """The CLI turns ImporterErrors into messages; a bug must escape as one."""
    assert not issubclass(IllegalTransitionError, ImporterError)


def test_final_states_have_no_way_out() -> None:
    """No transition starts from `finished` or `unfinished`; any other state can be stopped."""
    for sources, _ in TRANSITIONS.values():
        assert not any(state.is_final for state in sources)
    assert TRANSITIONS["stopped"][0] == {state for state in State if not state.is_final}


@pytest.mark.anyio
async def test_the_turn_is_handed_back_once_when_the_entry_stops_submitting() -> None:
    """The turn is held while planned or creating (a 429 retry keeps it), released once after."""
    semaphore = anyio.Semaphore(1)
    await semaphore.acquire()
    with Journal(MEMORY) as journal:
        entry = lifecycle(journal)
        entry.take_turn(Turn(semaphore))
        entry.sending()
        entry.not_sent()  # a 429: the client sends it again
        entry.sending()
        assert semaphore.value == 0
        entry.uncertain("lost", 1)
        assert semaphore.value == 1
        entry.sending()  # after reconciliation: the turn is not taken again
        entry.submitted(image())
        entry.close()
        assert semaphore.value == 1


@pytest.mark.anyio
async def test_a_cancelled_entry_hands_its_turn_back_on_close() -> None:
    """An entry whose task ends while it holds its turn releases it in `close`."""
    semaphore = anyio.Semaphore(1)
    await semaphore.acquire()
    with Journal(MEMORY) as journal:
        entry = lifecycle(journal)
        entry.take_turn(Turn(semaphore))
        entry.sending()
        assert semaphore.value == 0
        entry.close()
        entry.close()
    assert semaphore.value == 1


@pytest.mark.anyio
async def test_a_stopped_run_reports_each_entry_from_the_journal() -> None:
    """Stopped: no row is not_submitted; a submitted or a creating row is pending."""
    with Journal(MEMORY) as journal:
        fresh = lifecycle(journal)
        fresh.stopped()
        assert fresh.result.outcome is Outcome.NOT_SUBMITTED
        submitted = lifecycle(journal)
        submitted.sending()
        submitted.submitted(image())
        submitted.stopped()
        assert submitted.result.outcome is Outcome.PENDING
        assert submitted.result.image_id == 7
    with Journal(MEMORY) as journal:
        creating = lifecycle(journal)
        creating.sending()
        creating.stopped()
        assert creating.result.outcome is Outcome.PENDING
        assert "not known" in (creating.result.error or "")


@pytest.mark.anyio
async def test_a_rate_limited_create_leaves_the_entry_not_submitted_with_the_reason() -> None:
    """429s until the retries ran out: no journal row, `not_submitted` with the message, logged."""
    with Journal(MEMORY) as journal, capture_logs() as logs:
        entry = lifecycle(journal)
        entry.sending()
        entry.not_sent()
        entry.not_submitted("API rate limit exceeded.")
        assert journal.get(ITEM.tag) is None
    assert entry.result.outcome is Outcome.NOT_SUBMITTED
    assert entry.result.error == "API rate limit exceeded."
    assert [e["event"] for e in logs] == ["image.not_submitted"]


@pytest.mark.anyio
async def test_an_unchanged_entry_ends_available_with_its_image_journaled() -> None:
    """planned -> unchanged -> rotating -> finished: renames and deletions in the report row."""
    available = Image(id=3, name="img-0@x", status="available", created_at="2026-11-01T02:00:00Z")
    with Journal(MEMORY) as journal, capture_logs() as logs:
        entry = lifecycle(journal)
        entry.unchanged(available)
        assert entry.state is State.UNCHANGED
        entry.rotating(2)
        entry.renamed(2, "img-0", "img-0@20261001T020000Z")
        entry.renamed(3, "img-0@x", "img-0")
        entry.deleted(1, "old_version")
        entry.available(available)
        row = journal.get(ITEM.tag)
    assert row is not None
    assert (row.phase, row.outcome, row.image_id) == (Phase.FINISHED, "available", 3)
    assert row.version == ITEM.version_tag
    assert [r.image_id for r in entry.result.renamed] == [2, 3]
    assert entry.result.deleted == (1,)
    assert entry.result.submitted_at is not None  # the image's creation time
    assert [e["event"] for e in logs] == [
        "image.unchanged",
        "image.rotating",
        "image.renamed",
        "image.renamed",
        "image.deleted",
        "image.available",
    ]


@pytest.mark.anyio
async def test_a_watched_image_that_is_lost_is_decided_again() -> None:
    """planned -> importing (watching) -> planned (lost) -> creating: the new action reported."""
    with Journal(MEMORY) as journal:
        entry = lifecycle(journal)
        entry.watching(9, "pending", submitted_at=None, group="g", source="journal")
        row = journal.get(ITEM.tag)
        assert row is not None
        assert (row.phase, row.image_id, row.version) == (Phase.SUBMITTED, 9, ITEM.version_tag)
        entry.lost("gone", Decision(Action.CREATE))
        assert entry.state is State.PLANNED
        assert entry.result.image_id is None
        assert entry.result.action == "create"
        entry.sending()
        entry.submitted(image(image_id=10))
    assert entry.result.image_id == 10


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("steps", "wanted"),
    [
        (["rotating"], "rotating"),  # nothing to rotate before an image is there
        (["sending", "lost"], "planned"),  # only a watched image is lost
        (["sending", "submitted", "unchanged"], "unchanged"),  # decided once, before sending
        (["source_failed", "sending"], "creating"),  # a source that failed sends nothing
    ],
)
async def test_convergence_transitions_are_refused_out_of_turn(
    steps: list[str], wanted: str
) -> None:
    """The nightly states obey the table too."""
    calls = {
        "rotating": lambda e: e.rotating(1),
        "sending": lambda e: e.sending(),
        "submitted": lambda e: e.submitted(image()),
        "lost": lambda e: e.lost("gone", Decision(Action.CREATE)),
        "unchanged": lambda e: e.unchanged(image("available")),
        "source_failed": lambda e: e.source_failed("no version"),
    }
    with Journal(MEMORY) as journal:
        entry = lifecycle(journal)
        for step in steps[:-1]:
            calls[step](entry)
        with pytest.raises(IllegalTransitionError) as raised:
            calls[steps[-1]](entry)
    assert raised.value.wanted == State(wanted)


@pytest.mark.anyio
async def test_a_status_arriving_after_the_entry_finished_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read by id still in flight when the entry timed out answers late: no crash, no change."""
    callbacks: list[Callable[[Image], None]] = []

    async def never_finishes(self: StatusPoller, image_id: int, on_status: Any, **_: Any) -> Image:
        callbacks.append(on_status)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(StatusPoller, "wait", never_finishes)
    stuck = manifest_of("https://images.example.com/x-stuck-pending.qcow2")
    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run_import(stuck, settings_for(sim.base_url, image_timeout=60.0))
    assert report.images[0].outcome is Outcome.TIMED_OUT
    (late,) = callbacks
    late(Image(id=report.images[0].image_id or 0, status="available"))
    assert report.images[0].outcome is Outcome.TIMED_OUT
