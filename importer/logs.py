"""Structured logs: human-readable on a terminal, JSON lines for machines.

Event names are stable (``image.submitted``, ``image.available``, ``request.retry``
...) and details are fields. A last processor scrubs every string field: URL
query strings (presigned URLs carry secrets) and the token never reach the output.
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


def configure_logging(
    fmt: LogFormat = "console",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> None:
    """Set up structlog for the CLI. Library users may configure structlog themselves."""
    stream = stream or sys.stderr
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
