"""The result report: one JSON document a person or a machine can act on."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO

from importer.clock import isoformat

#: 2: each image says its action, version, renames and deletions; the report names
#: its set and lists orphaned images (see the README's "The report"). Still 2 with
#: regions: each image's ``regions`` and the summary's ``regions`` are new fields, and
#: every other field keeps its meaning.
REPORT_VERSION = 2
#: ``stopped`` of a report written while its run was still going (the periodic
#: rewrites, and ``importer status`` of a run that never recorded its end).
RUNNING = "running"
#: How many entries needing attention the human summary lists, at most.
SUMMARY_LIMIT = 20


class Outcome(StrEnum):
    """How one manifest entry ended."""

    #: The image is ``available``.
    AVAILABLE = "available"
    #: The import failed: the image turned ``deleted`` with an ``error_message``.
    FAILED = "failed"
    #: The image did not become available within the per-image timeout.
    TIMED_OUT = "timed_out"
    #: The API refused the create with a 4xx (other than 401/429).
    REJECTED = "rejected"
    #: Submitted, but the run stopped before the image finished.
    PENDING = "pending"
    #: Never submitted (the run stopped first).
    NOT_SUBMITTED = "not_submitted"

    @property
    def is_success(self) -> bool:
        return self is Outcome.AVAILABLE


@dataclass(frozen=True, slots=True)
class Renamed:
    """One image renamed by rotation."""

    image_id: int
    old: str
    new: str

    def to_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "from": self.old, "to": self.new}


@dataclass(frozen=True, slots=True)
class ImageResult:
    """The line of the report for one manifest entry."""

    index: int
    name: str
    region: str
    tag: str
    outcome: Outcome
    image_id: int | None = None
    status: str | None = None
    error: str | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    #: Extra copies of one version (lost create answers, concurrent runs), deleted.
    duplicates_deleted: tuple[int, ...] = ()
    #: What the run did for the entry: ``create``, ``replace``, ``unchanged``,
    #: ``watch`` or ``error`` (see :class:`importer.converge.Action`).
    action: str | None = None
    #: The source's version (its short label) and what decided it.
    version: str | None = None
    version_source: str | None = None
    #: Renames by rotation, in the order made.
    renamed: tuple[Renamed, ...] = ()
    #: Older versions deleted by rotation (beyond ``keep``).
    deleted: tuple[int, ...] = ()
    #: Each region the image is transferred to, with its state (``transferred``,
    #: ``transferring``, ``not_transferred`` or ``transfer_failed: <why>``, see
    #: :mod:`importer.transfers`), in the manifest's order.
    regions: tuple[tuple[str, str], ...] = ()

    def region_states(self) -> dict[str, str]:
        """Every region of the entry and its state, the import region first.

        The import region is ``available`` once the image is (also when the run stopped
        while copying it elsewhere), else the entry's outcome.
        """
        ready = self.outcome is Outcome.AVAILABLE or self.status == "available"
        home = "available" if ready else self.outcome.value
        return {self.region: home, **dict(self.regions)}

    def to_json(self) -> dict[str, Any]:
        # A shallow copy: asdict's deep one was most of the cost of a 10,000-entry report,
        # which is written every minute of a run.
        data = {name: getattr(self, name) for name in _RESULT_FIELDS}
        data["regions"] = self.region_states()
        data["outcome"] = self.outcome.value
        data["submitted_at"] = _iso(self.submitted_at)
        data["finished_at"] = _iso(self.finished_at)
        data["duplicates_deleted"] = list(self.duplicates_deleted)
        data["renamed"] = [rename.to_json() for rename in self.renamed]
        data["deleted"] = list(self.deleted)
        return data

    @property
    def needs_attention(self) -> bool:
        """Not available, or available with something left to say."""
        return not self.outcome.is_success or self.error is not None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageResult:
        """The result :meth:`to_json` wrote (timestamps to the second)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["outcome"] = Outcome(data["outcome"])
        values["submitted_at"] = _unix(data.get("submitted_at"))
        values["finished_at"] = _unix(data.get("finished_at"))
        values["duplicates_deleted"] = tuple(data.get("duplicates_deleted", ()))
        values["renamed"] = tuple(
            Renamed(r["image_id"], r["from"], r["to"]) for r in data.get("renamed", ())
        )
        values["deleted"] = tuple(data.get("deleted", ()))
        # The import region's state is derived from the outcome: only the others are kept.
        values["regions"] = tuple(
            (region, state)
            for region, state in data.get("regions", {}).items()
            if region != data["region"]
        )
        return cls(**values)


_RESULT_FIELDS = tuple(f.name for f in fields(ImageResult))


@dataclass(frozen=True)
class OrphanResult:
    """An image of the set whose entry left the manifest."""

    image_id: int
    name: str
    tag: str | None
    status: str
    #: Deleted by this run (``--prune``).
    deleted: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    """Everything a run found out, in manifest order."""

    manifest: str
    api_url: str
    started_at: float
    finished_at: float
    images: tuple[ImageResult, ...]
    requests: int
    rate_limited: int
    #: Why the run ended early, if it did (``authentication_failed``, ``interrupted``...).
    stopped: str | None = None
    requests_by_endpoint: dict[str, int] = field(default_factory=dict)
    #: The set whose images the manifest owns (see :mod:`importer.identity`).
    set: str | None = None
    orphans: tuple[OrphanResult, ...] = ()

    def counts(self) -> Counter[Outcome]:
        return Counter(result.outcome for result in self.images)

    @property
    def all_available(self) -> bool:
        """Every entry available, its names and versions put right (no error left)."""
        return all(r.outcome.is_success and r.error is None for r in self.images) and not any(
            orphan.error for orphan in self.orphans
        )

    def to_json(self) -> dict[str, Any]:
        totals = Totals()
        for result in self.images:
            totals.add(result)
        return {**self.head(totals), "images": [result.to_json() for result in self.images]}

    def head(self, totals: Totals) -> dict[str, Any]:
        """Every field of :meth:`to_json` before ``images`` (and ``orphans`` after it)."""
        summary = totals.summary()
        summary["requests"] = self.requests
        summary["rate_limited"] = self.rate_limited
        summary.update(totals.sums())
        summary["orphaned"] = len(self.orphans)
        summary["orphans_deleted"] = sum(orphan.deleted for orphan in self.orphans)
        summary["regions"] = totals.regions()
        return {
            "report_version": REPORT_VERSION,
            "manifest": self.manifest,
            "set": self.set,
            "api_url": self.api_url,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "stopped": self.stopped,
            "summary": summary,
            "requests_by_endpoint": dict(sorted(self.requests_by_endpoint.items())),
            # Placeholders keep the order of the keys: images, then orphans.
            "images": [],
            "orphans": [orphan.to_json() for orphan in self.orphans],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """The report :meth:`to_json` wrote (how ``importer status`` reads the journal's copy)."""
        summary = data.get("summary", {})
        return cls(
            manifest=data["manifest"],
            api_url=data["api_url"],
            started_at=_unix(data["started_at"]) or 0.0,
            finished_at=_unix(data["finished_at"]) or 0.0,
            images=tuple(ImageResult.from_json(image) for image in data["images"]),
            requests=summary.get("requests", 0),
            rate_limited=summary.get("rate_limited", 0),
            stopped=data.get("stopped"),
            requests_by_endpoint=dict(data.get("requests_by_endpoint", {})),
            set=data.get("set"),
            orphans=tuple(OrphanResult(**orphan) for orphan in data.get("orphans", ())),
        )

    def to_text(self) -> str:
        """The report as the JSON text :meth:`write` puts in the file."""
        return to_json_text(self.to_json())

    def write(self, path: Path) -> None:
        """Write atomically: a reader never sees half a report.

        The file is readable by others (mode 0644 less the umask): it holds no secret,
        and a monitoring user may need to read it. A run rewriting its report again and
        again writes it with a :class:`ReportWriter` instead (the same file, cheaper).
        """
        write_json_atomic(path, self.to_json())

    def human_summary(self, limit: int = SUMMARY_LIMIT) -> str:
        """Counts, then the entries that need attention (every entry of a short run).

        At most ``limit`` entries are listed, then how many more there are, so that
        the summary of 10,000 entries still fits a terminal.
        """
        counts = self.counts()
        parts = [f"{counts[o]} {o.value}" for o in Outcome if counts.get(o)]
        lines = [
            f"{plural(len(self.images), 'image')}: {', '.join(parts) or 'none'}"
            f" ({plural(self.requests, 'request')}, {self.rate_limited} rate-limited)"
        ]
        if self.stopped == RUNNING:
            lines.append("run not ended (still running, or killed): unfinished images are pending")
        elif self.stopped:
            lines.append(f"run stopped early: {self.stopped}")
        # A short run lists every image; a long one only those needing attention.
        every = len(self.images) <= limit
        listed = [self._line(r) for r in self.images if every or r.needs_attention]
        for orphan in self.orphans:
            done = "deleted" if orphan.deleted else "orphaned"
            error = f": {orphan.error}" if orphan.error else ""
            listed.append(f"  {done:<13} {orphan.name} image {orphan.image_id}{error}")
        lines.extend(listed[:limit])
        if len(listed) > limit:
            lines.append(f"  ... and {len(listed) - limit} more (see the report)")
        return "\n".join(lines)

    @staticmethod
    def _line(result: ImageResult) -> str:
        ident = f" image {result.image_id}" if result.image_id else ""
        action = f" [{result.action}]" if result.action else ""
        error = f": {result.error}" if result.error else ""
        return f"  {result.outcome.value:<13} {result.name} ({result.region}){ident}{action}{error}"


class Totals:
    """The summary's counts over report rows, kept by adding and taking away rows.

    :meth:`Report.to_json` adds every row; a :class:`ReportWriter` takes away the old
    row and adds the new one where a row changed, so its summary costs O(changes).
    """

    __slots__ = (
        "_actions",
        "_deleted",
        "_duplicates",
        "_outcomes",
        "_regions",
        "_renamed",
        "_rows",
    )

    def __init__(self) -> None:
        self._rows = 0
        self._outcomes: Counter[Outcome] = Counter()
        self._actions: Counter[str] = Counter()
        self._regions: Counter[str] = Counter()
        self._duplicates = self._renamed = self._deleted = 0

    def copy(self) -> Totals:
        other = Totals()
        other._rows = self._rows
        other._outcomes = self._outcomes.copy()
        other._actions = self._actions.copy()
        other._regions = self._regions.copy()
        other._duplicates, other._renamed = self._duplicates, self._renamed
        other._deleted = self._deleted
        return other

    def add(self, row: ImageResult, sign: int = 1) -> None:
        """Count ``row`` in (``sign`` -1: take it out again)."""
        self._rows += sign
        self._outcomes[row.outcome] += sign
        if row.action:
            self._actions[row.action] += sign
        self._duplicates += sign * len(row.duplicates_deleted)
        self._renamed += sign * len(row.renamed)
        self._deleted += sign * len(row.deleted)
        for _, state in row.regions:
            # Regions reached by transfer, by state (``transfer_failed`` without its reason).
            self._regions[state.partition(":")[0]] += sign

    def summary(self) -> dict[str, Any]:
        """The summary's fields before ``requests``: the total, then each outcome's count."""
        summary: dict[str, Any] = {"total": self._rows}
        summary.update({outcome.value: self._outcomes.get(outcome, 0) for outcome in Outcome})
        return summary

    def sums(self) -> dict[str, Any]:
        """The summary's fields after ``rate_limited``: what the rows did beyond importing."""
        return {
            "duplicates_deleted": self._duplicates,
            "actions": _present(self._actions),
            "renamed": self._renamed,
            "deleted": self._deleted,
        }

    def regions(self) -> dict[str, int]:
        return _present(self._regions)


def _present(counts: Counter[str]) -> dict[str, int]:
    """The counts above zero, by key (a count taken back to zero is not shown)."""
    return {key: count for key, count in sorted(counts.items()) if count}


class ReportWriter:
    """Writes one run's report again and again, rendering anew only the rows that changed.

    A run rewrites its report file every minute (see :func:`importer.pipeline.run_import`);
    rendered whole each time, the report of 50,000 entries cost seconds of CPU a minute,
    nearly all of a long run's CPU, and a peak of hundreds of MB in the JSON encoder's
    pieces. The writer renders a row again only where the report carries another row
    object at that place (the run hands over the same :class:`ImageResult` for an entry
    that did not change); the summary is kept the same way (:class:`Totals`). The other
    rows' text is copied from the file it wrote last, where it keeps their places (two
    numbers a row): keeping their text instead held some 30 MB at 50,000 entries. If
    that file is not the one it wrote any more (replaced, or changed: its inode, size,
    modification or status-change time differ), every row is rendered again. The change
    time cannot be set back (an edit whose modification time was restored still shows);
    what it cannot tell is a same-size edit made within the file system's timestamp
    granularity of the write (one clock tick, a few ms, on Linux before 6.13), which only
    someone editing the report in place during a run could make. The file is
    :meth:`Report.write`'s, byte for byte.
    """

    def __init__(self) -> None:
        self._rows: tuple[ImageResult, ...] = ()
        #: Where each row's text starts and ends in the file written last (byte offsets).
        self._starts = array("q")
        self._ends = array("q")
        #: That file, and what identifies it as the one written (see :func:`_identity`).
        self._path: Path | None = None
        self._written: _Identity | None = None
        self._totals = Totals()
        #: Rows rendered so far (the tests' measure of "only the rows that changed").
        self.rendered = 0

    def text(self, report: Report) -> str:
        """The report's JSON text, as :meth:`Report.to_text` makes it."""
        with self._previous() as previous:
            update = self._update(report.images, previous)
            pieces = self._chunks(report, update, previous, array("q"), array("q"))
            return b"".join(pieces).decode("utf-8")

    def write(self, report: Report, path: Path) -> None:
        """Write the report to ``path`` as :meth:`Report.write` does (atomically)."""
        starts, ends = array("q"), array("q")
        with self._previous() as previous:
            update = self._update(report.images, previous)
            chunks = self._chunks(report, update, previous, starts, ends)
            written = _write_atomic(path, chunks)
        # Only a file written whole becomes the one to copy from (a failed write left the
        # previous file, and the rows it has, in place).
        self._rows, self._totals = report.images, update.totals
        self._starts, self._ends = starts, ends
        self._path, self._written = path, written

    @contextlib.contextmanager
    def _previous(self) -> Iterator[BinaryIO | None]:
        """The file written last, open to copy rows from, if it is still that file."""
        if self._path is None or self._written is None:
            yield None
            return
        try:
            # Not blocking: whatever took the file's place (a FIFO) must not stop the run.
            fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            yield None
            return
        with os.fdopen(fd, "rb") as previous:
            stat = os.fstat(fd)
            same = S_ISREG(stat.st_mode) and _identity(stat) == self._written
            yield previous if same else None

    def _update(self, images: tuple[ImageResult, ...], previous: BinaryIO | None) -> _Update:
        """The rows to render and the totals of ``images`` (the writer's own are unchanged)."""
        rows = self._rows
        if previous is None or len(rows) != len(images):  # the first report (or another run's)
            totals = Totals()
            for row in images:
                totals.add(row)
            return _Update(None, totals)
        totals = self._totals.copy()
        changed = set()
        for i, (old, new) in enumerate(zip(rows, images, strict=True)):
            if old is not new:
                changed.add(i)
                totals.add(old, -1)
                totals.add(new)
        return _Update(changed, totals)

    def _render(self, row: ImageResult) -> bytes:
        self.rendered += 1
        # Inside the report, a row sits two levels deep: four spaces more on every line.
        text = "    " + json.dumps(row.to_json(), indent=2).replace("\n", "\n    ")
        return text.encode("utf-8")

    def _chunks(
        self,
        report: Report,
        update: _Update,
        previous: BinaryIO | None,
        starts: array[int],
        ends: array[int],
    ) -> Iterator[bytes]:
        """The file's bytes; each row's place in them goes into ``starts`` and ``ends``."""
        head = report.head(update.totals)
        at = 0
        for number, (key, value) in enumerate(head.items()):
            if key == "images" and report.images:
                opening = ("{\n  " if number == 0 else ",\n  ") + json.dumps(key) + ": [\n"
                data = opening.encode("utf-8")
                yield data
                at += len(data)
                for i, piece_at, rows_bytes in self._rows_bytes(report.images, update, previous):
                    if i:
                        yield b",\n"
                        at += 2
                    yield rows_bytes
                    starts.extend(at + offset for offset in piece_at[0])
                    ends.extend(at + offset for offset in piece_at[1])
                    at += len(rows_bytes)
                yield b"\n  ]"
                at += 4
                continue
            text = ("{\n  " if number == 0 else ",\n  ") + json.dumps(key) + ": "
            text += json.dumps(value, indent=2).replace("\n", "\n  ")
            data = text.encode("utf-8")
            yield data
            at += len(data)
        yield b"\n}\n"

    def _rows_bytes(
        self, images: tuple[ImageResult, ...], update: _Update, previous: BinaryIO | None
    ) -> Iterator[tuple[int, tuple[list[int], list[int]], bytes]]:
        """The rows' text in pieces: (first row, the rows' places in the piece, the piece).

        A run of rows that did not change is one piece (or several, of at most
        :data:`COPY_BYTES`) copied from ``previous``, separators included; a changed row
        is a piece of its own.
        """
        changed = update.changed
        count = len(images)
        i = 0
        while i < count:
            if changed is None or i in changed or previous is None:
                data = self._render(images[i])
                yield i, ([0], [len(data)]), data
                i += 1
                continue
            # The longest run of unchanged rows from i, at most COPY_BYTES of the old file.
            first, base = i, self._starts[i]
            j = i
            while j + 1 < count and j + 1 not in changed and self._ends[j + 1] - base <= COPY_BYTES:
                j += 1
            previous.seek(base)
            data = previous.read(self._ends[j] - base)
            if len(data) != self._ends[j] - base:  # pragma: no cover - checked by identity
                raise OSError(f"{previous.name} is shorter than when it was written")
            places = (
                [self._starts[k] - base for k in range(first, j + 1)],
                [self._ends[k] - base for k in range(first, j + 1)],
            )
            yield first, places, data
            i = j + 1


#: Unchanged rows are copied from the previous file in pieces of at most this many bytes.
COPY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class _Update:
    #: The indexes of the rows to render anew; ``None``: every row.
    changed: set[int] | None
    totals: Totals


_Identity = tuple[int, int, int, int, int]


def _identity(stat: os.stat_result) -> _Identity:
    """(device, inode, size, modification and status-change times in ns)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _iso(unix: float | None) -> str | None:
    return isoformat(unix) if unix is not None else None


def _unix(iso: str | None) -> float | None:
    if iso is None:
        return None
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def plural(count: int, noun: str) -> str:
    """``1 image``, ``2 images``, ``0 images``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def to_json_text(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    """Write ``data`` as JSON to ``path``, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, to_json_text(data), mode)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    A reader (a scheduler, a metrics collector) sees the old file or the new one,
    never half of one. ``mode`` is given to the kernel at creation, which takes
    the umask off it.
    """
    _write_atomic(path, (text.encode("utf-8"),), mode)


def _write_atomic(path: Path, chunks: Iterable[bytes], mode: int = 0o644) -> _Identity:
    """Write the bytes ``chunks`` make to ``path`` (see :func:`write_text_atomic`).

    Returns what identifies the file written (see :class:`ReportWriter`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:  # pragma: no cover - 48 random bits met another file
            continue
        break
    try:
        with os.fdopen(fd, "wb") as out:
            out.writelines(chunks)
            out.flush()
            os.fsync(out.fileno())
            # After the rename, which sets the change time on most file systems.
            os.replace(tmp, path)
            written = _identity(os.fstat(out.fileno()))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def unwritable_reason(path: Path) -> str | None:
    """Why :func:`write_text_atomic` could not write ``path``, or ``None`` if it can.

    Checked before a run starts, so that a run does not end, hours later, unable to
    write its report. It tries what the write will do: create a file in the directory
    (or in its nearest existing ancestor, where the missing directories will be made).
    Permission bits alone would not tell (root, read-only mounts, /sys).
    """
    try:
        if path.is_dir():
            return "it is a directory"
        ancestor = path.parent
        while not ancestor.exists():
            if ancestor == ancestor.parent:  # pragma: no cover - the root always exists
                break
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{ancestor} is not a directory"
    except OSError as exc:
        return exc.strerror or str(exc)
    probe = ancestor / f".{path.name}.{secrets.token_hex(6)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        return f"cannot create a file in {ancestor} ({exc.strerror or exc})"
    return None
