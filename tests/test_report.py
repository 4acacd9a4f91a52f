"""The report file: who may read it, where it can be written, and how it reads."""

from __future__ import annotations

import gc
import json
import os
import random
import stat
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import importer.report as report_module
from importer.report import (
    ImageResult,
    OrphanResult,
    Outcome,
    Renamed,
    Report,
    ReportWriter,
    unwritable_reason,
)


def report_of(count: int, requests: int) -> Report:
    images = tuple(
        ImageResult(
            index=i, name=f"img-{i}", region="nyc3", tag="importer:0", outcome=Outcome.AVAILABLE
        )
        for i in range(count)
    )
    return Report(
        manifest="m.yaml", api_url="https://api.example.com", started_at=0.0, finished_at=1.0,
        images=images, requests=requests, rate_limited=0,
    )  # fmt: skip


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process's umask after a test sets its own."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_report_is_readable_by_others_less_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    """The report holds no secret: mode 0644 less the umask, not 0600."""
    os.umask(mask)
    path = tmp_path / "deep" / "report.json"
    report_of(1, 1).write(path)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert json.loads(path.read_text())["summary"]["available"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left


def test_report_replaces_an_older_one_whole(tmp_path: Path) -> None:
    """Writing over an existing report replaces it (atomically, through a rename)."""
    path = tmp_path / "report.json"
    path.write_text("old and longer than the new one " * 100)
    report_of(2, 3).write(path)
    assert json.loads(path.read_text())["summary"]["total"] == 2


def test_writable_places(tmp_path: Path) -> None:
    """An existing directory, or missing directories under one, can take the report."""
    assert unwritable_reason(tmp_path / "r.json") is None
    assert unwritable_reason(tmp_path / "a" / "b" / "r.json") is None
    assert not (tmp_path / "a").exists()  # checking creates nothing
    assert list(tmp_path.iterdir()) == []


def test_unwritable_places(tmp_path: Path) -> None:
    """A directory, or a path under a file, is named as the reason it cannot be written."""
    (tmp_path / "f").write_text("")
    assert unwritable_reason(tmp_path) == "it is a directory"
    assert unwritable_reason(tmp_path / "f" / "r.json") == f"{tmp_path / 'f'} is not a directory"
    assert unwritable_reason(tmp_path / "f" / "x" / "r.json") == (
        f"{tmp_path / 'f'} is not a directory"
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_even_for_root() -> None:
    """A directory no one may create files in (/proc) is found out by trying, not by mode bits."""
    reason = unwritable_reason(Path("/proc/report.json"))
    assert reason is not None
    assert reason.startswith("cannot create a file in /proc")


@pytest.mark.parametrize(
    ("count", "requests", "head"),
    [
        (1, 1, "1 image: 1 available (1 request, 0 rate-limited)"),
        (2, 0, "2 images: 2 available (0 requests, 0 rate-limited)"),
        (0, 1, "0 images: none (1 request, 0 rate-limited)"),
    ],
)
def test_summary_counts_read_as_english(count: int, requests: int, head: str) -> None:
    """One image, one request: singular; anything else: plural."""
    assert report_of(count, requests).human_summary().splitlines()[0] == head


def test_summary_of_10000_entries_fits_a_terminal() -> None:
    """Counts, then at most 20 entries needing attention, then how many more: 23 lines."""
    images = tuple(
        ImageResult(
            index=i, name=f"img-{i}", region="nyc3", tag="importer:0",
            outcome=Outcome.FAILED if i % 100 == 7 else Outcome.AVAILABLE,
            error="it broke" if i % 100 == 7 else None,
        )
        for i in range(10_000)
    )  # fmt: skip
    report = Report(
        manifest="m.yaml", api_url="https://api.example.com", started_at=0.0, finished_at=1.0,
        images=images, requests=10_500, rate_limited=0,
    )  # fmt: skip
    lines = report.human_summary().splitlines()
    assert lines[0] == "10000 images: 9900 available, 100 failed (10500 requests, 0 rate-limited)"
    assert lines[1:21] == [f"  failed        img-{i} (nyc3): it broke" for i in range(7, 2000, 100)]
    assert lines[21:] == ["  ... and 80 more (see the report)"]


def test_report_reads_back_what_it_wrote() -> None:
    """from_json(to_json()) gives the same report (to the second), the way status reads it."""
    report = Report(
        manifest="m.yaml", api_url="https://api.example.com", started_at=1_790_000_000.0,
        finished_at=1_790_000_900.0, requests=9, rate_limited=1, stopped="deadline",
        requests_by_endpoint={"POST /v2/images": 2}, set="nightly",
        images=(
            ImageResult(
                index=0, name="a", region="nyc3", tag="importer:1", outcome=Outcome.AVAILABLE,
                image_id=5, status="available", submitted_at=1_790_000_001.0,
                finished_at=1_790_000_300.0, duplicates_deleted=(7, 8),
            ),
            ImageResult(index=1, name="b", region="ams3", tag="importer:2",
                        outcome=Outcome.NOT_SUBMITTED, error="rate limited"),
        ),
    )  # fmt: skip
    assert Report.from_json(report.to_json()) == report


def test_report_v2_reads_back_renames_deletions_and_orphans() -> None:
    """The nightly fields (action, version, renames, deletions, orphans) survive the round trip."""
    report = Report(
        manifest="m.yaml", api_url="https://api.example.com", started_at=1_790_000_000.0,
        finished_at=1_790_000_900.0, requests=9, rate_limited=0, set="nightly",
        images=(
            ImageResult(
                index=0, name="a", region="nyc3", tag="importer:1", outcome=Outcome.AVAILABLE,
                image_id=6, action="replace", version="ec29c26b5064", version_source="etag",
                renamed=(Renamed(2, "a", "a@old"), Renamed(6, "a@new", "a")), deleted=(1,),
            ),
        ),
        orphans=(OrphanResult(4, "gone", "importer:9", "available", deleted=True),),
    )  # fmt: skip
    assert Report.from_json(report.to_json()) == report


def _rich_report() -> Report:
    """A report with a row of every kind the summary counts (outcomes, actions, regions...)."""
    return Report(
        manifest="m.yaml", api_url="https://api.example.com", started_at=1_790_000_000.0,
        finished_at=1_790_000_900.0, requests=9, rate_limited=1, set="nightly",
        requests_by_endpoint={"POST /v2/images": 2, "GET /v2/images": 1},
        images=(
            ImageResult(
                index=0, name="a", region="nyc3", tag="importer:1", outcome=Outcome.AVAILABLE,
                image_id=6, action="replace", version="ec29c26b5064", version_source="etag",
                renamed=(Renamed(2, "a", "a@old"),), deleted=(1,), duplicates_deleted=(7, 8),
                regions=(("ams3", "transferred"), ("sgp1", "transfer_failed: it broke")),
            ),
            ImageResult(index=1, name="b \u00e9\"", region="ams3", tag="importer:2",
                        outcome=Outcome.PENDING, image_id=9, action="create",
                        regions=(("fra1", "transferring"),)),
            ImageResult(index=2, name="c", region="sfo3", tag="importer:3",
                        outcome=Outcome.NOT_SUBMITTED, error="rate limited"),
        ),
        orphans=(OrphanResult(4, "gone", "importer:9", "available", deleted=True),),
    )  # fmt: skip


def test_writer_writes_the_report_byte_for_byte(tmp_path: Path) -> None:
    """A ReportWriter's file is Report.write's, for a first report, a changed one and none."""
    writer = ReportWriter()
    first = _rich_report()
    row = first.images[1]
    done = replace(row, outcome=Outcome.AVAILABLE, action=None, regions=(("fra1", "transferred"),))
    changed = replace(first, images=(first.images[0], done, first.images[2]), requests=12)
    emptied = replace(first, images=(), orphans=())
    for report in (first, changed, first, emptied, first):
        (tmp_path / "expected.json").unlink(missing_ok=True)
        report.write(tmp_path / "expected.json")
        writer.write(report, tmp_path / "written.json")
        assert (tmp_path / "written.json").read_bytes() == (tmp_path / "expected.json").read_bytes()
        assert writer.text(report) == report.to_text()


def test_writer_renders_only_the_rows_that_changed(tmp_path: Path) -> None:
    """Rewriting a 1,000-row report with one row changed renders that row, not 1,000."""
    report = report_of(1000, 5)
    writer = ReportWriter()
    writer.write(report, tmp_path / "r.json")
    assert writer.rendered == 1000
    images = list(report.images)
    images[500] = replace(images[500], outcome=Outcome.FAILED, error="it broke")
    changed = replace(report, images=tuple(images), requests=6)
    writer.write(changed, tmp_path / "r.json")
    writer.write(changed, tmp_path / "r.json")
    assert writer.rendered == 1001
    assert (tmp_path / "r.json").read_text() == changed.to_text()
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["failed"] == 1


def _changed_rows(report: Report, rng: random.Random, share: float) -> Report:
    images = tuple(
        replace(row, outcome=Outcome.FAILED, error=f"broke {rng.random()}")
        if rng.random() < share
        else row
        for row in report.images
    )
    return replace(report, images=images, requests=report.requests + 1)


def test_writer_copies_unchanged_rows_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows copied from the previous file (in many pieces) give Report.write's bytes."""
    # Small pieces: runs of unchanged rows are cut where they grow past the limit.
    monkeypatch.setattr(report_module, "COPY_BYTES", 700)
    rng = random.Random(7)
    report = report_of(300, 1)
    writer = ReportWriter()
    rendered = 0
    for share in (0.0, 0.01, 0.2, 0.0, 1.0, 0.05):
        report = _changed_rows(report, rng, share)
        before = writer.rendered
        writer.write(report, tmp_path / "r.json")
        rendered += writer.rendered - before
        assert (tmp_path / "r.json").read_text() == report.to_text()
        assert writer.text(report) == report.to_text()
    # Each row rendered once, then only where it changed.
    assert rendered < 300 + 300 * 1.3


def test_writer_renders_everything_when_its_file_was_changed(tmp_path: Path) -> None:
    """A report file replaced or edited since the writer wrote it is not copied from."""
    path = tmp_path / "r.json"
    report = report_of(50, 1)
    writer = ReportWriter()
    writer.write(report, path)
    written = path.stat()
    path.write_text(path.read_text().replace("img-1", "IMG-1"))  # same size, edited
    # Dated a second later: a clock as coarse as a few ms could keep the time otherwise.
    os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns + 10**9))
    again = replace(report, requests=2)
    writer.write(again, path)
    assert path.read_text() == again.to_text()
    assert writer.rendered == 100
    path.unlink()
    assert writer.text(again) == again.to_text()
    assert writer.rendered == 150


def test_writer_does_not_copy_a_file_edited_in_place_with_its_time_restored(
    tmp_path: Path,
) -> None:
    """An edit of the same size whose modification time was set back (same inode, size
    and mtime) still shows in the change time: every row is rendered, the file is right."""
    path = tmp_path / "r.json"
    report = report_of(50, 1)
    writer = ReportWriter()
    writer.write(report, path)
    written = path.stat()
    path.write_text(path.read_text().replace('"img-7"', '"IMG-7"'))
    os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns))
    edited = path.stat()
    assert (edited.st_ino, edited.st_size, edited.st_mtime_ns) == (
        written.st_ino, written.st_size, written.st_mtime_ns
    )  # fmt: skip
    if edited.st_ctime_ns == written.st_ctime_ns:
        pytest.skip("this file system's timestamps are coarser than the edit's delay")
    again = replace(report, requests=2)
    writer.write(again, path)
    assert path.read_text() == again.to_text()
    assert writer.rendered == 100


def test_writer_is_not_stopped_by_a_fifo_in_its_files_place(tmp_path: Path) -> None:
    """A FIFO put where the report was is neither read from nor waited on: it is replaced."""
    path = tmp_path / "r.json"
    report = report_of(5, 1)
    writer = ReportWriter()
    writer.write(report, path)
    path.unlink()
    os.mkfifo(path)
    again = replace(report, requests=2)
    writer.write(again, path)
    assert path.read_text() == again.to_text()
    assert writer.rendered == 10


def test_writer_after_a_failed_write_copies_from_the_file_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails midway leaves the previous file, which the next write copies from."""
    path = tmp_path / "r.json"
    report = report_of(100, 1)
    writer = ReportWriter()
    writer.write(report, path)
    changed = _changed_rows(report, random.Random(1), 0.1)

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", lambda fd: disk_full())
    with pytest.raises(OSError, match="No space"):
        writer.write(changed, path)
    monkeypatch.undo()
    assert path.read_text() == report.to_text()
    again = _changed_rows(changed, random.Random(2), 0.1)
    writer.write(again, path)
    assert path.read_text() == again.to_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_writer_keeps_no_text_of_its_rows(tmp_path: Path) -> None:
    """Between rewrites the writer holds a few bytes a row, not the row's text (~600 bytes)."""
    report = report_of(2000, 1)
    writer = ReportWriter()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        writer.write(report, tmp_path / "r.json")
        writer.write(replace(report, requests=2), tmp_path / "r.json")
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 40 * len(report.images)
