"""The order of submission: the largest file known so far goes first.

An import's duration grows with its file, so the longest imports should start first
and the last image should not start last. Sizes come from probing the sources (one
``HEAD`` each, :mod:`importer.sources`), which takes a while for a large manifest:
waiting for every answer before the first create would idle the budget, and giving up
waiting after a fixed time would send the rest in manifest order. Instead, probing and
submitting overlap: :class:`LargestFirst` receives each entry as its size becomes
known (:meth:`~LargestFirst.add`) and hands out, each time a create may go
(:meth:`~LargestFirst.next`), the largest known entry not yet handed out. It waits
only while nothing is known and probes are still running, and at the very start for
a short ``grace``, so that the first creates choose among every answer of a small
manifest, and among a thousand or so of a large one, rather than the first dozen.
Entries whose size could not be learned go before the sized ones (one of them may be
the largest), in the order they came.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Generic, TypeVar

import anyio

from importer.clock import Clock

T = TypeVar("T")

#: Seconds the first create waits for more sizes (unless every probe answered sooner):
#: the first minute's creates all leave at once, and a file learned of just after them
#: waits for the next minute. A manifest probed within this time is wholly sorted.
GRACE = 10.0


class LargestFirst(Generic[T]):
    """A queue of items to submit, handed out largest first as their sizes arrive.

    ``expected`` items will be added in all (fewer if :meth:`close` is called early);
    ``by_size=False`` hands them out by rank alone (the manifest's order, among those
    known).
    """

    def __init__(
        self, clock: Clock, *, expected: int, grace: float = GRACE, by_size: bool = True
    ) -> None:
        self._clock = clock
        self._grace_until: float | None = None
        self._grace = grace
        self._by_size = by_size
        # (unsized first, -size, rank or arrival, arrival, item): the smallest goes first.
        self._heap: list[tuple[int, float, int, int, T]] = []
        self._sequence = itertools.count()
        self._unknown = expected
        self._closed = False
        self._arrived = anyio.Event()

    def add(self, item: T, size: int | None, rank: int | None = None) -> None:
        """``item`` may be submitted; ``size`` in bytes, ``None`` if unknown.

        ``rank`` (the manifest's order) decides between equal sizes, and alone without
        ``by_size``; items without one keep the order they came in.
        """
        if self._closed:
            raise RuntimeError("an item was added to a closed queue")
        self._unknown = max(0, self._unknown - 1)
        if not self._by_size or size is None:
            key: tuple[int, float] = (0, 0.0)  # unsized first: any of them may be the largest
        else:
            key = (1, -float(size))
        order = next(self._sequence)
        heapq.heappush(self._heap, (*key, order if rank is None else rank, order, item))
        self._wake()

    def expect_fewer(self, count: int = 1) -> None:
        """``count`` of the expected items will not come (they have nothing to submit)."""
        self._unknown = max(0, self._unknown - count)
        if self._unknown == 0:
            self._wake()

    def close(self) -> None:
        """No more items will come: :meth:`next` stops waiting for them."""
        self._closed = True
        self._unknown = 0
        self._wake()

    @property
    def waiting(self) -> int:
        """Items known and not handed out yet."""
        return len(self._heap)

    @property
    def left(self) -> int:
        """Items not handed out yet, known or still to come."""
        return len(self._heap) + self._unknown

    async def next(self) -> T | None:
        """The next item to submit; ``None`` once every item was handed out."""
        if self._grace_until is None:
            self._grace_until = self._clock.monotonic() + self._grace
        while True:
            pending = self._unknown > 0
            if self._heap and not (pending and self._clock.monotonic() < self._grace_until):
                return heapq.heappop(self._heap)[-1]
            if not self._heap and not pending:
                return None
            # Nothing known yet, or still in the first moments: wait for more answers.
            arrived = self._arrived
            wait = self._grace_until - self._clock.monotonic() if self._heap else math.inf
            with self._clock.move_on_after(wait):
                await arrived.wait()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = anyio.Event()
