"""How the simulated DigitalOcean behaves: timings, limits and injected faults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit


@dataclass(frozen=True)
class SimulatorConfig:
    """Every knob of the simulator. The defaults are the ``demo`` timings (seconds).

    Outcomes are reproducible: every random decision derives from ``seed`` plus
    what it is about (an image's url and name, a request's method, path, body and
    occurrence), never from the order in which unrelated requests arrived.

    Identity and listing:
        seed: root of every random decision.
        token: the only bearer token accepted; ``None`` accepts any non-empty token
            (each token then has its own rate-limit budget).
        list_in_progress: whether ``NEW``/``pending`` images appear in
            ``GET /v2/images``. The real behaviour is unknown, so tests must be
            able to switch it either way.
        list_lag: seconds after its creation before an image appears in
            ``GET /v2/images`` at all (listings may lag behind creates).
        list_failed: whether failed imports (``deleted`` with an
            ``error_message``) appear in listings until they are purged. A failed
            image was seen to drop out of the list, so off by default.
        purge_failed_after: seconds after an import failed before its image is
            purged: ``GET /v2/images/{id}`` answers 404 and listings drop it, so its
            ``error_message`` can no longer be read. ``None``: never purged.
        links_base_url: where ``links.pages`` point. ``None``: absolute URLs on the
            host the request came to; else absolute URLs on this base (DigitalOcean
            writes ``https://api.digitalocean.com/v2/images?page=2...`` whatever
            address the client used).
        fail_query_urls: fail imports whose URL has a query string (presigned URLs
            "have failed" for real, but not always, so it is off by default).

    Persistence:
        state_file: a JSON file holding the account (images, id counters, changed files):
            loaded at start when it exists, saved after every request that may change it
            and at the end (see ``importer/simulator/persist.py``). ``None``: the account
            lives in memory only.

    Image lifecycle (seconds of the injected clock):
        new_seconds: time an image stays ``NEW``.
        pending_seconds: base time it then stays ``pending``...
        seconds_per_gib: ...plus this much per GiB of source file.
        duration_noise: each duration is scaled by a seeded factor in
            ``[1 - duration_noise, 1 + duration_noise]``.
        fail_fast_seconds: when an image marked ``fail-fast`` turns ``deleted``.
        slow_factor: duration multiplier for images marked ``slow``.
        failure_rate: fraction of images that fail asynchronously at random.
        stuck_rate: fraction of images that never leave ``NEW`` or ``pending``.
        transfer_seconds, transfer_seconds_per_gib: duration of a ``transfer`` action
            (scaled by ``duration_noise`` too); the region shows in the image's
            ``regions`` only once it has completed.
        transfer_failure_rate: fraction of transfer actions that turn ``errored``
            part-way (each attempt drawn anew, so a retry may succeed); the markers
            ``fail-transfer`` and ``fail-transfer-<region>`` fail every attempt.
        head_latency: seconds the file host takes to answer a ``HEAD`` (a real image
            host is a network away; 0 answers at once).

    Rate limits (per token, sliding logs):
        per_minute: requests allowed within any ``minute_window``.
        per_hour: requests allowed within any ``hour_window``.
        minute_window, hour_window: how long a request counts, in seconds.
        count_rate_limited: whether a request answered 429 counts against both
            budgets, as an accepted one does. Not documented; off by default.
        other_burst: another client of the same token sends this many requests
            just before the token's first request reaches the simulator...
        other_per_minute: ...and then this many per ``minute_window``, evenly
            spaced. They count against the token's budgets, are refused (429)
            when there is no room, and are not among the requests served.

    Faults (fractions of ``/v2`` requests; all off by default):
        revoke_after: after this many authenticated requests the token is revoked
            and every later request gets 401.
        error_rate: answered 500/502/503 without doing anything.
        html_error_fraction: share of those 5xx answers with an HTML body, as a
            proxy in front of the API would send.
        reset_rate: connection dropped without an answer, without doing anything.
        lost_create_rate: ``POST /v2/images`` creates the image, then the answer is
            lost (connection dropped or a 5xx).
        slow_rate, slow_seconds: answer delayed by ``slow_seconds``.
        garbage_rate: a 2xx answer whose body is not JSON, truncated JSON or JSON
            missing required fields (the operation itself is performed).
        delay_after, delay_seconds: every answer to a request arriving
            ``delay_after`` seconds or more after the first ``/v2`` request is
            sent ``delay_seconds`` late; the request is carried out at once (a
            DELETE deletes), only its answer waits. ``None``: never.
        refuse_delete_importing: ``DELETE`` of an image still importing (``NEW``
            or ``pending``) answers 422 ``unprocessable_entity`` and deletes
            nothing. What DigitalOcean does is not documented; 422 with a message
            is how it refuses other operations on busy resources.
    """

    seed: int = 0
    token: str | None = None
    list_in_progress: bool = False
    list_lag: float = 0.0
    list_failed: bool = False
    purge_failed_after: float | None = None
    links_base_url: str | None = None
    fail_query_urls: bool = False
    state_file: Path | None = None

    new_seconds: float = 1.0
    pending_seconds: float = 2.0
    seconds_per_gib: float = 0.25
    duration_noise: float = 0.2
    fail_fast_seconds: float = 0.5
    slow_factor: float = 10.0
    failure_rate: float = 0.0
    stuck_rate: float = 0.0
    transfer_seconds: float = 2.0
    transfer_seconds_per_gib: float = 0.25
    transfer_failure_rate: float = 0.0
    head_latency: float = 0.0

    per_minute: int = 250
    per_hour: int = 5000
    minute_window: float = 60.0
    hour_window: float = 3600.0
    count_rate_limited: bool = False
    other_burst: int = 0
    other_per_minute: float = 0.0

    revoke_after: int | None = None
    error_rate: float = 0.0
    html_error_fraction: float = 0.25
    reset_rate: float = 0.0
    lost_create_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    garbage_rate: float = 0.0
    delay_after: float | None = None
    delay_seconds: float = 30.0
    refuse_delete_importing: bool = False

    def __post_init__(self) -> None:
        fractions = (
            "duration_noise", "failure_rate", "stuck_rate", "error_rate", "html_error_fraction",
            "reset_rate", "lost_create_rate", "slow_rate", "garbage_rate", "transfer_failure_rate",
        )  # fmt: skip
        for name in fractions:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SimulatorConfig.{name} must be within [0, 1], got {value!r}")
        durations = (
            "new_seconds", "pending_seconds", "seconds_per_gib", "fail_fast_seconds",
            "transfer_seconds", "transfer_seconds_per_gib", "slow_seconds", "list_lag",
            "head_latency",
            "other_per_minute", "delay_seconds", "purge_failed_after", "delay_after",
        )  # fmt: skip
        for name in durations:
            value = getattr(self, name)
            if value is None and name in ("purge_failed_after", "delay_after"):
                continue
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"SimulatorConfig.{name} must be a finite number >= 0")
        if self.other_burst < 0:
            raise ValueError("SimulatorConfig.other_burst must be >= 0")
        if self.links_base_url is not None:
            parts = urlsplit(self.links_base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("SimulatorConfig.links_base_url must be an absolute http(s) URL")
        for name in ("per_minute", "per_hour", "slow_factor", "minute_window", "hour_window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SimulatorConfig.{name} must be > 0")
        if self.revoke_after is not None and self.revoke_after < 0:
            raise ValueError("SimulatorConfig.revoke_after must be >= 0 or None")
        if self.token is not None and not self.token:
            raise ValueError("SimulatorConfig.token must be non-empty, or None to accept any")

    @classmethod
    def demo(cls, **overrides: Any) -> Self:
        """Seconds-long imports: five images finish well within 15 s at a 1 s poll."""
        return cls(**overrides)

    @classmethod
    def realistic(cls, **overrides: Any) -> Self:
        """Minutes-long imports, as DigitalOcean takes (a few minutes for a small image)."""
        timings: dict[str, Any] = {
            "new_seconds": 30.0,
            "pending_seconds": 120.0,
            "seconds_per_gib": 60.0,
            "duration_noise": 0.3,
            "fail_fast_seconds": 5.0,
            "transfer_seconds": 120.0,
            "transfer_seconds_per_gib": 120.0,
            "slow_seconds": 20.0,
        }
        return cls(**{**timings, **overrides})
