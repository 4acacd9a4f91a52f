"""``importer status``: the report of the last run on a state file, from the journal alone.

No token and no request: the run recorded its report in the journal when it
started, every minute, when it started stopping and at its end (see
:func:`importer.pipeline.run_import`). A run that was killed recorded no end;
its entries' own rows are written at every step, so those written after the
run's last record say more than that record, and win. The run's request counts
are those of its last record.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from importer.errors import StateFileError
from importer.journal import EntryState, Journal, Phase
from importer.lifecycle import UNKNOWN_CREATE
from importer.report import ImageResult, Outcome, Report


def last_report(state: Path) -> Report:
    """The report of the last run recorded in ``state``, opened read-only (no lock taken)."""
    with Journal(state, read_only=True) as journal:
        record = journal.last_run()
        if record is None:
            raise StateFileError(
                f"{state} holds no recorded run (runs record themselves since this version); "
                "run `importer run` with this --state first"
            )
        data = json.loads(record.header)
        data["images"] = [json.loads(image) for image in record.images]
        report = Report.from_json(data)
        if record.ended:
            return report
        newer = {row.tag: row for row in journal.changed_since(record.updated_at)}
    images = tuple(_refreshed(result, newer.get(result.tag)) for result in report.images)
    return replace(report, images=images)


def _refreshed(result: ImageResult, row: EntryState | None) -> ImageResult:
    """``result`` as the entry's journal row, newer than the run's record, tells it."""
    if row is None:
        return result
    if row.phase is Phase.FINISHED and row.outcome is not None:
        return replace(
            result,
            outcome=Outcome(row.outcome),
            image_id=row.image_id if row.image_id is not None else result.image_id,
            status=row.status,
            error=row.error,
            submitted_at=row.submitted_at,
            finished_at=row.finished_at,
            duplicates_deleted=row.duplicates,
        )
    if row.phase is Phase.SUBMITTED:
        return replace(
            result,
            outcome=Outcome.PENDING,
            image_id=row.image_id,
            status=row.status,
            error=None,
            submitted_at=row.submitted_at,
        )
    return replace(result, outcome=Outcome.PENDING, error=UNKNOWN_CREATE)
