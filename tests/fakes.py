"""Test doubles: a clock whose time moves only when told."""

from __future__ import annotations

import anyio


class FakeClock:
    """Manual time: ``sleep`` moves time forward by exactly its argument, at once.

    Right for code where one task waits at a time (as inside the governor's
    queue); tests of many concurrent sleepers use the virtual-time loop instead.
    """

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall_offset = wall_offset
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self._wall_offset + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()

    def advance(self, seconds: float) -> None:
        self.now += seconds
