"""The result report: one JSON document a person or a machine can act on."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from importer.clock import isoformat

#: 2: each image says its action, version, renames and deletions; the report names
#: its set and lists orphaned images (see the README's "The report").
REPORT_VERSION = 2


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


@dataclass(frozen=True)
class Renamed:
    """One image renamed by rotation."""

    image_id: int
    old: str
    new: str

    def to_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "from": self.old, "to": self.new}


@dataclass(frozen=True)
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["submitted_at"] = _iso(self.submitted_at)
        data["finished_at"] = _iso(self.finished_at)
        data["duplicates_deleted"] = list(self.duplicates_deleted)
        data["renamed"] = [rename.to_json() for rename in self.renamed]
        data["deleted"] = list(self.deleted)
        return data


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
        counts = self.counts()
        summary: dict[str, Any] = {"total": len(self.images)}
        summary.update({outcome.value: counts.get(outcome, 0) for outcome in Outcome})
        summary["requests"] = self.requests
        summary["rate_limited"] = self.rate_limited
        summary["duplicates_deleted"] = sum(len(r.duplicates_deleted) for r in self.images)
        actions = Counter(r.action for r in self.images if r.action)
        summary["actions"] = dict(sorted(actions.items()))
        summary["renamed"] = sum(len(r.renamed) for r in self.images)
        summary["deleted"] = sum(len(r.deleted) for r in self.images)
        summary["orphaned"] = len(self.orphans)
        summary["orphans_deleted"] = sum(orphan.deleted for orphan in self.orphans)
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
            "images": [result.to_json() for result in self.images],
            "orphans": [orphan.to_json() for orphan in self.orphans],
        }

    def write(self, path: Path) -> None:
        """Write atomically: a reader never sees half a report."""
        write_json_atomic(path, self.to_json())

    def human_summary(self) -> str:
        counts = self.counts()
        parts = [f"{counts[o]} {o.value}" for o in Outcome if counts.get(o)]
        lines = [
            f"{len(self.images)} images: {', '.join(parts) or 'none'}"
            f" ({self.requests} requests, {self.rate_limited} rate-limited)"
        ]
        if self.stopped:
            lines.append(f"run stopped early: {self.stopped}")
        # A short run lists every image; a long one only those needing attention.
        every = len(self.images) <= 20
        for result in self.images:
            if every or not result.outcome.is_success or result.error:
                ident = f" image {result.image_id}" if result.image_id else ""
                action = f" [{result.action}]" if result.action else ""
                error = f": {result.error}" if result.error else ""
                lines.append(
                    f"  {result.outcome.value:<13} {result.name} ({result.region}){ident}"
                    f"{action}{error}"
                )
        for orphan in self.orphans:
            done = "deleted" if orphan.deleted else "orphaned"
            error = f": {orphan.error}" if orphan.error else ""
            lines.append(f"  {done:<13} {orphan.name} image {orphan.image_id}{error}")
        return "\n".join(lines)


def _iso(unix: float | None) -> str | None:
    return isoformat(unix) if unix is not None else None


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
