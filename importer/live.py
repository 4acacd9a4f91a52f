"""The live view of a run on a terminal (stderr), rendered with rich.

It shows what a person watching a long run asks: how far it is (entries by
state), how many images are in flight, how much of the hour's request budget is
used, when the last import should end (from the durations the poller has seen),
and the latest failures. It is drawn only when stderr is a terminal and the logs
are for people; otherwise the logs go on as they are (see :mod:`importer.cli`).

:func:`render` is a pure function of a :class:`~importer.progress.RunSnapshot`,
so the view is tested by rendering fixed snapshots to a recording console.
While the view is up, log lines are printed above it through :attr:`LiveView.stream`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO, cast

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from importer.clock import Clock
from importer.progress import PLANNED, RunSnapshot

#: Order of the labels in the counts line; others follow, largest first.
_ORDER = (
    "available",
    "failed",
    "timed_out",
    "rejected",
    "unchanged",
    "creating",
    "uncertain",
    "importing",
    "transferring",
    "rotating",
    "planned",
    "pending",
    "not_submitted",
)
_STYLES = {
    "available": "green",
    "failed": "red",
    "timed_out": "red",
    "rejected": "red",
    "importing": "cyan",
    "pending": "yellow",
}


def render(snapshot: RunSnapshot) -> RenderableType:
    """The view of one instant of a run."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    elapsed = _duration(snapshot.now - snapshot.started_at)
    head = Text.assemble(
        (f"{snapshot.finished:,}", "bold"), f" of {snapshot.total:,} finished, {elapsed} elapsed"
    )
    if snapshot.stopping:
        head.append(f", stopping: {snapshot.stopping}", style="yellow")
    if snapshot.preparing:
        head.append(f", {snapshot.preparing}")
    grid.add_row("run", head)
    grid.add_row("entries", _counts(snapshot))
    grid.add_row(
        "in flight", f"{snapshot.in_flight:,} image{'' if snapshot.in_flight == 1 else 's'}"
    )
    grid.add_row("requests", _requests(snapshot))
    grid.add_row("last import", _expected_end(snapshot))
    parts: list[RenderableType] = [grid]
    if snapshot.failures:
        # The error gives way to the terminal's width; the outcome and name do not.
        failures = Table.grid(padding=(0, 1), expand=True)
        failures.add_column(style="red", no_wrap=True)
        failures.add_column(no_wrap=True)
        failures.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
        for failure in snapshot.failures:
            failures.add_row(
                failure.outcome, f"{failure.name} ({failure.region})", failure.error or ""
            )
        parts.extend([Text("latest failures", style="bold"), failures])
    return Group(*parts)


def _counts(snapshot: RunSnapshot) -> Text:
    counts = dict(snapshot.counts)
    labels = [label for label in _ORDER if counts.get(label)]
    labels += [label for label, _ in snapshot.counts if label not in _ORDER]
    text = Text()
    for i, label in enumerate(labels):
        if i:
            text.append("  ")
        text.append(f"{counts[label]:,} ", style="bold")
        text.append(label, style=_STYLES.get(label, ""))
    return text or Text("none")


def _requests(snapshot: RunSnapshot) -> RenderableType:
    total = f"{snapshot.requests:,} in all, {snapshot.rate_limited:,} rate-limited"
    if snapshot.hour_used is None or not snapshot.hour_budget:
        return Text(total)
    share = snapshot.hour_used / snapshot.hour_budget
    row = Table.grid(padding=(0, 1))
    row.add_row(
        f"{snapshot.hour_used:,} of {snapshot.hour_budget:,} this hour",
        ProgressBar(total=snapshot.hour_budget, completed=snapshot.hour_used, width=20),
        f"{share:.0%}  ({total})",
    )
    return row


def _expected_end(snapshot: RunSnapshot) -> str:
    if snapshot.expected_end is None:
        if snapshot.in_flight:
            return "expected end not known yet (learning how long imports take)"
        return "none in flight"
    clock = datetime.fromtimestamp(snapshot.expected_end, tz=UTC).strftime("%H:%M:%S UTC")
    planned = snapshot.count(PLANNED)
    later = f"; {planned:,} not started yet" if planned else ""
    if snapshot.expected_end <= snapshot.now:
        return f"expected by {clock}, running late: any moment now{later}"
    left = _duration(snapshot.expected_end - snapshot.now)
    return f"expected to end at {clock} (in {left}){later}"


def _duration(seconds: float) -> str:
    """``45s``, ``12m03s``, ``2h05m``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class _LinesAbove:
    """A text stream whose complete lines are printed above the live view."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            # Log lines carry their own colours (ANSI codes): keep them, add none.
            self._console.print(Text.from_ansi(line), highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self.write("\n")

    def isatty(self) -> bool:
        return self._console.is_terminal


class LiveView:
    """A live view on ``console`` (stderr) for the length of a ``with`` block."""

    def __init__(self, console: Console | None = None, refresh: float = 1.0) -> None:
        self.console = console or Console(stderr=True)
        self._refresh = refresh
        # The run's own clock paces the redraws; rich's thread would not follow virtual time.
        self._live = Live(
            Text(""),
            console=self.console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        #: Where logs go while the view is up: printed above it, line by line. (Loggers
        #: only write, flush and ask isatty.)
        self.stream = cast(TextIO, _LinesAbove(self.console))

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.stop()
        self.stream.flush()

    def show(self, snapshot: RunSnapshot) -> None:
        self._live.update(render(snapshot), refresh=True)

    async def follow(self, source: Callable[[], RunSnapshot], clock: Clock) -> None:
        """Redraw from ``source`` every ``refresh`` seconds of ``clock``, until cancelled."""
        while True:
            self.show(source())
            await clock.sleep(self._refresh)
