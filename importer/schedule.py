"""When each watched thing is checked next: the due-time queue of a watch loop.

The status poller (:mod:`importer.poller`) and the transfers' watcher
(:mod:`importer.transfers`) each keep many watches, each due at a time, and one
background task that wakes when the earliest is due, takes every watch due
within a few seconds (one listing serves them all), checks them, and sleeps again.
:class:`DueQueue` is that queue; *when* a watch is due (first check, next check,
batching, what a check does) stays each owner's own policy.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, Protocol, TypeVar

import anyio

from importer.clock import Clock

#: A check is due within this share of the wait, either way, so watches begun together
#: do not fall due in lockstep.
JITTER = 0.1
#: Checks due within this share of the poll interval (at most ``BATCH_MAX`` seconds)
#: go together.
BATCH_SHARE = 0.25
BATCH_MAX = 5.0


class Watched(Protocol):
    """What the queue reads and writes of a watch: when it is due, and whether it ended."""

    due: float

    @property
    def done(self) -> anyio.Event: ...


K = TypeVar("K", bound=Hashable)
W = TypeVar("W", bound=Watched)


def batch_window(interval: float) -> float:
    """How far ahead of now a check counts as due, at poll interval ``interval``."""
    return min(BATCH_MAX, interval * BATCH_SHARE)


#: Every watch is asked for by id once, at this share of its timeout at the latest, so
#: that a failure is reported as one (with its message), never as a timeout.
LAST_CALL_SHARE = 0.8


def last_call_due(*, last_call: float, asked: bool, now: float) -> bool:
    """Whether a watch never ``asked`` for by id has reached its ``last_call``."""
    return not asked and now >= last_call


def not_after_last_call(when: float, *, last_call: float, asked: bool, now: float) -> float:
    """``when``, or the last call if that comes first (never before ``now``), until a watch
    has been ``asked`` for by id once: each is, before its timeout, so that a failure is
    reported as one, never as a timeout."""
    if not asked and when > last_call:
        return max(last_call, now)
    return when


class DueQueue(Generic[K, W]):
    """Watches due at times, the earliest first, and a sleep until the next is due.

    ``watches`` is the owner's own mapping of the watches in progress, by ``key``. A
    watch is due at one time: setting it again leaves the entry set before stale, and
    an entry whose watch is done, or no longer in ``watches``, is passed over.
    """

    def __init__(
        self,
        clock: Clock,
        watches: Mapping[K, W],
        key: Callable[[W], K],
        rng: random.Random,
    ) -> None:
        self._clock = clock
        self._watches = watches
        self._key = key
        self._rng = rng
        self._heap: list[tuple[float, int, K]] = []  # (due, sequence, key)
        self._sequence = itertools.count()
        self._changed = anyio.Event()

    def set_due(self, watch: W, when: float) -> None:
        """``watch`` is due at ``when`` (monotonic), and not at any time set before."""
        watch.due = when
        key = self._key(watch)
        heapq.heappush(self._heap, (when, next(self._sequence), key))
        if self._heap[0][2] == key:
            self._changed.set()

    def jittered(self, when: float) -> float:
        """``when``, moved by up to ``JITTER`` of the wait until it, either way."""
        return when + (when - self._clock.monotonic()) * self._rng.uniform(-JITTER, JITTER)

    def schedule(self, watch: W, when: float) -> None:
        """``watch`` is due at about ``when`` (see :meth:`jittered`)."""
        self.set_due(watch, self.jittered(when))

    def pop_due(self, within: float) -> list[W]:
        """The watches due within ``within`` seconds from now, earliest first, taken off."""
        horizon = self._clock.monotonic() + within
        due: list[W] = []
        while self._heap and self._heap[0][0] <= horizon:
            when, _, key = heapq.heappop(self._heap)
            watch = self._watches.get(key)
            if watch is not None and watch.due == when and not watch.done.is_set():
                due.append(watch)
        return due

    async def sleep_until_next(self) -> None:
        """Until the earliest watch is due, or one is set due before it (or forever)."""
        self._changed = anyio.Event()
        delay = math.inf
        if self._heap:
            delay = self._heap[0][0] - self._clock.monotonic()
        with self._clock.move_on_after(delay):
            await self._changed.wait()
