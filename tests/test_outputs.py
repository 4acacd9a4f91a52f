"""Outputs for CI and monitoring (JUnit, Markdown, Prometheus), and the report rewritten mid-run."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from markdown_it import MarkdownIt
from prometheus_client.parser import text_string_to_metric_families

from importer.cli import main
from importer.journal import Journal
from importer.logs import reset_logging
from importer.outputs import Outputs, junit_xml, markdown, metrics
from importer.pipeline import CHECKPOINT_INTERVAL, run_import
from importer.report import RUNNING, ImageResult, Outcome, Report
from importer.simulator import SimulatorConfig, run_simulator
from importer.status import last_report
from tests.helpers import image_urls, manifest_of, settings_for

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
STARTED = 1_790_000_000.0


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    yield
    reset_logging()


def result(index: int, outcome: Outcome, error: str | None = None) -> ImageResult:
    submitted = STARTED + index
    done = outcome in (Outcome.AVAILABLE, Outcome.FAILED, Outcome.TIMED_OUT, Outcome.REJECTED)
    return ImageResult(
        index=index,
        name=f"img-{index}",
        region="nyc3",
        tag=f"importer:{index:016x}",
        outcome=outcome,
        image_id=150_000_000 + index if outcome is not Outcome.NOT_SUBMITTED else None,
        error=error,
        submitted_at=submitted if outcome is not Outcome.NOT_SUBMITTED else None,
        finished_at=submitted + 300 if done else None,
    )


MIXED = (
    result(0, Outcome.AVAILABLE),
    result(1, Outcome.FAILED, "We had a problem | decompressing <your> file.\nSecond line."),
    result(2, Outcome.TIMED_OUT, "timed out waiting for the import"),
    result(3, Outcome.REJECTED, "name is invalid"),
    result(4, Outcome.PENDING),
    result(5, Outcome.NOT_SUBMITTED, "API rate limit exceeded."),
)


def report_of(
    images: tuple[ImageResult, ...] = MIXED, stopped: str | None = None, set_name: str = "nightly"
) -> Report:
    return Report(
        manifest="manifests/nightly.yaml", api_url="https://api.digitalocean.com",
        started_at=STARTED, finished_at=STARTED + 900, images=images, requests=42,
        rate_limited=1, stopped=stopped, requests_by_endpoint={"POST /v2/images": 6}, set=set_name,
    )  # fmt: skip


# -- JUnit --------------------------------------------------------------------------

#: The attributes of the JUnit XML schema CI servers read (Jenkins' junit-10.xsd, which
#: GitLab and the GitHub test-report actions follow): required, then allowed.
SUITES_ATTRS = ({"tests", "failures", "errors", "time"}, {"name", "skipped", "disabled"})
SUITE_ATTRS = (
    {"name", "tests", "failures", "errors", "skipped", "time"},
    {"timestamp", "hostname", "id", "package", "disabled", "file", "log", "url", "version"},
)
CASE_ATTRS = ({"classname", "name", "time"}, {"assertions", "status", "file", "line"})


def check_attrs(element: ET.Element, attrs: tuple[set[str], set[str]]) -> None:
    required, optional = attrs
    keys = set(element.keys())
    assert required <= keys, (element.tag, keys)
    assert keys <= required | optional, (element.tag, keys)


def test_junit_has_the_schema_shape_ci_servers_read() -> None:
    """testsuites > testsuite > (properties, testcase*); counts and times typed as in the schema."""
    root = ET.fromstring(junit_xml(report_of()))
    assert root.tag == "testsuites"
    check_attrs(root, SUITES_ATTRS)
    [suite] = list(root)
    assert suite.tag == "testsuite"
    check_attrs(suite, SUITE_ATTRS)
    children = [child.tag for child in suite]
    assert children == ["properties"] + ["testcase"] * 6
    for element in (root, suite):
        for key in ("tests", "failures", "errors", "skipped"):
            assert int(element.get(key, "")) >= 0
        assert float(element.get("time", "")) == pytest.approx(900.0)
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("6", "3", "2")
    assert suite.get("name") == "nightly"
    assert suite.get("timestamp") == "2026-09-21T14:13:20"
    properties = suite.find("properties")
    assert properties is not None
    assert len(properties) == 5
    for prop in properties:
        assert prop.tag == "property"
        assert prop.keys() == ["name", "value"]
    cases = suite.findall("testcase")
    for case in cases:
        check_attrs(case, CASE_ATTRS)
        float(case.get("time", ""))
        assert len(case) <= 1
    assert [case.get("name") for case in cases] == [f"img-{i} (nyc3)" for i in range(6)]
    failures = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failures) == {"img-1 (nyc3)", "img-2 (nyc3)", "img-3 (nyc3)"}
    failure = failures["img-1 (nyc3)"]
    assert failure is not None
    assert failure.keys() == ["message", "type"]
    assert failure.get("message") == MIXED[1].error  # the error itself, escaped by the writer
    assert failure.get("type") == "failed"
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    assert skipped == ["img-4 (nyc3)", "img-5 (nyc3)"]
    assert cases[0].get("time") == "300.000"
    assert len(cases[0]) == 0


def test_junit_of_an_empty_run_is_valid() -> None:
    """No entries: one empty suite, zero counts."""
    root = ET.fromstring(junit_xml(report_of(images=())))
    [suite] = list(root)
    assert (suite.get("tests"), suite.get("failures")) == ("0", "0")


# -- Markdown -----------------------------------------------------------------------


def tables(text: str) -> list[list[list[str]]]:
    """Each table of the Markdown as rendered (GitHub-flavoured tables): rows of cell texts."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    found: list[list[list[str]]] = []
    row: list[str] = []
    for token in tokens:
        if token.type == "table_open":
            found.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and found and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            found[-1].append(row)
    return found


def test_markdown_renders_as_a_table_of_every_entry() -> None:
    """A short run: a table, a header, a row per entry; a pipe in an error stays in its cell."""
    text = markdown(report_of())
    [table] = tables(text)
    assert table[0] == ["#", "name", "region", "outcome", "image", "error"]
    assert [row[1] for row in table[1:]] == [f"img-{i}" for i in range(6)]
    assert table[2][3] == "failed"
    assert table[2][5] == "We had a problem | decompressing &lt;your> file. Second line."
    html = MarkdownIt("commonmark").enable("table").render(text)
    # The text as written, no HTML of its own (a "<" is shown, never opens a tag).
    assert "<td>We had a problem | decompressing &lt;your&gt; file. Second line.</td>" in html
    assert "6 entries" in text


def test_markdown_of_a_large_run_lists_only_entries_needing_attention() -> None:
    """10,000 entries: only those needing attention, 50 rows at most, then how many more."""
    images = tuple(
        result(i, Outcome.FAILED if i % 100 == 0 else Outcome.AVAILABLE, "bad")
        if i % 100 == 0
        else result(i, Outcome.AVAILABLE)
        for i in range(10_000)
    )
    text = markdown(report_of(images))
    [table] = tables(text)
    assert len(table) == 1 + 50
    assert {row[3] for row in table[1:]} == {"failed"}
    assert "... and 50 more" in text
    assert len(text) < 10_000


# -- Prometheus ---------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_with_prometheus_client() -> None:
    """Entries by outcome, requests, 429s, duration, end, by set; a success sets its time."""
    success = report_of(tuple(result(i, Outcome.AVAILABLE) for i in range(3)))
    values = samples(metrics(success, last_success=None))
    nightly = (("set", "nightly"),)
    assert values[("importer_entries", (("outcome", "available"), ("set", "nightly")))] == 3
    assert values[("importer_entries", (("outcome", "failed"), ("set", "nightly")))] == 0
    assert values[("importer_requests", nightly)] == 42
    assert values[("importer_rate_limited", nightly)] == 1
    assert values[("importer_run_duration_seconds", nightly)] == 900
    assert values[("importer_run_timestamp_seconds", nightly)] == STARTED + 900
    assert values[("importer_last_success_timestamp_seconds", nightly)] == STARTED + 900
    assert values[("importer_run_running", nightly)] == 0


def test_last_success_is_carried_over_from_the_previous_file(tmp_path: Path) -> None:
    """A failed run keeps the last success time of its set; another set's line is not taken."""
    path = tmp_path / "importer.prom"
    other = report_of(tuple(result(i, Outcome.AVAILABLE) for i in range(2)), set_name="other")
    Outputs(metrics=path).write(replace(other, finished_at=STARTED + 50), final=True)
    assert samples(path.read_text())[
        ("importer_last_success_timestamp_seconds", (("set", "other"),))
    ] == (STARTED + 50)
    good = report_of(tuple(result(i, Outcome.AVAILABLE) for i in range(2)))
    Outputs(metrics=path).write(good, final=True)
    failed = replace(report_of(), finished_at=STARTED + 86_400)
    Outputs(metrics=path).write(failed, final=True)
    values = samples(path.read_text())
    nightly = (("set", "nightly"),)
    assert values[("importer_last_success_timestamp_seconds", nightly)] == STARTED + 900
    assert values[("importer_run_timestamp_seconds", nightly)] == STARTED + 86_400
    # A run still going (a periodic rewrite) is no success either.
    Outputs(metrics=path).write(report_of(stopped=RUNNING), final=False)
    values = samples(path.read_text())
    assert values[("importer_last_success_timestamp_seconds", nightly)] == STARTED + 900
    assert values[("importer_run_running", nightly)] == 1


def test_a_set_that_never_succeeded_has_no_last_success() -> None:
    """No success yet, no earlier file: the metric is absent rather than a made-up zero."""
    names = {name for name, _ in samples(metrics(report_of(), last_success=None))}
    assert "importer_last_success_timestamp_seconds" not in names


# -- writing ------------------------------------------------------------------------


def test_outputs_are_written_atomically_and_the_step_summary_only_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files replaced whole, no temporary left; $GITHUB_STEP_SUMMARY appended once, at the end."""
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "out"
    outputs = Outputs.from_env(
        junit=out / "junit.xml", markdown=out / "summary.md", metrics=out / "importer.prom"
    )
    outputs.write(report_of(stopped=RUNNING), final=False)
    outputs.write(report_of(stopped=RUNNING), final=False)
    assert summary.read_text() == "earlier step\n"
    outputs.write(report_of(), final=True)
    assert sorted(p.name for p in out.iterdir()) == ["importer.prom", "junit.xml", "summary.md"]
    assert summary.read_text() == "earlier step\n" + markdown(report_of()) + "\n"
    assert Outputs.from_env(junit=None, markdown=None, metrics=None).step_summary is None


@pytest.mark.parametrize("flag", ["--junit", "--markdown", "--metrics"])
def test_unwritable_output_is_refused_before_the_run(tmp_path: Path, flag: str) -> None:
    """An output under a file: exit 2, one line naming the flag, nothing run or written."""
    blocker = tmp_path / "f"
    blocker.write_text("")
    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        main,
        ["run", str(MANIFESTS / "example.yaml"), "--simulate", "--virtual-time",
         "--report", str(report), flag, str(blocker / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0]
    assert "is not a directory" in lines[0]
    assert not report.exists()


def test_run_writes_every_output(tmp_path: Path) -> None:
    """`run --junit --markdown --metrics`: all three written at the end, from the same report."""
    paths = {flag: tmp_path / name for flag, name in
             (("--junit", "j.xml"), ("--markdown", "m.md"), ("--metrics", "m.prom"))}  # fmt: skip
    args = [
        "run", str(MANIFESTS / "example-failures.yaml"), "--simulate", "--virtual-time",
        "--report", str(tmp_path / "r.json"),
    ]  # fmt: skip
    for flag, path in paths.items():
        args += [flag, str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    suite = ET.fromstring(paths["--junit"].read_text())[0]
    assert (suite.get("tests"), suite.get("failures")) == ("5", "3")
    assert len(tables(paths["--markdown"].read_text())[0]) == 6
    values = samples(paths["--metrics"].read_text())
    assert values[("importer_entries", (("outcome", "failed"), ("set", "example-failures")))] == 3


# -- rewritten during the run -------------------------------------------------------


@pytest.mark.anyio
async def test_report_is_recorded_every_minute_and_at_the_stop(tmp_path: Path) -> None:
    """A run stopped by its deadline: recorded each minute and at the stop, the journal too."""
    seen: list[Report] = []
    state = tmp_path / "state.sqlite"
    config = SimulatorConfig.demo(new_seconds=30.0, pending_seconds=600.0)
    async with run_simulator(config) as sim:
        settings = settings_for(sim.base_url, state_path=state, deadline=330.0)
        final = await run_import(manifest_of(*image_urls(3)), settings, on_checkpoint=seen.append)
    assert final.stopped == "deadline"
    offsets = [round(r.finished_at - final.started_at) for r in seen]
    assert offsets == [60, 120, 180, 240, 300, 330]
    assert [r.stopped for r in seen] == [RUNNING] * 5 + ["deadline"]
    assert all(r.outcome is Outcome.PENDING for r in seen[0].images)
    assert [r.requests for r in seen] == sorted(r.requests for r in seen)
    assert CHECKPOINT_INTERVAL == 60.0
    with Journal(state, read_only=True) as journal:
        record = journal.last_run()
    assert record is not None
    assert record.ended
    assert last_report(state).to_json() == final.to_json()


@pytest.mark.anyio
async def test_rewrites_hand_over_unchanged_rows_as_the_same_objects() -> None:
    """Each rewrite's rows are the last one's objects where nothing changed (O(changes) writing)."""
    seen: list[Report] = []
    # The imports end at about 222, 225 and 247 s, and are seen up to some 9 s later: the
    # checkpoint at 240 s falls between the first seen and the last (with ends near 235 s,
    # the poll's jitter sometimes put every sighting after it).
    config = SimulatorConfig.demo(new_seconds=30.0, pending_seconds=188.0)
    async with run_simulator(config) as sim:
        settings = settings_for(sim.base_url, deadline=330.0)
        await run_import(manifest_of(*image_urls(3)), settings, on_checkpoint=seen.append)
    assert len(seen) >= 3
    pairs = [
        (a, b)
        for one, two in itertools.pairwise(seen)
        for a, b in zip(one.images, two.images, strict=True)
    ]
    assert all(a is b or a != b for a, b in pairs)
    assert any(a is b for a, b in pairs)
    assert any(a != b for a, b in pairs)
