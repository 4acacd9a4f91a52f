"""The command line: exit codes, the report file, and the token's safety."""

from __future__ import annotations

import errno
import json
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from importer.cli import _listen_error, _on_signal, exit_code, main
from importer.logs import reset_logging
from importer.pipeline import Stopper
from importer.report import Report, ReportWriter
from tests.processes import ENV

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
EXAMPLE = str(MANIFESTS / "example.yaml")


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each command configures logging onto its runner's stream: leave none of it behind."""
    yield
    reset_logging()


def invoke(
    *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(main, list(args), env=env, input=input, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def silent_port() -> Iterator[socket.socket]:
    """A loopback port that listens and never answers: any request would queue up there."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener


def connection_attempted(listener: socket.socket) -> bool:
    readable, _, _ = select.select([listener], [], [], 0)
    return bool(readable)


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


# -- output paths are checked before anything runs ------------------------------------


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_report_under_a_file_is_refused_before_the_run(tmp_path: Path, log_format: str) -> None:
    """`--report f/r.json` with `f` a file: exit 2, one line, nothing started, nothing written."""
    blocker = tmp_path / "f"
    blocker.write_text("")
    code, out, err = invoke(
        "run", EXAMPLE, "--simulate", "--virtual-time", "--report", str(blocker / "r.json"),
        "--log-format", log_format,
    )  # fmt: skip
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # no simulator.listening: nothing ran
    assert "is not a directory" in lines[0]
    assert "--report" in lines[0]
    if log_format == "json":
        assert json.loads(lines[0])["event"] == "cli.error"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_report_in_an_unwritable_directory_is_refused_before_any_request(
    silent_port: socket.socket, tmp_path: Path
) -> None:
    """`--report /sys/r.json` (unwritable even for root) against an API: exit 2, no request."""
    port = silent_port.getsockname()[1]
    code, _, err = invoke(
        "run", EXAMPLE, "--api-url", f"http://127.0.0.1:{port}", "--manifest-order",
        "--report", "/sys/r.json", "--state", str(tmp_path / "s.sqlite"),
        env={"DIGITALOCEAN_TOKEN": "dop_v1_secret"},
    )  # fmt: skip
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "/sys" in err
    assert not connection_attempted(silent_port)
    assert not (tmp_path / "s.sqlite").exists()


def test_report_that_fails_at_the_end_still_shows_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report write failing after the run (disk full): the summary, then one line, exit 2."""

    def disk_full(self: ReportWriter, report: Report, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # `run` writes its report (the rewrites and the last) through a ReportWriter.
    monkeypatch.setattr(ReportWriter, "write", disk_full)
    code, out, err = invoke(
        "run", EXAMPLE, "--simulate", "--virtual-time", "--report", str(tmp_path / "r.json")
    )
    assert code == 2
    assert "5 available" in out
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert error_lines == [
        f"error: cannot write the report to {tmp_path / 'r.json'}: No space left on device; "
        "pass --report a path in a directory you can write to, or - for standard output"
    ]
    assert "Traceback" not in err


def test_report_dash_writes_json_to_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--report -`: standard output is the JSON report alone; the summary goes to stderr."""
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke("run", EXAMPLE, "--simulate", "--virtual-time", "--report", "-")
    assert code == 0
    report = json.loads(out)
    assert report["summary"]["available"] == 5
    assert "5 images: 5 available" in err
    assert list(tmp_path.iterdir()) == []  # no file named "-"


# -- flags say what they do, and refuse what they cannot do ---------------------------


def test_help_shows_the_real_poll_interval_default() -> None:
    """`run --help` gives the poll interval's actual default, 30 s."""
    _, out, _ = invoke("run", "--help")
    text = " ".join(out.split())
    assert "Between status checks of one image [default: 30s;" in text
    assert "[default: 60s; 1s with --simulate]" in text


@pytest.mark.parametrize("flag", ["--first-poll", "--poll-interval", "--deadline", "--timeout"])
def test_zero_durations_are_refused_naming_the_flag(tmp_path: Path, flag: str) -> None:
    """A zero duration is refused with exit 2 in the flag's own name, before anything runs."""
    report = tmp_path / "r.json"
    code, out, err = invoke(
        "run", EXAMPLE, "--simulate", "--virtual-time", "--report", str(report), flag, "0"
    )
    assert code == 2
    # The flag, not the setting behind it (``--timeout``, not ``image_timeout``).
    assert err == f"error: {flag} must be positive, got 0\n"
    assert out == ""
    assert not report.exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--api-url", "ftp://x"), ("--token-file", "/nonexistent")]
)
def test_simulate_refuses_api_options(tmp_path: Path, flag: str, value: str) -> None:
    """`--simulate` with `--api-url` or `--token-file` is refused in one line, not ignored."""
    report = tmp_path / "r.json"
    code, _, err = invoke(
        "run", EXAMPLE, "--simulate", "--virtual-time", "--report", str(report), flag, value
    )
    assert code == 2
    assert len(err.splitlines()) == 1
    assert f"{flag} does not go with --simulate" in err
    assert not report.exists()


def test_validate_reads_standard_input() -> None:
    """`validate -` checks the manifest given on standard input."""
    text = (MANIFESTS / "example.yaml").read_text()
    code, out, _ = invoke("validate", "-", input=text)
    assert code == 0
    assert out == "<stdin>: 5 images, no problems\n"
    code, _, err = invoke("validate", "-", input="images: [{name: a}]\n")
    assert code == 2
    assert "<stdin>" in err


def test_run_from_standard_input_is_refused() -> None:
    """`run -` says why it needs a file, instead of looking for a file named '-'."""
    code, _, err = invoke("run", "-", "--simulate", "--virtual-time", input="images: []\n")
    assert code == 2
    assert "validate -" in err


def test_one_image_is_not_plural(tmp_path: Path) -> None:
    """Human output says "1 image", not "1 images"."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text("images:\n  - {name: a, url: 'https://h.example/a.qcow2', region: nyc3}\n")
    _, out, _ = invoke("validate", str(manifest))
    assert out == f"{manifest}: 1 image, no problems\n"
    code, out, _ = invoke(
        "run", str(manifest), "--simulate", "--virtual-time", "--report", str(tmp_path / "r.json")
    )
    assert code == 0
    assert out.startswith("1 image: 1 available (")


# -- logs: with JSON chosen, every stderr line is JSON ------------------------------------


def test_json_logs_have_no_plain_line(tmp_path: Path) -> None:
    """`--log-format json`: every stderr line is a JSON event, the simulator's address too."""
    code, _, err = invoke(
        "run", EXAMPLE, "--simulate", "--virtual-time", "--log-format", "json",
        "--report", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert code == 0
    events = [json.loads(line) for line in err.splitlines()]
    listening = [e for e in events if e["event"] == "simulator.listening"]
    assert len(listening) == 1
    assert listening[0]["url"].startswith("http://127.0.0.1:")


def test_signals_are_events() -> None:
    """A first signal logs run.signal and stops; a second logs run.signal and exits at once."""
    exits: list[int] = []

    class Exited(Exception):
        pass

    def exit_now(code: int) -> NoReturn:
        exits.append(code)
        raise Exited

    stopper = Stopper()
    with capture_logs() as events:
        _on_signal(signal.SIGINT, stopper, exit_now)
        assert stopper.reason == "interrupted"
        assert exits == []
        with pytest.raises(Exited):
            _on_signal(signal.SIGTERM, stopper, exit_now)
    assert exits == [143]
    assert [(e["event"], e["signal"], e["action"]) for e in events] == [
        ("run.signal", "SIGINT", "stop"),
        ("run.signal", "SIGTERM", "exit"),
    ]


# -- importer simulate --------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_simulate_on_a_busy_port_is_one_line(silent_port: socket.socket, log_format: str) -> None:
    """`simulate` on a port in use: exit 2, one line saying to pick another port, no traceback."""
    port = silent_port.getsockname()[1]
    code, out, err = invoke("simulate", "--port", str(port), "--log-format", log_format)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert f"127.0.0.1:{port}" in lines[0]
    assert "in use" in lines[0]
    assert "--port" in lines[0]
    if log_format == "json":
        assert json.loads(lines[0])["exit_code"] == 2


def test_simulate_on_a_foreign_address_is_one_line() -> None:
    """`simulate --host` with an address of no local interface: exit 2, one line naming --host."""
    code, _, err = invoke("simulate", "--host", "192.0.2.1", "--port", "0")  # TEST-NET-1
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "--host" in err


def test_unresolvable_host_says_to_change_host() -> None:
    """A host name that does not resolve is reported as such, naming --host."""
    error = _listen_error("nowhere.invalid", 8080, socket.gaierror(-2, "Name or service not known"))
    assert error.exit_code == 2
    assert "does not resolve" in str(error)
    assert "--host" in str(error)


@pytest.mark.slow
def test_interrupted_run_logs_only_json(tmp_path: Path) -> None:
    """A real process with JSON logs, interrupted: every stderr line is JSON, the signal's too."""
    command = [
        sys.executable, "-m", "importer", "run", EXAMPLE, "--simulate", "--log-format", "json",
        "--report", str(tmp_path / "r.json"), "--first-poll", "10m",
    ]  # fmt: skip
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if '"image.submitted"' in line:
                break
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 130, rest
    events = [json.loads(line) for line in [*lines, *rest.splitlines()]]
    names = [event["event"] for event in events]
    assert "simulator.listening" in names
    signals = [event for event in events if event["event"] == "run.signal"]
    assert [(e["signal"], e["action"]) for e in signals] == [("SIGINT", "stop")]
