"""How big each source image is, to import the longest first.

An import's duration grows with the size of its file, and the file's size is one
``HEAD`` away on the image host (which DigitalOcean needs to answer ``HEAD``
anyway): no API budget is spent, and no token is sent. A size that cannot be
learned (no ``Content-Length``, an error, a presigned URL that refuses ``HEAD``)
is ``None``; such entries keep their manifest order, ahead of the sized ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import aiohttp
import anyio
import structlog

from importer.clock import Clock, LoopClock
from importer.manifest import Entry

#: Maps a manifest URL to the URL to ask (the simulator serves sizes for any name).
UrlRewrite = Callable[[str], str]


class HeadSizer:
    """Learns sizes with concurrent ``HEAD`` requests, bounded and time-limited."""

    def __init__(
        self,
        *,
        concurrency: int = 16,
        timeout: float = 10.0,
        total_timeout: float = 60.0,
        rewrite: UrlRewrite | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._concurrency = concurrency
        self._timeout = timeout
        # Sizing only orders the work: it must never hold the run up for long.
        self._total_timeout = total_timeout
        self._rewrite = rewrite
        self._clock = clock or LoopClock()
        self._log = structlog.get_logger("importer.sizing")

    async def sizes(self, entries: Sequence[Entry]) -> dict[int, int | None]:
        """Size in bytes of each entry's file, by entry index (``None`` if unknown)."""
        sizes: dict[int, int | None] = {}
        limiter = anyio.CapacityLimiter(self._concurrency)
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(entry: Entry) -> None:
                async with limiter:
                    sizes[entry.index] = await self._head(session, entry.url)

            with self._clock.move_on_after(self._total_timeout):
                async with anyio.create_task_group() as tg:
                    for entry in entries:
                        tg.start_soon(one, entry)
        known = sum(size is not None for size in sizes.values())
        self._log.info("plan.sized", images=len(entries), sized=known)
        return sizes

    async def _head(self, session: aiohttp.ClientSession, url: str) -> int | None:
        target = self._rewrite(url) if self._rewrite else url
        try:
            async with session.head(target, allow_redirects=True) as response:
                if response.status != 200:
                    return None
                length = response.headers.get("Content-Length", "")
                return int(length) if length.isdigit() else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
