"""The command line: exit codes, the report file, and the token's safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from importer.cli import exit_code, main
from importer.report import Report

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_demo_imports_every_example_image(tmp_path: Path) -> None:
    """`run manifests/example.yaml --simulate` (on virtual time) exits 0 with all available."""
    report_path = tmp_path / "report.json"
    code, out, _ = invoke(
        "run", str(MANIFESTS / "example.yaml"), "--simulate", "--virtual-time",
        "--report", str(report_path),
    )  # fmt: skip
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["summary"]["total"] == 5
    assert report["summary"]["available"] == 5
    assert {image["outcome"] for image in report["images"]} == {"available"}
    assert "5 available" in out


def test_failures_example_reports_each_failure_and_exits_1(tmp_path: Path) -> None:
    """`example-failures.yaml` gives `failed` with the API's message for each bad entry, exit 1."""
    report_path = tmp_path / "report.json"
    code, _, _ = invoke(
        "run", str(MANIFESTS / "example-failures.yaml"), "--simulate", "--virtual-time",
        "--report", str(report_path),
    )  # fmt: skip
    assert code == 1
    images = json.loads(report_path.read_text())["images"]
    by_name = {image["name"]: image for image in images}
    for name in ("db-postgres-16-2024-06", "legacy-app-2019", "cache-redis-2024-06"):
        assert by_name[name]["outcome"] == "failed"
        assert by_name[name]["error"]
        assert by_name[name]["status"] == "deleted"
    assert "decompressing" in by_name["db-postgres-16-2024-06"]["error"]
    assert by_name["web-base-2024-06"]["outcome"] == "available"


def test_invalid_manifest_exits_2_listing_problems(tmp_path: Path) -> None:
    """A bad manifest is refused with exit 2, one line per problem, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("images:\n  - name: a\n    url: ftp://x/a.img\n    region: nyc9\n")
    code, out, err = invoke("run", str(bad), "--simulate", "--virtual-time")
    assert code == 2
    assert "Traceback" not in out + err
    assert "nyc9" in err
    assert "url" in err
    code, _, err = invoke("validate", str(bad))
    assert code == 2


def test_validate_accepts_examples() -> None:
    """`validate` says how many images a good manifest holds, exit 0."""
    code, out, _ = invoke("validate", str(MANIFESTS / "example.yaml"))
    assert code == 0
    assert "5 images" in out


def test_missing_token_is_a_usage_error(tmp_path: Path) -> None:
    """Without DIGITALOCEAN_TOKEN or --token-file a real run exits 2 and says how to fix it."""
    code, _, err = invoke(
        "run", str(MANIFESTS / "example.yaml"), "--report", str(tmp_path / "r.json"),
        env={"DIGITALOCEAN_TOKEN": ""},
    )  # fmt: skip
    assert code == 2
    assert "DIGITALOCEAN_TOKEN" in err


def test_plain_http_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    """The token is never sent over plain http to a non-loopback address."""
    code, _, err = invoke(
        "run", str(MANIFESTS / "example.yaml"), "--api-url", "http://api.example.com",
        "--state", str(tmp_path / "s.sqlite"),
        env={"DIGITALOCEAN_TOKEN": "dop_v1_secret"},
    )  # fmt: skip
    assert code == 2
    assert "plain http" in err
    assert "dop_v1_secret" not in err


@pytest.mark.parametrize(
    ("stopped", "code"),
    [
        ("authentication_failed", 3),
        ("api_unreachable", 3),
        ("deadline", 4),
        ("interrupted", 130),
        ("terminated", 143),
    ],
)
def test_exit_codes_of_stopped_runs(stopped: str, code: int) -> None:
    """Each way a run can stop early maps to its documented exit code."""
    report = Report(
        manifest="m", api_url="u", started_at=0.0, finished_at=1.0, images=(),
        requests=0, rate_limited=0, stopped=stopped,
    )  # fmt: skip
    assert exit_code(report) == code


@pytest.mark.parametrize("flag", ["--token", "--api-token"])
def test_no_token_option_exists(flag: str) -> None:
    """A token cannot be given as a command-line value (it would leak into ps and history)."""
    code, _, _ = invoke("run", str(MANIFESTS / "example.yaml"), flag, "x")
    assert code == 2


def test_deadline_stops_the_run_with_exit_4(tmp_path: Path) -> None:
    """`--deadline` ends the run when its time is up: exit 4, unfinished images `pending`."""
    report_path = tmp_path / "report.json"
    code, _, _ = invoke(
        "run", str(MANIFESTS / "example.yaml"), "--simulate", "--virtual-time",
        "--deadline", "2s", "--report", str(report_path),
    )  # fmt: skip
    assert code == 4
    report = json.loads(report_path.read_text())
    assert report["stopped"] == "deadline"
    assert report["summary"]["pending"] == 5


def test_second_process_on_the_same_state_exits_2(tmp_path: Path) -> None:
    """While another importer holds the state file, a run refuses with exit 2 and says why."""
    from importer.journal import Journal  # noqa: PLC0415

    state = tmp_path / "state.sqlite"
    with Journal(state):
        code, _, err = invoke(
            "run", str(MANIFESTS / "example.yaml"), "--simulate", "--virtual-time",
            "--state", str(state), "--report", str(tmp_path / "r.json"),
        )  # fmt: skip
    assert code == 2
    assert "another importer" in err
