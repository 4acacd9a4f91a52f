"""The ``importer`` command: ``run``, ``plan``, ``status``, ``validate`` and ``simulate``.

Exit codes of ``run``: 0 every image available (and its names put right); 1 some
image failed, timed out or was rejected, or rotation left something undone; 2
invalid manifest or usage (or the state file is in use, or the report cannot be
written); 3 authentication failed, the API unreachable or the account unreadable; 4 the
``--deadline`` passed; 130 interrupted (SIGINT); 143 terminated (SIGTERM).

Every check of the command line and of the paths to write is made before the first
request. Logs go to stderr; with ``--log-format json`` every stderr line is JSON. On a
terminal, with console logs, a live view of the run (:mod:`importer.live`) is drawn on
stderr, with only warnings (``-v``: every line down to debug) printed above it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TextIO, TypeVar
from urllib.parse import urlsplit

import anyio
import click
import structlog

from importer.catalog import API_URL_ENV, DEFAULT_API_URL, TOKEN_ENV
from importer.clock import LoopClock, VirtualTimeLoop
from importer.durations import parse_duration
from importer.errors import (
    AccountUnreadableError,
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    ImporterError,
    InvalidSettingError,
    ListenError,
    ManifestError,
    OutputPathError,
    Problem,
    UsageError,
)
from importer.journal import MEMORY, PRIVATE, Journal
from importer.live import LiveView
from importer.logs import LogFormat, configure_logging
from importer.manifest import Manifest, load_manifest, parse_manifest
from importer.outputs import Outputs, path_error
from importer.pipeline import Stopper, plan_only, run_import
from importer.plan import RunPlan
from importer.progress import RunMonitor, RunSnapshot, preparing
from importer.report import (
    RUNNING,
    Report,
    ReportWriter,
    plural,
    unwritable_reason,
    write_json_atomic,
)
from importer.settings import Settings, Token, default_api_url
from importer.simulator import SimulatorConfig, run_simulator
from importer.sources import SourceProber
from importer.status import last_report

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_API = 3
EXIT_DEADLINE = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_STOP_EXIT = {
    "authentication_failed": EXIT_API,
    "api_unreachable": EXIT_API,
    "account_unreadable": EXIT_API,
    "deadline": EXIT_DEADLINE,
    "interrupted": EXIT_INTERRUPTED,
    "terminated": EXIT_TERMINATED,
    # Only `importer status` sees it: the last run has not ended (or was killed).
    RUNNING: EXIT_FAILURES,
}
_SIGNAL_REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
DEFAULT_STATE = Path("importer-state.sqlite")
#: ``--report -`` and ``validate -``: standard output, standard input.
DASH = Path("-")
STDIN_SOURCE = "<stdin>"
FC = TypeVar("FC", bound=Callable[..., Any])


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic in newer stubs only
    """``90``, ``45s``, ``15m``, ``1h30m``: seconds as a float."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _die(error: ImporterError, log_format: LogFormat = "console") -> NoReturn:
    """One line (or one JSON event) saying what is wrong and what to do, then the exit code."""
    if log_format == "json":
        structlog.get_logger("importer.cli").error(
            "cli.error", error=str(error), exit_code=error.exit_code
        )
    else:
        click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def _load(path: Path, log_format: LogFormat = "console") -> Manifest:
    try:
        if path == DASH:
            return _load_stdin()
        return load_manifest(path)
    except ImporterError as error:
        _die(error, log_format)


def _load_stdin() -> Manifest:
    """A manifest from standard input: YAML, or JSON (which YAML reads too)."""
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = Problem(f"the manifest is not UTF-8 text (byte at offset {exc.start})")
        raise ManifestError(STDIN_SOURCE, [problem]) from exc
    return parse_manifest(text, source=STDIN_SOURCE)


def _flags(command: click.Command) -> dict[str, str]:
    """Each option's parameter name -> its flag: ``image_timeout`` -> ``--timeout``."""
    return {
        param.name: param.opts[0]
        for param in command.params
        if isinstance(param, click.Option) and param.name
    }


def _output_options(command: FC) -> FC:
    """``--junit``, ``--markdown`` and ``--metrics``, shared by ``run`` and ``status``."""
    for flag, name, help_text in reversed(
        (
            ("--junit", "junit_path", "Also write a JUnit XML file: one test case per entry."),
            (
                "--markdown",
                "markdown_path",
                "Also write a Markdown summary (and append it to $GITHUB_STEP_SUMMARY if set).",
            ),
            (
                "--metrics",
                "metrics_path",
                "Also write Prometheus metrics (text format, for node_exporter's textfile "
                "collector).",
            ),
        )
    ):
        option = click.option(
            flag, name, type=click.Path(path_type=Path, dir_okay=False), help=help_text
        )
        command = option(command)
    return command


def _log_format_option(command: FC) -> FC:
    """``--log-format``, the same for every command that logs."""
    option = click.option(
        "--log-format",
        type=click.Choice(["console", "json"]),
        default="console",
        show_default=True,
        help="Human-readable logs, or JSON lines.",
    )
    return option(command)


def _api_options(command: FC) -> FC:
    """``--api-url`` and ``--token-file``: where the API is and who to be, for ``run`` and
    ``plan``."""
    token_file = click.option(
        "--token-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"Read the API token from this file instead of ${TOKEN_ENV}.",
    )
    api_url = click.option(
        "--api-url",
        default=None,
        help=f"API base URL [default: ${API_URL_ENV} or https://api.digitalocean.com].",
    )
    return api_url(token_file(command))


def _check_outputs(outputs: Outputs, log_format: LogFormat) -> None:
    """Refuse, before anything runs, an output that could not be written at the end."""
    for flag, path in outputs.paths():
        reason = unwritable_reason(path)
        if reason is not None:
            _die(path_error(flag, path, reason), log_format)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="importer")
def main() -> None:
    """Bulk-import DigitalOcean custom images from a manifest."""


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True))
def validate(manifest: Path) -> None:
    """Check MANIFEST (- for standard input) without sending anything; list every problem."""
    loaded = _load(manifest)
    source = STDIN_SOURCE if manifest == DASH else manifest
    click.echo(f"{source}: {plural(len(loaded.entries), 'image')}, no problems")


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    default=Path("import-report.json"),
    show_default=True,
    help="Where to write the JSON report; - for standard output (the summary then goes to stderr).",
)
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"The journal to resume from [default: {DEFAULT_STATE}; none with --simulate].",
)
@click.option(
    "--simulate",
    is_flag=True,
    help="Run against the built-in simulator (demo timings, no token needed).",
)
@click.option(
    "--virtual-time",
    is_flag=True,
    help="With --simulate: run on virtual time, so minutes of imports take moments.",
)
@_api_options
@click.option(
    "--concurrency",
    type=click.IntRange(2, 256),
    default=8,
    show_default=True,
    help="Requests in flight at once.",
)
@click.option(
    "--per-minute",
    type=click.IntRange(1),
    default=250,
    show_default=True,
    help="Most requests in any 60 s (DigitalOcean allows 250 per token).",
)
@click.option(
    "--per-hour",
    type=click.IntRange(1),
    default=5000,
    show_default=True,
    help="Most requests in any hour (DigitalOcean allows 5,000 per token).",
)
@click.option(
    "--minute-window",
    type=DURATION,
    default=None,
    hidden=True,
    help="How long a request counts against --per-minute [default: 60s, DigitalOcean's]; "
    "only to match a simulator run with the same flag.",
)
@click.option(
    "--reserve",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of both limits left to other users of the token.",
)
@click.option(
    "--size-order/--manifest-order",
    default=True,
    show_default=True,
    help="Size each source with HEAD and import the largest first, or keep the manifest's order.",
)
@click.option(
    "--timeout",
    "image_timeout",
    type=DURATION,
    default="60m",
    show_default=True,
    help="Give up on an image this long after submitting it.",
)
@click.option(
    "--deadline",
    type=DURATION,
    default=None,
    help="Stop the whole run after this long (exit 4); a later run resumes it.",
)
@click.option(
    "--first-poll",
    type=DURATION,
    default=None,
    help="Wait before an image's first status check "
    f"[default: {Settings.first_poll:g}s; 1s with --simulate].",
)
@click.option(
    "--poll-interval",
    type=DURATION,
    default=None,
    help="Between status checks of one image "
    f"[default: {Settings.poll_interval:g}s; 1s with --simulate].",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Delete the set's images whose entry left the manifest [default: only report them].",
)
@_log_format_option
@_output_options
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and the final summary.")
@click.option("-v", "--verbose", is_flag=True, help="Every log line, debug ones too.")
def run(
    manifest: Path,
    report_path: Path,
    state_path: Path | None,
    simulate: bool,
    virtual_time: bool,
    api_url: str | None,
    token_file: Path | None,
    concurrency: int,
    per_minute: int,
    per_hour: int,
    minute_window: float | None,
    reserve: float,
    size_order: bool,
    image_timeout: float,
    deadline: float | None,
    first_poll: float | None,
    poll_interval: float | None,
    prune: bool,
    log_format: LogFormat,
    junit_path: Path | None,
    markdown_path: Path | None,
    metrics_path: Path | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Make the account hold what MANIFEST asks for (import, replace, rotate); write a report."""
    # Set up first, so that even a refusal is a JSON line when JSON is asked for.
    configure_logging(log_format)
    if quiet and verbose:
        _die(UsageError("-q and -v contradict each other; pass one of them"), log_format)
    for flag, given in (("--api-url", api_url is not None), ("--token-file", token_file)):
        if simulate and given:
            _die(
                UsageError(
                    f"{flag} does not go with --simulate, which runs against its own "
                    f"simulator and needs no token; drop {flag} or --simulate"
                ),
                log_format,
            )
    if virtual_time and not simulate:
        _die(
            UsageError("--virtual-time needs --simulate: the real API runs on real time"),
            log_format,
        )
    if manifest == DASH:
        _die(
            UsageError(
                "run reads its manifest from a file (the file's name names the image groups); "
                "save it to a file first (`importer validate -` checks standard input)"
            ),
            log_format,
        )
    loaded = _load(manifest, log_format)
    try:
        token = Token("simulated") if simulate else Token.from_env_or_file(token_file)
        demo = 1.0 if simulate else None
        settings = Settings(
            token=token,
            # A simulated run is pointed at its simulator once that listens.
            api_url=(
                DEFAULT_API_URL if simulate else default_api_url() if api_url is None else api_url
            ),
            concurrency=concurrency,
            per_minute=per_minute,
            per_hour=per_hour,
            minute_window=minute_window or Settings.minute_window,
            reserve=reserve,
            image_timeout=image_timeout,
            deadline=deadline,
            first_poll=first_poll if first_poll is not None else demo or Settings.first_poll,
            poll_interval=(
                poll_interval if poll_interval is not None else demo or Settings.poll_interval
            ),
            progress_interval=5.0 if simulate else Settings.progress_interval,
            report_path=report_path,
            state_path=state_path if state_path or simulate else DEFAULT_STATE,
        )
    except InvalidSettingError as error:
        flags = _flags(click.get_current_context().command)
        _die(error.renamed(flags.get(error.setting, error.setting)), log_format)
    except ImporterError as error:
        _die(error, log_format)
    to_stdout = settings.report_path == DASH
    # The report is written when the run ends, maybe hours from now: find out now.
    reason = None if to_stdout else unwritable_reason(settings.report_path)
    if reason is not None:
        _die(OutputPathError(str(settings.report_path), reason, fix=_REPORT_FIX), log_format)
    outputs = Outputs.from_env(junit=junit_path, markdown=markdown_path, metrics=metrics_path)
    _check_outputs(outputs, log_format)
    # On a terminal, the view replaces the info lines (it says what they would);
    # warnings still scroll above it. Anywhere else, the logs are as they always were.
    view = LiveView() if not quiet and log_format == "console" and sys.stderr.isatty() else None
    level = logging.DEBUG if verbose else logging.WARNING if quiet or view else logging.INFO
    options: dict[str, Any] = {"loop_factory": VirtualTimeLoop} if virtual_time else {}
    # One writer for every rewrite and the last: it renders only the rows that changed.
    writer = ReportWriter()

    def checkpoint(interim: Report) -> None:
        """Rewrite the outputs during the run, so that a killed run leaves recent ones."""
        try:
            if not to_stdout:
                writer.write(interim, settings.report_path)
            outputs.write(interim, final=False)
        except (OSError, OutputPathError) as exc:
            structlog.get_logger("importer.cli").warning("outputs.write_failed", error=str(exc))

    configure_logging(log_format, secrets=[token.value], level=level)
    try:
        # Opened (and locked) before anything starts, so a refusal is just a message.
        journal = Journal(settings.state_path or PRIVATE)
    except ImporterError as error:  # the state file is locked or unusable
        _die(error, log_format)
    # The view is up only while the run is: messages before and after it print plainly.
    with journal, view if view is not None else contextlib.nullcontext():
        if view is not None:
            configure_logging(log_format, secrets=[token.value], level=level, stream=view.stream)
        run_options = _RunOptions(
            simulate, size_order, prune, log_format, quiet, view=view, on_checkpoint=checkpoint
        )
        report = anyio.run(_run, loaded, settings, journal, run_options, backend_options=options)
    if view is not None:
        configure_logging(log_format, secrets=[token.value], level=level)
    _finish(report, settings.report_path, outputs, log_format, quiet=quiet, writer=writer)


def _finish(
    report: Report,
    report_path: Path | None,
    outputs: Outputs,
    log_format: LogFormat,
    *,
    quiet: bool = False,
    writer: ReportWriter | None = None,
) -> NoReturn:
    """Write the report and the outputs, print the summary, exit with the run's code.

    A file that cannot be written is said after the summary, with exit 2. ``writer``:
    the one that wrote the run's rewrites (it renders only the rows changed since).
    """
    writer = writer or ReportWriter()
    failure: ImporterError | None = None
    if report_path is not None and report_path != DASH:
        try:
            writer.write(report, report_path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            failure = OutputPathError(str(report_path), reason, fix=_REPORT_FIX)
    if failure is None:
        try:
            outputs.write(report, final=True)
        except OutputPathError as error:
            failure = error
    if report_path == DASH:
        click.echo(writer.text(report), nl=False)
        # Standard output holds the JSON alone; in JSON logs, run.finished has the counts.
        if log_format == "console":
            click.echo(report.human_summary(), err=True)
    else:
        click.echo(report.human_summary())
        if report_path is not None and failure is None and not quiet:
            click.echo(f"report written to {report_path}")
    if failure is not None:
        _die(failure, log_format)
    sys.exit(exit_code(report))


_REPORT_FIX = "pass --report a path in a directory you can write to, or - for standard output"


@main.command()
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The state file of the runs to report on.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    default=None,
    help="Also write the JSON report there; - for standard output (the summary then goes "
    "to stderr).",
)
@_output_options
@_log_format_option
def status(
    state_path: Path,
    report_path: Path | None,
    junit_path: Path | None,
    markdown_path: Path | None,
    metrics_path: Path | None,
    log_format: LogFormat,
) -> None:
    """Report the last run on a state file, from its journal alone: no token, no request.

    Works while that run goes on, and after it was killed: then the report is its last
    record, brought up to date by the journal's newer rows, with `stopped: running`.
    Exit code: the run's own (0, 1, 3, 4, 130, 143), or 1 if it has not ended.
    """
    configure_logging(log_format)
    if report_path is not None and report_path != DASH:
        reason = unwritable_reason(report_path)
        if reason is not None:
            _die(OutputPathError(str(report_path), reason, fix=_REPORT_FIX), log_format)
    outputs = Outputs.from_env(junit=junit_path, markdown=markdown_path, metrics=metrics_path)
    _check_outputs(outputs, log_format)
    try:
        report = last_report(state_path)
    except ImporterError as error:
        _die(error, log_format)
    _finish(report, report_path, outputs, log_format)


@dataclass(frozen=True)
class _RunOptions:
    simulate: bool
    size_order: bool
    prune: bool
    log_format: LogFormat
    quiet: bool = False
    #: The live view, when stderr is a terminal.
    view: LiveView | None = None
    #: Rewrites the outputs with the report so far (see run_import).
    on_checkpoint: Callable[[Report], None] | None = None


def simulator_state_path(state_path: Path) -> Path:
    """Where ``--simulate --state S`` keeps the simulator's account: ``S.simulator.json``.

    The journal alone would speak of images a fresh simulator never had: a resumed
    demo must find its images again.
    """
    return state_path.with_name(state_path.name + ".simulator.json")


def _simulator_config(settings: Settings) -> SimulatorConfig:
    state = settings.state_path
    return SimulatorConfig.demo(state_file=simulator_state_path(state) if state else None)


async def _run(
    manifest: Manifest, settings: Settings, journal: Journal, options: _RunOptions
) -> Report:
    stopper = Stopper()
    # Wall time anchored now: under --virtual-time, timestamps still read as today.
    clock = LoopClock(epoch=time.time())
    started = clock.wall()
    view = options.view
    # With the view up, the plan is printed above it; with -q, not at all.
    on_plan = _plan_printer(
        options.log_format, None if options.quiet else view.stream if view else sys.stderr
    )
    monitors: list[RunMonitor] = []

    def snapshot() -> RunSnapshot:
        if monitors:
            return monitors[0].snapshot()
        return preparing(len(manifest.entries), "starting", started, clock.wall())

    hooks: dict[str, Any] = {"on_start": monitors.append, "on_checkpoint": options.on_checkpoint}
    async with anyio.create_task_group() as signals:
        signals.start_soon(_stop_on_signals, stopper)
        if view is not None:
            signals.start_soon(view.follow, snapshot, clock)
        if options.simulate:
            async with run_simulator(_simulator_config(settings), clock) as simulator:
                log = structlog.get_logger("importer.cli")
                log.info("simulator.listening", url=simulator.base_url)
                settings = replace(settings, api_url=simulator.base_url)
                # The example URLs lead nowhere: ask the simulator's file host, which
                # knows every file name, instead of the internet.
                prober = SourceProber(
                    clock, rewrite=lambda url: simulator.file_url(_file_name(url))
                )
                report = await run_import(
                    manifest,
                    settings,
                    clock=clock,
                    stopper=stopper,
                    journal=journal,
                    prober=prober,
                    size_order=options.size_order,
                    prune=options.prune,
                    on_plan=on_plan,
                    **hooks,
                )
        else:
            report = await run_import(
                manifest,
                settings,
                clock=clock,
                stopper=stopper,
                journal=journal,
                prober=SourceProber(clock),
                size_order=options.size_order,
                prune=options.prune,
                on_plan=on_plan,
                **hooks,
            )
        signals.cancel_scope.cancel()
    return report


def _plan_printer(log_format: LogFormat, out: TextIO | None) -> Callable[[RunPlan], None]:
    """``run`` shows its plan before it starts (in JSON logs, ``plan.made`` says it all).

    ``out``: where the table goes (stderr, or above the live view); ``None`` for none.
    """

    def show(plan: RunPlan) -> None:
        if log_format == "console":
            if out is None:
                return
            click.echo(f"plan for set {plan.set}: {plan.summary_line()}", file=out)
            for line in plan.table():
                click.echo(line, file=out)
        else:
            log = structlog.get_logger("importer.cli")
            for fields in plan.entry_events():
                log.info("plan.entry", **fields)

    return show


def _file_name(url: str) -> str:
    return PurePosixPath(urlsplit(url).path).name or "image"


async def _stop_on_signals(stopper: Stopper) -> None:
    with anyio.open_signal_receiver(*_SIGNAL_REASONS) as received:
        async for signum in received:
            _on_signal(signum, stopper)


def _on_signal(
    signum: int, stopper: Stopper, exit_now: Callable[[int], NoReturn] = os._exit
) -> None:
    """First SIGINT/SIGTERM: stop gracefully. A second one: leave at once (the journal is safe)."""
    sig = signal.Signals(signum)
    reason = _SIGNAL_REASONS[sig]
    log = structlog.get_logger("importer.cli")
    if stopper.reason is not None:
        log.warning("run.signal", signal=sig.name, action="exit", note="the next run resumes")
        exit_now(_STOP_EXIT[reason])
    log.warning("run.signal", signal=sig.name, action="stop", note="signal again to exit at once")
    stopper.stop(reason)


@main.command("plan")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"The journal a run would use, read if it exists [default: {DEFAULT_STATE}; "
    "none with --simulate].",
)
@click.option(
    "--simulate",
    is_flag=True,
    help="Plan against the built-in simulator (its account is kept beside --state).",
)
@_api_options
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    default=None,
    help="Also write the plan as JSON to this path (- for standard output).",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Plan as `run --prune` would: orphaned images counted as deletions.",
)
@_log_format_option
def plan_command(
    manifest: Path,
    state_path: Path | None,
    simulate: bool,
    api_url: str | None,
    token_file: Path | None,
    json_path: Path | None,
    prune: bool,
    log_format: LogFormat,
) -> None:
    """Show what `run` would do: read the sources and the account, send no POST, PUT or DELETE.

    Exit 0: a plan was made; 1: some entry's source cannot be read (the plan says
    which); 2: invalid manifest, usage or state file; 3: the account could not be
    read (a refused token, the API unreachable).
    """
    configure_logging(log_format)
    if simulate and (api_url is not None or token_file is not None):
        _die(UsageError("--simulate needs neither --api-url nor --token-file"), log_format)
    loaded = _load(manifest, log_format)
    # A simulated account is kept only beside a state named on the command line.
    state = state_path or (None if simulate else DEFAULT_STATE)
    try:
        token = Token("simulated") if simulate else Token.from_env_or_file(token_file)
        settings = Settings(
            token=token,
            api_url=(
                DEFAULT_API_URL if simulate else default_api_url() if api_url is None else api_url
            ),
            state_path=state,
        )
    except ImporterError as error:
        _die(error, log_format)
    if json_path is not None and json_path != DASH:
        reason = unwritable_reason(json_path)
        if reason is not None:
            _die(OutputPathError(str(json_path), reason, fix=_PLAN_FIX), log_format)
    configure_logging(log_format, secrets=[token.value])
    try:
        # A plan reads the journal if there is one; it never makes one.
        with Journal(state if state is not None and state.exists() else MEMORY) as journal:
            made = anyio.run(_plan, loaded, settings, journal, simulate)
    except ImporterError as error:
        _die(error, log_format)
    if prune:
        made = replace(made, prune=True)
    if json_path == DASH:
        click.echo(json.dumps(made.to_json(), indent=2))
    else:
        click.echo(f"plan for set {made.set}: {made.summary_line()}")
        for line in made.table():
            click.echo(line)
        if json_path is not None:
            write_json_atomic(json_path, made.to_json())
            click.echo(f"plan written to {json_path}")
    sys.exit(EXIT_FAILURES if made.counts()["error"] else EXIT_OK)


_PLAN_FIX = "pass --json a path in a directory you can write to, or - for standard output"


async def _plan(
    manifest: Manifest, settings: Settings, journal: Journal, simulate: bool
) -> RunPlan:
    clock = LoopClock(epoch=time.time())
    try:
        if simulate:
            async with run_simulator(_simulator_config(settings), clock) as simulator:
                settings = replace(settings, api_url=simulator.base_url)
                prober = SourceProber(
                    clock, rewrite=lambda url: simulator.file_url(_file_name(url))
                )
                return await plan_only(
                    manifest, settings, clock=clock, journal=journal, prober=prober
                )
        return await plan_only(
            manifest, settings, clock=clock, journal=journal, prober=SourceProber(clock)
        )
    except (AuthenticationError, ApiUnreachableError):
        raise
    except ApiError as exc:
        raise AccountUnreadableError(str(exc)) from None


def exit_code(report: Report) -> int:
    """The documented exit code for a finished (or stopped) run."""
    if report.stopped:
        return _STOP_EXIT.get(report.stopped, EXIT_INTERRUPTED)
    return EXIT_OK if report.all_available else EXIT_FAILURES


_FAULT_OPTIONS = {
    "failure_rate": "Fraction of images that fail asynchronously at random.",
    "stuck_rate": "Fraction of images that never leave NEW or pending.",
    "error_rate": "Fraction of /v2 requests answered 500/502/503.",
    "html_error_fraction": "Share of those 5xx answers with an HTML body.",
    "reset_rate": "Fraction of /v2 requests whose connection is dropped unanswered.",
    "lost_create_rate": "Fraction of creates that succeed but whose answer is lost.",
    "slow_rate": "Fraction of /v2 requests answered late (see --slow-seconds).",
    "garbage_rate": "Fraction of 2xx answers with a malformed body.",
    "transfer_failure_rate": "Fraction of transfer actions that turn errored part-way.",
}


def _fault_options(command: FC) -> FC:
    for name, help_text in reversed(_FAULT_OPTIONS.items()):
        flag = "--" + name.replace("_", "-")
        option = click.option(flag, name, type=click.FloatRange(0, 1), default=None, help=help_text)
        command = option(command)
    return command


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (0 picks a free one).",
)
@click.option(
    "--realistic",
    is_flag=True,
    help="Minutes-long imports, as DigitalOcean takes [default: the demo's seconds].",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Root of every random decision: the same seed, the same outcomes.",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Accept only the token in this file [default: any bearer token].",
)
@click.option(
    "--per-minute",
    type=click.IntRange(1),
    default=None,
    help="Requests allowed per token in any minute [default: 250].",
)
@click.option(
    "--per-hour",
    type=click.IntRange(1),
    default=None,
    help="Requests allowed per token in any hour [default: 5000].",
)
@click.option(
    "--list-in-progress/--hide-in-progress",
    default=None,
    help="Whether NEW/pending images appear in listings [default: hidden; the real "
    "API's behaviour is unknown].",
)
@click.option(
    "--new-seconds", type=click.FloatRange(0), default=None, help="How long an image stays NEW."
)
@click.option(
    "--pending-seconds",
    type=click.FloatRange(0),
    default=None,
    help="How long it then stays pending, before the per-GiB part.",
)
@click.option(
    "--seconds-per-gib",
    type=click.FloatRange(0),
    default=None,
    help="Import time added per GiB of source file.",
)
@click.option(
    "--transfer-seconds",
    type=click.FloatRange(0),
    default=None,
    help="How long a transfer to another region takes, before the per-GiB part.",
)
@click.option(
    "--revoke-after",
    type=click.IntRange(0),
    default=None,
    help="Revoke the token after this many requests.",
)
@click.option(
    "--slow-seconds", type=click.FloatRange(0), default=None, help="How late a slow answer is."
)
@click.option(
    "--minute-window",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds a request counts in the --per-minute limit [default: 60]; shorter "
    "makes rate-limit pauses short, for tests.",
)
@click.option(
    "--count-rate-limited/--free-rate-limited",
    default=None,
    help="Whether requests answered 429 count against the budgets [default: free].",
)
@click.option(
    "--other-burst",
    type=click.IntRange(0),
    default=None,
    help="Another client of the token sends this many requests just before its first one.",
)
@click.option(
    "--other-per-minute",
    type=click.FloatRange(0),
    default=None,
    help="That other client then sends this many requests per minute.",
)
@click.option(
    "--list-lag",
    type=click.FloatRange(0),
    default=None,
    help="Seconds before a new image appears in listings.",
)
@click.option(
    "--list-failed/--hide-failed",
    default=None,
    help="Whether failed images appear in listings until purged [default: hidden].",
)
@click.option(
    "--purge-failed-after",
    type=click.FloatRange(0),
    default=None,
    help="Seconds after a failure before the image answers 404 [default: never].",
)
@click.option(
    "--links-base-url",
    default=None,
    help="Base of the pagination links, e.g. https://api.digitalocean.com [default: this host].",
)
@click.option(
    "--delay-after",
    type=click.FloatRange(0),
    default=None,
    help="Seconds after the first request from which every answer is late [default: never].",
)
@click.option(
    "--delay-seconds",
    type=click.FloatRange(0),
    default=None,
    help="How late, with --delay-after [default: 30].",
)
@click.option(
    "--refuse-delete-importing/--allow-delete-importing",
    default=None,
    help="Whether DELETE of an image still importing answers 422 [default: allowed].",
)
@_fault_options
@_log_format_option
def simulate(
    host: str,
    port: int,
    realistic: bool,
    seed: int,
    token_file: Path | None,
    log_format: LogFormat,
    **knobs: Any,
) -> None:
    """Serve the DigitalOcean API simulator until interrupted; print its base URL."""
    configure_logging(log_format)
    try:
        token = Token.from_env_or_file(token_file).value if token_file else None
        known = {f.name for f in fields(SimulatorConfig)}
        overrides = {k: v for k, v in knobs.items() if v is not None and k in known}
        preset = SimulatorConfig.realistic if realistic else SimulatorConfig.demo
        config = preset(seed=seed, token=token, **overrides)
    except ImporterError as error:
        _die(error, log_format)
    except ValueError as exc:
        _die(UsageError(str(exc)), log_format)
    log = structlog.get_logger("importer.cli")

    async def serve() -> None:
        async with AsyncExitStack() as stack:
            try:
                simulator = await stack.enter_async_context(
                    run_simulator(config, host=host, port=port)
                )
            except OSError as exc:
                raise _listen_error(host, port, exc) from None
            log.info("simulator.listening", url=simulator.base_url)
            # Standard output: the base URL alone, for scripts to read.
            click.echo(simulator.base_url)
            sys.stdout.flush()
            await anyio.sleep_forever()

    try:
        anyio.run(serve)
    except ListenError as error:
        _die(error, log_format)
    except KeyboardInterrupt:
        log.info("simulator.stopped")


def _listen_error(host: str, port: int, exc: OSError) -> ListenError:
    """What went wrong when binding ``host:port``, and which flag to change."""
    other_host = "pass --host an address of this machine, such as 127.0.0.1"
    if isinstance(exc, socket.gaierror):
        return ListenError(
            host, port, f"the host name does not resolve ({exc.strerror})", other_host
        )
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            host,
            port,
            "the port is in use",
            "stop what holds it, or pass another --port (--port 0 picks a free one)",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(host, port, "no interface of this machine has that address", other_host)
    if exc.errno == errno.EACCES:
        return ListenError(
            host, port, "permission denied", "pass a --port above 1023 (or 0 for a free one)"
        )
    return ListenError(host, port, exc.strerror or str(exc), "check --host and --port")
