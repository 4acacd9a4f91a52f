"""Structured logs: human-readable on a terminal, JSON lines for machines.

Event names are stable (``image.submitted``, ``image.available``, ``request.retry``
...) and details are fields. A last processor scrubs every string field: URL
query strings (presigned URLs carry secrets) and the token never reach the output.
Everything goes to stderr, so that standard output holds only what a command prints
on purpose (the summary, a report written to ``-``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from importer.redact import redact_text

LogFormat = Literal["console", "json"]


class Redactor:
    """A structlog processor that redacts secrets from every string in the event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = redact_text(value, self._secrets)
        return event_dict


class _StdlibBridge(logging.StreamHandler):  # type: ignore[type-arg]  # generic in newer stubs
    """Renders the standard library's records (aiohttp's, asyncio's) like structlog's events."""


def configure_logging(
    fmt: LogFormat = "console",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> None:
    """Send the importer's logs to ``stream`` (default: stderr), secrets masked.

    Also renders warnings that libraries log through :mod:`logging` the same way, so
    that with ``"json"`` every line is JSON. Calling it again replaces the setup.
    """
    stream = stream or sys.stderr
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    redactor = Redactor(secrets)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    reset_logging()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, redactor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    bridge = _StdlibBridge(stream)
    # Only warnings and worse: aiohttp's and asyncio's info lines are noise here.
    bridge.setLevel(max(level, logging.WARNING))
    bridge.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redactor,
                renderer,
            ],
        )
    )
    logging.getLogger().addHandler(bridge)


def reset_logging() -> None:
    """Undo :func:`configure_logging`: structlog's defaults, no handler of ours in ``logging``."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
