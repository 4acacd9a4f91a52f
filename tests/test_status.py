"""`importer status`: the last run's report from the journal alone, even after a `kill -9`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from importer.cli import main
from importer.journal import Journal
from importer.lifecycle import UNKNOWN_CREATE
from importer.logs import reset_logging
from importer.pipeline import run_import
from importer.plan import make_plan
from importer.report import RUNNING, Outcome, Report
from importer.simulator import SimulatorConfig, run_simulator
from importer.status import last_report
from tests.helpers import image_urls, manifest_of, settings_for
from tests.processes import ENV

MANIFEST = manifest_of(*image_urls(4))


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    yield
    reset_logging()


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.anyio
async def test_status_of_a_finished_run_is_its_report(tmp_path: Path) -> None:
    """After a run, the journal gives back its report, field for field."""
    state = tmp_path / "state.sqlite"
    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
    assert last_report(state).to_json() == report.to_json()


@pytest.mark.anyio
async def test_status_follows_rows_newer_than_the_last_record(tmp_path: Path) -> None:
    """A run that recorded no end: rows written after its last record win; older ones do not."""
    state = tmp_path / "state.sqlite"
    plan = make_plan(MANIFEST)
    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run_import(MANIFEST, settings_for(sim.base_url, state_path=state))
    recorded, later = report.finished_at + 5, report.finished_at + 10
    with Journal(state) as journal:
        record = journal.last_run()
        assert record is not None
        # As if the run had been killed after recording this, with nothing finished yet...
        header = json.dumps(replace(report, images=(), stopped=RUNNING).to_json())
        rows = [
            (r.index, json.dumps(replace(r, outcome=Outcome.NOT_SUBMITTED).to_json()))
            for r in report.images
        ]
        journal.run_recorded(record.run_id, header, rows, recorded, ended=False)
        # ...and had then written three rows.
        journal.finished(plan[0].tag, "img-0", "nyc3", "failed", "it broke", later)
        journal.creating(plan[1].tag, "img-1", "nyc3", later)
        journal.submitted(plan[2].tag, 777, "pending", later)
    status = last_report(state)
    assert status.stopped == RUNNING
    assert [(r.outcome, r.error) for r in status.images] == [
        (Outcome.FAILED, "it broke"),
        (Outcome.PENDING, UNKNOWN_CREATE),
        (Outcome.PENDING, None),
        (Outcome.NOT_SUBMITTED, None),  # its row is older than the record: the record wins
    ]
    assert status.images[2].image_id == 777
    assert status.images[2].status == "pending"


def test_status_without_a_state_file_is_one_line(tmp_path: Path) -> None:
    """`status --state missing` exits 2 in one line, and creates nothing."""
    missing = tmp_path / "missing.sqlite"
    code, out, err = invoke("status", "--state", str(missing))
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "no state file" in err
    assert list(tmp_path.iterdir()) == []


def test_status_of_a_state_without_runs_says_so(tmp_path: Path) -> None:
    """A journal that holds no recorded run: exit 2, saying to run first."""
    state = tmp_path / "state.sqlite"
    with Journal(state):
        pass
    code, _, err = invoke("status", "--state", str(state))
    assert code == 2
    assert "holds no recorded run" in err


def test_status_reads_while_a_run_holds_the_state(tmp_path: Path) -> None:
    """Reading takes no lock: status works while another importer has the state open."""
    state = tmp_path / "state.sqlite"
    with Journal(state) as journal:
        journal.run_started(
            json.dumps(
                Report(
                    manifest="m.yaml", api_url="https://api.example.com", started_at=0.0,
                    finished_at=60.0, images=(), requests=3, rate_limited=0, stopped=RUNNING,
                ).to_json()
            ),
            [],
            0.0,
        )  # fmt: skip
        code, out, _ = invoke("status", "--state", str(state), "--report", "-")
    assert code == 1  # a run that has not ended
    assert json.loads(out)["summary"]["requests"] == 3


@pytest.mark.slow
def test_status_after_kill_9_reproduces_the_last_report(tmp_path: Path) -> None:
    """A run killed with SIGKILL mid-way: `status` gives its last report from the journal alone."""
    manifest = tmp_path / "killed.yaml"
    manifest.write_text(
        "defaults: {region: nyc3}\nimages:\n"
        "  - {name: a, url: 'https://images.example.com/a.qcow2'}\n"
        "  - {name: b, url: 'https://images.example.com/b-fail-fast.qcow2'}\n"
        "  - {name: c, url: 'https://images.example.com/c-stuck-new.qcow2'}\n"
        "  - {name: d, url: 'https://images.example.com/d-stuck-pending.qcow2'}\n"
    )
    state, report_path = tmp_path / "state.sqlite", tmp_path / "report.json"
    command = [
        sys.executable, "-m", "importer", "run", str(manifest), "--simulate", "--virtual-time",
        "--state", str(state), "--report", str(report_path), "--log-format", "json",
        "--timeout", "10h",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    ) as process:
        try:
            deadline = time.monotonic() + 60
            # Two stuck images keep it running for hours of its virtual clock; the report is
            # rewritten every virtual minute. Kill it once a rewrite shows a and b finished.
            while time.monotonic() < deadline:
                if _settled(report_path):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the running importer never rewrote its report")
            assert process.poll() is None, "the run ended before it was killed"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    written = json.loads(report_path.read_text())
    out_path = tmp_path / "status.json"
    code, out, _ = invoke("status", "--state", str(state), "--report", str(out_path))
    assert code == 1
    assert "run not ended" in out
    rebuilt = json.loads(out_path.read_text())
    assert rebuilt["stopped"] == written["stopped"] == RUNNING
    for key in ("manifest", "set", "api_url", "started_at", "images"):
        assert rebuilt[key] == written[key], key
    # The journal may hold one more minute's record than the file (it is written first).
    assert rebuilt["summary"]["requests"] >= written["summary"]["requests"]
    assert rebuilt["finished_at"] >= written["finished_at"]
    outcomes = [(i["name"], i["outcome"]) for i in rebuilt["images"]]
    assert outcomes == [("a", "available"), ("b", "failed"), ("c", "pending"), ("d", "pending")]
    assert all(image["image_id"] for image in rebuilt["images"])


def _settled(report_path: Path) -> bool:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    outcomes = [image["outcome"] for image in report["images"]]
    return report["stopped"] == RUNNING and outcomes[:2] == ["available", "failed"]


@pytest.mark.anyio
async def test_each_minute_records_only_the_entries_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 entries: all at the start and the end; each minute between, only those that changed."""
    recorded: list[tuple[int, bool]] = []
    real = Journal.run_recorded

    def spy(self: Journal, run_id: int, header: str, images: Any, now: float, **kw: Any) -> None:
        rows = list(images)
        recorded.append((len(rows), kw["ended"]))
        real(self, run_id, header, rows, now, **kw)

    monkeypatch.setattr(Journal, "run_recorded", spy)
    config = SimulatorConfig.demo(new_seconds=100.0, pending_seconds=400.0, duration_noise=0.0)
    async with run_simulator(config) as sim:
        settings = settings_for(sim.base_url, first_poll=30.0, poll_interval=20.0)
        # A fixed seed: the poller's jitter decides which minutes see a change.
        report = await run_import(manifest_of(*image_urls(30)), settings, seed=3)
    assert {r.outcome for r in report.images} == {Outcome.AVAILABLE}
    rows = [count for count, ended in recorded if not ended]
    # The first minute submits all 30; then only the few read by id while pending change
    # (listings do not show importing images here), and most minutes change nothing.
    assert rows[0] == 30
    assert sum(rows[1:]) <= 10
    assert rows.count(0) >= 3
    assert recorded[-1] == (30, True)
