"""SIGINT and SIGTERM stop a run gracefully: journal settled, partial report, documented exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from importer.journal import Journal, Phase
from importer.manifest import load_manifest
from importer.plan import make_plan
from tests.processes import ENV

MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "generated-200.yaml"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_with_partial_report(tmp_path: Path, signum: int, code: int) -> None:
    """After the signal: exit 130/143, a report of pending/not_submitted, every row settled."""
    report_path, state = tmp_path / "report.json", tmp_path / "state.sqlite"
    command = [
        sys.executable, "-m", "importer", "run", str(MANIFEST), "--simulate",
        "--report", str(report_path), "--state", str(state), "--log-format", "json",
        "--first-poll", "10m",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if '"image.submitted"' in line:
                break
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    report = json.loads(report_path.read_text())
    assert report["stopped"] == ("interrupted" if signum == signal.SIGINT else "terminated")
    outcomes = {image["outcome"] for image in report["images"]}
    assert outcomes <= {"pending", "not_submitted"}
    assert "pending" in outcomes
    with Journal(state) as journal:
        for item, result in zip(make_plan(load_manifest(MANIFEST)), report["images"], strict=True):
            row = journal.get(item.tag)
            if result["outcome"] == "pending":
                assert row is not None
                assert row.phase is Phase.SUBMITTED
                assert row.image_id == result["image_id"]
            else:
                assert row is None
