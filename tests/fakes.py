"""The tests' one fake of time: the virtual-time event loop.

Every async test runs on :class:`~importer.clock.VirtualTimeLoop` (see
``conftest.py``), whose time moves only when every task waits. Code under test
reads it through the production :class:`~importer.clock.LoopClock`, so sleeps,
deadlines (``Clock.move_on_after``), aiohttp's timeouts and the simulator all
share that one time. :class:`FakeClock` is that clock with a few conveniences
for tests; there is no second, hand-moved time to drift from the loop's.
"""

from __future__ import annotations

import asyncio

from importer.clock import LoopClock, VirtualTimeLoop

EPOCH = 1_700_000_000.0


class FakeClock(LoopClock):
    """:class:`LoopClock` on the virtual-time loop, with ``now`` and ``advance``."""

    def __init__(self, epoch: float = EPOCH) -> None:
        super().__init__(epoch=epoch)

    @property
    def now(self) -> float:
        """The loop's (virtual) time."""
        return self.monotonic()

    def advance(self, seconds: float) -> None:
        """Move the loop's time forward at once, as if every task had waited that long."""
        loop = asyncio.get_running_loop()
        if not isinstance(loop, VirtualTimeLoop):
            raise TypeError("advance() needs the virtual-time loop (the tests' anyio_backend)")
        loop.advance(seconds)
