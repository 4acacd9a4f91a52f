"""What a run writes for schedulers, CI and monitoring besides its JSON report.

* JUnit XML (``--junit``): one test case per manifest entry, in the shape CI
  servers read (Jenkins, GitLab, GitHub actions that publish test results): a
  ``testsuites`` root, one ``testsuite`` with ``tests``/``failures``/``errors``/
  ``skipped``/``time``, a ``testcase`` per entry with ``classname``/``name``/``time``,
  and a ``failure`` (``message``, ``type``) for an entry that failed, timed out or
  was rejected. An entry the run did not finish (``pending``, ``not_submitted``)
  is ``skipped``: the next run resumes it.
* Markdown (``--markdown``): the counts, then a table; also appended to
  ``$GITHUB_STEP_SUMMARY`` at the end of the run when that is set.
* Prometheus text format (``--metrics``), for node_exporter's textfile collector:
  entries by outcome, requests, 429s, the run's duration, when it ended and when
  a run last succeeded, each labelled by the set. A run that did not succeed
  keeps the previous file's last success time, so that the value stays the time
  of the last *success*.

Each file is written atomically (a reader sees the old file or the new one), and
every path is checked writable before the first request.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from importer.clock import isoformat
from importer.errors import OutputPathError
from importer.report import RUNNING, ImageResult, Outcome, Report, write_text_atomic

#: Outcomes that are a test failure in JUnit terms; the unfinished ones are skipped.
_FAILED = frozenset({Outcome.FAILED, Outcome.TIMED_OUT, Outcome.REJECTED})
_UNFINISHED = frozenset({Outcome.PENDING, Outcome.NOT_SUBMITTED})
#: A run of at most this many entries lists every one in the Markdown table; a
#: longer one lists those needing attention, at most this many rows.
MARKDOWN_ROWS = 50
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
LAST_SUCCESS = "importer_last_success_timestamp_seconds"


def _suite_name(report: Report) -> str:
    return report.set or Path(report.manifest).stem or "importer"


def _duration(result: ImageResult) -> float:
    if result.submitted_at is None or result.finished_at is None:
        return 0.0
    return max(0.0, result.finished_at - result.submitted_at)


# -- JUnit XML ----------------------------------------------------------------------


def junit_xml(report: Report) -> str:
    """The report as a JUnit XML document (one test case per entry)."""
    name = _suite_name(report)
    counts = report.counts()
    failures = sum(counts[o] for o in _FAILED) + sum(
        1 for r in report.images if r.outcome.is_success and r.error
    )
    skipped = sum(counts[o] for o in _UNFINISHED)
    elapsed = f"{max(0.0, report.finished_at - report.started_at):.3f}"
    totals = {
        "tests": str(len(report.images)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": elapsed,
    }
    root = ET.Element("testsuites", {"name": "importer", **totals})
    suite = ET.SubElement(
        root,
        "testsuite",
        {"name": name, **totals, "timestamp": _timestamp(report.started_at)},
    )
    properties = ET.SubElement(suite, "properties")
    for key, value in (
        ("manifest", report.manifest),
        ("api_url", report.api_url),
        ("stopped", report.stopped or ""),
        ("requests", str(report.requests)),
        ("rate_limited", str(report.rate_limited)),
    ):
        ET.SubElement(properties, "property", {"name": key, "value": value})
    for result in report.images:
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": name,
                "name": f"{result.name} ({result.region})",
                "time": f"{_duration(result):.3f}",
            },
        )
        message = result.error or f"the image ended {result.outcome.value}"
        if result.outcome in _FAILED or (result.outcome.is_success and result.error):
            failure = ET.SubElement(
                case, "failure", {"message": message, "type": result.outcome.value}
            )
            failure.text = _case_text(result)
        elif result.outcome in _UNFINISHED:
            ET.SubElement(case, "skipped", {"message": message})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _case_text(result: ImageResult) -> str:
    lines = [f"outcome: {result.outcome.value}", f"tag: {result.tag}"]
    if result.image_id is not None:
        lines.append(f"image: {result.image_id} ({result.status})")
    if result.error:
        lines.append(f"error: {result.error}")
    return "\n".join(lines)


def _timestamp(unix: float) -> str:
    # JUnit's schema types the timestamp as ISO 8601 without a zone (it is UTC here).
    return isoformat(unix).rstrip("Z")


# -- Markdown -----------------------------------------------------------------------


def markdown(report: Report, rows: int = MARKDOWN_ROWS) -> str:
    """The report as Markdown: a heading, the counts, and a table of entries."""
    counts = report.counts()
    lines = [f"## Image import: {_suite_name(report)}", ""]
    status = "run not ended" if report.stopped == RUNNING else None
    if status is None and report.stopped:
        status = f"run stopped early: {report.stopped}"
    lines.append(
        f"**{len(report.images)} entries**: "
        + (", ".join(f"{counts[o]} {o.value}" for o in Outcome if counts.get(o)) or "none")
        + f" ({report.requests} requests, {report.rate_limited} rate-limited)"
        + (f"; {status}" if status else "")
    )
    lines.append("")
    every = len(report.images) <= rows
    listed = [r for r in report.images if every or r.needs_attention]
    if not listed:
        lines.append("Every image is available.")
        return "\n".join(lines) + "\n"
    if not every:
        lines.append("Entries that need attention:")
        lines.append("")
    lines.append("| # | name | region | outcome | image | error |")
    lines.append("|---:|---|---|---|---:|---|")
    for result in listed[:rows]:
        image = str(result.image_id) if result.image_id is not None else ""
        cells = [
            str(result.index),
            result.name,
            result.region,
            result.outcome.value,
            image,
            result.error or "",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if len(listed) > rows:
        lines.append("")
        lines.append(f"... and {len(listed) - rows} more (see the JSON report)")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text that stays inside its table cell: no pipe, no line break, no HTML."""
    text = " ".join(text.split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


# -- Prometheus text format ---------------------------------------------------------


def metrics(report: Report, last_success: float | None) -> str:
    """The report as Prometheus text exposition; ``last_success`` if this run is none."""
    label = f'set="{_label_value(_suite_name(report))}"'
    if report.stopped is None and report.all_available:
        last_success = report.finished_at
    counts = report.counts()
    families: list[tuple[str, str, list[tuple[str, float]]]] = [
        (
            "importer_entries",
            "Manifest entries of the last run, by outcome.",
            [(f'{{{label},outcome="{o.value}"}}', counts.get(o, 0)) for o in Outcome],
        ),
        (
            "importer_requests",
            "API requests the last run sent.",
            [(f"{{{label}}}", report.requests)],
        ),
        (
            "importer_rate_limited",
            "429 answers the last run received.",
            [(f"{{{label}}}", report.rate_limited)],
        ),
        (
            "importer_run_duration_seconds",
            "How long the last run took (so far, while it runs).",
            [(f"{{{label}}}", max(0.0, report.finished_at - report.started_at))],
        ),
        (
            "importer_run_timestamp_seconds",
            "When the last run ended (or last wrote this file, while it runs).",
            [(f"{{{label}}}", report.finished_at)],
        ),
        (
            "importer_run_running",
            "1 while the run that wrote this file had not ended.",
            [(f"{{{label}}}", 1 if report.stopped == RUNNING else 0)],
        ),
    ]
    if last_success is not None:
        families.append(
            (
                LAST_SUCCESS,
                "When a run last ended with every image available.",
                [(f"{{{label}}}", last_success)],
            )
        )
    lines: list[str] = []
    for name, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def previous_last_success(path: Path, set_name: str) -> float | None:
    """The last success time of ``set_name`` in an earlier metrics file, if it holds one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    pattern = re.compile(
        rf'^{LAST_SUCCESS}\{{set="{re.escape(_label_value(set_name))}"\}} (\S+)$', re.MULTILINE
    )
    match = pattern.search(text)
    if match is None:
        return None
    try:
        value = float(match[1])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- writing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """The files one run writes besides its JSON report; ``None``: not asked for."""

    junit: Path | None = None
    markdown: Path | None = None
    metrics: Path | None = None
    #: ``$GITHUB_STEP_SUMMARY``: the Markdown is appended to it at the end (with ``markdown``).
    step_summary: Path | None = None

    @classmethod
    def from_env(
        cls, *, junit: Path | None, markdown: Path | None, metrics: Path | None
    ) -> Outputs:
        summary = os.environ.get(STEP_SUMMARY_ENV, "").strip()
        return cls(
            junit=junit,
            markdown=markdown,
            metrics=metrics,
            step_summary=Path(summary) if summary and markdown is not None else None,
        )

    def paths(self) -> Iterable[tuple[str, Path]]:
        """Each file asked for, with the flag that asked."""
        for flag, path in (
            ("--junit", self.junit),
            ("--markdown", self.markdown),
            ("--metrics", self.metrics),
        ):
            if path is not None:
                yield flag, path

    def write(self, report: Report, *, final: bool) -> None:
        """Write every file; an :class:`OutputPathError` names the first that failed.

        The step summary is appended only when ``final``: the periodic rewrites
        would append it again and again.
        """
        for flag, path in self.paths():
            try:
                write_text_atomic(path, self._render(flag, path, report))
            except OSError as exc:
                raise path_error(flag, path, exc.strerror or str(exc)) from None
        if final and self.step_summary is not None:
            try:
                with self.step_summary.open("a", encoding="utf-8") as out:
                    out.write(markdown(report) + "\n")
            except OSError as exc:
                raise OutputPathError(
                    str(self.step_summary),
                    exc.strerror or str(exc),
                    what="step summary",
                    fix=f"check ${STEP_SUMMARY_ENV}, or drop --markdown",
                ) from None

    def _render(self, flag: str, path: Path, report: Report) -> str:
        if flag == "--junit":
            return junit_xml(report)
        if flag == "--markdown":
            return markdown(report)
        return metrics(report, previous_last_success(path, _suite_name(report)))


_WHAT = {"--junit": "JUnit file", "--markdown": "Markdown summary", "--metrics": "metrics file"}


def path_error(flag: str, path: Path, reason: str) -> OutputPathError:
    """The error for an output that cannot be written, saying which flag to change."""
    return OutputPathError(
        str(path),
        reason,
        what=_WHAT.get(flag, "file"),
        fix=f"pass {flag} a path in a directory you can write to",
    )
