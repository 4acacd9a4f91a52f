"""How the simulated DigitalOcean behaves: timings, limits and injected faults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self


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
            ``GET /v2/images``. The real behaviour is unknown (do-api-facts.md), so
            tests must be able to switch it either way.
        fail_query_urls: fail imports whose URL has a query string (presigned URLs
            "have failed" for real, but not always, so it is off by default).

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
        transfer_seconds, transfer_seconds_per_gib: duration of a ``transfer`` action.
        head_latency: seconds the file host takes to answer a ``HEAD`` (a real image
            host is a network away; 0 answers at once).

    Rate limits (per token, sliding logs):
        per_minute: requests allowed within any ``minute_window``.
        per_hour: requests allowed within any ``hour_window``.
        minute_window, hour_window: how long a request counts, in seconds.

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
    """

    seed: int = 0
    token: str | None = None
    list_in_progress: bool = False
    fail_query_urls: bool = False

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
    head_latency: float = 0.0

    per_minute: int = 250
    per_hour: int = 5000
    minute_window: float = 60.0
    hour_window: float = 3600.0

    revoke_after: int | None = None
    error_rate: float = 0.0
    html_error_fraction: float = 0.25
    reset_rate: float = 0.0
    lost_create_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    garbage_rate: float = 0.0

    def __post_init__(self) -> None:
        fractions = (
            "duration_noise", "failure_rate", "stuck_rate", "error_rate", "html_error_fraction",
            "reset_rate", "lost_create_rate", "slow_rate", "garbage_rate",
        )  # fmt: skip
        for name in fractions:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SimulatorConfig.{name} must be within [0, 1], got {value!r}")
        durations = (
            "new_seconds", "pending_seconds", "seconds_per_gib", "fail_fast_seconds",
            "transfer_seconds", "transfer_seconds_per_gib", "slow_seconds", "head_latency",
        )  # fmt: skip
        for name in durations:
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"SimulatorConfig.{name} must be a finite number >= 0")
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
