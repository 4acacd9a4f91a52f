"""The ``importer`` command: ``run``, ``validate`` and ``simulate``.

Exit codes: 0 every image available; 1 some image failed, timed out or was
rejected; 2 invalid manifest or usage; 3 authentication failed or the API
unreachable; 130 interrupted.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import click

from importer.catalog import API_URL_ENV, TOKEN_ENV
from importer.durations import parse_duration
from importer.errors import ImporterError
from importer.logs import LogFormat, configure_logging
from importer.manifest import Manifest, load_manifest
from importer.pipeline import run_import
from importer.report import Report
from importer.settings import Settings, Token, default_api_url

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_API = 3
EXIT_INTERRUPTED = 130

_STOP_EXIT = {"authentication_failed": EXIT_API, "api_unreachable": EXIT_API}


class Duration(click.ParamType):  # type: ignore[type-arg]
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


def _die(error: ImporterError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def _load(path: Path) -> Manifest:
    try:
        return load_manifest(path)
    except ImporterError as error:
        _die(error)
        raise  # pragma: no cover - _die exits


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="importer")
def main() -> None:
    """Bulk-import DigitalOcean custom images from a manifest."""


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
def validate(manifest: Path) -> None:
    """Check MANIFEST without sending anything; list every problem."""
    loaded = _load(manifest)
    click.echo(f"{manifest}: {len(loaded.entries)} images, no problems")


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("import-report.json"),
    show_default=True,
    help="Where to write the JSON report.",
)
@click.option(
    "--simulate",
    is_flag=True,
    help="Run against the built-in simulator (demo timings, no token needed).",
)
@click.option(
    "--api-url",
    default=None,
    help=f"API base URL [default: ${API_URL_ENV} or https://api.digitalocean.com].",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help=f"Read the API token from this file instead of ${TOKEN_ENV}.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
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
    "--timeout",
    "image_timeout",
    type=DURATION,
    default="60m",
    show_default=True,
    help="Give up on an image this long after submitting it.",
)
@click.option(
    "--first-poll",
    type=DURATION,
    default=None,
    help="Wait before an image's first status check [default: 30s; 1s with --simulate].",
)
@click.option(
    "--poll-interval",
    type=DURATION,
    default=None,
    help="Between status checks of one image [default: 15s; 1s with --simulate].",
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
    simulate: bool,
    api_url: str | None,
    token_file: Path | None,
    concurrency: int,
    per_minute: int,
    per_hour: int,
    image_timeout: float,
    first_poll: float | None,
    poll_interval: float | None,
    log_format: LogFormat,
) -> None:
    """Import every image of MANIFEST and write a report."""
    loaded = _load(manifest)
    try:
        token = Token("simulated") if simulate else Token.from_env_or_file(token_file)
        demo = 1.0 if simulate else None
        settings = Settings(
            token=token,
            api_url=default_api_url() if api_url is None or simulate else api_url,
            concurrency=concurrency,
            per_minute=per_minute,
            per_hour=per_hour,
            image_timeout=image_timeout,
            first_poll=first_poll or demo or Settings.first_poll,
            poll_interval=poll_interval or demo or Settings.poll_interval,
            progress_interval=5.0 if simulate else Settings.progress_interval,
            report_path=report_path,
        )
    except ImporterError as error:
        _die(error)
        raise  # pragma: no cover
    configure_logging(log_format, secrets=[token.value])
    try:
        report = anyio.run(_run, loaded, settings, simulate)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    report.write(settings.report_path)
    click.echo(report.human_summary())
    click.echo(f"report written to {settings.report_path}")
    sys.exit(exit_code(report))


async def _run(manifest: Manifest, settings: Settings, simulate: bool) -> Report:
    if not simulate:
        return await run_import(manifest, settings)
    from importer.simulator import SimulatorConfig, run_simulator  # noqa: PLC0415

    async with run_simulator(SimulatorConfig.demo()) as simulator:
        click.echo(f"simulator listening on {simulator.base_url}", err=True)
        return await run_import(manifest, replace(settings, api_url=simulator.base_url))


def exit_code(report: Report) -> int:
    """The documented exit code for a finished (or stopped) run."""
    if report.stopped:
        return _STOP_EXIT.get(report.stopped, EXIT_INTERRUPTED)
    return EXIT_OK if report.all_available else EXIT_FAILURES
