"""Neither the token nor a URL's query string reaches a log line, the report or the journal."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from importer.logs import configure_logging, reset_logging
from importer.pipeline import run_import
from importer.simulator import SimulatorConfig, run_simulator
from tests.helpers import TEST_TOKEN, manifest_of, settings_for

SIGNATURE = "Zm9vYmFyc2VjcmV0c2lnbmF0dXJl"


def journal_bytes(folder: Path) -> bytes:
    """Every byte of the journal and its WAL, as a leak would sit in them."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob("state.sqlite*")))


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", secrets=[TEST_TOKEN], stream=stream)
    yield stream
    reset_logging()


@pytest.mark.anyio
async def test_presigned_urls_and_token_stay_secret(
    tmp_path: Path, log_stream: io.StringIO
) -> None:
    """A run with presigned URLs, failures, retries and a 401 leaks no secret anywhere."""
    urls = [
        f"https://bucket.example.com/a-fail-download.qcow2?X-Amz-Signature={SIGNATURE}",
        f"https://bucket.example.com/b.qcow2?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=600",
        f"https://bucket.example.com/c.qcow2?sig={SIGNATURE}",
    ]
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(error_rate=0.3, lost_create_rate=0.3, revoke_after=12, seed=4)
    async with run_simulator(config) as sim:
        report = await run_import(
            manifest_of(*urls), settings_for(sim.base_url, state_path=state, max_attempts=3)
        )
    report_text = json.dumps(report.to_json())
    logged = log_stream.getvalue()
    assert logged.count("\n") > 5  # the run did log
    for line in logged.splitlines():
        json.loads(line)  # JSON lines, one event each
    places = {
        "logs": logged,
        "report": report_text,
        "journal": journal_bytes(tmp_path).decode("latin-1"),
        "summary": report.human_summary(),
    }
    for where, text in places.items():
        assert SIGNATURE not in text, where
        assert TEST_TOKEN not in text, where


def test_redactor_scrubs_every_string_field(log_stream: io.StringIO) -> None:
    """Whatever field a secret hides in, the rendered line has it masked."""
    structlog.get_logger("t").warning(
        "probe",
        error=f"GET https://x.example.com/f.img?token={SIGNATURE} failed for {TEST_TOKEN}",
        url=f"https://x.example.com/f.img?a={SIGNATURE}",
    )
    line = log_stream.getvalue()
    assert SIGNATURE not in line
    assert TEST_TOKEN not in line
    assert "x.example.com/f.img" in line


def test_short_token_does_not_mangle_log_lines() -> None:
    """With a token `image` (or `term`), event names and words stay whole; the token alone goes."""
    stream = io.StringIO()
    configure_logging("json", secrets=["image", "term"], stream=stream)
    try:
        structlog.get_logger("t").info(
            "image.submitted", reason="terminated", header="Bearer term", name="image"
        )
    finally:
        reset_logging()
    event = json.loads(stream.getvalue())
    assert event["event"] == "image.submitted"
    assert event["reason"] == "terminated"
    assert event["header"] == "Bearer ***"
    assert event["name"] == "***"
