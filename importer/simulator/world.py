"""The simulated DigitalOcean account: pure state and rules, no HTTP.

Images, their lifecycle, rate limits, fault decisions and request counters live
here; ``app.py`` only translates HTTP to calls on a :class:`World`. Nothing runs
in the background: an image's status is computed from the injected clock each
time it is read, so virtual time can jump over a ten-minute import at once.

Per-image outcomes are decided by markers in the URL's file name (see
``MARKERS``) and by draws from a generator seeded with ``seed + url path + name``,
so the same entry has the same fate whatever order requests arrive in.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import sys
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args
from urllib.parse import unquote, urlsplit, urlunsplit

from importer.catalog import (
    DECOMPRESS_ERROR,
    DISTRIBUTIONS,
    PER_PAGE_MAX,
    REGIONS,
    rejected_suffix,
    tag_problem,
)
from importer.clock import Clock, isoformat
from importer.simulator.config import SimulatorConfig
from importer.simulator.listing import ListingIndex

Json = dict[str, Any]

FIRST_IMAGE_ID: Final = 150_000_001
FIRST_ACTION_ID: Final = 2_000_000_001
GIB: Final = 2**30
MIB: Final = 2**20
PER_PAGE_DEFAULT: Final = 20
MAX_DECOMPRESSED_GIB: Final = 100.0
#: Illustrative ratio of decompressed to compressed size, for ``min_disk_size``.
COMPRESSION_RATIO: Final = 3.0
#: ``Last-Modified`` of every file the simulator's file host never saw change
#: (2023-10-01T00:00:00Z): fixed, so that versions are the same on every run.
FILE_EPOCH: Final = 1_696_118_400.0
#: What a changed file's content can be wrong with, for the imports made from it.
FileDefect = Literal["decompress", "download"]
FILE_DEFECTS: Final[tuple[FileDefect, ...]] = get_args(FileDefect)
#: Version of the snapshot format written by :meth:`World.snapshot`.
SNAPSHOT_FORMAT: Final = 1

UNAUTHORIZED_MESSAGE: Final = "Unable to authenticate you."
NOT_FOUND_MESSAGE: Final = "The resource you were accessing could not be found."
RATE_LIMITED_MESSAGE: Final = "API rate limit exceeded."
# Illustrative, like DigitalOcean's 422 "Droplet already has a pending event.":
# what the API answers to deleting an image still importing is not documented.
DELETE_IMPORTING_MESSAGE: Final = (
    "The image is still being imported and cannot be deleted yet. "
    "Please try again once its import has finished."
)

# The exact text DigitalOcean gives for a failed download is not documented
# anywhere we know of; this message is illustrative. Clients must show whatever
# error_message says, never match on it.
DOWNLOAD_ERROR: Final = (
    "We were unable to download your image from the URL provided. Please make sure the URL "
    "is publicly accessible, names a file and answers HEAD requests."
)
# Also illustrative: an ISO is not an archive, so DECOMPRESS_ERROR would be wrong for it.
UNSUPPORTED_FORMAT_ERROR: Final = (
    "The image format is not supported. Please upload a raw, qcow2, vhdx, vdi or vmdk image, "
    "optionally compressed with gzip or bzip2."
)
TOO_LARGE_ERROR: Final = "The image is larger than 100 GB after decompression."

#: Markers recognised in the URL's file name (case-insensitive).
MARKERS: Final = {
    "fail-decompress": "fails during pending with DECOMPRESS_ERROR (the real message)",
    "fail-download": "fails early in pending with an illustrative download message",
    "fail-fast": "turns deleted exactly fail_fast_seconds after creation",
    "stuck-new": "never leaves NEW",
    "stuck-pending": "never leaves pending",
    "slow": "NEW and pending last slow_factor times longer",
    "no-head": "the file host answers HEAD with 405 and the import fails to download",
    "fail-transfer": "every transfer action of the image turns errored part-way",
    "fail-transfer-<region>": "every transfer of the image to that region turns errored",
    "size-<N>G / size-<N>M": "the source file is N GiB / MiB (else a seeded 0.5-8 GiB)",
}
_SIZE_MARKER: Final = re.compile(r"size-(\d+(?:\.\d+)?)([gm])", re.IGNORECASE)
_FAIL_TRANSFER_MARKER: Final = re.compile(r"fail-transfer(?:-([a-z]{3}\d))?", re.IGNORECASE)
_COMPRESSED_SUFFIXES: Final = (".gz", ".bz2")
# Archives hold files rather than one compressed stream: DigitalOcean reports
# those with its decompression error (tf-provider#613 names "multiple files");
# this mapping is an inference. Other rejected endings get the format message.
_ARCHIVE_SUFFIXES: Final = frozenset({".xz", ".zip", ".tar.gz", ".tgz", ".7z", ".rar"})

_REGION_CITIES: Final = {
    "ams": "Amsterdam", "atl": "Atlanta", "blr": "Bangalore", "fra": "Frankfurt",
    "lon": "London", "nyc": "New York", "ric": "Richmond", "sfo": "San Francisco",
    "sgp": "Singapore", "syd": "Sydney", "tor": "Toronto",
}  # fmt: skip


class ApiProblem(Exception):
    """An error answer: HTTP status, DigitalOcean error id and message."""

    def __init__(self, status: int, error_id: str, message: str) -> None:
        super().__init__(f"{status} {error_id}: {message}")
        self.status = status
        self.error_id = error_id
        self.message = message


def _seeded(*parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random("|".join(str(p) for p in parts))  # noqa: S311 - simulation, not security


@dataclass(frozen=True, slots=True)
class ImportPlan:
    """Everything decided about one import when it was created."""

    new_seconds: float
    #: ``math.inf`` when stuck in pending.
    pending_seconds: float
    #: Seconds after creation when the image turns ``deleted``, or ``None``.
    fail_after: float | None
    failure_message: str
    size_bytes: int
    compressed: bool

    @property
    def size_gib(self) -> float:
        return self.size_bytes / GIB

    @property
    def decompressed_gib(self) -> float:
        return self.size_gib * (COMPRESSION_RATIO if self.compressed else 1.0)

    @property
    def ready_after(self) -> float | None:
        """Seconds after creation when the image turns ``available``, or ``None`` if never."""
        if self.fail_after is not None:
            return None
        total = self.new_seconds + self.pending_seconds
        return total if math.isfinite(total) else None


@dataclass(slots=True)
class SimAction:
    """A ``transfer`` image action: copies an available image to another region.

    It completes ``duration`` seconds after it started, unless ``error_after`` says it
    turns ``errored`` before that; only a completed transfer adds its region to the
    image's ``regions``.
    """

    id: int
    image_id: int
    region: str
    started_at: float
    started_mono: float
    duration: float
    clock: Clock = field(repr=False, compare=False)
    #: Seconds after the start when the transfer fails, or ``None`` if it does not.
    error_after: float | None = None

    @property
    def elapsed(self) -> float:
        return self.clock.monotonic() - self.started_mono

    @property
    def status(self) -> str:
        if self.error_after is not None:
            return "errored" if self.elapsed >= self.error_after else "in-progress"
        return "completed" if self.elapsed >= self.duration else "in-progress"

    @property
    def completed_at(self) -> float | None:
        """Unix time it ended (completed or errored), or ``None`` while in progress."""
        if self.status == "in-progress":
            return None
        return self.started_at + (
            self.error_after if self.error_after is not None else self.duration
        )


@dataclass(slots=True)
class SimImage:
    """One custom image; its status is read from the clock, never stored."""

    id: int
    name: str
    url: str
    region: str
    distribution: str
    description: str
    tags: tuple[str, ...]
    plan: ImportPlan
    #: Unix time (clock.wall) of creation.
    created_at: float
    created_mono: float
    clock: Clock = field(repr=False, compare=False)
    deleted_by_user: bool = False
    deleted_mono: float | None = None
    #: A tuple, not a list: most images are never transferred, and every image has one.
    transfers: tuple[SimAction, ...] = ()

    @property
    def elapsed(self) -> float:
        """Seconds of import so far; frozen at the moment the user deleted it."""
        end = self.deleted_mono if self.deleted_mono is not None else self.clock.monotonic()
        return end - self.created_mono

    @property
    def import_status(self) -> str:
        """The lifecycle status, ignoring a deletion by the user."""
        plan, elapsed = self.plan, self.elapsed
        if plan.fail_after is not None and elapsed >= plan.fail_after:
            return "deleted"
        if elapsed < plan.new_seconds:
            return "NEW"
        # A failing import stays pending until it fails: it never becomes available.
        if plan.fail_after is not None or elapsed < plan.new_seconds + plan.pending_seconds:
            return "pending"
        return "available"

    @property
    def status(self) -> str:
        return "deleted" if self.deleted_by_user else self.import_status

    @property
    def failed_mono(self) -> float | None:
        """Monotonic time when the import failed, or ``None`` if it has not (yet)."""
        fail_after = self.plan.fail_after
        if fail_after is None or self.import_status != "deleted":
            return None
        return self.created_mono + fail_after

    @property
    def error_message(self) -> str:
        failed = self.import_status == "deleted"
        return self.plan.failure_message if failed else ""

    @property
    def available_at(self) -> float | None:
        """Unix time it became available, or ``None`` if it has not (yet)."""
        ready = self.plan.ready_after
        if ready is None or self.elapsed < ready:
            return None
        return self.created_at + ready

    @property
    def regions(self) -> list[str]:
        if self.import_status != "available":
            return []
        copies = [t.region for t in self.transfers if t.status == "completed"]
        return [self.region, *dict.fromkeys(c for c in copies if c != self.region)]


@dataclass(slots=True)
class SimFile:
    """What the file host knows of a file beyond its name: changes made by a test.

    Files never changed have no record: their content is revision 0, their size comes
    from a ``size-`` marker or the seed, and they were last modified at ``FILE_EPOCH``.
    """

    revision: int = 0
    #: Bytes, when a change set it; else the marker's or the seeded size.
    size: int | None = None
    answers_head: bool = True
    #: Why imports of this content fail, whatever the file's name says is fine.
    defect: FileDefect | None = None
    #: Unix time of the last change.
    changed_at: float = FILE_EPOCH


@dataclass(frozen=True, slots=True)
class FileVersion:
    """A file's current content as the file host describes it."""

    name: str
    revision: int
    size: int
    #: A strong ETag, quotes included.
    etag: str
    #: Unix time, whole seconds (HTTP dates have no fractions).
    last_modified: float
    #: Hex SHA-256 of the simulated content, as a ``SHA256SUMS`` file lists it.
    sha256: str
    answers_head: bool
    defect: FileDefect | None

    def json(self) -> Json:
        return {
            "name": self.name,
            "revision": self.revision,
            "size": self.size,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "sha256": self.sha256,
            "answers_head": self.answers_head,
            "defect": self.defect,
        }


@dataclass
class _Budget:
    """One token's request logs (monotonic times) and revocation state."""

    minute: deque[float] = field(default_factory=deque)
    hour: deque[float] = field(default_factory=deque)
    authenticated: int = 0
    revoked: bool = False
    #: When the other client of this token sends its next request.
    other_next: float = math.inf


@dataclass(frozen=True, slots=True)
class Answer:
    """One ``/v2`` request as the simulator saw it, for tests to measure pacing."""

    #: Monotonic arrival time.
    at: float
    route: str
    #: The status answered; 0 when the connection was dropped without an answer.
    status: int
    #: The ``retry-after`` sent, in seconds.
    retry_after: float | None = None


@dataclass(frozen=True)
class Admission:
    """The gate's verdict on one request: auth, then rate limits."""

    token: str | None
    #: 401 or 429 to answer instead of handling the request, else ``None``.
    problem: ApiProblem | None
    #: ``ratelimit-*`` (and on a burst 429, ``retry-after``) headers.
    headers: dict[str, str]


@dataclass(frozen=True)
class FaultPlan:
    """The faults drawn for one request; which apply also depends on its answer."""

    slow: bool = False
    reset: bool = False
    #: Answer a 5xx without doing anything.
    error: bool = False
    #: The 5xx to answer (for ``error`` and for a lost create): 500, 502 or 503.
    status: int = 500
    #: That 5xx comes with a proxy's HTML body.
    html: bool = False
    lost_create: bool = False
    #: How a lost create is lost: dropped connection (True) or a 5xx (False).
    lost_as_reset: bool = False
    garbage: bool = False
    garbage_kind: int = 0


@dataclass(frozen=True)
class ImagePage:
    images: list[SimImage]
    total: int
    page: int
    per_page: int
    last_page: int


class World:
    """The state of one simulated account, driven by an injected :class:`Clock`.

    Attributes for assertions: ``images`` (id -> :class:`SimImage`, including
    failed and user-deleted ones), ``actions`` (id -> :class:`SimAction`),
    ``request_counts`` (``"METHOD /route"`` -> requests received),
    ``rate_limited_count`` (429s sent), ``fault_counts`` (fault kind -> times
    applied), ``answers`` (every ``/v2`` request's arrival, status and
    retry-after, in arrival order), ``other_sent`` and ``other_rate_limited``
    (the other client's requests). :meth:`state` gives the same as JSON, less
    ``answers``. ``cpu_seconds`` is the process
    CPU time spent handling ``/v2`` and file-host requests, so that a benchmark
    running a client in the same process can subtract the simulator's share.
    """

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.images: dict[int, SimImage] = {}
        self.actions: dict[int, SimAction] = {}
        self.request_counts: Counter[str] = Counter()
        self.rate_limited_count = 0
        self.fault_counts: Counter[str] = Counter()
        self.cpu_seconds = 0.0
        #: Files a test changed (by name); the others are implicit, at revision 0.
        self.files: dict[str, SimFile] = {}
        #: Checksums files served by the file host: name -> the files they list.
        self.checksum_lists: dict[str, tuple[str, ...]] = {}
        self.answers: list[Answer] = []
        self.other_sent = 0
        self.other_rate_limited = 0
        self._first_arrival: float | None = None
        self._budgets: dict[str, _Budget] = {}
        self._fault_occurrences: Counter[str] = Counter()
        self._next_image_id = FIRST_IMAGE_ID
        self._next_action_id = FIRST_ACTION_ID
        self._request_seq = 0
        self._listing = ListingIndex()

    # -- requests -------------------------------------------------------------

    def count_request(self, route: str) -> None:
        self.request_counts[route] += 1

    def arrive(self) -> float:
        """The arrival time of a ``/v2`` request; the first one starts ``delay_after``."""
        now = self.clock.monotonic()
        if self._first_arrival is None:
            self._first_arrival = now
        return now

    def answer_delay(self, arrived: float) -> float:
        """How late to send the answer to a request that arrived at ``arrived``."""
        after = self.config.delay_after
        start = self._first_arrival
        if after is None or start is None or arrived - start < after:
            return 0.0
        return self.config.delay_seconds

    def record_answer(self, answer: Answer) -> None:
        self.answers.append(answer)

    def next_request_id(self) -> str:
        self._request_seq += 1
        rng = _seeded(self.config.seed, "request", self._request_seq)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def admit(self, authorization: str | None) -> Admission:
        """Authenticate, then apply both rate limits; counts the request if admitted.

        Choices where the facts are silent: 401s are not counted against any budget
        (the token is not trusted), 429s are counted only with
        ``count_rate_limited``, and every request that passed authentication
        counts towards ``revoke_after``.

        A 429 says ``ratelimit-remaining: 0`` whichever limit was hit, as
        DigitalOcean's does: a burst 429 reads 0 even with most of the hour left,
        and carries ``retry-after`` (seconds until the minute has room); an
        hourly one carries no ``retry-after``, only ``ratelimit-reset``.
        """
        cfg = self.config
        now = self.clock.monotonic()
        token = _bearer_token(authorization)
        if token is None or (cfg.token is not None and token != cfg.token):
            return self._unauthorized(self._budgets.get(token or "", _Budget()), now)
        budget = self._budgets.get(token)
        if budget is None:
            budget = self._budgets[token] = self._new_budget(now)
        self._book_other_client(budget, now)
        if not budget.revoked and cfg.revoke_after is not None:
            budget.revoked = budget.authenticated >= cfg.revoke_after
        if budget.revoked:
            return self._unauthorized(budget, now)
        budget.authenticated += 1
        refused = self._take(budget, now)
        if refused is None:
            return Admission(token, None, self._rate_headers(budget, now))
        self.rate_limited_count += 1
        headers = self._rate_headers(budget, now)
        headers["ratelimit-remaining"] = "0"
        # Only the burst limit promises a slot soon; an exhausted hourly budget
        # sends no retry-after, just ratelimit-reset.
        if refused == "minute":
            # With counted 429s the window may hold more than its limit: room comes
            # once all but per_minute - 1 of its requests have expired.
            oldest = budget.minute[len(budget.minute) - cfg.per_minute]
            wait = oldest + cfg.minute_window - now
            headers["retry-after"] = str(max(1, math.ceil(wait)))
        problem = ApiProblem(429, "too_many_requests", RATE_LIMITED_MESSAGE)
        return Admission(token, problem, headers)

    def _take(self, budget: _Budget, now: float) -> str | None:
        """Log one request at ``now``; the limit that refuses it (``"hour"``, ``"minute"``).

        A refused request is logged too with ``count_rate_limited``.
        """
        cfg = self.config
        self._prune(budget, now)
        refused: str | None = None
        if len(budget.hour) >= cfg.per_hour:
            refused = "hour"
        elif len(budget.minute) >= cfg.per_minute:
            refused = "minute"
        if refused is None or cfg.count_rate_limited:
            budget.minute.append(now)
            budget.hour.append(now)
        return refused

    def _new_budget(self, now: float) -> _Budget:
        """A token's budget from its first request; its other client starts now."""
        budget = _Budget()
        for _ in range(self.config.other_burst):
            self._other_request(budget, now)
        if self.config.other_per_minute > 0:
            budget.other_next = now + self.config.minute_window / self.config.other_per_minute
        return budget

    def _book_other_client(self, budget: _Budget, now: float) -> None:
        """The other client's requests up to ``now``, in order, on the simulator's clock."""
        while budget.other_next <= now:
            self._other_request(budget, budget.other_next)
            budget.other_next += self.config.minute_window / self.config.other_per_minute

    def _other_request(self, budget: _Budget, at: float) -> None:
        self.other_sent += 1
        if self._take(budget, at) is not None:
            self.other_rate_limited += 1

    def _unauthorized(self, budget: _Budget, now: float) -> Admission:
        problem = ApiProblem(401, "unauthorized", UNAUTHORIZED_MESSAGE)
        return Admission(None, problem, self._rate_headers(budget, now))

    def _prune(self, budget: _Budget, now: float) -> None:
        # A request counts for exactly one window after it was made.
        for log, window in (
            (budget.minute, self.config.minute_window),
            (budget.hour, self.config.hour_window),
        ):
            while log and log[0] + window <= now:
                log.popleft()

    def _rate_headers(self, budget: _Budget, now: float) -> dict[str, str]:
        cfg = self.config
        self._prune(budget, now)
        wall = self.clock.wall()
        reset = wall + (budget.hour[0] + cfg.hour_window - now) if budget.hour else wall
        return {
            "ratelimit-limit": str(cfg.per_hour),
            "ratelimit-remaining": str(max(0, cfg.per_hour - len(budget.hour))),
            "ratelimit-reset": str(math.ceil(reset)),
        }

    def draw_faults(self, method: str, path_qs: str, body: bytes) -> FaultPlan:
        """Faults for one request, from seed + the request itself + its occurrence number.

        Keyed by what the request is rather than when it came, so concurrent
        requests for different images do not shift each other's faults.
        """
        cfg = self.config
        digest = hashlib.sha256(body).hexdigest()[:16]
        key = f"{method} {path_qs} {digest}"
        occurrence = self._fault_occurrences[key]
        self._fault_occurrences[key] += 1
        rng = _seeded(cfg.seed, "fault", key, occurrence)
        # A fixed number of draws in a fixed order: changing one rate never
        # reshuffles the decisions of another.
        slow, reset, error, html, lost, garbage = (rng.random() for _ in range(6))
        status = rng.choice((500, 502, 503))
        lost_as_reset = rng.random() < 0.5
        garbage_kind = rng.randrange(3)
        return FaultPlan(
            slow=slow < cfg.slow_rate,
            reset=reset < cfg.reset_rate,
            error=error < cfg.error_rate,
            status=status,
            html=html < cfg.html_error_fraction,
            lost_create=lost < cfg.lost_create_rate,
            lost_as_reset=lost_as_reset,
            garbage=garbage < cfg.garbage_rate,
            garbage_kind=garbage_kind,
        )

    def record_fault(self, kind: str) -> None:
        self.fault_counts[kind] += 1

    # -- images ---------------------------------------------------------------

    def create_image(self, body: object) -> SimImage:
        """``POST /v2/images``: validate, then start a lazily-evolving import.

        Files DigitalOcean cannot import (a rejected suffix, no file name, too
        large) are still accepted with 202 and fail later, as imports fail for
        real: the API does not check the file before answering.
        """
        if not isinstance(body, dict):
            raise ApiProblem(400, "bad_request", "The request body must be a JSON object.")
        problems: list[str] = []
        name, url, region = body.get("name"), body.get("url"), body.get("region")
        if not isinstance(name, str) or not name.strip():
            problems.append("name is required and must be a non-empty string")
        if not isinstance(url, str) or not _is_http_url(url):
            problems.append("url is required and must be an http or https URL")
        if not isinstance(region, str) or region not in REGIONS:
            problems.append(f"region {region!r} is not a valid region slug")
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            problems.append("description must be a string")
        tags = body.get("tags")
        if tags is not None and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)
        ):
            problems.append("tags must be a list of strings")
        elif tags:
            problems.extend(p for p in map(tag_problem, tags) if p is not None)
        if problems:
            raise ApiProblem(422, "unprocessable_entity", "; ".join(problems))
        assert isinstance(name, str)
        assert isinstance(url, str)
        assert isinstance(region, str)
        distribution = body.get("distribution")
        now = self.clock.monotonic()
        image = SimImage(
            id=self._next_image_id,
            name=name,
            url=url,
            # Each answer's JSON decodes to new strings: region, distribution and tags are
            # shared by many images, so one copy each (a 50,000-image account kept 50,000
            # copies of the set tag, in the process of an `importer run --simulate`).
            region=sys.intern(region),
            # Like the real API: any value outside the enum silently becomes Unknown.
            distribution=sys.intern(distribution) if distribution in DISTRIBUTIONS else "Unknown",
            description=description or "",
            tags=tuple(dict.fromkeys(map(sys.intern, tags or ()))),
            plan=self.plan_import(name, url),
            created_at=self.clock.wall(),
            created_mono=now,
            clock=self.clock,
        )
        self._next_image_id += 1
        self.images[image.id] = image
        self._listing.add(image)
        return image

    def plan_import(self, name: str, url: str) -> ImportPlan:
        """The fate of an import of ``url`` named ``name``: a pure function of seed, url, name.

        Only the URL's path and query count, not its host: a file on this
        simulator's file host (a random port each run) keeps its fate across runs.
        """
        cfg = self.config
        parts = urlsplit(url)
        filename = unquote(parts.path.rsplit("/", 1)[-1])
        marked = filename.lower()
        rng = _seeded(cfg.seed, "image", parts.path, parts.query, name)
        new_noise, pending_noise, fail_point, failure, failure_kind, stuck, stuck_kind = (
            rng.random() for _ in range(7)
        )
        size_bytes = self.file_size(filename)
        compressed = marked.endswith(_COMPRESSED_SUFFIXES)
        factor = cfg.slow_factor if "slow" in marked else 1.0
        spread = cfg.duration_noise
        new_seconds = cfg.new_seconds * (1 + spread * (2 * new_noise - 1)) * factor
        pending_seconds = (
            (cfg.pending_seconds + cfg.seconds_per_gib * size_bytes / GIB)
            * (1 + spread * (2 * pending_noise - 1))
            * factor
        )

        suffix = rejected_suffix(parts.path)
        # A file changed by a test imports as its current content is, not as it was.
        defect = self.files[filename].defect if filename in self.files else None
        download_failure = (
            not filename
            or "fail-download" in marked
            or not self.file_answers_head(filename)
            or defect == "download"
            or (cfg.fail_query_urls and bool(parts.query))
        )
        message = ""
        if download_failure:
            message = DOWNLOAD_ERROR
        elif suffix is not None:
            message = DECOMPRESS_ERROR if suffix in _ARCHIVE_SUFFIXES else UNSUPPORTED_FORMAT_ERROR
        elif "fail-decompress" in marked or defect == "decompress":
            message = DECOMPRESS_ERROR
        elif size_bytes / GIB * (COMPRESSION_RATIO if compressed else 1.0) > MAX_DECOMPRESSED_GIB:
            message = TOO_LARGE_ERROR
        elif failure < cfg.failure_rate:
            message = DOWNLOAD_ERROR if failure_kind < 0.5 else DECOMPRESS_ERROR
        elif "fail-fast" in marked:
            # On its own, fail-fast says when, not why: use the one real message known.
            message = DECOMPRESS_ERROR

        fail_after: float | None = None
        if "fail-fast" in marked and message:
            fail_after = cfg.fail_fast_seconds
        elif message:
            # Failures come "minutes later" (tf-provider#613): a download fails
            # early in pending, a decompression or format problem later.
            early = message == DOWNLOAD_ERROR
            share = 0.1 + 0.3 * fail_point if early else 0.4 + 0.5 * fail_point
            fail_after = new_seconds + pending_seconds * share

        stuck_in: str | None = None
        if "stuck-new" in marked or "stuck-pending" in marked:
            stuck_in = "NEW" if "stuck-new" in marked else "pending"
        elif stuck < cfg.stuck_rate:
            stuck_in = "NEW" if stuck_kind < 0.5 else "pending"
        if stuck_in is not None:
            # Stuck means it never leaves that status: not even to fail.
            fail_after, message = None, ""
            if stuck_in == "NEW":
                new_seconds = math.inf
            pending_seconds = math.inf
        return ImportPlan(
            new_seconds=new_seconds,
            pending_seconds=pending_seconds,
            fail_after=fail_after,
            failure_message=message,
            size_bytes=size_bytes,
            compressed=compressed,
        )

    def file_size(self, filename: str) -> int:
        """Bytes of the file ``filename``: as a change set it, its ``size-`` marker, or seeded."""
        record = self.files.get(filename)
        if record is not None and record.size is not None:
            return record.size
        match = _SIZE_MARKER.search(filename)
        if match is not None:
            unit = GIB if match.group(2).lower() == "g" else MIB
            return int(float(match.group(1)) * unit)
        return int(_seeded(self.config.seed, "size", filename).uniform(0.5, 8.0) * GIB)

    def file_answers_head(self, filename: str) -> bool:
        record = self.files.get(filename)
        return "no-head" not in filename.lower() and (record is None or record.answers_head)

    # -- the file host --------------------------------------------------------

    def file_version(self, filename: str) -> FileVersion:
        """The current content of ``filename``: size, ETag, Last-Modified, SHA-256."""
        record = self.files.get(filename, SimFile())
        content = f"{self.config.seed}|file|{filename}|{record.revision}"
        return FileVersion(
            name=filename,
            revision=record.revision,
            size=self.file_size(filename),
            etag='"' + hashlib.md5(content.encode(), usedforsecurity=False).hexdigest() + '"',
            last_modified=float(math.floor(record.changed_at)),
            sha256=hashlib.sha256(content.encode()).hexdigest(),
            answers_head=self.file_answers_head(filename),
            defect=record.defect,
        )

    def change_file(
        self, filename: str, *, size: int | None = None, defect: FileDefect | None = None
    ) -> FileVersion:
        """New content for ``filename``: a new ETag, Last-Modified and digest.

        ``size`` keeps the current size when ``None``. ``defect`` makes imports of the new
        content fail (``None``: the content is sound). Images already made are not touched.
        """
        if size is not None and size < 0:
            raise ValueError("a file's size is >= 0 bytes")
        if defect is not None and defect not in FILE_DEFECTS:
            raise ValueError(f"defect must be one of {FILE_DEFECTS} or None")
        record = self.files.setdefault(filename, SimFile())
        record.revision += 1
        if size is not None:
            record.size = size
        record.defect = defect
        # Last-Modified counts whole seconds: a change must move it even within one second.
        record.changed_at = max(math.floor(self.clock.wall()), math.floor(record.changed_at) + 1)
        return self.file_version(filename)

    def set_file_head(self, filename: str, answers: bool) -> FileVersion:
        """Make the file host refuse ``HEAD`` for ``filename`` (405), or answer it again.

        The content does not change. A file refusing ``HEAD`` still answers ``GET``, as
        presigned URLs do; imports from it fail, as DigitalOcean needs ``HEAD``. A file
        whose name has the ``no-head`` marker refuses ``HEAD`` whatever is set here.
        """
        self.files.setdefault(filename, SimFile()).answers_head = answers
        return self.file_version(filename)

    def define_checksums(self, listname: str, filenames: list[str] | tuple[str, ...]) -> None:
        """Serve ``/_files/<listname>`` as a ``SHA256SUMS`` file listing ``filenames``."""
        self.checksum_lists[listname] = tuple(filenames)

    def checksums_text(self, listname: str) -> str | None:
        """The ``SHA256SUMS`` text of ``listname`` with each file's current digest, or ``None``."""
        names = self.checksum_lists.get(listname)
        if names is None:
            return None
        return "".join(f"{self.file_version(name).sha256}  {name}\n" for name in names)

    def get_image(self, image_id: int) -> SimImage:
        """An image readable by id: failed ones too (until purged), not those the user deleted."""
        image = self.images.get(image_id)
        if image is None or image.deleted_by_user or self.purged(image):
            raise ApiProblem(404, "not_found", NOT_FOUND_MESSAGE)
        return image

    def purged(self, image: SimImage) -> bool:
        """Whether a failed import is gone for good (``purge_failed_after``)."""
        purge_after = self.config.purge_failed_after
        failed = image.failed_mono
        if purge_after is None or failed is None:
            return False
        return self.clock.monotonic() - failed >= purge_after

    def untag_image(self, image_id: int, tag: str) -> None:
        """Take ``tag`` off an image, as a person does with DigitalOcean's tag resources
        (``DELETE /v2/tags/{tag}/resources``; not served here: tests call this)."""
        image = self.get_image(image_id)
        image.tags = tuple(t for t in image.tags if t != tag)
        # The listing index files images by tag once; rare enough to rebuild.
        self._listing = ListingIndex()
        for known in sorted(self.images):
            self._listing.add(self.images[known])

    def delete_image(self, image_id: int) -> None:
        image = self.get_image(image_id)
        if self.config.refuse_delete_importing and image.import_status in ("NEW", "pending"):
            raise ApiProblem(422, "unprocessable_entity", DELETE_IMPORTING_MESSAGE)
        image.deleted_by_user = True
        image.deleted_mono = self.clock.monotonic()
        self._listing.deleted(image)

    def update_image(self, image_id: int, body: object) -> SimImage:
        """``PUT /v2/images/{id}`` (``images_update``): any of name, distribution, description.

        Other keys are ignored, as the API ignores what it does not know; a body without any
        of the three is a 422, since it cannot be what the caller meant. As on create, a
        distribution outside the enum silently becomes ``Unknown``. Images in any status can
        be updated (the facts are silent); images the user deleted are 404.
        """
        image = self.get_image(image_id)
        if not isinstance(body, dict):
            raise ApiProblem(400, "bad_request", "The request body must be a JSON object.")
        problems: list[str] = []
        name = body.get("name")
        if "name" in body and (not isinstance(name, str) or not name.strip()):
            problems.append("name must be a non-empty string")
        description = body.get("description")
        if "description" in body and not isinstance(description, str):
            problems.append("description must be a string")
        distribution = body.get("distribution")
        if "distribution" in body and not isinstance(distribution, str):
            problems.append("distribution must be a string")
        if not problems and not {"name", "description", "distribution"} & body.keys():
            problems.append("give at least one of name, distribution, description")
        if problems:
            raise ApiProblem(422, "unprocessable_entity", "; ".join(problems))
        if isinstance(name, str):
            image.name = name
        if isinstance(description, str):
            image.description = description
        if isinstance(distribution, str):
            image.distribution = distribution if distribution in DISTRIBUTIONS else "Unknown"
        return image

    def listed(self, image: SimImage, now: float) -> bool:
        """Whether ``GET /v2/images`` shows ``image`` at ``now`` (filters aside)."""
        cfg = self.config
        if image.deleted_by_user or now - image.created_mono < cfg.list_lag:
            return False
        status = image.status
        if status == "available":
            return True
        if status == "deleted":
            return cfg.list_failed and not self.purged(image)
        return cfg.list_in_progress

    def list_images(self, query: Mapping[str, str]) -> ImagePage:
        """``GET /v2/images``: visible images by ascending id, one page of them.

        ``private`` is accepted and ignored: every simulated image is private and
        no public catalogue is simulated. A ``type`` filter (``distribution`` or
        ``application``) never matches a custom image. ``per_page`` outside
        1..200 or ``page`` < 1 answer 422 rather than being clamped, so a client
        bug shows up in tests (what the real API does there is not documented).
        A call costs about its page, not every image: see :mod:`importer.simulator.listing`.
        """
        per_page = _int_param(query, "per_page", PER_PAGE_DEFAULT, PER_PAGE_MAX)
        page = _int_param(query, "page", 1, None)
        tag = query.get("tag_name")
        now = self.clock.monotonic()
        images: list[SimImage] = []
        total = 0
        if "type" in query:
            pass
        elif self.config.list_lag == 0 and not self.config.list_failed:
            # The plain listings (the defaults, and every benchmark) come from the index,
            # in time proportional to the page.
            images, total = self._listing.page(
                tag, self.config.list_in_progress, page, per_page, now
            )
        else:
            matching = [
                image
                for _, image in sorted(self.images.items())
                if self.listed(image, now) and (tag is None or tag in image.tags)
            ]
            start = (page - 1) * per_page
            images, total = matching[start : start + per_page], len(matching)
        return ImagePage(
            images=images,
            total=total,
            page=page,
            per_page=per_page,
            last_page=max(1, math.ceil(total / per_page)),
        )

    def image_json(self, image: SimImage) -> Json:
        available = image.status == "available"
        plan = image.plan
        return {
            "id": image.id,
            "name": image.name,
            "type": "custom",
            "distribution": image.distribution,
            "slug": None,
            "public": False,
            "regions": image.regions,
            "created_at": isoformat(image.created_at),
            "min_disk_size": max(1, math.ceil(plan.decompressed_gib)) if available else None,
            "size_gigabytes": round(plan.size_gib, 2) if available else None,
            "description": image.description,
            "tags": list(image.tags),
            "status": image.status,
            "error_message": image.error_message,
        }

    # -- transfer actions -----------------------------------------------------

    def transfer_image(self, image_id: int, body: object) -> SimAction:
        """``POST /v2/images/{id}/actions`` with ``{"type": "transfer", "region": ...}``."""
        image = self.get_image(image_id)
        if not isinstance(body, dict):
            raise ApiProblem(400, "bad_request", "The request body must be a JSON object.")
        if body.get("type") != "transfer":
            raise ApiProblem(422, "unprocessable_entity", "only transfer actions are simulated")
        region = body.get("region")
        if not isinstance(region, str) or region not in REGIONS:
            raise ApiProblem(422, "unprocessable_entity", f"region {region!r} is not valid")
        if image.status != "available":
            raise ApiProblem(422, "unprocessable_entity", "the image is not available yet")
        if region in image.regions:
            raise ApiProblem(422, "unprocessable_entity", f"the image is already in {region}")
        # A transfer to a region another transfer is still copying to is accepted as a new
        # action (what DigitalOcean does then is not documented); an errored one leaves
        # the region free for another attempt.
        attempt = sum(t.region == region for t in image.transfers)
        rng = _seeded(self.config.seed, "transfer", image.id, region, attempt)
        noise, failure, fail_point = (rng.random() for _ in range(3))
        base = self.config.transfer_seconds + self.config.transfer_seconds_per_gib * (
            image.plan.size_gib
        )
        duration = base * (1 + self.config.duration_noise * (2 * noise - 1))
        fails = failure < self.config.transfer_failure_rate or _transfer_marked(image.url, region)
        action = SimAction(
            id=self._next_action_id,
            image_id=image.id,
            region=region,
            started_at=self.clock.wall(),
            started_mono=self.clock.monotonic(),
            duration=duration,
            clock=self.clock,
            error_after=duration * (0.2 + 0.7 * fail_point) if fails else None,
        )
        self._next_action_id += 1
        self.actions[action.id] = action
        image.transfers = (*image.transfers, action)
        return action

    def get_action(self, action_id: int) -> SimAction:
        action = self.actions.get(action_id)
        if action is None:
            raise ApiProblem(404, "not_found", NOT_FOUND_MESSAGE)
        return action

    def action_json(self, action: SimAction) -> Json:
        completed_at = action.completed_at
        return {
            "id": action.id,
            "status": action.status,
            "type": "transfer",
            "started_at": isoformat(action.started_at),
            "completed_at": isoformat(completed_at) if completed_at is not None else None,
            "resource_id": action.image_id,
            "resource_type": "image",
            "region": {
                "name": f"{_REGION_CITIES.get(action.region[:3], action.region)} "
                f"{action.region[3:]}",
                "slug": action.region,
                "features": ["image_transfer"],
                "available": True,
                "sizes": [],
            },
            "region_slug": action.region,
        }

    # -- admin ----------------------------------------------------------------

    def state(self) -> Json:
        """Everything held, for ``GET /_simulator/state``. Times are Unix seconds."""
        return {
            "images": [
                {
                    "id": image.id,
                    "name": image.name,
                    "region": image.region,
                    # Presigned query strings are secrets; the admin view drops them.
                    "url": urlunsplit(urlsplit(image.url)._replace(query="", fragment="")),
                    "tags": list(image.tags),
                    "status": image.status,
                    "error_message": image.error_message,
                    "created_at": image.created_at,
                    "available_at": image.available_at,
                    "deleted_by_user": image.deleted_by_user,
                }
                for _, image in sorted(self.images.items())
            ],
            "actions": [
                {
                    "id": action.id,
                    "image_id": action.image_id,
                    "region": action.region,
                    "status": action.status,
                    "started_at": action.started_at,
                    "completed_at": action.completed_at,
                }
                for _, action in sorted(self.actions.items())
            ],
            "requests": dict(self.request_counts),
            "rate_limited": self.rate_limited_count,
            "other_client": {"sent": self.other_sent, "rate_limited": self.other_rate_limited},
            "faults": dict(self.fault_counts),
            "now": self.clock.wall(),
        }

    def answers_json(self) -> Json:
        """``answers`` as JSON, for ``GET /_simulator/answers``; times on the monotonic clock."""
        return {
            "answers": [
                {
                    "at": answer.at,
                    "route": answer.route,
                    "status": answer.status,
                    "retry_after": answer.retry_after,
                }
                for answer in self.answers
            ],
            "now": self.clock.monotonic(),
        }

    # -- persistence ----------------------------------------------------------

    def snapshot(self) -> Json:
        """The account as JSON: images, actions, id counters, changed files, checksum lists.

        Times are Unix seconds, so that a world restored later, in another process, on
        another clock, goes on where this one was: an image 30 s into its import when saved
        and restored 10 s later is 40 s in. URLs are saved without query string and
        credentials (presigned URLs carry secrets; a saved image's URL is only shown).
        Request counters, rate-limit logs and fault draws belong to one process and are not
        saved.
        """
        return {
            "format": SNAPSHOT_FORMAT,
            "saved_at": self.clock.wall(),
            "next_image_id": self._next_image_id,
            "next_action_id": self._next_action_id,
            "images": [self._image_snapshot(image) for _, image in sorted(self.images.items())],
            "actions": [
                {
                    "id": action.id,
                    "image_id": action.image_id,
                    "region": action.region,
                    "started_at": action.started_at,
                    "duration": action.duration,
                    "error_after": action.error_after,
                }
                for _, action in sorted(self.actions.items())
            ],
            "files": {
                name: {
                    "revision": record.revision,
                    "size": record.size,
                    "answers_head": record.answers_head,
                    "defect": record.defect,
                    "changed_at": record.changed_at,
                }
                for name, record in sorted(self.files.items())
            },
            "checksum_lists": {name: list(files) for name, files in self.checksum_lists.items()},
        }

    def _image_snapshot(self, image: SimImage) -> Json:
        plan = image.plan
        parts = urlsplit(image.url)
        return {
            "id": image.id,
            "name": image.name,
            "url": urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="")),
            "region": image.region,
            "distribution": image.distribution,
            "description": image.description,
            "tags": list(image.tags),
            "created_at": image.created_at,
            # When its import started on this world's clock: ``created_at`` is what the API
            # shows, and lags it by as much as an earlier restore's clock was behind.
            "started_at": self._wall_of(image.created_mono),
            "deleted_at": None if image.deleted_mono is None else self._wall_of(image.deleted_mono),
            "plan": {
                "new_seconds": _finite_or_none(plan.new_seconds),
                "pending_seconds": _finite_or_none(plan.pending_seconds),
                "fail_after": plan.fail_after,
                "failure_message": plan.failure_message,
                "size_bytes": plan.size_bytes,
                "compressed": plan.compressed,
            },
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the account with one :meth:`snapshot` wrote; raises ``ValueError`` if unusable.

        Each image's import goes on from its creation time, on this world's clock. Should
        this clock's wall time be earlier than the save (a virtual clock that ran ahead, a
        clock set back), the world goes on from the moment it was saved: time never runs
        backwards for an image.
        """
        try:
            self._restore(snapshot)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a simulator snapshot ({type(exc).__name__}: {exc})") from None

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        if snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown snapshot format {snapshot.get('format')!r}")
        behind = max(0.0, float(snapshot["saved_at"]) - self.clock.wall())

        def mono_of(wall: float) -> float:
            return self.clock.monotonic() - (self.clock.wall() + behind - wall)

        images: dict[int, SimImage] = {}
        for raw in snapshot["images"]:
            plan = raw["plan"]
            deleted_at = raw["deleted_at"]
            image = SimImage(
                id=int(raw["id"]),
                name=str(raw["name"]),
                url=str(raw["url"]),
                region=str(raw["region"]),
                distribution=str(raw["distribution"]),
                description=str(raw["description"]),
                tags=tuple(str(tag) for tag in raw["tags"]),
                plan=ImportPlan(
                    new_seconds=_inf_if_none(plan["new_seconds"]),
                    pending_seconds=_inf_if_none(plan["pending_seconds"]),
                    fail_after=None if plan["fail_after"] is None else float(plan["fail_after"]),
                    failure_message=str(plan["failure_message"]),
                    size_bytes=int(plan["size_bytes"]),
                    compressed=bool(plan["compressed"]),
                ),
                created_at=float(raw["created_at"]),
                created_mono=mono_of(float(raw.get("started_at", raw["created_at"]))),
                clock=self.clock,
                deleted_by_user=deleted_at is not None,
                deleted_mono=None if deleted_at is None else mono_of(float(deleted_at)),
            )
            images[image.id] = image
        actions: dict[int, SimAction] = {}
        for raw in snapshot["actions"]:
            action = SimAction(
                id=int(raw["id"]),
                image_id=int(raw["image_id"]),
                region=str(raw["region"]),
                started_at=float(raw["started_at"]),
                started_mono=mono_of(float(raw["started_at"])),
                duration=float(raw["duration"]),
                clock=self.clock,
                error_after=None if raw.get("error_after") is None else float(raw["error_after"]),
            )
            actions[action.id] = action
            owner = images[action.image_id]
            owner.transfers = (*owner.transfers, action)
        files: dict[str, SimFile] = {}
        for name, raw in snapshot["files"].items():
            defect = raw["defect"]
            if defect is not None and defect not in FILE_DEFECTS:
                raise ValueError(f"unknown file defect {defect!r}")
            files[str(name)] = SimFile(
                revision=int(raw["revision"]),
                size=None if raw["size"] is None else int(raw["size"]),
                answers_head=bool(raw["answers_head"]),
                defect=defect,
                changed_at=float(raw["changed_at"]),
            )
        lists = {
            str(name): tuple(str(f) for f in names)
            for name, names in snapshot["checksum_lists"].items()
        }
        next_image_id = max(int(snapshot["next_image_id"]), max(images, default=0) + 1)
        next_action_id = max(int(snapshot["next_action_id"]), max(actions, default=0) + 1)
        # Nothing is replaced before everything was read: a bad snapshot changes nothing.
        self.images, self.actions, self.files, self.checksum_lists = images, actions, files, lists
        self._listing = ListingIndex()
        for image_id in sorted(images):
            self._listing.add(images[image_id])
        self._next_image_id, self._next_action_id = next_image_id, next_action_id

    def _wall_of(self, mono: float) -> float:
        return self.clock.wall() - (self.clock.monotonic() - mono)


def _transfer_marked(url: str, region: str) -> bool:
    """Whether the image's file name says its transfers (to ``region``) fail."""
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    for match in _FAIL_TRANSFER_MARKER.finditer(filename):
        named = match.group(1)
        if named is None or named.lower() == region:
            return True
    return False


def _finite_or_none(value: float) -> float | None:
    # JSON has no infinity: a duration that never ends (a stuck import) is saved as null.
    return value if math.isfinite(value) else None


def _inf_if_none(value: float | None) -> float:
    return math.inf if value is None else float(value)


def _bearer_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    # RFC 7235: the auth scheme is case-insensitive.
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _int_param(query: Mapping[str, str], name: str, default: int, maximum: int | None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1 or (maximum is not None and value > maximum):
        bound = f"between 1 and {maximum}" if maximum is not None else "at least 1"
        raise ApiProblem(422, "unprocessable_entity", f"{name} must be an integer {bound}")
    return value
