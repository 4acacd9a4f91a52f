"""One source of time: sleeps and deadlines both follow the clock the code was given."""

from __future__ import annotations

import anyio
import pytest

from tests.fakes import FakeClock


@pytest.mark.anyio
async def test_a_deadline_gives_up_on_the_clocks_time() -> None:
    """clock.move_on_after(30) around a 100 s sleep gives up after exactly 30 s of that clock."""
    clock = FakeClock()
    start = clock.monotonic()
    with clock.move_on_after(30.0) as scope:
        await clock.sleep(100.0)
    assert scope.cancelled_caught
    assert clock.monotonic() - start == pytest.approx(30.0)


@pytest.mark.anyio
async def test_advancing_the_fake_moves_deadlines_and_anyio_alike() -> None:
    """FakeClock.advance moves the loop's time: the clock, anyio and deadlines agree."""
    clock = FakeClock()
    wall, loop_time = clock.wall(), anyio.current_time()
    with clock.move_on_after(60.0) as scope:
        clock.advance(61.0)
        await clock.sleep(10.0)  # the deadline passed already: cancelled at once
    assert scope.cancelled_caught
    assert clock.now == anyio.current_time() == pytest.approx(loop_time + 61.0)
    assert clock.wall() == pytest.approx(wall + 61.0)
