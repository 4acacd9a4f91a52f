"""The ``importer`` command: ``run``, ``validate`` and ``simulate``.

Exit codes: 0 every image available; 1 some image failed, timed out or was
rejected; 2 invalid manifest or usage (or the state file is in use, or the report
cannot be written); 3 authentication failed or the API unreachable; 4 the
``--deadline`` passed; 130 interrupted (SIGINT); 143 terminated (SIGTERM).

Every check of the command line and of the paths to write is made before the first
request. Logs go to stderr; with ``--log-format json`` every stderr line is JSON.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import anyio
import click
import structlog

from importer.catalog import API_URL_ENV, DEFAULT_API_URL, TOKEN_ENV
from importer.clock import LoopClock, VirtualTimeLoop
from importer.durations import parse_duration
from importer.errors import (
    ImporterError,
    InvalidSettingError,
    ListenError,
    ManifestError,
    OutputPathError,
    Problem,
    UsageError,
)
from importer.journal import MEMORY, Journal
from importer.logs import LogFormat, configure_logging
from importer.manifest import Manifest, load_manifest, parse_manifest
from importer.pipeline import Stopper, run_import
from importer.report import Report, plural, unwritable_reason
from importer.settings import Settings, Token, default_api_url
from importer.simulator import SimulatorConfig, run_simulator
from importer.sizing import HeadSizer

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
    "deadline": EXIT_DEADLINE,
    "interrupted": EXIT_INTERRUPTED,
    "terminated": EXIT_TERMINATED,
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
@click.option(
    "--api-url",
    default=None,
    help=f"API base URL [default: ${API_URL_ENV} or https://api.digitalocean.com].",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"Read the API token from this file instead of ${TOKEN_ENV}.",
)
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
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="Human-readable logs, or JSON lines.",
)
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
    log_format: LogFormat,
) -> None:
    """Import every image of MANIFEST and write a report."""
    # Set up first, so that even a refusal is a JSON line when JSON is asked for.
    configure_logging(log_format)
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
    configure_logging(log_format, secrets=[token.value])
    options: dict[str, Any] = {"loop_factory": VirtualTimeLoop} if virtual_time else {}
    try:
        # Opened (and locked) before anything starts, so a refusal is just a message.
        with Journal(settings.state_path or MEMORY) as journal:
            report = anyio.run(
                _run, loaded, settings, journal, simulate, size_order, backend_options=options
            )
    except ImporterError as error:  # the state file is locked or unusable
        _die(error, log_format)
    if to_stdout:
        click.echo(report.to_text(), nl=False)
        # Standard output holds the JSON alone; in JSON logs, run.finished has the counts.
        if log_format == "console":
            click.echo(report.human_summary(), err=True)
    else:
        try:
            report.write(settings.report_path)
        except OSError as exc:
            click.echo(report.human_summary())
            reason = exc.strerror or str(exc)
            _die(OutputPathError(str(settings.report_path), reason, fix=_REPORT_FIX), log_format)
        click.echo(report.human_summary())
        click.echo(f"report written to {settings.report_path}")
    sys.exit(exit_code(report))


_REPORT_FIX = "pass --report a path in a directory you can write to, or - for standard output"


async def _run(
    manifest: Manifest, settings: Settings, journal: Journal, simulate: bool, size_order: bool
) -> Report:
    stopper = Stopper()
    # Wall time anchored now: under --virtual-time, timestamps still read as today.
    clock = LoopClock(epoch=time.time())
    async with anyio.create_task_group() as signals:
        signals.start_soon(_stop_on_signals, stopper)
        if simulate:
            async with run_simulator(SimulatorConfig.demo(), clock) as simulator:
                log = structlog.get_logger("importer.cli")
                log.info("simulator.listening", url=simulator.base_url)
                settings = replace(settings, api_url=simulator.base_url)
                # The example URLs lead nowhere: ask the simulator's file host, which
                # knows every file name, instead of the internet.
                sizer = HeadSizer(rewrite=lambda url: simulator.file_url(_file_name(url)))
                report = await run_import(
                    manifest,
                    settings,
                    clock=clock,
                    stopper=stopper,
                    journal=journal,
                    sizer=sizer if size_order else None,
                )
        else:
            report = await run_import(
                manifest,
                settings,
                clock=clock,
                stopper=stopper,
                journal=journal,
                sizer=HeadSizer() if size_order else None,
            )
        signals.cancel_scope.cancel()
    return report


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
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="Human-readable logs, or JSON lines.",
)
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
