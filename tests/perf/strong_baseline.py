"""The strong baseline: what a competent engineer writes in an afternoon with pydo.aio.

It knows the token's limits and that POSTs must not be retried blindly, and does the
obvious right things, no more:

* **Largest first.** It sizes every file with ``HEAD`` (aiohttp, 16 at a time, no time
  limit), then creates the largest first; files it could not size go last.
* **One pacer** for every API request, at the rate the importer allows itself (225 a
  minute, 4,500 an hour by default): both sliding windows are kept on the client, and the
  creates and the listings take turns at it in the order they asked.
* **One listing every 30 s.** Every create carries a *run tag*; every 30 s it lists the
  images with that tag (``per_page=200``, every page; when the first page's ``meta.total``
  says nothing new is listed, that page is all). An image listed ``available`` is done.
* **No blind POST retries.** A 429 says nothing was created: the request waits for
  ``retry-after`` (or until ``ratelimit-reset`` when the hour is spent, else a minute),
  and every other request waits with it. A create answered with a 5xx or not at all may
  have made the image: the listing finds it by name; if it has not shown up
  ``UNCERTAIN_WAIT`` seconds later, it is created again. A listing page that fails is
  read again at the next poll. pydo's own retries are off (``retry_total=0``), so that
  all of this is the script's.

What it does not do: group tags (one listing page tells the status of only 200 images, and
a run's listing grows with every image that finishes), a learned schedule, reading the
token's remaining budget from the answers, or deleting duplicate images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import aiohttp
import anyio
from azure.core.exceptions import AzureError, HttpResponseError
from pydo.aio import Client

from importer.clock import Clock
from importer.manifest import Entry
from tests.perf.baseline import BaselineResult, _create_body, _error_name
from tests.perf.windows import RequestLog

POLL_INTERVAL = 30.0
PER_PAGE = 200
HEAD_CONCURRENCY = 16
#: Seconds after a create whose answer was lost before it is sent again: the longest an
#: import is given (the importer's default timeout, and Terraform's), since a listing may
#: hide an image until its import is over.
UNCERTAIN_WAIT = 60 * 60.0
#: Wait after a 429 that names no time.
DEFAULT_PAUSE = 60.0


class Pacer:
    """Every request waits here for room in both windows, in the order they asked."""

    def __init__(self, clock: Clock, per_minute: int, per_hour: int) -> None:
        self._clock = clock
        self._log = RequestLog.per(per_minute, per_hour)
        self._lock = anyio.Lock()
        self._paused_until = 0.0

    async def turn(self) -> None:
        async with self._lock:
            while True:
                now = self._clock.monotonic()
                wait = max(self._log.wait_time(now), self._paused_until - now)
                if wait <= 0:
                    break
                await self._clock.sleep(wait)
            self._log.record(self._clock.monotonic())

    def pause(self, seconds: float) -> None:
        """No request goes for ``seconds`` (a 429 asked for it)."""
        self._paused_until = max(self._paused_until, self._clock.monotonic() + seconds)


class StrongImporter:
    """Sizes, creates largest first under one pacer, and lists a run tag every 30 s."""

    def __init__(
        self,
        client: Client,
        clock: Clock,
        *,
        run_tag: str,
        per_minute: int = 225,
        per_hour: int = 4500,
        poll_interval: float = POLL_INTERVAL,
        enforce_https: bool = True,
    ) -> None:
        self._client = client
        self._clock = clock
        self._run_tag = run_tag
        self._pacer = Pacer(clock, per_minute, per_hour)
        self._poll_interval = poll_interval
        # No retries inside pydo: the script decides. azure-core refuses a bearer token over
        # plain http unless each call says otherwise; the simulator serves plain http.
        self._options: dict[str, Any] = {"retry_total": 0}
        if not enforce_https:
            self._options["enforce_https"] = False
        #: Entry index -> what is known of it.
        self.results: dict[int, BaselineResult] = {}
        self._by_name: dict[str, Entry] = {}
        #: Entry index -> clock time its latest create's answer was lost.
        self._uncertain: dict[int, float] = {}
        self._entries: dict[int, Entry] = {}
        #: What the last full listing counted, and whether every image in it was available.
        self._listed = 0
        self._listed_all_available = False
        self._done = anyio.Event()

    async def run(self, entries: Sequence[Entry]) -> None:
        """Import every entry; returns when each is available (or failed to be created)."""
        for entry in entries:
            self.results[entry.index] = BaselineResult(entry.index)
            self._by_name[entry.name] = entry
            self._entries[entry.index] = entry
        sizes = await self._sizes(entries)
        order = sorted(entries, key=lambda e: (-sizes.get(e.index, -1), e.index))
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch)
            for entry in order:
                await self._create(entry)
            self._check_done()
            await self._done.wait()
            group.cancel_scope.cancel()

    async def _sizes(self, entries: Sequence[Entry]) -> dict[int, int]:
        sizes: dict[int, int] = {}
        limiter = anyio.CapacityLimiter(HEAD_CONCURRENCY)
        async with aiohttp.ClientSession() as http:

            async def head(entry: Entry) -> None:
                async with limiter:
                    try:
                        async with http.head(entry.url, allow_redirects=True) as answer:
                            if answer.status == 200 and answer.content_length is not None:
                                sizes[entry.index] = answer.content_length
                    except (aiohttp.ClientError, TimeoutError):
                        pass  # unknown size: it goes last

            async with anyio.create_task_group() as group:
                for entry in entries:
                    group.start_soon(head, entry)
        return sizes

    async def _create(self, entry: Entry) -> None:
        result = self.results[entry.index]
        body = _create_body(entry)
        body["tags"] = [*body.get("tags", []), self._run_tag]
        while True:
            await self._pacer.turn()
            try:
                created = await self._client.images.create_custom(body=body, **self._options)
            except HttpResponseError as exc:
                if exc.status_code == 429:
                    self._pacer.pause(self._pause_for(exc))
                    continue  # not created: safe to send again
                if exc.status_code is not None and exc.status_code < 500:
                    result.error = f"{_error_name(exc)} on create"
                    return
                self._uncertain[entry.index] = self._clock.monotonic()
                return
            except AzureError:
                self._uncertain[entry.index] = self._clock.monotonic()
                return
            image = created["image"]
            result.image_id = int(image["id"])
            result.status = str(image["status"])
            self._uncertain.pop(entry.index, None)
            return

    def _pause_for(self, exc: HttpResponseError) -> float:
        response: Any = exc.response  # azure-core's types leave the headers out
        headers = response.headers if response is not None else {}
        if "retry-after" in headers:
            return float(headers["retry-after"])
        if headers.get("ratelimit-remaining") == "0" and "ratelimit-reset" in headers:
            return max(1.0, float(headers["ratelimit-reset"]) - self._clock.wall())
        return DEFAULT_PAUSE

    async def _watch(self) -> None:
        while True:
            await self._clock.sleep(self._poll_interval)
            await self._list()
            await self._recreate_lost()
            self._check_done()

    async def _list(self) -> None:
        page = 1
        pages = 1
        all_available = True
        while page <= pages:
            await self._pacer.turn()
            try:
                answer = await self._client.images.list(
                    tag_name=self._run_tag, private=True, per_page=PER_PAGE, page=page,
                    **self._options,
                )  # fmt: skip
            except HttpResponseError as exc:
                if exc.status_code == 429:
                    self._pacer.pause(self._pause_for(exc))
                return  # read again at the next poll
            except AzureError:
                return
            total = int(answer.get("meta", {}).get("total", 0))
            if page == 1 and total == self._listed and self._listed_all_available:
                return  # the same images as last time, all of them known to be available
            pages = max(1, math.ceil(total / PER_PAGE))
            now = self._clock.wall()
            for image in answer.get("images", []):
                self._note(image, now)
                all_available &= image.get("status") == "available"
            if page == pages:
                self._listed, self._listed_all_available = total, all_available
            page += 1

    def _note(self, image: dict[str, Any], now: float) -> None:
        entry = self._by_name.get(str(image.get("name")))
        if entry is None:
            return
        result = self.results[entry.index]
        if result.image_id is None:
            result.image_id = int(image["id"])  # a create whose answer was lost
            self._uncertain.pop(entry.index, None)
        if int(image["id"]) != result.image_id:
            return  # another copy of the entry: not this script's business
        result.status = str(image.get("status"))
        if result.status == "available" and result.detected_at is None:
            result.detected_at = now

    async def _recreate_lost(self) -> None:
        now = self._clock.monotonic()
        late = [i for i, since in self._uncertain.items() if now - since >= UNCERTAIN_WAIT]
        for index in late:
            del self._uncertain[index]
            await self._create(self._entries[index])

    def _check_done(self) -> None:
        if all(r.finished for r in self.results.values()):
            self._done.set()
