"""The due-time queue of the watch loops (the status poller's, the transfers')."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anyio
import pytest

from importer.schedule import DueQueue, batch_window, last_call_due, not_after_last_call
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio


@dataclass(eq=False)
class _Watch:
    name: str
    due: float = 0.0
    done: anyio.Event = field(default_factory=anyio.Event)


def _queue(
    clock: FakeClock, *names: str, seed: int = 0
) -> tuple[DueQueue[str, _Watch], dict[str, _Watch]]:
    watches = {name: _Watch(name) for name in names}
    return DueQueue(clock, watches, key=lambda w: w.name, rng=random.Random(seed)), watches


def _set_due(
    queue: DueQueue[str, _Watch], watches: dict[str, _Watch], at: float, *dues: tuple[str, float]
) -> None:
    """Each named watch due ``at`` plus its offset, in the order given."""
    for name, offset in dues:
        queue.set_due(watches[name], at + offset)


async def test_pop_due_takes_what_is_due_within_the_window_earliest_first() -> None:
    """Watches due by now + window come out in due order; later ones stay for later."""
    clock = FakeClock()
    queue, watches = _queue(clock, "a", "b", "c", "d")
    now = clock.now
    _set_due(queue, watches, now, ("c", 4.0), ("a", -1.0), ("d", 6.0), ("b", 2.0))
    assert [w.name for w in queue.pop_due(5.0)] == ["a", "b", "c"]
    assert queue.pop_due(5.0) == []
    clock.advance(1.0)
    assert [w.name for w in queue.pop_due(5.0)] == ["d"]


async def test_a_watch_set_due_again_comes_out_once_at_its_new_time() -> None:
    """Setting a watch due again leaves its earlier time stale, earlier or later."""
    clock = FakeClock()
    queue, watches = _queue(clock, "a", "b")
    now = clock.now
    _set_due(queue, watches, now, ("a", 1.0), ("a", 10.0), ("b", 10.0), ("b", 2.0))
    assert [w.name for w in queue.pop_due(3.0)] == ["b"]
    assert watches["a"].due == now + 10.0
    assert [w.name for w in queue.pop_due(11.0)] == ["a"]


async def test_done_and_forgotten_watches_are_passed_over() -> None:
    """A watch that ended, or that its owner no longer holds, is never popped."""
    clock = FakeClock()
    queue, watches = _queue(clock, "a", "b", "c")
    for watch in watches.values():
        queue.set_due(watch, clock.now)
    watches["a"].done.set()
    del watches["b"]
    assert [w.name for w in queue.pop_due(0.0)] == ["c"]


async def test_sleep_until_next_wakes_when_the_earliest_is_due() -> None:
    """The sleep lasts exactly until the head of the queue is due, not longer."""
    clock = FakeClock()
    queue, watches = _queue(clock, "a", "b")
    start = clock.now
    _set_due(queue, watches, start, ("b", 30.0), ("a", 12.0))
    await queue.sleep_until_next()
    assert clock.now == pytest.approx(start + 12.0)


@pytest.mark.parametrize(("second", "woken"), [(20.0, 5.0), (50.0, 40.0)])
async def test_only_a_new_earliest_due_time_ends_the_sleep(second: float, woken: float) -> None:
    """A watch set due before the head wakes the loop at once; one behind it waits its turn."""
    clock = FakeClock()
    queue, watches = _queue(clock, "a", "b")
    start = clock.now
    queue.set_due(watches["a"], start + 40.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.sleep_until_next)
        await clock.sleep(5.0)
        queue.set_due(watches["b"], start + second)
    assert clock.now == pytest.approx(start + woken)


async def test_an_empty_queue_sleeps_until_a_watch_is_set_due() -> None:
    """With nothing due, the loop sleeps for good, and the first watch set due wakes it."""
    clock = FakeClock()
    queue, watches = _queue(clock, "a")
    start = clock.now
    with anyio.fail_after(1000.0):
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.sleep_until_next)
            await clock.sleep(500.0)
            queue.set_due(watches["a"], clock.now + 100.0)
    assert clock.now == pytest.approx(start + 500.0)


async def test_jitter_stays_within_a_tenth_of_the_wait_and_spreads() -> None:
    """Scheduled times fall within +/-10% of the wait, and not all on one time."""
    clock = FakeClock()
    queue, watches = _queue(clock, *(f"w{i}" for i in range(200)), seed=7)
    now = clock.now
    for watch in watches.values():
        queue.schedule(watch, now + 100.0)
    dues = [watch.due - now for watch in watches.values()]
    assert all(90.0 <= due <= 110.0 for due in dues)
    assert max(dues) - min(dues) > 15.0
    assert queue.jittered(now) == now  # due now: no wait to jitter


def test_a_check_never_comes_after_the_last_call_until_asked() -> None:
    """Brought forward to the last call (never into the past), unless asked for by id."""
    assert not_after_last_call(500.0, last_call=400.0, asked=False, now=100.0) == 400.0
    assert not_after_last_call(500.0, last_call=400.0, asked=False, now=450.0) == 450.0
    assert not_after_last_call(300.0, last_call=400.0, asked=False, now=100.0) == 300.0
    assert not_after_last_call(500.0, last_call=400.0, asked=True, now=100.0) == 500.0


def test_the_last_call_is_due_from_its_time_until_asked() -> None:
    """Due from the last call on, and never once the watch was asked for by id."""
    assert not last_call_due(last_call=400.0, asked=False, now=399.0)
    assert last_call_due(last_call=400.0, asked=False, now=400.0)
    assert not last_call_due(last_call=400.0, asked=True, now=500.0)


def test_the_batch_window_is_a_quarter_interval_at_most_five_seconds() -> None:
    """Checks due within a quarter of the interval go together, capped at 5 s."""
    assert batch_window(8.0) == 2.0
    assert batch_window(30.0) == 5.0
