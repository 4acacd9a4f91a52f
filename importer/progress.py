"""How far a run is, at any instant, for the live view and the periodic reports.

The run records each entry's changes in a :class:`Tally` as they happen, so a
:class:`RunSnapshot` costs the same whether the manifest holds ten entries or
ten thousand: counts are kept incrementally (one dictionary update per change),
never recounted. :class:`RunMonitor` adds what the other parts of the run know
(requests sent, the hour's budget, when the last import should end) and makes the
frozen snapshot the live view renders.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from importer.clock import Clock
from importer.report import ImageResult

#: Labels of entries whose image is being made: submitted (or being submitted,
#: or being looked for after a lost answer) and not finished.
IN_FLIGHT = frozenset({"creating", "uncertain", "importing", "transferring", "rotating"})
#: Labels of entries that have ended (in this run, or an earlier one).
FINISHED = frozenset({"available", "failed", "timed_out", "rejected"})
#: The label of an entry nothing has been done for yet (see :mod:`importer.lifecycle`).
PLANNED = "planned"
#: Failures the snapshot keeps, newest first.
LATEST_FAILURES = 5
#: How often the expected end is worked out again (it walks the images in flight).
EXPECTED_END_EVERY = 15.0


@dataclass(frozen=True)
class Failure:
    """One entry that ended without its image, as the live view lists it."""

    name: str
    region: str
    outcome: str
    error: str | None


@dataclass(frozen=True)
class RunSnapshot:
    """The run at one instant. Times are Unix times (the run's wall clock)."""

    total: int
    #: Entries by label (an outcome once finished, else where they stand), largest first.
    counts: tuple[tuple[str, int], ...]
    in_flight: int
    requests: int
    rate_limited: int
    #: Our requests in the last hour, and what the run allows itself in one.
    hour_used: int | None
    hour_budget: int | None
    started_at: float
    now: float
    #: When the last image in flight should be available, from the durations seen so
    #: far (it may be past: imports running late); ``None`` until enough imports have
    #: finished to tell.
    expected_end: float | None
    failures: tuple[Failure, ...]
    #: Why the run is stopping, if it is.
    stopping: str | None = None
    #: What the run is doing before its first request (sizing the sources...).
    preparing: str | None = None

    def count(self, label: str) -> int:
        return dict(self.counts).get(label, 0)

    @property
    def finished(self) -> int:
        """Entries with a final outcome of this run or an earlier one."""
        return sum(count for label, count in self.counts if label in FINISHED)


class Tally:
    """Entries by label, kept as they change: O(1) per change, O(labels) per read."""

    def __init__(self, labels: Mapping[int, str]) -> None:
        self._labels = dict(labels)
        self._counts: Counter[str] = Counter(self._labels.values())
        self._failures: deque[Failure] = deque(maxlen=LATEST_FAILURES)

    def move(self, index: int, label: str) -> bool:
        """Entry ``index`` now counts under ``label``; whether that is a change."""
        old = self._labels.get(index)
        if old == label:
            return False
        if old is not None:
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._labels[index] = label
        self._counts[label] += 1
        return True

    def failed(self, result: ImageResult) -> None:
        """An entry of this run ended without its image."""
        self._failures.appendleft(
            Failure(result.name, result.region, result.outcome.value, result.error)
        )

    @property
    def total(self) -> int:
        return len(self._labels)

    def counts(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self._counts.items(), key=lambda item: (-item[1], item[0])))

    def failures(self) -> tuple[Failure, ...]:
        return tuple(self._failures)


@dataclass(frozen=True)
class Sources:
    """Where a monitor reads what the tally does not hold; each is cheap to call."""

    requests: Callable[[], int]
    rate_limited: Callable[[], int]
    #: ``(used, budget)`` of the sliding hour, or ``None`` without an hourly window.
    hour: Callable[[], tuple[int, int] | None]
    #: The monotonic time the last image in flight should end, or ``None``.
    expected_end: Callable[[], float | None]
    stopping: Callable[[], str | None]


class RunMonitor:
    """Makes :class:`RunSnapshot` values of one run; :meth:`snapshot` is cheap."""

    def __init__(self, tally: Tally, sources: Sources, clock: Clock, started_at: float) -> None:
        self._tally = tally
        self._sources = sources
        self._clock = clock
        self._started_at = started_at
        self._expected: tuple[float, float | None] | None = None

    def snapshot(self) -> RunSnapshot:
        counts = self._tally.counts()
        hour = self._sources.hour()
        return RunSnapshot(
            total=self._tally.total,
            counts=counts,
            in_flight=sum(count for label, count in counts if label in IN_FLIGHT),
            requests=self._sources.requests(),
            rate_limited=self._sources.rate_limited(),
            hour_used=hour[0] if hour is not None else None,
            hour_budget=hour[1] if hour is not None else None,
            started_at=self._started_at,
            now=self._clock.wall(),
            expected_end=self._expected_end(),
            failures=self._tally.failures(),
            stopping=self._sources.stopping(),
        )

    def _expected_end(self) -> float | None:
        now = self._clock.monotonic()
        if self._expected is None or now - self._expected[0] >= EXPECTED_END_EVERY:
            self._expected = (now, self._sources.expected_end())
        end = self._expected[1]
        if end is None:
            return None
        return self._clock.wall() + (end - now)


def preparing(total: int, what: str, started_at: float, now: float) -> RunSnapshot:
    """The snapshot of a run that has sent nothing yet."""
    return RunSnapshot(
        total=total,
        counts=((PLANNED, total),) if total else (),
        in_flight=0,
        requests=0,
        rate_limited=0,
        hour_used=None,
        hour_budget=None,
        started_at=started_at,
        now=now,
        expected_end=None,
        failures=(),
        preparing=what,
    )
