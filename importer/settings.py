"""One explicit object with every knob of a run, handed down from the CLI or the caller."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from importer.catalog import API_URL_ENV, DEFAULT_API_URL, TOKEN_ENV
from importer.errors import ConfigurationError, InvalidSettingError
from importer.redact import redact_url


@dataclass(frozen=True)
class Token:
    """A bearer token that never shows itself in a repr, a log or a traceback."""

    value: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.value or any(c.isspace() for c in self.value):
            raise ConfigurationError(
                "the API token is empty or contains white space; "
                f"set {TOKEN_ENV} or pass --token-file with the token alone in it"
            )

    def __str__(self) -> str:
        return "Token(***)"

    @classmethod
    def from_env_or_file(cls, token_file: Path | None = None) -> Token:
        """The token from ``token_file`` if given, else from ``DIGITALOCEAN_TOKEN``."""
        if token_file is not None:
            try:
                raw = token_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the token file {token_file}: {exc.strerror or exc}"
                ) from None
            return cls(raw.strip())
        raw = os.environ.get(TOKEN_ENV, "").strip()
        if not raw:
            raise ConfigurationError(
                f"no API token: set {TOKEN_ENV} or pass --token-file PATH "
                "(or use --simulate to run against the built-in simulator)"
            )
        return cls(raw)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_url(url: str) -> str:
    """``url`` without a trailing slash, if it is safe to send a bearer token to."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigurationError(f"the API URL {redact_url(url)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"the API URL {redact_url(url)!r} is not an absolute http(s) URL")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        # The token is the only credential sent; anything else in the URL would be
        # written to reports and state files, where no secret belongs.
        raise ConfigurationError(
            f"the API URL {redact_url(url)!r} carries credentials, a query or a fragment; "
            "give the base URL alone (scheme, host, optional port and path)"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigurationError(
            f"refusing to send the token over plain http to {parts.hostname}; "
            "use https (plain http is allowed only for loopback addresses)"
        )
    return url.rstrip("/")


def default_api_url() -> str:
    """``DIGITALOCEAN_API_URL`` if set, else DigitalOcean's own URL."""
    return os.environ.get(API_URL_ENV, "").strip() or DEFAULT_API_URL


@dataclass(frozen=True)
class Settings:
    """Everything a run needs besides the manifest. Times are in seconds."""

    token: Token
    #: Stored without a trailing slash, so paths join as ``{api_url}/v2/images``. The
    #: default is read when the object is made, as the command line reads it.
    api_url: str = field(default_factory=default_api_url)
    #: Requests in flight at once (at least 2: creates leave one to status checks).
    concurrency: int = 8
    #: DigitalOcean's limits per token: 250 in any minute, 5,000 in any hour.
    per_minute: int = 250
    per_hour: int = 5000
    #: How long a request counts against ``per_minute``: DigitalOcean's minute. Only a
    #: simulator whose burst window was shortened (for tests) calls for another value.
    minute_window: float = 60.0
    #: Share of both limits left to other users of the token (Terraform, CI...),
    #: on top of what the API's headers show they spend.
    reserve: float = 0.1
    #: Before the importer has seen imports finish (and learned how long they
    #: take), an image is first checked this long after its submission.
    first_poll: float = 60.0
    #: Between checks of an image that is due: at most this long between an
    #: image becoming available and the importer knowing it, while the budget allows
    #: (the poller stretches it, up to twice, when status checks would otherwise cost
    #: the creates an hour).
    poll_interval: float = 30.0
    #: Give up on an image this long after it was submitted.
    image_timeout: float = 3600.0
    #: One HTTP request, connect to last byte.
    request_timeout: float = 60.0
    #: Attempts for one request that fails transiently (5xx, reset, garbage).
    max_attempts: int = 6
    #: Backoff between those attempts: full jitter, exponential, capped.
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    #: Retries of one request answered 429; each waits for the pause the API asked for.
    max_rate_limited: int = 30
    #: Creates sent for one entry before it is given up (each after the previous
    #: one's outcome was unknown and reconciliation found no image).
    max_creates: int = 8
    #: Transfers sent for one region of one image in a run, before that region is
    #: reported failed (each after the previous one errored or was refused). Each
    #: transfer is watched for at most ``image_timeout`` from its start.
    max_transfers: int = 3
    #: How long an image whose create answer was lost may stay invisible in
    #: listings before it is taken as absent. ``None``: the per-image timeout, the
    #: longest an import in progress (which listings may hide) can take.
    reconcile_window: float | None = None
    #: Stop the run this long after it started (nightly windows); ``None``: no limit.
    deadline: float | None = None
    #: How often a progress line is logged.
    progress_interval: float = 30.0
    report_path: Path = Path("import-report.json")
    #: The journal; ``None`` keeps it in a private temporary file, deleted at the end
    #: (nothing to resume from).
    state_path: Path | None = None

    @property
    def effective_per_minute(self) -> int:
        """The requests per minute this run allows itself, after the reserve."""
        return max(1, math.floor(self.per_minute * (1 - self.reserve)))

    @property
    def effective_per_hour(self) -> int:
        return max(1, math.floor(self.per_hour * (1 - self.reserve)))

    @property
    def reconcile_after(self) -> float:
        return self.image_timeout if self.reconcile_window is None else self.reconcile_window

    def __post_init__(self) -> None:
        # Frozen: the normalised URL replaces the given one through the back door.
        object.__setattr__(self, "api_url", check_api_url(self.api_url))
        positive: dict[str, float | None] = {
            "concurrency": self.concurrency,
            "per_minute": self.per_minute,
            "per_hour": self.per_hour,
            "minute_window": self.minute_window,
            "max_attempts": self.max_attempts,
            "first_poll": self.first_poll,
            "poll_interval": self.poll_interval,
            "image_timeout": self.image_timeout,
            "request_timeout": self.request_timeout,
            "max_creates": self.max_creates,
            "max_transfers": self.max_transfers,
            "deadline": self.deadline,
        }
        for name, value in positive.items():
            # NaN compares false with everything: "not > 0" refuses it too.
            if value is not None and not value > 0:
                raise InvalidSettingError(name, value, "must be positive")
        if self.concurrency < 2:
            raise InvalidSettingError(
                "concurrency",
                self.concurrency,
                "must be at least 2 (one request is kept for status checks)",
            )
        if not 0 <= self.reserve < 1:
            raise InvalidSettingError("reserve", self.reserve, "must be a fraction in [0, 1)")
