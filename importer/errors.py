"""The importer's exceptions, rooted in one base error.

Every message says what happened and what to do about it; every error carries
its context as attributes so that callers (and tests) need not parse text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from importer.redact import redact_text


class ImporterError(Exception):
    """Base of every error the importer raises on purpose."""

    #: The process exit code the CLI uses when this error ends a run.
    exit_code: int = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as we can."""

    message: str
    #: Index of the entry in ``images`` (``None`` for problems outside any entry).
    index: int | None = None
    #: The entry's name, when it has one.
    name: str | None = None
    #: Dotted field path inside the entry (or the document), e.g. ``tags.1``.
    field: str | None = None

    def __str__(self) -> str:
        where: list[str] = []
        if self.index is not None:
            where.append(f"images[{self.index}]")
            if self.name:
                where[-1] += f" ({self.name!r})"
        if self.field:
            where.append(self.field)
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class ManifestError(ImporterError):
    """The manifest cannot be used: unreadable, unparsable or invalid."""

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems: tuple[Problem, ...] = tuple(problems)
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}; nothing was sent"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}\n{body}\nFix the manifest and run again.")


class UsageError(ImporterError):
    """The command line or settings are inconsistent."""

    exit_code = 2


class ConfigurationError(UsageError):
    """A required setting (token, URL, file) is missing or unsafe."""


class ApiError(ImporterError):
    """The DigitalOcean API answered with an error."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_id: str | None = None,
        request_id: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        self.status = status
        self.error_id = error_id
        self.request_id = request_id
        self.method = method
        self.path = path
        self.api_message = message
        where = f"{method} {path}" if method and path else "request"
        code = f" {status}" if status is not None else ""
        ident = f" ({error_id})" if error_id else ""
        super().__init__(f"{where} failed{code}{ident}: {message}")

    @property
    def safe_message(self) -> str:
        """The API's message with URL query strings redacted, fit for logs and reports."""
        return redact_text(self.api_message)


class AuthenticationError(ApiError):
    """The API refused the token (401). Nothing more can be done with it."""

    exit_code = 3

    def __str__(self) -> str:
        return (
            f"{super().__str__()} - the API refused the token; check DIGITALOCEAN_TOKEN "
            "(or --token-file): it may be wrong, expired or revoked."
        )


class RateLimitedError(ApiError):
    """The API answered 429 and the retries allowed for it ran out."""


class RejectedError(ApiError):
    """A 4xx other than 401 and 429: the request itself is wrong; retrying won't help."""


class ImageVanishedError(RejectedError):
    """The image is gone (404): deleted by someone else while it imported."""


class TransientApiError(ApiError):
    """A 5xx, a malformed answer or a dropped connection: may succeed if tried again."""


class ApiUnreachableError(ApiError):
    """The API could not be reached at all, after retrying."""

    exit_code = 3

    def __str__(self) -> str:
        return (
            f"{super().__str__()} - the API could not be reached; check the network and "
            "--api-url / DIGITALOCEAN_API_URL."
        )


class UncertainCreateError(ApiError):
    """A create was sent but its answer was lost: the image may or may not exist."""


class StateLockedError(ImporterError):
    """Another importer process holds the state file."""

    exit_code = 2


class StateFileError(ImporterError):
    """The state file cannot be opened or is not an importer journal."""

    exit_code = 2


class InvalidSettingError(ConfigurationError):
    """A setting's value is out of range. ``setting`` names it as the caller spelled it."""

    def __init__(self, setting: str, value: object, requirement: str) -> None:
        self.setting = setting
        self.value = value
        self.requirement = requirement
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        super().__init__(f"{setting} {requirement}, got {shown}")

    def renamed(self, setting: str) -> InvalidSettingError:
        """The same error, naming the setting as ``setting`` (a command-line flag, say)."""
        return InvalidSettingError(setting, self.value, self.requirement)


class OutputPathError(UsageError):
    """A file the run must write at the end (the report) cannot be written where asked."""

    def __init__(self, path: str, reason: str, *, what: str = "report", fix: str = "") -> None:
        self.path = path
        self.reason = reason
        fix = fix or "choose a path in a directory you can write to"
        super().__init__(f"cannot write the {what} to {path}: {reason}; {fix}")


class ListenError(UsageError):
    """The simulator cannot listen on the address asked for."""

    def __init__(self, host: str, port: int, reason: str, fix: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"cannot listen on {host}:{port}: {reason}; {fix}")


class AccountUnreadableError(ImporterError):
    """The set's images could not be listed: nothing can be decided without them."""

    exit_code = 3

    def __str__(self) -> str:
        return (
            f"the account's images could not be listed ({super().__str__()}); nothing was "
            "sent. A later run tries again."
        )
