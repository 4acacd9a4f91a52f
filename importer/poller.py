"""Learning the statuses of many importing images on few requests.

One background task (:meth:`StatusPoller.run`) serves every image task, which
waits in :meth:`StatusPoller.wait`. Statuses come from listings of *groups*
(``GET /v2/images?tag_name=<group tag>``, up to 200 images a page, see
:mod:`importer.plan`); a group is listed only when one of its images is due.
The listing cannot tell everything: a failed image drops out of listings, and
DigitalOcean may hide images still importing. An image missing from its
group's listing for too long is therefore asked for by id, the only way to read
a failure's ``error_message`` when listings leave failed images out.

A failed image may be purged (then a read by id answers 404, and listings drop
it) before the importer reads it. So every failure any listing or read shows is
kept (:meth:`StatusPoller.learn`), and a 404 for an image whose failure was seen
reports that failure with its message; one never seen is reported as such
(:data:`UNREAD_FAILURE`), never as the API's bare "not found".

Listings may also lag behind creates: an image may be missing from them for a
while after it was made. :class:`ListingLag` learns how long, from this run's
own creates, so that reconciliation (:mod:`importer.reconcile`) knows when
"not listed" means "absent".

When is an image due? Nothing happens in an import's first minutes, so the
poller learns from the imports it sees finish how long an import of a given
size takes (:class:`DurationModel`), and checks an image first when the
quickest plausible import of its size would be done, then every
``poll_interval``. Before it has learned anything, it checks after
``first_poll`` and then at growing intervals. Every schedule has +/-10% jitter,
so groups do not poll in lockstep.

Knowing its schedule, the poller also forecasts what its status checks will need
(:meth:`StatusPoller.demand`, a :class:`~importer.forecast.StatusForecast`): each
group in flight is listed once per interval from its next listing until its last
member should be done (by the slowest import seen so far, for its size), plus one
request per group for asking by id, plus one more group's worth for images about to
be submitted. The governor keeps that much of the hour for status checks, and at
least one listing per interval whatever the forecast says.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog

from importer.api import Image
from importer.catalog import PER_PAGE_MAX
from importer.client import ImagesClient
from importer.clock import Clock
from importer.errors import (
    ApiError,
    ImageVanishedError,
    RateLimitedError,
    RejectedError,
    TransientApiError,
)
from importer.forecast import Demand
from importer.governor import Priority
from importer.schedule import (
    LAST_CALL_SHARE,
    DueQueue,
    batch_window,
    last_call_due,
    not_after_last_call,
)

#: Images asked for by id per group and listing, when unlisted may mean importing:
#: this many, or this share of the group's unfinished images if more.
DIRECT_PER_GROUP = 2
DIRECT_SHARE = 0.05
#: Called with each status seen, so the caller can record it.
StatusCallback = Callable[[Image], None]
GIB = 1024**3
#: What is reported of an image gone (404) before any listing or read showed it failed.
UNREAD_FAILURE = (
    "the image was removed (404) before its error message could be read: "
    "its import failed and the API purged it, or someone deleted it"
)


class ListingLag:
    """How long after a create its image may still be missing from listings.

    Learned from this run's own creates: each one's send time (wall clock) is
    noted, and the first listing that shows its image bounds the lag from above
    (the listing's answer came after the image appeared). Only bounds that say
    something count: one within ``HORIZON`` of the send, or one of an image a
    listing of its group missed before (its lag was long, and the bound shows
    how long). An image first listed long after its send, never missed, says
    only that the listing came late. :meth:`bound` is twice the largest bound
    counted, so that a lag a little longer than any seen is still covered;
    before any counts it is the caller's default.
    """

    #: Margin over the longest lag seen.
    FACTOR = 2.0
    #: A first listing this soon after the send bounds the lag usefully (seconds): about
    #: when the first listing of a group comes, the default first poll after its creates.
    HORIZON = 60.0
    #: An image sent this shortly before a listing's answer is not counted as missed by it.
    GUARD = 1.0

    def __init__(self) -> None:
        self._sent: dict[int, float] = {}
        self._groups: dict[str, set[int]] = {}
        self._group_of: dict[int, str] = {}
        self._missed: set[int] = set()
        self._longest: float | None = None

    def sent(self, image_id: int, at: float, group: str | None = None) -> None:
        """The create that made ``image_id`` (in ``group``) left at ``at`` (wall clock)."""
        if image_id not in self._sent:
            self._sent[image_id] = at
            if group is not None:
                self._groups.setdefault(group, set()).add(image_id)
                self._group_of[image_id] = group

    def listed(self, images: Sequence[Image], at: float, tag: str | None = None) -> None:
        """A listing (of ``tag``, when it is a group's) answered at ``at`` (wall clock)."""
        shown = set()
        for image in images:
            shown.add(image.id)
            sent = self._sent.pop(image.id, None)
            if sent is None:
                continue
            group = self._group_of.pop(image.id, None)
            if group is not None:
                self._groups[group].discard(image.id)
            lag = max(0.0, at - sent)
            missed = image.id in self._missed
            self._missed.discard(image.id)
            if lag <= self.HORIZON or missed:
                self._longest = lag if self._longest is None else max(self._longest, lag)
        members = self._groups.get(tag) if tag is not None else None
        for image_id in members or ():
            if image_id not in shown and self._sent[image_id] <= at - self.GUARD:
                self._missed.add(image_id)

    @property
    def longest(self) -> float | None:
        """The longest lag counted (an upper bound of each), or ``None`` before any."""
        return self._longest

    def bound(self, default: float) -> float:
        """How long after a create a listing may still miss its image: at most ``default``."""
        if self._longest is None:
            return default
        return min(default, self.FACTOR * self._longest)


#: How far ahead a forecast looks: the longest a request counts in DigitalOcean's window.
FORECAST_HORIZON = 2 * 3600.0
#: The interval is stretched to at most this many times ``poll_interval``...
MAX_STRETCH = 3.0
#: ...even when that falls short of the budget by up to this factor (a forecast errs)...
HOPELESS = 1.5
#: ...aiming at this share of it, less this many requests.
BUDGET_MARGIN = 0.9
BUDGET_CUSHION = 20.0
#: ...counting per group, besides one listing per interval of its life, this many (until
#: groups have finished, and what they needed is known).
LISTINGS_PER_GROUP = 1.5
#: The budget assumes imports differ by at least this much from the fit, either way:
#: the first to finish are the quickest, and alone they would promise short lives to
#: every group; a forecast short of the truth costs an hour, one beyond it some lag.
PRIOR_SPREAD = 0.25
#: ...and chosen again this often (seconds).
RETUNE_EVERY = 60.0
#: With no create left to send and at most this many images to wait for (or this share of
#: those of the run), the interval is this share of ``poll_interval``.
ENDGAME_IMAGES = 5
ENDGAME_SHARE_OF_RUN = 0.02
ENDGAME_SHARE = 1 / 3
#: The duration model is fitted again, counting the imports still running, this often
#: (seconds) while imports are seen finishing.
REFIT_EVERY = 30.0
#: Finished groups whose lives the budget counts on, once this many (of the latest kept).
MIN_LIVES = 3
LIVES_KEPT = 50


class StatusBudget(Protocol):
    """How many status requests fit beside the creates still to send (the governor)."""

    def spare(self, creates: int) -> float:
        """Requests that may go besides ``creates`` creates without delaying the last by long."""
        ...


#: A refit counts the imports still running once at least this share of those it counts
#: has been seen finishing.
MIN_FINISHED_SHARE = 0.1


class DurationModel:
    """Import duration as ``a + b * size``, fitted to the imports seen finishing.

    ``early(size)`` and ``late(size)`` scale the fit by the 10th and 95th
    percentiles of how far real durations strayed from it, so a check at
    ``early`` rarely comes after an import finished, and ``late`` is when an
    import that is still not seen has probably failed.

    The imports seen finishing are not a fair sample while others still run: of the
    files submitted lately (the smallest, largest first) only the quickest are done,
    so alone they would make small files look quick and large ones slow (a run of
    4,300 fitted 1 GiB at 90 s and 8 GiB at 900 s, for 210 s and 630 s). :meth:`refit`
    also counts the imports still running, each known to take longer than it has so
    far (Buckley-James: each is given the duration expected beyond its elapsed time,
    from the Kaplan-Meier estimate of how durations stray from the fit, and the line is
    fitted again, a few times).
    """

    MIN_SAMPLES = 3
    #: Buckley-James rounds per refit.
    ROUNDS = 3
    #: Imports counted by a refit, at most, finished and still running (the same share
    #: of each, evenly picked: the share of those running is what corrects the fit): a
    #: refit costs milliseconds, not tens.
    COUNTED = 768

    def __init__(self, window: int = 256, history: int = 4096) -> None:
        self._n = 0
        self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        # Finished imports kept for refits (the latest), as (GiB, seconds).
        self._history: deque[tuple[float, float]] = deque(maxlen=history)
        self._quantiles: tuple[float, float, float] | None = None
        # Set by refit: the line, and the quantiles of the ratios, until the next refit.
        self._line: tuple[float, float] | None = None
        self._refit_quantiles: tuple[float, float, float] | None = None

    def observe(self, size: int | None, duration: float) -> None:
        x = (size or 0) / GIB
        self._n += 1
        self._sx += x
        self._sy += duration
        self._sxx += x * x
        self._sxy += x * duration
        self._samples.append((x, duration))
        self._history.append((x, duration))
        self._quantiles = None

    def refit(self, running: Iterable[tuple[int | None, float]]) -> None:
        """Fit again, counting ``running`` imports: (size, seconds they have run at least)."""
        if not self.ready:
            return
        done = list(self._history)
        pending = [((size or 0) / GIB, elapsed) for size, elapsed in running if elapsed > 0]
        share = min(1.0, self.COUNTED / (len(done) + len(pending)))
        done = _evenly(done, math.ceil(share * len(done)))
        pending = _evenly(pending, math.ceil(share * len(pending)))
        self._line = None
        self._refit_quantiles = None
        if not pending or len(done) < MIN_FINISHED_SHARE * (len(done) + len(pending)):
            # None running, or too few seen finishing to tell even how quick the quickest
            # tenth is: what lies beyond them is unknown, and the plain fit is kept.
            return
        line = _line([x for x, _ in done], [y for _, y in done])
        for _ in range(self.ROUNDS):
            fit = functools.partial(_on_line, line)
            curve = _KaplanMeier([y / fit(x) for x, y in done], [e / fit(x) for x, e in pending])
            imputed = [fit(x) * curve.beyond(e / fit(x)) for x, e in pending]
            xs = [x for x, _ in done] + [x for x, _ in pending]
            ys = [y for _, y in done] + imputed
            line = _line(xs, ys)
        fitted = [_on_line(line, x) for x, _ in done]
        curve = _KaplanMeier(
            [y / f for (_, y), f in zip(done, fitted, strict=True)],
            [e / _on_line(line, x) for x, e in pending],
        )
        low = curve.quantile(0.10, default=math.nan)
        if math.isnan(low):
            return
        self._line = line
        self._quantiles = None  # the plain quantiles, against the new line
        raw = self._raw_spread()
        high = max(curve.quantile(0.95, default=raw[1]), low)
        slowest = max(y / f for (_, y), f in zip(done, fitted, strict=True))
        self._refit_quantiles = (low, high, max(slowest, high))

    def fit(self, size: int | None) -> float:
        """The fitted duration of an import of ``size`` bytes (once :attr:`ready`)."""
        return self._fit((size or 0) / GIB)

    @property
    def slowest_ratio(self) -> float:
        """The longest import seen, relative to the fit for its size."""
        return self._spread()[2]

    @property
    def samples(self) -> int:
        """Imports seen finishing."""
        return self._n

    def _fit(self, x: float) -> float:
        if self._line is not None:
            return _on_line(self._line, x)
        mean_x, mean_y = self._sx / self._n, self._sy / self._n
        variance = self._sxx / self._n - mean_x * mean_x
        slope = 0.0
        if variance > 1e-9:
            slope = max(0.0, (self._sxy / self._n - mean_x * mean_y) / variance)
        return _on_line((max(0.0, mean_y - slope * mean_x), slope), x)

    def _spread(self) -> tuple[float, float, float]:
        if self._refit_quantiles is not None:
            return self._refit_quantiles
        return self._raw_spread()

    def _raw_spread(self) -> tuple[float, float, float]:
        if self._quantiles is None:
            ratios = sorted(y / self._fit(x) for x, y in self._samples)
            low = ratios[int(0.10 * (len(ratios) - 1))]
            high = ratios[math.ceil(0.95 * (len(ratios) - 1))]
            self._quantiles = (low, high, ratios[-1])
        return self._quantiles

    @property
    def ready(self) -> bool:
        return self._n >= self.MIN_SAMPLES

    def early(self, size: int | None) -> float:
        return self._fit((size or 0) / GIB) * self._spread()[0]

    def late(self, size: int | None) -> float:
        return self._fit((size or 0) / GIB) * self._spread()[1]


def _evenly(items: list[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    """At most ``most`` of ``items``, picked at even steps (the newest always among them)."""
    if len(items) <= most:
        return items
    step = len(items) / most
    return [items[len(items) - 1 - int(k * step)] for k in range(most)]


def _on_line(line: tuple[float, float], x: float) -> float:
    """The duration ``line`` (intercept, slope) gives ``x`` GiB, never quite zero (the
    spread is measured in durations divided by it)."""
    intercept, slope = line
    return max(1e-3, intercept + slope * x)


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = a + b * x``, with ``a, b >= 0`` (imports do not get quicker with
    size, nor take less than nothing)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    variance = sum((x - mean_x) ** 2 for x in xs) / n
    slope = 0.0
    if variance > 1e-9:
        covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / n
        slope = max(0.0, covariance / variance)
    return max(0.0, mean_y - slope * mean_x), slope


class _KaplanMeier:
    """How likely a value is to exceed each level, from values seen (``events``) and values
    known only to exceed a level (``censored``)."""

    def __init__(self, events: Sequence[float], censored: Sequence[float]) -> None:
        # Events before censored values at a tie: a value censored at r is known to exceed it.
        marks = sorted([(r, 0) for r in events] + [(r, 1) for r in censored])
        at_risk = len(marks)
        survival = 1.0
        #: (level, survival just after it), at each level where some value was seen.
        self.steps: list[tuple[float, float]] = []
        index = 0
        while index < len(marks):
            level = marks[index][0]
            seen = leaving = 0
            while index < len(marks) and marks[index][0] == level:
                seen += marks[index][1] == 0
                leaving += 1
                index += 1
            if seen:
                survival *= 1 - seen / at_risk
                self.steps.append((level, survival))
            at_risk -= leaving
        self._levels = [level for level, _ in self.steps]
        # Area under the survival curve from each step's level to the last step's.
        self._area_after = [0.0] * len(self.steps)
        for k in range(len(self.steps) - 2, -1, -1):
            width = self.steps[k + 1][0] - self.steps[k][0]
            self._area_after[k] = self._area_after[k + 1] + self.steps[k][1] * width

    def survival(self, level: float) -> float:
        k = bisect.bisect_right(self._levels, level) - 1
        return 1.0 if k < 0 else self.steps[k][1]

    def beyond(self, level: float) -> float:
        """The expected value, given that it exceeds ``level`` (``level`` itself where the
        values seen tell nothing beyond it)."""
        k = bisect.bisect_right(self._levels, level) - 1
        if k + 1 >= len(self.steps):
            return level
        held = self.survival(level)
        if held <= 1e-12:
            return level
        # From `level` to the next step the curve holds at `held`; then the steps' area.
        area = held * (self.steps[k + 1][0] - level) + self._area_after[k + 1]
        return level + area / held

    def quantile(self, q: float, *, default: float) -> float:
        """The level below which a share ``q`` of values falls (``default`` if unknown)."""
        for level, survival in self.steps:
            if 1 - survival >= q:
                return level
        return default


def next_check(
    model: DurationModel,
    size: int | None,
    started: float,
    now: float,
    *,
    checks: int,
    interval: float,
) -> float:
    """When to look again at a watch (an import, a transfer) begun at ``started`` and
    looked at ``checks`` times: when one of its size is likely done, else in an interval."""
    if model.ready:
        early = started + model.early(size)
        return early if early > now else now + interval
    # Nothing learned yet: back off, so a long first one costs few requests. Capped
    # exponent: a float power overflows after ~1,750 checks of a stuck one.
    return now + min(interval * 1.5 ** min(checks, 4), 4 * interval)


def overdue(
    model: DurationModel, size: int | None, elapsed: float, *, interval: float, first_poll: float
) -> bool:
    """Whether a watch ``elapsed`` seconds old has taken so much longer than its like that
    only asking for it by id can tell what became of it."""
    if model.ready:
        return elapsed > 2 * model.late(size) + interval
    return elapsed > 8 * first_poll


@dataclass(eq=False)
class _Watch:
    image_id: int
    group: str
    size: int | None
    submitted: float
    on_status: StatusCallback
    due: float = 0.0
    checks: int = 0
    #: The last time the image was known not to be finished, if this run knows one:
    #: only then does its finishing tell how long imports take.
    last_unfinished: float | None = None
    status: str | None = None
    #: When a listing last showed this image.
    listed_at: float = -math.inf
    next_direct: float = 0.0
    directs: int = 0
    result: Image | BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False)
class _Group:
    """One group with images in flight: its members, and what the forecast needs of it."""

    #: The images being waited for, by id, in the order they were submitted.
    members: dict[int, _Watch] = field(default_factory=dict)
    first_submitted: float = math.inf
    last_submitted: float = -math.inf
    smallest: int | None = None
    largest: int | None = None
    #: When the group is listed next, once it has been listed.
    next_listing: float | None = None
    #: Listings of it in all.
    listed: int = 0
    #: When a listing of it first showed a finished import...
    first_found: float | None = None
    #: ...the listings since, and the poll intervals they were made at, summed.
    listings: int = 0
    intervals: float = 0.0

    def add(self, watch: _Watch) -> None:
        self.members[watch.image_id] = watch
        self.first_submitted = min(self.first_submitted, watch.submitted)
        self.last_submitted = max(self.last_submitted, watch.submitted)
        size = watch.size or 0
        self.smallest = size if self.smallest is None else min(self.smallest, size)
        self.largest = size if self.largest is None else max(self.largest, size)

    def unfinished(self) -> list[_Watch]:
        return [watch for watch in self.members.values() if not watch.done.is_set()]

    def oldest_unfinished(self) -> _Watch | None:
        return next((w for w in self.members.values() if not w.done.is_set()), None)


class StatusPoller:
    """Waits for images to finish, listing groups and asking by id only when needed."""

    def __init__(
        self,
        client: ImagesClient,
        clock: Clock,
        *,
        first_poll: float,
        poll_interval: float,
        image_timeout: float = math.inf,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._first_poll = first_poll
        self._interval = poll_interval
        # The interval when the budget allows; stretched when status checks would cost
        # creates a whole hour (see pace_with).
        self._fastest = poll_interval
        self._budget: StatusBudget | None = None
        self._creates_left: Callable[[], int] | None = None
        self._retuned_at = -math.inf
        self._refitted_at = -math.inf
        self._refitted_samples = 0
        # When the last group listing before the model was ready went.
        self._learning_turn = -math.inf
        self._last_call = LAST_CALL_SHARE * image_timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log = structlog.get_logger("importer.poller")
        self._watches: dict[int, _Watch] = {}
        self._groups: dict[str, _Group] = {}
        # How long finished groups needed listing, relative to the fitted import of their
        # largest file: what the budget counts on for the groups to come.
        self._lives: deque[float] = deque(maxlen=LIVES_KEPT)
        # Images waited for in this run, in all.
        self._watched = 0
        # And how many listings each needed before one found an import finished.
        self._before_found: deque[int] = deque(maxlen=LIVES_KEPT)
        self._queue = DueQueue(
            clock, self._watches, key=lambda watch: watch.image_id, rng=self._rng
        )
        self.model = DurationModel()
        #: Whether listings show images still importing: learned, never assumed.
        self.lists_in_progress = False
        #: How long listings lag behind this run's creates.
        self.lag = ListingLag()
        # Every failed image seen in a listing or read, by id: its message outlives
        # the image (a failed image may be purged before anyone reads it by id).
        self._failed: dict[int, Image] = {}
        #: Told every image a group listing shows, watched or not (another run's
        #: import of the same entry may share the group).
        self.on_listed: Callable[[Sequence[Image]], None] | None = None

    # -- the image tasks' side ------------------------------------------------------

    async def wait(
        self,
        image_id: int,
        on_status: StatusCallback,
        *,
        group: str,
        size: int | None = None,
        submitted_at: float | None = None,
        fresh: bool = True,
        sent_at: float | None = None,
    ) -> Image:
        """The image once it is ``available`` or ``deleted``/``retired``.

        ``submitted_at`` (wall time) places an image submitted earlier. ``fresh``
        says it was just created by this run (so it was importing at
        ``submitted_at``); a resumed or adopted image was not seen importing.
        ``sent_at`` (wall time) is when the create of a fresh image left: its
        first listing teaches :attr:`lag`.
        """
        if fresh and sent_at is not None:
            self.lag.sent(image_id, sent_at, group)
        failed = self._failed.get(image_id)
        if failed is not None:
            # Seen failed already (by reconciliation): nothing to wait for.
            on_status(failed)
            return failed
        now = self._clock.monotonic()
        submitted = now
        if submitted_at is not None:
            submitted = now - max(0.0, self._clock.wall() - submitted_at)
        watch = _Watch(
            image_id,
            group,
            size,
            submitted,
            on_status,
            last_unfinished=submitted if fresh else None,
        )
        self._watches[image_id] = watch
        self._watched += 1
        members = self._groups.setdefault(group, _Group())
        members.add(watch)
        self._queue.schedule(watch, self._first_check(watch, now))
        try:
            await watch.done.wait()
        finally:
            self._watches.pop(image_id, None)
            members.members.pop(image_id, None)
            if not members.members and self._groups.get(group) is members:
                del self._groups[group]
                self._group_done(members)
        if isinstance(watch.result, BaseException):
            raise watch.result
        assert watch.result is not None
        return watch.result

    # -- the budget -------------------------------------------------------------------

    @property
    def interval(self) -> float:
        """Seconds between listings of a group whose images are due, as now chosen."""
        return self._interval

    def pace_with(self, budget: StatusBudget, creates_left: Callable[[], int]) -> None:
        """Poll at ``poll_interval`` unless that would cost creates an hour (set once).

        ``creates_left`` says how many creates the run still has to send. When the
        status checks forecast for the rest of the run would not fit in what
        ``budget`` says the hour leaves beside those creates (the rest of the hour
        after a run needing 4,300 creates is some 200 requests), the interval is
        stretched, up to ``MAX_STRETCH`` times, until they fit; if nothing fits, the
        creates wait for the next hour anyway, and the interval stays short.
        """
        self._budget = budget
        self._creates_left = creates_left

    def _endgame(self, creates: int) -> bool:
        """Every create sent and few images left: the last one seen is the run's end."""
        few = max(ENDGAME_IMAGES, ENDGAME_SHARE_OF_RUN * self._watched)
        return creates == 0 and len(self._watches) <= few

    def _retune(self, now: float) -> None:
        if self._budget is None or not self.model.ready:
            return
        creates = self._creates_left() if self._creates_left is not None else 0
        endgame = self._endgame(creates)
        # The endgame starts at once, not at the next minute's retune: its first images
        # seen late are the run's end seen late.
        starts = endgame and self._interval > self._fastest * ENDGAME_SHARE
        if now - self._retuned_at < RETUNE_EVERY and not starts:
            return
        self._retuned_at = now
        fastest = self._fastest
        slowest = MAX_STRETCH * fastest
        interval = fastest
        if creates > 0:
            # A margin: checks beyond the budget cost an hour, below it only some lag.
            spare = self._budget.spare(creates) * BUDGET_MARGIN - BUDGET_CUSHION
            # Listings left: `fixed` plus `spread` seconds of groups' lives over the interval.
            fixed, spread = self._listings_left(now, creates)
            if fixed + spread / fastest > spare:
                # Stretched as far as needed. When even the longest interval is short of
                # the budget, the creates may wait for the next hour whatever is done:
                # unless they miss it by little (the forecast errs), the interval stays.
                fits = fixed + spread / slowest <= spare * HOPELESS
                interval = min(slowest, spread / max(spare - fixed, 1e-9)) if fits else fastest
        elif endgame:
            # Checks cost no create any more.
            interval = fastest * ENDGAME_SHARE
        if interval != self._interval:
            self._log.info("poll.interval", seconds=round(interval, 1), creates_left=creates)
            shorter = interval < self._interval
            self._interval = interval
            if shorter:
                self._pull_in(now)

    def _pull_in(self, now: float) -> None:
        """The interval shrank: no group waits longer than the new one for its next listing
        (listings planned at the old interval would keep the old lag one more round)."""
        for stats in self._groups.values():
            if stats.next_listing is None or stats.next_listing <= now + self._interval:
                continue
            stats.next_listing = now + self._interval * self._rng.uniform(0.9, 1.1)
            for member in stats.unfinished():
                if member.due > stats.next_listing:
                    self._queue.set_due(member, stats.next_listing)

    def _refit(self, now: float) -> None:
        """Fit durations again, counting the imports still running (see
        :meth:`DurationModel.refit`), and move first checks not made yet to match."""
        model = self.model
        if (
            not model.ready
            or model.samples == self._refitted_samples
            or now - self._refitted_at < REFIT_EVERY
        ):
            return
        self._refitted_at = now
        self._refitted_samples = model.samples
        model.refit(
            (watch.size, watch.last_unfinished - watch.submitted)
            for watch in self._watches.values()
            if watch.last_unfinished is not None and not watch.done.is_set()
        )
        for stats in self._groups.values():
            if stats.first_found is not None:
                continue
            # Nothing of the group seen finished yet: its first listing follows the new fit,
            # earlier or later, though never before its next listing is due.
            for member in stats.unfinished():
                if member.directs == 0:
                    when = self._queue.jittered(self._first_check(member, now))
                    if stats.next_listing is not None:
                        when = max(when, stats.next_listing)
                    self._queue.set_due(member, when)

    def _group_done(self, stats: _Group) -> None:
        """A group has no image left to wait for: note how many listings it needed from
        the one that first found an import finished (those before are few, and before
        imports are learned, no measure of a group), times the interval they were made
        at, relative to the fitted import of its largest file."""
        if not self.model.ready or not stats.listings:
            return
        self._lives.append(stats.intervals / self.model.fit(stats.largest))
        self._before_found.append(stats.listed - stats.listings)

    def _listings_left(self, now: float, creates: int) -> tuple[float, float]:
        """Listings the run still needs, as ``fixed + spread / interval``.

        Per group, a listing or two and one per interval of its life: as many as finished
        groups needed (on average, relative to their imports' length and scaled by the
        interval), once a few have finished; until then, the life from the duration
        model and ``PRIOR_SPREAD``.
        """
        measured = len(self._lives) >= MIN_LIVES
        ratio = tail = 0.0
        first = LISTINGS_PER_GROUP
        if measured:
            ratio = sum(self._lives) / len(self._lives)
            first = sum(self._before_found) / len(self._before_found)
        else:
            tail = self._tail_ratio(now)
        fixed = spread = 0.0
        smallest: int | None = None
        submitting = 0.0
        for stats in self._groups.values():
            if measured:
                life = ratio * self.model.fit(stats.largest)
                if stats.first_found is None:
                    fixed += max(0.0, first - stats.listed)
                spread += max(0.0, life - stats.intervals)
            else:
                fixed += LISTINGS_PER_GROUP
                start, end = self._group_span(stats, now, tail)
                spread += end - start
            submitting = max(submitting, stats.last_submitted - stats.first_submitted)
            if stats.smallest is not None:
                smallest = stats.smallest if smallest is None else min(smallest, stats.smallest)
        # Groups to come hold files no larger than those in flight (largest first).
        groups = math.ceil(creates / PER_PAGE_MAX)
        model = self.model
        if measured:
            life = ratio * model.fit(smallest)
        else:
            life = model.fit(smallest) * tail - self._early(smallest) + submitting
        return fixed + first * groups, spread + groups * max(0.0, life)

    def _tail_ratio(self, now: float) -> float:
        """How slow, relative to the fit, the slowest imports of this run are.

        The slowest seen finishing, or, if slower, the oldest still importing: early
        in a run only the quickest have finished, and they alone would promise short
        lives. Capped where an image missing that long is asked for by id.
        """
        model = self.model
        ratio = model.slowest_ratio
        ratio = max(ratio, 1 + PRIOR_SPREAD)
        for stats in self._groups.values():
            oldest = stats.oldest_unfinished()
            if oldest is not None and oldest.last_unfinished is not None:
                # As long as it was last seen importing: since then it may be done, unseen,
                # and counting that time would stretch every group by the poll interval.
                ran = oldest.last_unfinished - oldest.submitted
                ratio = max(ratio, ran / model.fit(oldest.size))
        return min(ratio, 2 * max(model.slowest_ratio, 1 + PRIOR_SPREAD))

    def _early(self, size: int | None) -> float:
        """When the quickest import of ``size`` may be done, for planning (see ``PRIOR_SPREAD``)."""
        early = self.model.early(size)
        return min(early, self.model.fit(size) * (1 - PRIOR_SPREAD))

    def _group_span(self, stats: _Group, now: float, tail: float) -> tuple[float, float]:
        """When a group (the model being ready) is listed first and last from ``now`` on."""
        first = stats.first_submitted + self._early(stats.smallest)
        last = stats.last_submitted + self.model.fit(stats.largest) * tail + self._interval
        start = max(now, stats.next_listing if stats.next_listing is not None else first)
        # A group overdue is listed on: at least once more after the next listing.
        return start, max(last, start + self._interval)

    def expected_end(self) -> float | None:
        """When the last image being watched should finish (monotonic), once durations are known.

        Each image's late bound (see :class:`DurationModel`): the time by which it
        should be done, not the earliest it could be. Walks the images in flight:
        call it now and then, not per request.
        """
        if not self.model.ready:
            return None
        ends = [
            watch.submitted + self.model.late(watch.size)
            for watch in self._watches.values()
            if not watch.done.is_set()
        ]
        return max(ends, default=None)

    # -- the background task --------------------------------------------------------

    async def run(self) -> None:
        """Check due images forever (the pipeline cancels this when the run ends)."""
        while True:
            self._refit(self._clock.monotonic())
            self._retune(self._clock.monotonic())
            due = self._queue.pop_due(batch_window(self._interval))
            if due and not self.model.samples:
                due = self._before_learning(due)
            if not due:
                await self._queue.sleep_until_next()
                continue
            groups = {watch.group for watch in due}
            listed: set[str] = set()
            listed_from = self._clock.monotonic()
            async with anyio.create_task_group() as tg:
                for group in sorted(groups):
                    tg.start_soon(self._check_group, group, listed)
            now = self._clock.monotonic()
            due_ids = {watch.image_id for watch in due}
            # A listing speaks of every member of its group, due or not; a failed one
            # of none (its members are checked again later, not asked one by one).
            members = [
                watch
                for group in sorted(listed)
                if group in self._groups
                for watch in self._groups[group].unfinished()
            ]
            asked: Counter[str] = Counter()
            sizes = Counter(watch.group for watch in members)
            async with anyio.create_task_group() as tg:
                for watch in sorted(members, key=lambda w: w.submitted):
                    if watch.listed_at >= listed_from or not self._should_ask_directly(watch, now):
                        continue
                    capped = not (self.lists_in_progress or self._last_call_due(watch, now))
                    cap = max(DIRECT_PER_GROUP, math.ceil(DIRECT_SHARE * sizes[watch.group]))
                    if capped and asked[watch.group] >= cap:
                        # Unlisted may just mean importing: ask the oldest few first,
                        # not a whole group at once; the others at a later listing.
                        watch.next_direct = now + self._interval
                        continue
                    asked[watch.group] += 1
                    tg.start_soon(self._check_directly, watch)
                    due_ids.discard(watch.image_id)
                for watch in due:
                    if watch.image_id in due_ids and not watch.done.is_set():
                        # Never before its group's next listing (set by the check above),
                        # jitter included: a group is listed once per interval, not sooner.
                        when = self._queue.jittered(self._next_check(watch, now))
                        self._queue.set_due(watch, max(when, watch.due))

    def _before_learning(self, due: list[_Watch]) -> list[_Watch]:
        """Until an import is seen to finish, one group listing per interval in all.

        Nothing is known of how long imports take, and minutes may pass before the
        first finishes: listing every group at every check would spend a request per
        group and interval to learn nothing. Groups take turns, the one due the longest
        first; the others wait for the next turn. Once one import is seen
        finished, others may have too: every group is checked at once (:meth:`_saw`).
        """
        if len(self._groups) <= 1:
            return due  # one group: its own schedule already lists it once per interval
        now = self._clock.monotonic()
        turn = self._learning_turn + self._interval
        chosen = None if now < turn else min(due, key=self._waiting_longest).group
        kept = [watch for watch in due if watch.group == chosen]
        if chosen is not None:
            self._learning_turn = now
            turn = now + self._interval
        for watch in due:
            if watch.group != chosen:
                self._queue.set_due(watch, max(turn, watch.due))
        return kept

    def _waiting_longest(self, watch: _Watch) -> tuple[float, float]:
        """Since when a group has been due: since its next listing came due, or for one
        never listed, since its first check came due."""
        stats = self._groups.get(watch.group)
        if stats is None:
            return (watch.due, watch.submitted)
        due = stats.next_listing
        if due is None:
            due = stats.first_submitted + self._first_poll
        return (due, watch.submitted)

    async def _check_group(self, group: str, listed: set[str]) -> None:
        try:
            images = await self._client.list(tag_name=group, priority=Priority.STATUS)
        except (TransientApiError, RateLimitedError, RejectedError) as exc:
            # A listing that failed says nothing about the images: check again later.
            self._log.warning("group.poll_failed", group=group, reason=str(exc))
            return
        except ApiError as exc:
            # A 401 or an unreachable API: each image task receives it and ends the run.
            for member in self._members(group):
                self._resolve(member, exc)
            return
        listed.add(group)
        self.take_listing(group, images)

    def take_listing(self, group: str, images: Sequence[Image]) -> None:
        """What a listing of ``group`` showed, whoever listed it (this poller, or the
        transfers' watcher, :mod:`importer.transfers`): one listing serves both."""
        self.learn(images, tag=group)
        if self.on_listed is not None:
            self.on_listed(images)
        now = self._clock.monotonic()
        stats = self._groups.get(group)
        for image in images:
            watch = self._watches.get(image.id)
            if watch is not None and not watch.done.is_set():
                watch.listed_at = now
                self._saw(watch, image, now)
                if stats is not None and stats.first_found is None and watch.done.is_set():
                    stats.first_found = now
        if stats is not None:
            stats.listed += 1
            if stats.first_found is not None:
                stats.listings += 1
                stats.intervals += self._interval
        # This listing checked the whole group: none of it is due again before the
        # next interval, so a group is listed at most once per interval.
        next_listing = now + self._interval * self._rng.uniform(0.9, 1.1)
        stats = self._groups.get(group)
        if stats is not None:
            stats.next_listing = next_listing
        for member in self._members(group):
            if member.due < next_listing:
                # Listed importing, or not listed and so not available: unfinished now.
                member.last_unfinished = now
                self._queue.set_due(member, next_listing)

    def _members(self, group: str) -> list[_Watch]:
        stats = self._groups.get(group)
        return stats.unfinished() if stats is not None else []

    def learn(self, images: Sequence[Image], *, tag: str | None = None) -> None:
        """Learn from a listing just answered, whoever asked for it.

        Whether listings show images still importing; how long they lag behind
        creates; and every failure shown, which also ends the wait for that image.
        """
        if not self.lists_in_progress and any(i.status in ("NEW", "pending") for i in images):
            self.lists_in_progress = True
            self._log.info("listing.shows_in_progress")
        self.lag.listed(images, self._clock.wall(), tag)
        for image in images:
            if image.has_failed:
                self._note_failed(image)

    def failure(self, image_id: int) -> Image | None:
        """The failed image ``image_id`` as last seen, if any listing or read showed it failed."""
        return self._failed.get(image_id)

    async def look(self, image_id: int) -> Image:
        """Read one image by id, a 404 mapped to what is known of it.

        An image gone (404) whose failure was seen is that failure, with its
        message; one never seen failed raises :class:`ImageVanishedError` saying
        so plainly.
        """
        try:
            image = await self._client.get(image_id, priority=Priority.STATUS)
        except RejectedError as exc:
            if exc.status != 404:
                raise
            failed = self._failed.get(image_id)
            if failed is not None:
                return failed
            raise ImageVanishedError(
                UNREAD_FAILURE, status=404, method=exc.method, path=exc.path
            ) from None
        if image.has_failed:
            self._note_failed(image)
        return image

    def _note_failed(self, image: Image) -> None:
        self._failed[image.id] = image
        watch = self._watches.get(image.id)
        if watch is not None and not watch.done.is_set():
            self._saw(watch, image, self._clock.monotonic())

    async def _check_directly(self, watch: _Watch) -> None:
        watch.directs += 1
        now = self._clock.monotonic()
        try:
            image = await self.look(watch.image_id)
        except (TransientApiError, RateLimitedError) as exc:
            self._log.warning("image.poll_failed", image_id=watch.image_id, reason=str(exc))
        except ApiError as exc:
            self._resolve(watch, exc)
            return
        else:
            self._saw(watch, image, self._clock.monotonic())
            if watch.done.is_set():
                return
        # Asked by id and still importing: ask that way again only after a while.
        watch.next_direct = now + self._interval * 2 ** min(watch.directs, 6)
        self._queue.schedule(watch, self._next_check(watch, self._clock.monotonic()))

    # -- forecasting ------------------------------------------------------------------

    def demand(self, now: float) -> Demand:
        """The status requests this poller expects to send from ``now`` on.

        Each group in flight: one listing at its next listing (or when its first
        member should be done) and one per interval until its last member should
        be done (by the slowest import seen, for the largest member's size), plus
        one request for asking by id. Before any import was seen to finish, a
        listing every two intervals for as long as the forecast looks. Plus one
        more group, submitted now, for the creates on their way. Floor: one
        request per interval, until two intervals after the last listing foreseen.
        """
        interval = self._interval
        # (time, step, change of slope), summed below into one curve.
        events: list[tuple[float, float, float]] = []
        smallest: int | None = None
        largest: int | None = None
        tail = self._tail_ratio(now) if self.model.ready else 0.0
        for stats in self._groups.values():
            self._forecast_group(stats, now, tail, events)
            if stats.smallest is not None:
                smallest = stats.smallest if smallest is None else min(smallest, stats.smallest)
            if stats.largest is not None:
                largest = stats.largest if largest is None else max(largest, stats.largest)
        if self._creates_left is None or self._creates_left() > 0:
            coming = _Group(
                first_submitted=now, last_submitted=now, smallest=smallest, largest=largest
            )
            self._forecast_group(coming, now, tail, events)
        events.sort()
        corners: list[tuple[float, float]] = [(now, 0.0)]
        count = slope = 0.0
        previous = now
        for when, step, change in events:
            count += slope * (when - previous)
            previous = when
            if step:
                corners.append((when, count))
                count += step
            corners.append((when, count))
            slope += change
        # The floor lasts as long as the listings foreseen, and two intervals more.
        until = max((when for when, _, _ in events), default=now) + 2 * interval
        return Demand.of(now, corners, floor_interval=interval, floor_until=until)

    def _forecast_group(
        self, stats: _Group, now: float, tail: float, events: list[tuple[float, float, float]]
    ) -> None:
        if self.model.ready:
            start, end = self._group_span(stats, now, tail)
            pace = self._interval
        else:
            first = stats.first_submitted + self._first_poll
            start = max(now, stats.next_listing if stats.next_listing is not None else first)
            end = now + FORECAST_HORIZON
            pace = 2 * self._interval
        # Listings at start, start + pace, ... until end: 1 + (end - start) // pace of
        # them, counted as a half at start and the rest evenly, on average as many.
        events.append((start, 0.5, 1 / pace))
        events.append((end, 0.0, -1 / pace))

    # -- deciding ---------------------------------------------------------------------

    def _saw(self, watch: _Watch, image: Image, now: float) -> None:
        watch.on_status(image)
        watch.status = image.status
        if image.is_available or image.has_failed:
            if image.is_available and watch.last_unfinished is not None:
                # It finished between the last check that saw it unfinished and now.
                finished = (watch.last_unfinished + now) / 2
                learning = not self.model.ready
                first = not self.model.samples
                self.model.observe(watch.size, finished - watch.submitted)
                if first or (learning and self.model.ready):
                    self._reschedule_all(now)
            self._resolve(watch, image)
        else:
            watch.last_unfinished = now

    def _reschedule_all(self, now: float) -> None:
        """Imports were seen to finish: check each image when it may be done (at once,
        until enough have finished to tell how long they take)."""
        self._log.info("poll.learned", samples=self.model.samples, ready=self.model.ready)
        for watch in self._watches.values():
            if not watch.done.is_set():
                self._queue.schedule(
                    watch, self._first_check(watch, now) if self.model.ready else now
                )

    def _resolve(self, watch: _Watch, result: Image | BaseException) -> None:
        if not watch.done.is_set():
            watch.result = result
            watch.done.set()

    def _should_ask_directly(self, watch: _Watch, now: float) -> bool:
        """Whether only a ``GET`` by id can tell what became of this image."""
        if now < watch.next_direct:
            return False
        if self._last_call_due(watch, now):
            return True
        if self.lists_in_progress:
            # Listings show every live image: one missing from its group has failed.
            return True
        return overdue(
            self.model,
            watch.size,
            now - watch.submitted,
            interval=self._interval,
            first_poll=self._first_poll,
        )

    def _last_call_due(self, watch: _Watch, now: float) -> bool:
        return last_call_due(
            last_call=watch.submitted + self._last_call, asked=watch.directs > 0, now=now
        )

    def _first_check(self, watch: _Watch, now: float) -> float:
        if self.model.ready:
            when = max(now, watch.submitted + self.model.early(watch.size))
        else:
            when = max(now, watch.submitted) + self._first_poll
        return self._not_after_last_call(watch, when)

    def _next_check(self, watch: _Watch, now: float) -> float:
        watch.checks += 1
        when = next_check(
            self.model,
            watch.size,
            watch.submitted,
            now,
            checks=watch.checks,
            interval=self._interval,
        )
        return self._not_after_last_call(watch, when)

    def _not_after_last_call(self, watch: _Watch, when: float) -> float:
        return not_after_last_call(
            when,
            last_call=watch.submitted + self._last_call,
            asked=watch.directs > 0,
            now=self._clock.monotonic(),
        )
