"""Time, from one place.

Everything that waits, gives up or measures time takes a :class:`Clock`. The production
clock, :class:`LoopClock`, reads the running event loop's time, so the same code
runs on real time or, under :class:`VirtualTimeLoop`, on virtual time that jumps
forward whenever every task is waiting: a whole import of minutes-long images
then finishes in a fraction of a second of wall time, with every timestamp,
deadline and rate-limit window computed exactly as it would be for real.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio


class Clock(Protocol):
    """A source of time and a way to wait for it."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    def wall(self) -> float:
        """Unix time, for timestamps people and the API read."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...

    def move_on_after(self, seconds: float) -> anyio.CancelScope:
        """A cancel scope that gives up ``seconds`` from now, in this clock's time."""
        ...


class LoopClock:
    """The running event loop's clock, with a wall-clock anchor.

    ``monotonic`` is the loop's own time (which anyio's deadlines use too), and
    ``wall`` is that time shifted to Unix time once, at first use. Under a
    :class:`VirtualTimeLoop` both are virtual; ``epoch`` fixes where virtual wall
    time starts, so simulated runs are reproducible. Without one, every clock on
    a virtual loop shares the loop's own anchor, so that two runs on one loop
    (a run, then its rerun) agree on wall time as two real processes would.
    """

    def __init__(self, epoch: float | None = None) -> None:
        self._epoch = epoch
        self._anchor: tuple[float, float] | None = None

    def monotonic(self) -> float:
        return anyio.current_time()

    def wall(self) -> float:
        now = anyio.current_time()
        if self._anchor is None:
            if self._epoch is not None:
                self._anchor = (now, self._epoch)
            else:
                self._anchor = _loop_anchor() or (now, time.time())
        loop_start, wall_start = self._anchor
        return wall_start + (now - loop_start)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def move_on_after(self, seconds: float) -> anyio.CancelScope:
        # anyio's deadlines are in the loop's time, which is this clock's monotonic time.
        return anyio.CancelScope(deadline=self.monotonic() + seconds)


def _loop_anchor() -> tuple[float, float] | None:
    """A virtual loop's (loop time, Unix time) anchor; ``None`` on any other loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if isinstance(loop, VirtualTimeLoop):
        return (0.0, loop.wall_epoch)
    return None


def isoformat(unix: float) -> str:
    """Unix time as the API writes it: ``2020-05-04T22:23:02Z``."""
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _JumpingSelector:
    """Wraps a real selector: polls without blocking and, when nothing is ready, jumps time.

    The event loop asks the selector to block until the next timer is due. If no
    I/O is ready right now, we move the loop's virtual time to that timer instead
    of waiting for it. Loopback sockets deliver data synchronously, so a
    non-blocking poll sees every reply that is already on its way. With no timer
    at all, the loop is waiting for real I/O (another process, a thread): then we
    block for real.
    """

    def __init__(self, loop: VirtualTimeLoop, real: selectors.BaseSelector) -> None:
        self._loop = loop
        self._real = real

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            return self._real.select(None)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop whose time only moves when every task is waiting.

    Use it for tests and benchmarks whose server and client share this loop:
    ``anyio.run(main, backend_options={"loop_factory": VirtualTimeLoop})``.

    Keep threads out of such runs: while a thread works, the loop sees nothing
    ready and jumps to its next timer, so a thread's answer arrives at an
    arbitrary virtual time. (A host name makes aiohttp resolve it in a thread:
    use IP literals; ``trust_env=True`` reads proxy settings in one.)
    """

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self._virtual_now = 0.0
        #: The Unix time virtual time 0 stands for (when the loop was made).
        self.wall_epoch = time.time()
        self._selector: Any = _JumpingSelector(self, self._selector)

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move virtual time forward (never back)."""
        self._virtual_now += max(0.0, seconds)
