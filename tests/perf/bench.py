"""The benchmark: this importer against two pydo scripts and the lower bounds, at any size.

    python tests/perf/bench.py --images N [--weather] [--json PATH] [--seed S]
    python tests/perf/bench.py --sweep [--sizes 1000,3000,...] [--tools importer,strong,pydo]

Every row runs on the same simulator settings, with DigitalOcean's real limits (250
requests a minute, 5,000 an hour), minutes-long imports that grow with file size, and an
image host that takes ``HEAD_LATENCY`` to answer a ``HEAD``:

* ``importer``: :func:`importer.pipeline.run_import` with default settings (``--reserve``
  changes the reserve), probing the sources as ``importer run`` does (each file's size and
  version, submitting the largest known file first meanwhile);
* ``strong``: a competent script written with the official client
  (:mod:`tests.perf.strong_baseline`): one pacer at the rate the importer allows itself,
  largest first, one listing by a run tag every 30 s, no blind POST retries;
* ``pydo``: the official client used the obvious way (:mod:`tests.perf.baseline`);
* three **bounds**, from each image's actual import time (:func:`bounds`): when every image
  could be available at the earliest (``creates only``), and when the last could be *seen*
  available at the earliest, counting the status requests any tool needs, at the rate the
  importer allows itself (``+listings, allowed``: the ``x bound`` column) and at the full
  250/5,000 (``+listings, full``: the ``x full`` column);
* the **ideal** (:func:`size_ordered`): a perfect run at the allowed rate that orders the
  creates by file size, which is all a tool can know in advance (``x ideal``).

``--weather`` runs the same with 2% of API answers a 5xx, 1% of creates losing their
answer after making the image, and another tool spending 20% of the token's hour (a
client in the benchmark sending one request every 3.6 s on the same token), once with
in-progress images hidden from listings and once shown. The bounds then use what the
other tool leaves.

The baselines are cut off at ``CUTOFF_FACTOR`` times the bound plus an hour, or after
``max_requests`` requests; the naive one is skipped above ``--naive-max`` images (it fails
the same way at every size, and slowly).

Each row runs in a child process of its own (``--row TOOL``, printing one JSON object), so
that its CPU time and peak RSS are its own. Inside the child the simulator and the tool
share one virtual-time loop (:class:`BenchLoop`) and one :class:`~importer.clock.LoopClock`,
so hours of imports take seconds, every simulated time is exact, and a run is the same every
time. The building blocks (:func:`measure_importer`, :func:`measure_strong`,
:func:`measure_baseline`, :func:`bounds`) can also be called in-process, on a virtual-time
loop.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, TypeVarTuple

import aiohttp
import anyio

from importer.clock import Clock, LoopClock, VirtualTimeLoop
from importer.logs import configure_logging
from importer.manifest import Entry, Manifest
from importer.pipeline import run_import
from importer.report import Outcome
from importer.settings import Settings, Token
from importer.simulator import SimulatorConfig, World, run_simulator
from importer.sources import SourceProber

#: Where simulated wall time starts (2026-09-21T14:13:20Z): fixed, so runs are reproducible.
EPOCH = 1_790_000_000.0
PER_MINUTE = 250
PER_HOUR = 5000
#: The simulator accepts any token; each token has its own budget, and each row its own world.
TOKEN = "bench-token-not-a-secret"
REGIONS = ("nyc3", "ams3", "fra1", "sfo3", "sgp1")
#: Seconds the image host takes to answer a HEAD (a real one is a network away).
HEAD_LATENCY = 0.1
#: Images per listing page, at most: the fewest status requests any tool needs.
PER_PAGE = 200
#: The importer's default reserve for other users of the token.
RESERVE = 0.1
#: Weather: answers that are a 5xx, creates that lose their answer, another tool's share.
WEATHER_ERROR_RATE = 0.02
WEATHER_LOST_CREATE_RATE = 0.01
OTHER_TOOL_SHARE = 0.2
SWEEP_SIZES = (1_000, 3_000, 4_300, 4_500, 9_000, 10_000, 30_000, 50_000)
TOOLS = ("importer", "strong", "pydo")
#: The naive baseline is skipped above this many images unless asked for.
NAIVE_MAX = 10_000
#: The baselines are stopped at this multiple of the bound, plus an hour (the time a tool
#: may wait to prove that a create whose answer was lost made nothing)...
CUTOFF_FACTOR = 3.0
CUTOFF_SLACK = 3600.0
#: ...or once the simulator has served this many requests (a guard for large N).
MAX_REQUESTS = 2_000_000
#: How often (simulated seconds) the request guard looks at the simulator's counters.
GUARD_INTERVAL = 1.0

Capped = Literal["time", "requests"]
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class BenchLoop(VirtualTimeLoop):
    """A :class:`VirtualTimeLoop` that runs work meant for a thread pool inline.

    A VirtualTimeLoop jumps to the next timer whenever no I/O is ready, and a worker
    thread's result arrives as I/O only once the thread is done. aiohttp as azure-core
    configures it (``trust_env``) looks up ``.netrc`` and proxy settings in a thread on
    every request, so on a plain VirtualTimeLoop each pydo request let minutes of simulated
    time pass mid-flight (a 10 s poll became a 100 s one); and had the loop waited for the
    threads instead, the order of requests, and so which of them drew a 429, would follow
    real thread timing and change from run to run. Inline, those quick lookups take no
    simulated time and every run is the same. Their CPU time is still the process's; only
    the thread hand-off itself goes uncounted.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Jobs that were meant for a thread pool.
        self.thread_jobs = 0

    def run_in_executor(
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[[*_Ts], _T],
        *args: *_Ts,
    ) -> asyncio.Future[_T]:
        self.thread_jobs += 1
        future: asyncio.Future[_T] = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:  # delivered to the awaiting task, as a pool would
            future.set_exception(exc)
        return future


# -- the conditions of a run ----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """The simulated conditions of a run."""

    seed: int = 0
    #: 5xx answers, lost creates and another tool on the token (see the module's doc).
    weather: bool = False
    #: Whether listings show images still importing (the real behaviour is unknown).
    list_in_progress: bool = False
    head_latency: float = HEAD_LATENCY
    #: The importer's reserve for other users; the strong baseline paces at the same rate.
    reserve: float = RESERVE

    @property
    def label(self) -> str:
        if not self.weather and not self.list_in_progress:
            return "calm"
        listing = "shown" if self.list_in_progress else "hidden"
        return f"{'weather' if self.weather else 'calm'}, {listing}"

    @property
    def other_per_hour(self) -> int:
        """Requests an hour the other tool on the token sends (0 without weather)."""
        return round(OTHER_TOOL_SHARE * PER_HOUR) if self.weather else 0

    def simulator_config(self) -> SimulatorConfig:
        faults: dict[str, Any] = {}
        if self.weather:
            faults = {
                "error_rate": WEATHER_ERROR_RATE,
                "lost_create_rate": WEATHER_LOST_CREATE_RATE,
            }
        return SimulatorConfig.realistic(
            seed=self.seed,
            per_minute=PER_MINUTE,
            per_hour=PER_HOUR,
            list_in_progress=self.list_in_progress,
            head_latency=self.head_latency,
            **faults,
        )

    def settings(self, api_url: str) -> Settings:
        """``importer run``'s defaults, with this scenario's reserve."""
        return Settings(token=Token(TOKEN), api_url=api_url, state_path=None, reserve=self.reserve)

    def full_limits(self) -> tuple[int, int]:
        """Requests a minute and an hour the token has for the tool: what others leave."""
        other_per_minute = math.ceil(self.other_per_hour / 60)
        return PER_MINUTE - other_per_minute, PER_HOUR - self.other_per_hour

    def allowed_limits(self) -> tuple[int, int]:
        """What the importer allows itself (less the reserve), within what others leave."""
        allowed = request_limits(self.settings("http://127.0.0.1"))
        full = self.full_limits()
        return min(allowed[0], full[0]), min(allowed[1], full[1])


def simulator_config(seed: int = 0) -> SimulatorConfig:
    """The simulated DigitalOcean of a calm run."""
    return Scenario(seed=seed).simulator_config()


def bench_manifest(base_url: str, images: int) -> Manifest:
    """``images`` entries ``bench-00000``... whose files live on the simulator's file host.

    The simulator derives each file's size, and so each import's duration, from the file
    name and the seed: the same entry takes as long for every tool.
    """
    entries = tuple(
        Entry(
            index=i,
            name=f"bench-{i:05d}",
            url=f"{base_url}/_files/bench-{i:05d}.qcow2",
            region=REGIONS[i % len(REGIONS)],
            distribution="Ubuntu",
            description=None,
            tags=("bench",),
        )
        for i in range(images)
    )
    return Manifest(version=1, entries=entries, source="<bench>")


# -- bounds ------------------------------------------------------------------------------


def lower_bound(durations: Sequence[float], per_minute: int, per_hour: int) -> float:
    """The earliest moment every image could be available, in seconds from the start.

    Creates leave at the fastest pace both sliding windows allow (no latency, no status
    checks), longest import first: the send times do not depend on the order, and giving
    the earliest slots to the longest imports minimises the latest finish (an exchange
    argument). Nothing can finish earlier, so no tool can either.
    """
    ordered = sorted(durations, reverse=True)
    sends = _fastest_sends(len(ordered), per_minute, per_hour)
    return max(
        (sent + duration for sent, duration in zip(sends, ordered, strict=True)), default=0.0
    )


def detection_bound(
    durations: Sequence[float],
    per_minute: int,
    per_hour: int,
    per_page: int = PER_PAGE,
    *,
    in_order: bool = False,
) -> float:
    """The earliest moment a tool could have *seen* every image available.

    A tool learns an image is available from an answer sent after it became available: a
    listing page tells at most ``per_page`` images, so besides one create per image it
    sends at least one status request per ``per_page`` images, and its last one after the
    last image is available. Its last request goes no earlier than the fastest pace of the
    windows allows that many requests, and no earlier than :func:`lower_bound`.

    ``in_order``: the creates leave in the order given rather than longest import first
    (:func:`size_ordered`).
    """
    if not durations:
        return 0.0
    requests = len(durations) + math.ceil(len(durations) / per_page)
    *_, last_send = _fastest_sends(requests, per_minute, per_hour)
    if in_order:
        sends = _fastest_sends(len(durations), per_minute, per_hour)
        finished = max(sent + took for sent, took in zip(sends, durations, strict=True))
    else:
        finished = lower_bound(durations, per_minute, per_hour)
    return max(finished, last_send)


def size_ordered(planned: Sequence[tuple[int, float]], per_minute: int, per_hour: int) -> float:
    """:func:`detection_bound` with the creates sent largest file first, not longest import.

    ``planned``: each image's (file size, import duration). The bounds give the earliest
    slots to the imports that *will* take longest, which no tool can know: two files of
    one size import in times up to 30% apart in the simulator, as on a real service. A
    tool can know the sizes; this is the makespan of a perfect run ordered by them (no
    latency, listings costing nothing before the last image). It is not a bound (a lucky
    order can beat it) but the mark a tool that knows only sizes is held to (``x ideal``).
    """
    ordered = sorted(planned, key=lambda pair: -pair[0])  # stable: ties in manifest order
    return detection_bound([took for _, took in ordered], per_minute, per_hour, in_order=True)


def _fastest_sends(count: int, per_minute: int, per_hour: int) -> Iterator[float]:
    # Imported here: run as a script, this module's imports come before sys.path knows `tests`.
    from tests.perf.windows import fastest_sends  # noqa: PLC0415

    return fastest_sends(count, per_minute, per_hour)


def request_limits(settings: Settings) -> tuple[int, int]:
    """The per-minute and per-hour budgets the importer allows itself (less the reserve)."""
    return settings.effective_per_minute, settings.effective_per_hour


def planned_durations(world: World, manifest: Manifest) -> list[float]:
    """Each entry's import duration as the simulator will make it (for successful imports).

    The same as ``available_at - created_at`` of the images a run makes: the simulator
    decides an import's fate from the seed, the URL's path and the name alone.
    """
    return [took for _, took in planned_imports(world, manifest)]


def planned_imports(world: World, manifest: Manifest) -> list[tuple[int, float]]:
    """Each successful import's (file size, duration), in manifest order."""
    planned = []
    for entry in manifest.entries:
        ready = world.plan_import(entry.name, entry.url).ready_after
        if ready is not None:
            planned.append((world.file_size(entry.url.rsplit("/", 1)[-1]), ready))
    return planned


@dataclass(frozen=True)
class Bounds:
    """The bounds of one size and scenario (simulated seconds from the start)."""

    images: int
    scenario: str
    #: Creates only, at the allowed rate.
    creates_only: float
    #: With the status requests any tool needs, at the allowed rate (``x bound``).
    detection_allowed: float
    #: The same at the token's full rate, less what another tool takes (``x full``).
    detection_full: float
    #: A perfect run at the allowed rate ordered by file size (``x ideal``): :func:`size_ordered`.
    ideal: float
    allowed_limits: tuple[int, int]
    full_limits: tuple[int, int]


def bounds(images: int, scenario: Scenario) -> Bounds:
    """The bounds of ``images`` bench entries in ``scenario``, from the planned durations."""
    world = World(scenario.simulator_config(), LoopClock())  # plans only: the clock is unread
    planned = planned_imports(world, bench_manifest("http://bench.invalid", images))
    durations = [took for _, took in planned]
    allowed, full = scenario.allowed_limits(), scenario.full_limits()
    return Bounds(
        images=images,
        scenario=scenario.label,
        creates_only=lower_bound(durations, *allowed),
        detection_allowed=detection_bound(durations, *allowed),
        detection_full=detection_bound(durations, *full),
        ideal=size_ordered(planned, *allowed),
        allowed_limits=allowed,
        full_limits=full,
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolated between closest ranks; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Measurement:
    """One row of the table. Times are simulated seconds unless named ``wall``/``cpu``."""

    tool: str
    images: int
    #: Images the tool saw ``available``.
    available: int
    #: Why the run was cut off (``time``, ``requests``), if it was and had entries left.
    capped: Capped | None
    #: From the start of the run to the last image the tool saw available.
    makespan: float | None
    #: The bound this row is compared with: detection-aware, at the allowed rate.
    lower_bound: float | None
    #: How long the run lasted (to its end, or to the cutoff).
    ran: float
    #: The tool's ``/v2`` requests the simulator received, 429s included.
    requests: int
    #: 429 answers the tool received.
    rate_limited: int
    #: Detection lag (tool saw available - simulator made it available), percentiles.
    lag_p50: float | None
    lag_p95: float | None
    #: Process CPU during the run less the simulator's own request handling: an upper
    #: bound, since aiohttp's server-side HTTP parsing is still charged to the tool.
    cpu_seconds: float
    simulator_cpu_seconds: float
    #: The process's peak RSS (simulator included): an upper bound of the tool's.
    peak_rss_mb: float
    wall_seconds: float
    #: The scenario's label (``calm``, ``weather, hidden``...).
    scenario: str = "calm"
    #: The detection-aware bound at the token's full rate (``x full``).
    full_bound: float | None = None
    #: A perfect run ordered by file size at the allowed rate (``x ideal``).
    ideal: float | None = None
    #: Images beyond one per entry still there at the end (not deleted, not failed).
    duplicates: int = 0
    #: Requests (and 429s) of the other tool on the token, left out of the figures above.
    other_requests: int = 0
    other_rate_limited: int = 0
    #: How unfinished entries ended (outcome or error type) -> count.
    errors: dict[str, int] = field(default_factory=dict)
    requests_by_route: dict[str, int] = field(default_factory=dict)
    #: The actual import durations of the images made available (importer row only).
    durations: list[float] = field(default_factory=list)
    #: Jobs the tool meant for a thread pool (run inline and counted on a :class:`BenchLoop`).
    thread_jobs: int = 0

    @property
    def complete(self) -> bool:
        return self.available == self.images

    @property
    def requests_per_image(self) -> float:
        return self.requests / self.images if self.images else 0.0

    @property
    def makespan_ratio(self) -> float | None:
        if self.makespan is None or not self.lower_bound:
            return None
        return self.makespan / self.lower_bound

    @property
    def full_ratio(self) -> float | None:
        if self.makespan is None or not self.full_bound:
            return None
        return self.makespan / self.full_bound

    @property
    def ideal_ratio(self) -> float | None:
        if self.makespan is None or not self.ideal:
            return None
        return self.makespan / self.ideal

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            complete=self.complete,
            requests_per_image=self.requests_per_image,
            makespan_ratio=self.makespan_ratio,
            full_ratio=self.full_ratio,
            ideal_ratio=self.ideal_ratio,
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in names})


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _virtual_loop(*, threads: bool) -> VirtualTimeLoop:
    """The running loop, if its time is virtual (and keeps thread-pool work inline if asked)."""
    loop = asyncio.get_running_loop()
    wanted = BenchLoop if threads else VirtualTimeLoop
    if not isinstance(loop, wanted):
        raise RuntimeError(
            f"this measurement runs on {wanted.__name__} (on real time it would take hours): "
            f"anyio.run(..., backend_options={{'loop_factory': {wanted.__name__}}})"
        )
    return loop


def _thread_jobs(loop: VirtualTimeLoop) -> int:
    return loop.thread_jobs if isinstance(loop, BenchLoop) else 0


# -- the other tool on the token --------------------------------------------------------


async def other_tool(base_url: str, clock: Clock, per_hour: int, tally: Counter[str]) -> None:
    """Another tool on the same token: one listing request every ``3600 / per_hour`` s, forever.

    Its requests and 429s are counted in ``tally`` so that the rows can leave them out.
    """
    interval = 3600.0 / per_hour
    headers = {"Authorization": f"Bearer {TOKEN}"}
    query = {"tag_name": "another-tool", "per_page": "1"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            tally["requests"] += 1
            try:
                async with http.get(f"{base_url}/v2/images", params=query) as answer:
                    tally["rate_limited"] += answer.status == 429
                    await answer.read()
            except aiohttp.ClientError:
                pass  # a fault meant for the tools; this one does not care
            await clock.sleep(interval)


async def _alongside_other_tool(
    scenario: Scenario, base_url: str, clock: Clock, work: Callable[[], Awaitable[_T]]
) -> tuple[_T, Counter[str]]:
    """``work()``'s result, run with the other tool on the token when the weather asks."""
    tally: Counter[str] = Counter()
    async with anyio.create_task_group() as group:
        if scenario.other_per_hour:
            group.start_soon(other_tool, base_url, clock, scenario.other_per_hour, tally)
        result = await work()
        group.cancel_scope.cancel()
    return result, tally


def _duplicates(world: World) -> int:
    """Images beyond one per name that are still there (importing or available)."""
    live = Counter(image.name for image in world.images.values() if image.status != "deleted")
    return sum(count - 1 for count in live.values())


def _row(
    tool: str,
    images: int,
    world: World,
    scenario: Scenario,
    tally: Counter[str],
    *,
    detections: Sequence[float],
    lags: Sequence[float],
    errors: Counter[str],
    started: float,
    ran: float,
    cpu: float,
    wall: float,
    **rest: Any,
) -> Measurement:
    """A tool's row: what its run detected, and what the simulator saw of it."""
    routes = Counter(world.request_counts)
    # The other tool sends listings only: its share comes off that route.
    routes["GET /v2/images"] -= tally["requests"]
    return Measurement(
        tool=tool,
        images=images,
        available=len(detections),
        makespan=max(detections) - started if detections else None,
        ran=ran,
        requests=sum(world.request_counts.values()) - tally["requests"],
        rate_limited=world.rate_limited_count - tally["rate_limited"],
        lag_p50=percentile(lags, 50),
        lag_p95=percentile(lags, 95),
        cpu_seconds=cpu - world.cpu_seconds,
        simulator_cpu_seconds=world.cpu_seconds,
        peak_rss_mb=_peak_rss_mb(),
        wall_seconds=wall,
        scenario=scenario.label,
        duplicates=_duplicates(world),
        other_requests=tally["requests"],
        other_rate_limited=tally["rate_limited"],
        errors=dict(errors),
        requests_by_route={route: count for route, count in routes.items() if count},
        **rest,
    )


# -- the rows ------------------------------------------------------------------------------


async def measure_importer(
    images: int, *, seed: int = 0, scenario: Scenario | None = None
) -> Measurement:
    """Run this importer with default settings on ``images`` entries; its row.

    Runs on a :class:`VirtualTimeLoop` (the importer hands no work to threads) or a
    :class:`BenchLoop`.
    """
    scenario = scenario or Scenario(seed=seed)
    loop = _virtual_loop(threads=False)
    jobs_before = _thread_jobs(loop)
    clock = LoopClock(epoch=EPOCH)
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    async with run_simulator(scenario.simulator_config(), clock) as sim:
        manifest = bench_manifest(sim.base_url, images)
        settings = scenario.settings(sim.base_url)
        started = clock.wall()
        # Probing the sources (HEAD, no API budget) while submitting is what `importer run`
        # does by default.
        report, tally = await _alongside_other_tool(
            scenario,
            sim.base_url,
            clock,
            lambda: run_import(
                manifest, settings, clock=clock, prober=SourceProber(clock), seed=scenario.seed
            ),
        )
        ran = clock.wall() - started
        world = sim.world
    cpu = _cpu_seconds() - cpu_before
    wall = time.perf_counter() - wall_before

    durations: list[float] = []
    detections: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    for result in report.images:
        image = world.images.get(result.image_id) if result.image_id is not None else None
        available_at = image.available_at if image is not None else None
        if result.outcome is not Outcome.AVAILABLE or result.finished_at is None:
            errors[result.outcome.value] += 1
        elif image is not None and available_at is not None:
            durations.append(available_at - image.created_at)
            detections.append(result.finished_at)
            lags.append(result.finished_at - available_at)
    limits = bounds(images, scenario)
    return _row(
        "importer",
        images,
        world,
        scenario,
        tally,
        detections=detections,
        lags=lags,
        errors=errors,
        started=started,
        ran=ran,
        cpu=cpu,
        wall=wall,
        capped=None,
        lower_bound=limits.detection_allowed,
        full_bound=limits.detection_full,
        ideal=limits.ideal,
        durations=durations,
        thread_jobs=_thread_jobs(loop) - jobs_before,
    )


async def measure_baseline(
    images: int,
    *,
    seed: int = 0,
    scenario: Scenario | None = None,
    max_requests: int = MAX_REQUESTS,
    strong: bool = False,
) -> Measurement:
    """Run a pydo baseline on ``images`` entries (the naive one, or ``strong``); its row.

    It is cancelled ``CUTOFF_FACTOR`` times the bound plus ``CUTOFF_SLACK`` after it started,
    or once the simulator has served ``max_requests`` requests. Runs on a
    :class:`BenchLoop`: each of pydo's requests hands work to a thread pool.
    """
    scenario = scenario or Scenario(seed=seed)
    loop = _virtual_loop(threads=True)
    jobs_before = _thread_jobs(loop)
    # pydo and azure-core are imported here, not at the top: the importer's row must not
    # carry their modules in its memory, and the test suite runs without them.
    from tests.perf.baseline import BaselineResult, NaiveImporter, open_client  # noqa: PLC0415
    from tests.perf.strong_baseline import StrongImporter  # noqa: PLC0415

    limits = bounds(images, scenario)
    clock = LoopClock(epoch=EPOCH)
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    async with run_simulator(scenario.simulator_config(), clock) as sim:
        manifest = bench_manifest(sim.base_url, images)
        world = sim.world
        started = clock.wall()
        capped: Capped | None = None
        client = open_client(TOKEN, sim.base_url)
        tool: NaiveImporter | StrongImporter
        if strong:
            per_minute, per_hour = request_limits(scenario.settings(sim.base_url))
            tool = StrongImporter(
                client,
                clock,
                run_tag="bench-run",
                per_minute=per_minute,
                per_hour=per_hour,
                enforce_https=False,
            )
        else:
            tool = NaiveImporter(client, clock, enforce_https=False)

        async def run() -> None:
            nonlocal capped

            async def guard_requests(scope: anyio.CancelScope) -> None:
                nonlocal capped
                while sum(world.request_counts.values()) < max_requests:
                    await clock.sleep(GUARD_INTERVAL)
                capped = "requests"
                scope.cancel()

            async with anyio.create_task_group() as group:
                cutoff_after = CUTOFF_FACTOR * limits.detection_allowed + CUTOFF_SLACK
                with anyio.move_on_after(cutoff_after) as cutoff:
                    group.start_soon(guard_requests, cutoff)
                    await tool.run(manifest.entries)
                if cutoff.cancelled_caught and capped is None:
                    capped = "time"
                group.cancel_scope.cancel()

        try:
            _, tally = await _alongside_other_tool(scenario, sim.base_url, clock, run)
        finally:
            await client.close()
        ran = clock.wall() - started
    cpu = _cpu_seconds() - cpu_before
    wall = time.perf_counter() - wall_before

    detections: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    results: dict[int, BaselineResult] = tool.results
    for result in results.values():
        image = world.images.get(result.image_id) if result.image_id is not None else None
        available_at = image.available_at if image is not None else None
        if result.detected_at is not None and available_at is not None:
            detections.append(result.detected_at)
            lags.append(result.detected_at - available_at)
        else:
            errors[
                result.error or ("unfinished" if not result.finished else str(result.status))
            ] += 1
    unfinished = any(not result.finished for result in results.values())
    return _row(
        "strong" if strong else "pydo",
        images,
        world,
        scenario,
        tally,
        detections=detections,
        lags=lags,
        errors=errors,
        started=started,
        ran=ran,
        cpu=cpu,
        wall=wall,
        capped=capped if unfinished else None,
        lower_bound=limits.detection_allowed,
        full_bound=limits.detection_full,
        ideal=limits.ideal,
        thread_jobs=_thread_jobs(loop) - jobs_before,
    )


async def measure_strong(
    images: int, *, seed: int = 0, scenario: Scenario | None = None, **options: Any
) -> Measurement:
    """Run the strong baseline on ``images`` entries; its row (see :func:`measure_baseline`)."""
    return await measure_baseline(images, seed=seed, scenario=scenario, strong=True, **options)


# -- the command ------------------------------------------------------------------------


def _scenario(args: argparse.Namespace, *, list_in_progress: bool = False) -> Scenario:
    return Scenario(
        seed=args.seed,
        weather=args.weather,
        list_in_progress=list_in_progress,
        head_latency=args.head_latency,
        reserve=args.reserve,
    )


def _run_row(args: argparse.Namespace) -> int:
    """In a child: measure one row and print it as one JSON object on stdout."""
    # Logs go to stderr as JSON lines, as an unattended run writes them (structlog would
    # print to stdout otherwise, where the result goes).
    configure_logging("json", secrets=[TOKEN], stream=sys.stderr, level=logging.INFO)
    options = {"loop_factory": BenchLoop}
    scenario = _scenario(args, list_in_progress=args.show_in_progress)
    measurement: Measurement
    if args.row == "importer":
        measurement = anyio.run(
            lambda: measure_importer(args.images, scenario=scenario), backend_options=options
        )
    else:
        measurement = anyio.run(
            lambda: measure_baseline(
                args.images,
                scenario=scenario,
                max_requests=args.max_requests,
                strong=args.row == "strong",
            ),
            backend_options=options,
        )
    json.dump(measurement.to_json(), sys.stdout)
    sys.stdout.write("\n")
    return 0


def _child(
    tool: str, images: int, scenario: Scenario, args: argparse.Namespace
) -> tuple[Measurement, float]:
    """Run one row in a child process; its measurement and the child's whole wall time."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--row", tool,
        "--images", str(images), "--seed", str(scenario.seed),
        "--head-latency", repr(scenario.head_latency), "--reserve", repr(scenario.reserve),
        "--max-requests", str(args.max_requests),
    ]  # fmt: skip
    if scenario.weather:
        command.append("--weather")
    if scenario.list_in_progress:
        command.append("--show-in-progress")
    print(f"running {tool} on {images} images ({scenario.label})...", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as log:
        began = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
        elapsed = time.perf_counter() - began
        if done.returncode != 0:
            log.seek(0)
            tail = log.read()[-4000:]
            raise SystemExit(f"the {tool} row failed (exit {done.returncode}):\n{tail}")
    return Measurement.from_json(json.loads(done.stdout.strip().splitlines()[-1])), elapsed


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@dataclass
class Group:
    """The bounds and the measured rows of one size and scenario."""

    bounds: Bounds
    rows: list[Measurement] = field(default_factory=list)
    #: Tool -> the child process's whole wall time (interpreter start and imports included).
    process_walls: dict[str, float] = field(default_factory=dict)


def format_table(groups: Sequence[Group]) -> str:
    """The groups as one text table, each size's bounds before its tools, with footnotes."""
    header = (
        "N", "scenario", "tool", "finished", "makespan s", "x bound", "x full", "x ideal",
        "req/image",
        "429s", "dupes", "lag p50 s", "lag p95 s", "CPU s", "CPU ms/img", "RSS MB", "wall s",
    )  # fmt: skip
    lines: list[tuple[str, ...]] = [header]
    for group in groups:
        b = group.bounds
        n = f"{b.images:,}"
        for name, value in (
            ("bound: creates only", b.creates_only),
            ("bound: +listings, allowed", b.detection_allowed),
            ("bound: +listings, full", b.detection_full),
            ("ideal: largest file first", b.ideal),
        ):
            lines.append(
                (n, b.scenario, name, "-", _number(value),
                 _number(value / b.detection_allowed, 2) if b.detection_allowed else "-",
                 _number(value / b.detection_full, 2) if b.detection_full else "-",
                 _number(value / b.ideal, 2) if b.ideal else "-",
                 "-", "-", "-", "-", "-", "-", "-", "-", "-")
            )  # fmt: skip
        for row in group.rows:
            finished = f"{row.available}/{row.images}" + (
                f" capped ({row.capped})" if row.capped else ""
            )
            if row.complete:
                makespan = _number(row.makespan)
                ratio, full = _number(row.makespan_ratio, 2), _number(row.full_ratio, 2)
                ideal = _number(row.ideal_ratio, 2)
            elif row.capped is not None:
                makespan = f"> {row.ran:,.0f}"
                ratio = f"> {row.ran / row.lower_bound:.2f}" if row.lower_bound else "-"
                full = f"> {row.ran / row.full_bound:.2f}" if row.full_bound else "-"
                ideal = f"> {row.ran / row.ideal:.2f}" if row.ideal else "-"
            else:
                makespan, ratio, full, ideal = "never", "-", "-", "-"
            per_image = 1000 * row.cpu_seconds / row.images if row.images else None
            lines.append(
                (n, row.scenario, row.tool, finished, makespan, ratio, full, ideal,
                 _number(row.requests_per_image, 2), f"{row.rate_limited:,}", str(row.duplicates),
                 _number(row.lag_p50, 1), _number(row.lag_p95, 1), _number(row.cpu_seconds, 1),
                 _number(per_image, 2), _number(row.peak_rss_mb, 0), _number(row.wall_seconds, 1))
            )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {0, *range(3, len(header))}
    text = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    text += [
        "",
        "makespan: simulated seconds from the start (sizing included) to the last image the",
        "  tool saw available; '> T': cut off at T s with images unfinished; 'never': some",
        "  entries ended failed.",
        "bound: creates only: every create at the fastest pace the allowed rate permits,",
        "  longest import first, no latency, no status checks.",
        f"bound: +listings: the same creates plus one listing page per {PER_PAGE} images,",
        "  the last after the last image is available: at the allowed rate ('x bound' is",
        "  relative to it) and at the token's full rate ('x full'), less another tool's share",
        "  in weather.",
        "ideal: largest file first: a perfect run ordered by file size, the most a tool can",
        "  know in advance (the bounds order by the actual import times, which vary by up to",
        "  30% between files of one size); not a bound, the mark for 'x ideal'.",
        "req/image, 429s: the tool's own requests (another tool's in weather are left out).",
        "dupes: images beyond one per entry still there at the end.",
        "lag: simulated seconds from the image turning available to the tool recording it.",
        "CPU: the child's CPU time during the run less the simulator's request handling; an",
        "  upper bound: aiohttp's server-side HTTP parsing is still charged to the tool.",
        "RSS: the child process's peak, simulator included (an upper bound).",
        "wall s: the run inside the child (interpreter start and imports excluded).",
    ]
    for group in groups:
        for row in group.rows:
            if row.errors:
                ended = ", ".join(f"{count} {why}" for why, count in sorted(row.errors.items()))
                text.append(f"{row.tool}, {row.images:,} ({row.scenario}): not available: {ended}")
    return "\n".join(text)


def _parameters(args: argparse.Namespace, sizes: Sequence[int]) -> dict[str, Any]:
    # Only the command needs psutil (an extra); the test suite imports this module without it.
    import psutil  # noqa: PLC0415

    return {
        "sizes": list(sizes),
        "tools": args.tools,
        "seed": args.seed,
        "weather": args.weather,
        "reserve": args.reserve,
        "head_latency": args.head_latency,
        "simulator": [asdict(s.simulator_config()) for s in _scenarios(args)],
        "cutoff_factor": CUTOFF_FACTOR,
        "cutoff_slack": CUTOFF_SLACK,
        "max_requests": args.max_requests,
        "naive_max": args.naive_max,
        "regions": list(REGIONS),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.weather:
        return [_scenario(args, list_in_progress=False), _scenario(args, list_in_progress=True)]
    return [_scenario(args, list_in_progress=args.show_in_progress)]


def _compare(args: argparse.Namespace, sizes: Sequence[int]) -> int:
    groups: list[Group] = []
    for images in sizes:
        for scenario in _scenarios(args):
            group = Group(bounds(images, scenario))
            for tool in args.tools:
                if tool == "pydo" and images > args.naive_max:
                    continue
                row, group.process_walls[tool] = _child(tool, images, scenario, args)
                group.rows.append(row)
            groups.append(group)
            print(format_table(groups[-1:]).split("\n\n")[0], file=sys.stderr, flush=True)
    print(format_table(groups))
    skipped = [n for n in sizes if n > args.naive_max and "pydo" in args.tools]
    if skipped:
        print(f"pydo (naive): skipped above {args.naive_max:,} images (--naive-max)")
    print(
        "child process wall s (interpreter start and imports included): "
        + "; ".join(
            f"{g.bounds.images:,} {g.bounds.scenario}: "
            + ", ".join(f"{tool} {seconds:.1f}" for tool, seconds in g.process_walls.items())
            for g in groups
        )
    )
    if args.json is not None:
        document = {
            "parameters": _parameters(args, sizes),
            "bounds": [asdict(g.bounds) for g in groups],
            "rows": [
                {**row.to_json(), "process_wall_seconds": g.process_walls[row.tool]}
                for g in groups
                for row in g.rows
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes are whole numbers of images, at least 1")
    return sizes


def _tools(text: str) -> list[str]:
    tools = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown or not tools:
        raise argparse.ArgumentTypeError(f"tools are {', '.join(TOOLS)}; got {text!r}")
    return tools


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--images", type=int, help="manifest entries (one size)")
    size.add_argument(
        "--sweep", action="store_true", help=f"every size of --sizes (default {SWEEP_SIZES})"
    )
    parser.add_argument("--sizes", type=_sizes, help="sizes for --sweep, e.g. 1000,3000")
    parser.add_argument(
        "--tools", type=_tools, default=list(TOOLS), help=f"rows to run (default {','.join(TOOLS)})"
    )
    parser.add_argument("--no-baseline", action="store_true", help="only the importer's row")
    parser.add_argument("--weather", action="store_true", help="faults and another tool")
    parser.add_argument(
        "--show-in-progress", action="store_true", help="listings show importing images"
    )
    parser.add_argument("--seed", type=int, default=0, help="simulator and jitter seed")
    parser.add_argument(
        "--reserve", type=float, default=RESERVE, help="the importer's reserve (and pace)"
    )
    parser.add_argument("--head-latency", type=float, default=HEAD_LATENCY, help="seconds per HEAD")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--max-requests", type=int, default=MAX_REQUESTS, help="stop a baseline after these"
    )
    parser.add_argument(
        "--naive-max", type=int, default=NAIVE_MAX, help="skip the naive row above this size"
    )
    parser.add_argument("--row", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 1:
        parser.error("--images must be at least 1")
    if args.sizes is not None and not args.sweep:
        parser.error("--sizes goes with --sweep")
    if not 0 <= args.reserve < 1:
        parser.error("--reserve is a fraction in [0, 1)")
    if args.no_baseline:
        args.tools = ["importer"]
    if args.row:
        return _run_row(args)
    sizes = [args.images] if args.images is not None else list(args.sizes or SWEEP_SIZES)
    return _compare(args, sizes)


if __name__ == "__main__":
    # Run as a script, this file's directory leads sys.path; the baselines are imported as
    # tests.perf.*, from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
