"""Every deployment example runs: its own command line, against a simulator, with its token file.

Each test parses its example the way its scheduler would (YAML for Kubernetes and GitHub
Actions, the unit files' ini syntax for systemd, a crontab line), takes the `importer ...`
command out of it, and runs that command in-process on virtual time, with `--api-url`
pointed at a simulator that accepts only the test's token. What the example reads from
the machine (its manifest, its token file) is put where the example says, under a
temporary root; the manifest's URLs are pointed at the simulator's file host, so that
nothing leaves the loopback interface.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import pytest
import yaml
from click.testing import CliRunner

import importer.cli
from importer.cli import main
from importer.clock import VirtualTimeLoop
from importer.durations import parse_duration
from importer.logs import reset_logging
from importer.simulator import SimulatorConfig, run_simulator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOKEN = "dop_v1_example_token_for_the_tests"
DAY = 86_400.0


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    yield
    reset_logging()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Machine:
    """A temporary root standing in for the machine (or pod) an example runs on."""

    root: Path
    base_url: str

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    def path(self, path: str) -> Path:
        """Where the example's ``path`` lives here (absolute under the root, else the workdir)."""
        pure = PurePosixPath(path)
        if pure.is_absolute():
            return self.root.joinpath(*pure.parts[1:])
        return self.workdir / pure

    def put(self, path: str, text: str) -> None:
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def put_manifest(self, path: str, text: str) -> None:
        """The example's manifest, its sources served by the simulator's file host."""
        data = yaml.safe_load(text)
        for image in data["images"]:
            image["url"] = f"{self.base_url}/_files/{PurePosixPath(image['url']).name}"
        self.put(path, yaml.safe_dump(data, sort_keys=False))


@dataclass(frozen=True)
class Ran:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machine:
    """A root, a workdir to run in, and the CLI's runs served by an in-test simulator."""
    port = free_port()
    here = Machine(tmp_path, f"http://127.0.0.1:{port}")
    here.workdir.mkdir()
    monkeypatch.chdir(here.workdir)
    real_run, real_cli_run = anyio.run, importer.cli._run

    def on_virtual_time(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        options = {**(kwargs.pop("backend_options", None) or {}), "loop_factory": VirtualTimeLoop}
        return real_run(func, *args, backend_options=options, **kwargs)

    async def with_simulator(*args: Any) -> Any:
        # The simulator shares the run's loop (and so its virtual clock) and accepts
        # only the token the example's file holds.
        config = SimulatorConfig.demo(token=TOKEN)
        async with run_simulator(config, host="127.0.0.1", port=port):
            return await real_cli_run(*args)

    monkeypatch.setattr(anyio, "run", on_virtual_time)
    monkeypatch.setattr(importer.cli, "_run", with_simulator)
    return here


def run_command(machine: Machine, command: list[str], env: dict[str, str] | None = None) -> Ran:
    """Run an example's ``importer ...`` command, its absolute paths under the machine's root."""
    assert PurePosixPath(command[0]).name == "importer", command
    args = [str(machine.path(a)) if a.startswith("/") else a for a in command[1:]]
    assert "--api-url" not in args
    result = CliRunner().invoke(
        main, [*args, "--api-url", machine.base_url], env=env, catch_exceptions=False
    )
    return Ran(result.exit_code, result.stdout, result.stderr)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def period_of_cron(schedule: str) -> float:
    """How long between two runs of a daily or weekly cron schedule."""
    fields = schedule.split()
    assert len(fields) == 5, schedule
    minute, hour, day, month, weekday = fields
    assert minute.isdigit(), schedule
    assert hour.isdigit(), schedule
    assert (day, month) == ("*", "*"), schedule
    return DAY if weekday == "*" else 7 * DAY


def assert_all_available(report: dict[str, Any], entries: int) -> None:
    assert report["stopped"] is None
    assert report["summary"]["total"] == entries
    assert report["summary"]["available"] == entries


# -- the container image ------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """The Containerfile's instructions, continuation lines joined."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_containerfile_is_slim_non_root_with_importer_as_entrypoint() -> None:
    """A slim Python base of the version the package needs, a non-root user, `importer` first."""
    instructions = containerfile()
    [base] = [rest for keyword, rest in instructions if keyword == "FROM"]
    match = re.fullmatch(r"(?:docker\.io/library/)?python:(3\.\d+)-slim", base)
    assert match, base
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'requires-python = ">={match[1]}"' in pyproject
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoint] == [["importer"]]
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    # The Kubernetes example runs as the image's user: the same uid.
    cronjob = _cronjob()
    security = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["securityContext"]
    assert str(security["runAsUser"]) == users[-1].split(":")[0]


# -- Kubernetes ---------------------------------------------------------------------


def _documents() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((EXAMPLES / "kubernetes-cronjob.yaml").read_text()))


def _cronjob() -> dict[str, Any]:
    [cronjob] = [d for d in _documents() if d["kind"] == "CronJob"]
    return cronjob


def test_kubernetes_cronjob_runs_against_the_simulator(machine: Machine) -> None:
    """Forbid overlaps, token from a Secret file, deadline inside the period, no volume kept."""
    cronjob = _cronjob()
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # The image's entrypoint is `importer`; the container gives only its arguments.
    assert "command" not in container
    command = ["importer", *container["args"]]
    deadline = parse_duration(flag(command, "--deadline"))
    assert deadline < period_of_cron(spec["schedule"])
    assert deadline < spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert not any("persistentVolumeClaim" in volume for volume in volumes.values())
    config_maps = {d["metadata"]["name"]: d for d in _documents() if d["kind"] == "ConfigMap"}
    token_file = flag(command, "--token-file")
    token_from_secret = False
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        directory = PurePosixPath(mount["mountPath"])
        machine.path(str(directory)).mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]]["data"].items():
                machine.put_manifest(str(directory / key), text)
        elif "secret" in volume and PurePosixPath(token_file).parent == directory:
            machine.put(token_file, TOKEN + "\n")
            token_from_secret = True
    assert token_from_secret
    ran = run_command(machine, command)
    assert ran.exit_code == 0, ran.stderr
    report = json.loads(ran.stdout)  # `--report -`: standard output is the report alone
    assert_all_available(report, 2)
    assert all(json.loads(line) for line in ran.stderr.splitlines())  # JSON logs only


# -- systemd ------------------------------------------------------------------------


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string((EXAMPLES / name).read_text())
    return parser


def test_systemd_service_and_timer_run_against_the_simulator(machine: Machine) -> None:
    """The timer fires daily; the service's ExecStart, with its credential, imports every image."""
    timer = unit("importer.timer")
    assert timer["Timer"]["OnCalendar"] in ("daily", "*-*-* 02:00:00")
    assert timer["Install"]["WantedBy"] == "timers.target"
    service = unit("importer.service")["Service"]
    assert service["Type"] == "oneshot"
    credential, _, source = service["LoadCredential"].partition(":")
    # systemd sets these for the service (StateDirectory=, LoadCredential=).
    variables = {
        "CREDENTIALS_DIRECTORY": "/run/credentials/importer.service",
        "STATE_DIRECTORY": f"/var/lib/{service['StateDirectory']}",
    }
    exec_start = re.sub(r"\$\{(\w+)\}", lambda m: variables[m[1]], service["ExecStart"])
    command = shlex.split(exec_start)
    assert flag(command, "--token-file") == f"{variables['CREDENTIALS_DIRECTORY']}/{credential}"
    assert parse_duration(flag(command, "--deadline")) < min(
        DAY, parse_duration(service["TimeoutStartSec"])
    )
    machine.put(flag(command, "--token-file"), TOKEN + "\n")  # what systemd copies from source
    assert source.startswith("/etc/importer/")
    machine.put_manifest(command[2], (EXAMPLES / "images.yaml").read_text())
    ran = run_command(machine, command)
    assert ran.exit_code == 0, ran.stderr
    assert_all_available(json.loads(machine.path(flag(command, "--report")).read_text()), 3)
    metrics = machine.path(flag(command, "--metrics")).read_text()
    assert 'importer_entries{set="nightly-images",outcome="available"} 3' in metrics


# -- cron ---------------------------------------------------------------------------


def test_crontab_line_runs_against_the_simulator(machine: Machine) -> None:
    """The one crontab line: daily, its command (up to the redirection) imports every image."""
    [line] = [
        line
        for line in (EXAMPLES / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    fields = line.split(maxsplit=5)
    schedule, words = " ".join(fields[:5]), shlex.split(fields[5])
    assert "%" not in fields[5]  # cron would turn it into a newline
    end = next((i for i, w in enumerate(words) if w.startswith((">", "2>", "|"))), len(words))
    command = words[:end]
    assert parse_duration(flag(command, "--deadline")) < period_of_cron(schedule)
    machine.put(flag(command, "--token-file"), TOKEN + "\n")
    machine.put_manifest(command[2], (EXAMPLES / "images.yaml").read_text())
    ran = run_command(machine, command)
    assert ran.exit_code == 0, ran.stderr
    assert ran.stderr == ""  # -q: warnings only, and there were none
    assert ran.stdout.startswith("3 images: 3 available")
    assert_all_available(json.loads(machine.path(flag(command, "--report")).read_text()), 3)


# -- GitHub Actions -----------------------------------------------------------------


def test_github_actions_workflow_runs_against_the_simulator(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scheduled, never two at once; the Import step's command, token from the secret's env."""
    workflow = yaml.safe_load((EXAMPLES / "github-actions-nightly.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    [schedule] = triggers["schedule"]
    assert workflow["concurrency"]["cancel-in-progress"] is False
    [job] = workflow["jobs"].values()
    [step] = [s for s in job["steps"] if "importer run" in s.get("run", "")]
    command = shlex.split(step["run"])
    deadline = parse_duration(flag(command, "--deadline"))
    assert deadline < min(period_of_cron(schedule["cron"]), job["timeout-minutes"] * 60)
    env = {
        name: TOKEN if value == "${{ secrets.DIGITALOCEAN_TOKEN }}" else value
        for name, value in step["env"].items()
    }
    assert env == {"DIGITALOCEAN_TOKEN": TOKEN}
    summary = machine.root / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    machine.put_manifest(command[2], (EXAMPLES / command[2].removeprefix("examples/")).read_text())
    ran = run_command(machine, command, env=env)
    assert ran.exit_code == 0, ran.stderr
    assert_all_available(json.loads(machine.path(flag(command, "--report")).read_text()), 3)
    suite = ET.fromstring(machine.path(flag(command, "--junit")).read_text())[0]
    assert (suite.get("tests"), suite.get("failures")) == ("3", "0")
    assert summary.read_text() == machine.path(flag(command, "--markdown")).read_text() + "\n"
    uploaded = set(job["steps"][-1]["with"]["path"].split())
    assert uploaded == {flag(command, name) for name in ("--report", "--junit", "--markdown")}


def test_readme_links_every_example_under_ready_examples() -> None:
    """Each file of examples/ (and the Containerfile) is linked in "Ready examples"."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Ready examples for schedulers")
    section = readme[start : readme.index("\n#", start + 1)]
    linked = set(re.findall(r"\]\(([^)]+)\)", section))
    expected = {f"examples/{p.name}" for p in EXAMPLES.iterdir()} | {"Containerfile"}
    assert linked == expected
