"""The live view: rendered from fixed snapshots, fed incrementally, and never off a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from importer.cli import main
from importer.live import render
from importer.logs import reset_logging
from importer.pipeline import run_import
from importer.progress import Failure, RunMonitor, RunSnapshot, Tally, preparing
from importer.report import ImageResult, Outcome
from importer.simulator import SimulatorConfig, run_simulator
from importer.sizing import HeadSizer
from tests.helpers import image_urls, manifest_of, settings_for
from tests.processes import ENV

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A command run in-process configures logging: leave none of it to the next test."""
    yield
    reset_logging()


T = 1_790_000_000.0
MID_RUN = RunSnapshot(
    total=10_000,
    counts=(
        ("planned", 6_766),
        ("importing", 2_000),
        ("available", 1_200),
        ("failed", 30),
        ("timed_out", 4),
    ),
    in_flight=2_000,
    requests=3_456,
    rate_limited=0,
    hour_used=1_900,
    hour_budget=4_500,
    started_at=T,
    now=T + 723,
    expected_end=T + 723 + 1_860,
    failures=(
        Failure(
            "db-postgres-16",
            "nyc3",
            "failed",
            "We had a problem decompressing your file. This typically happens if the archive is "
            "corrupt",
        ),
        Failure("legacy-app", "ams3", "timed_out", "timed out waiting for the import"),
    ),
)


def rendered(snapshot: RunSnapshot, width: int = 100) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(render(snapshot))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def test_view_mid_run() -> None:
    """Counts by state, images in flight, the hour's budget, the expected end, the failures."""
    assert rendered(MID_RUN) == "\n".join(
        [
            "run          1,234 of 10,000 finished, 12m03s elapsed",
            "entries      1,200 available  30 failed  4 timed_out  2,000 importing  6,766 planned",
            "in flight    2,000 images",
            "requests     1,900 of 4,500 this hour ━━━━━━━━             42%  (3,456 in all, 0 "
            "rate-limited)",
            "last import  expected to end at 14:56:23 UTC (in 31m00s); 6,766 not started yet",
            "latest failures",
            "failed    db-postgres-16 (nyc3) We had a problem decompressing your file. This "
            "typically happens if…",
            "timed_out legacy-app (ams3)     timed out waiting for the import",
        ]
    )


def test_view_on_a_narrow_terminal_cuts_errors_not_names() -> None:
    """At 60 columns, a failure keeps its outcome and name; its error is cut short."""
    text = rendered(MID_RUN, width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "failed    db-postgres-16 (nyc3) We had a problem decompress…" in text
    assert "timed_out legacy-app (ams3)" in text


def test_view_before_the_first_request_and_while_stopping() -> None:
    """Sizing the sources: what it does, all planned; a stopping run says why."""
    assert rendered(preparing(5, "sizing the sources", T, T + 3)) == "\n".join(
        [
            "run          0 of 5 finished, 3s elapsed, sizing the sources",
            "entries      5 planned",
            "in flight    0 images",
            "requests     0 in all, 0 rate-limited",
            "last import  none in flight",
        ]
    )
    learning = RunSnapshot(
        total=2, counts=(("importing", 1), ("available", 1)), in_flight=1, requests=3,
        rate_limited=1, hour_used=3, hour_budget=4_500, started_at=T, now=T + 7_500,
        expected_end=None, failures=(), stopping="deadline",
    )  # fmt: skip
    text = rendered(learning)
    assert text.splitlines()[0] == "run          1 of 2 finished, 2h05m elapsed, stopping: deadline"
    assert "in flight    1 image\n" in text
    assert "expected end not known yet (learning how long imports take)" in text


@given(st.lists(st.tuples(st.integers(0, 19), st.sampled_from(["planned", "importing", "done"]))))
def test_tally_counts_match_a_recount(moves: list[tuple[int, str]]) -> None:
    """Whatever the moves, the incremental counts equal counting every entry again."""
    labels = dict.fromkeys(range(20), "planned")
    tally = Tally(labels)
    for index, label in moves:
        tally.move(index, label)
        labels[index] = label
    assert dict(tally.counts()) == Counter(labels.values())
    assert tally.total == 20


def test_tally_keeps_the_latest_failures_newest_first() -> None:
    """Five failures at most, the newest first."""
    tally = Tally({})
    for i in range(7):
        tally.failed(ImageResult(i, f"img-{i}", "nyc3", "t", Outcome.FAILED, error=f"e{i}"))
    assert [f.name for f in tally.failures()] == [f"img-{i}" for i in (6, 5, 4, 3, 2)]


@pytest.mark.anyio
async def test_snapshots_follow_the_run() -> None:
    """Sampled during a run: counts add up, requests and the hour's use grow, failures show."""
    monitors: list[RunMonitor] = []
    snapshots: list[RunSnapshot] = []
    urls = [*image_urls(8), "https://images.example.com/bad-fail-fast.qcow2"]

    def sample(report: object) -> None:
        snapshots.append(monitors[0].snapshot())

    async with run_simulator(SimulatorConfig.demo(pending_seconds=150.0)) as sim:
        report = await run_import(
            manifest_of(*urls),
            settings_for(sim.base_url),
            on_start=monitors.append,
            on_checkpoint=sample,
        )
    final = monitors[0].snapshot()
    assert len(snapshots) >= 2
    for snapshot in [*snapshots, final]:
        assert sum(count for _, count in snapshot.counts) == 9
        assert snapshot.hour_budget == 4_500
        assert snapshot.hour_used == snapshot.requests  # everything within the hour
    assert snapshots[0].in_flight == 8  # the quick failure is already over
    assert [f.name for f in snapshots[0].failures] == ["img-8"]
    assert [s.requests for s in snapshots] == sorted(s.requests for s in snapshots)
    assert dict(final.counts) == {"available": 8, "failed": 1}
    assert final.in_flight == 0
    assert final.requests == report.requests


@pytest.mark.anyio
async def test_expected_end_comes_from_the_learned_durations() -> None:
    """Imports of 60 s + 60 s/GiB: once three have finished, the last (6 GiB) is due at ~420 s."""
    monitors: list[RunMonitor] = []
    ends: list[tuple[float, float | None]] = []

    def sample(report: object) -> None:
        snapshot = monitors[0].snapshot()
        if snapshot.in_flight:
            ends.append((snapshot.now, snapshot.expected_end))

    config = SimulatorConfig.demo(
        new_seconds=30.0, pending_seconds=30.0, seconds_per_gib=60.0, duration_noise=0.0
    )
    async with run_simulator(config) as sim:
        # Sized sources (the simulator's file host), so that durations are fitted to sizes.
        urls = [sim.file_url(f"img-{size}-size-{size}G.qcow2") for size in range(1, 7)]
        report = await run_import(
            manifest_of(*urls),
            settings_for(sim.base_url, first_poll=30.0, poll_interval=10.0),
            sizer=HeadSizer(),
            seed=1,
            on_start=monitors.append,
            on_checkpoint=sample,
        )
    assert {r.outcome for r in report.images} == {Outcome.AVAILABLE}
    started = report.started_at
    estimates = [(round(now - started), end and end - started) for now, end in ends]
    # Nothing learned before three imports finished (the third at 240 s).
    assert [now for now, end in estimates if end is None] == [60, 120, 180, 240]
    known = [(now, end) for now, end in estimates if end is not None]
    assert [now for now, _ in known] == [300, 360, 420]
    for _, end in known:
        assert 400 <= end <= 460, known  # it ends at 420 s (seen within a poll interval)


def test_piped_stderr_gets_no_control_codes(tmp_path: Path) -> None:
    """Stderr not a terminal (even with FORCE_COLOR set): plain log lines, no escape code at all."""
    command = [
        sys.executable, "-m", "importer", "run", str(MANIFESTS / "example-failures.yaml"),
        "--simulate", "--virtual-time", "--report", str(tmp_path / "r.json"),
    ]  # fmt: skip
    env = {**ENV, "FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "120"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1
    assert "\x1b" not in done.stderr
    assert "\x1b" not in done.stdout
    assert "image.submitted" in done.stderr  # the logs, as ever
    assert "in flight" not in done.stderr


def run_on_a_terminal(*flags: str, tmp_path: Path) -> tuple[int, str, str]:
    """Run the failures example with stderr on a pseudo-terminal; (exit code, stdout, terminal)."""
    command = [
        sys.executable, "-m", "importer", "run", str(MANIFESTS / "example-failures.yaml"),
        "--simulate", "--virtual-time", "--report", str(tmp_path / "r.json"), *flags,
    ]  # fmt: skip
    leader, follower = pty.openpty()
    env = {**ENV, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, env=env
    ) as process:
        os.close(follower)
        screen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(leader, 65536)
            except OSError:  # the other side closed: the process is done
                break
            if not data:
                break
            screen += data
        assert process.stdout is not None
        out = process.stdout.read().decode()
        process.wait(timeout=60)
    os.close(leader)
    return process.returncode, out, screen.decode(errors="replace")


@pytest.mark.slow
def test_terminal_shows_the_view_and_only_warnings(tmp_path: Path) -> None:
    """On a terminal: the live view, warnings above it, no info lines; the summary on stdout."""
    code, out, screen = run_on_a_terminal(tmp_path=tmp_path)
    assert code == 1
    assert "in flight" in screen
    assert "latest failures" in screen
    assert "image.failed" in screen  # a warning
    assert "image.submitted" not in screen  # an info line: the view says it
    assert out.startswith("5 images: 2 available, 3 failed")


@pytest.mark.slow
def test_quiet_on_a_terminal_is_warnings_and_the_summary(tmp_path: Path) -> None:
    """`-q`: no view, only warnings on the terminal; the summary alone on stdout."""
    code, out, screen = run_on_a_terminal("-q", tmp_path=tmp_path)
    assert code == 1
    assert "in flight" not in screen
    assert "image.failed" in screen
    assert "image.submitted" not in screen
    assert "report written" not in out
    assert out.startswith("5 images: 2 available, 3 failed")


def test_quiet_and_verbose_together_are_refused(tmp_path: Path) -> None:
    """`-q -v`: exit 2, one line."""
    result = CliRunner().invoke(
        main, ["run", str(MANIFESTS / "example.yaml"), "--simulate", "-q", "-v"]
    )
    assert result.exit_code == 2
    assert "-q and -v" in result.stderr


@pytest.mark.slow
def test_verbose_on_a_terminal_shows_every_line_above_the_view(tmp_path: Path) -> None:
    """`-v`: the view, and every log line (info ones too) scrolling above it."""
    code, _, screen = run_on_a_terminal("-v", tmp_path=tmp_path)
    assert code == 1
    assert "in flight" in screen
    assert "image.submitted" in screen
