"""Which images ``GET /v2/images`` shows, found in time proportional to the page, not the account.

A listing shows, in ascending id order, the images that are ``available`` (or, when
in-progress images are listed, every image not ``deleted``), optionally only those with a
tag, one page of them, with the total. Statuses are read from the clock, so which images
match changes as time passes; filtering every image on every request made a run of N
images cost O(N) per listing and O(N²) in all.

Here each tag keeps its images in id order (ids only grow, so appending keeps the order).
A tag with few images (every group and entry tag the importer lists) is filtered directly,
reading each status from the clock: exact whatever happens to its images. A large tag
(a run tag on every image, or no tag at all) keeps a count of matching images per position
in a Fenwick tree, one per kind of listing: the total is a lookup and each image of the
page a search, O(log N). The trees follow the clock lazily: each image is due for a look
when its plan says it turns available or deleted, and a listing first looks at the images
that came due (an image's position in each large tag is then found by a binary search of
the tag's images, not kept: an account of 50,000 images would keep 50,000 dictionaries of
them). Each look reads the status from the clock, as the small path does; a plan
changed later only to finish *earlier* would be noticed at its old time in large listings.
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from importer.simulator.world import SimImage

#: Tags with at most this many images are filtered directly.
DIRECT_MAX: Final = 1000
#: Looks come this long before a plan's threshold (seconds): the status compares the time
#: elapsed since creation, which may pass the threshold a rounding error before
#: ``created + threshold`` does.
EARLY: Final = 1e-6


def visible(image: SimImage, in_progress: bool) -> bool:
    """Whether a listing shows ``image``: available, or with ``in_progress`` any not deleted."""
    status = image.status
    return status != "deleted" if in_progress else status == "available"


class _Counts:
    """A Fenwick tree over 0/1 flags at positions 1..n: append, flip, count, find the k-th."""

    def __init__(self) -> None:
        self._tree = [0]
        self.total = 0

    def append(self, flag: bool) -> None:
        tree = self._tree
        position = len(tree)
        # The node at `position` sums (position - lowbit, position]: the new flag plus the
        # nodes that partition the part already there.
        value = int(flag)
        low = position - (position & -position)
        below = position - 1
        while below > low:
            value += tree[below]
            below -= below & -below
        tree.append(value)
        self.total += flag

    def add(self, position: int, delta: int) -> None:
        tree = self._tree
        while position < len(tree):
            tree[position] += delta
            position += position & -position
        self.total += delta

    def find(self, k: int) -> int:
        """The position of the ``k``-th set flag (1-based; ``k <= total``)."""
        tree = self._tree
        position = 0
        step = 1 << (len(tree) - 1).bit_length()
        while step:
            nxt = position + step
            if nxt < len(tree) and tree[nxt] < k:
                position = nxt
                k -= tree[nxt]
            step >>= 1
        return position + 1


@dataclass(slots=True)
class _Entry:
    # One per image of the account: its place in each large tag is found when needed
    # (a search of the tag's images, which are in id order), not kept.
    image: SimImage
    #: Whether a large tag holds it.
    large: bool = False
    #: Whether the large listings show it, one bit per kind (bit ``in_progress``).
    shown: int = 0
    #: When it is next due for a look (earlier notes of it in the queue are stale).
    due: float | None = None

    def is_shown(self, kind: bool) -> bool:
        return bool(self.shown >> kind & 1)


_ID = attrgetter("id")


class ListingIndex:
    """The images of one simulated account, arranged for listing."""

    def __init__(self, *, direct_max: int = DIRECT_MAX) -> None:
        self._direct_max = direct_max
        #: The images with each tag (or all images, for ``None``), in id order: a list, no
        #: more, since most tags (an entry's, a version's) are on one image.
        self._tags: dict[str | None, list[SimImage]] = {}
        #: Per large tag, the counts of each kind of listing (index: ``in_progress``).
        self._counts: dict[str | None, tuple[_Counts, _Counts]] = {}
        self._entries: dict[int, _Entry] = {}
        #: (when, tie-breaker, image id): images due for a look.
        self._due: list[tuple[float, int, int]] = []
        self._order = itertools.count()

    def add(self, image: SimImage) -> None:
        """A new image (its id above every earlier one)."""
        entry = _Entry(image)
        self._entries[image.id] = entry
        for tag in (None, *image.tags):
            images = self._tags.get(tag)
            if images is None:
                images = self._tags[tag] = []
            images.append(image)
            counts = self._counts.get(tag)
            if counts is not None:
                self._place(entry, counts)
            elif len(images) > self._direct_max:
                self._grow(tag, images)
        if entry.large and entry.due is None:
            self._look(entry)

    def deleted(self, image: SimImage) -> None:
        """``image`` was deleted by the user: the large listings drop it now."""
        entry = self._entries.get(image.id)
        if entry is not None and entry.large:
            self._look(entry)

    def page(
        self, tag: str | None, in_progress: bool, page: int, per_page: int, now: float
    ) -> tuple[list[SimImage], int]:
        """The images on ``page`` (1-based) of the listing, and how many match in all."""
        images = self._tags.get(tag)
        if images is None:
            return [], 0
        start = (page - 1) * per_page
        large = self._counts.get(tag)
        if large is None:
            matching = [image for image in images if visible(image, in_progress)]
            return matching[start : start + per_page], len(matching)
        self._catch_up(now)
        counts = large[in_progress]
        end = min(start + per_page, counts.total)
        found = [images[counts.find(k) - 1] for k in range(start + 1, end + 1)]
        return found, counts.total

    # -- large tags -------------------------------------------------------------

    def _grow(self, tag: str | None, images: list[SimImage]) -> None:
        counts = self._counts[tag] = (_Counts(), _Counts())
        for image in images:
            entry = self._entries[image.id]
            fresh = not entry.large
            self._place(entry, counts)
            if fresh:
                self._look(entry)  # the first large tag it is in

    def _place(self, entry: _Entry, counts: tuple[_Counts, _Counts]) -> None:
        """Put ``entry`` at the next position of a large tag's counts (its place in the tag)."""
        entry.large = True
        for kind in (False, True):
            counts[kind].append(entry.is_shown(kind))

    def _positions(self, image: SimImage) -> Iterator[tuple[_Counts, _Counts, int]]:
        """The counts of each large tag placed to hold ``image``, and its position there."""
        for tag in (None, *image.tags):
            counts = self._counts.get(tag)
            if counts is None:
                continue
            images = self._tags[tag]
            position = bisect_left(images, image.id, key=_ID)
            # A tag it is not appended to yet (its add is under way) does not count it.
            if position < len(images) and images[position] is image:
                yield (*counts, position + 1)

    def _catch_up(self, now: float) -> None:
        due = self._due
        while due and due[0][0] <= now:
            when, _, image_id = heapq.heappop(due)
            entry = self._entries[image_id]
            if entry.due == when:
                self._look(entry)

    def _look(self, entry: _Entry) -> None:
        """Read ``entry``'s status from the clock; update the counts; note when to look again."""
        image = entry.image
        for kind in (False, True):
            now_shown = visible(image, kind)
            if now_shown != entry.is_shown(kind):
                entry.shown ^= 1 << kind
                delta = 1 if now_shown else -1
                for *counts, position in self._positions(image):
                    counts[kind].add(position, delta)
        entry.due = None
        if image.deleted_by_user:
            return  # nothing changes any more
        plan, elapsed = image.plan, image.elapsed
        # Where the status may still change: turning available, or deleted by a failure.
        ahead = [
            threshold
            for threshold in (plan.ready_after, plan.fail_after)
            if threshold is not None and math.isfinite(threshold) and elapsed < threshold
        ]
        if ahead:
            when = image.created_mono + min(ahead)
            # Looked too early (by a rounding error at most): look again just after now.
            when = max(when - EARLY, math.nextafter(image.created_mono + elapsed, math.inf))
            entry.due = when
            heapq.heappush(self._due, (when, next(self._order), image.id))
