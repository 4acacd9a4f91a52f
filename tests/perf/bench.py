"""The benchmark: this importer against the naive pydo baseline and the lower bound.

    python tests/perf/bench.py --images N [--json PATH] [--seed S] [--no-baseline]

Every row runs on the same simulator settings, with DigitalOcean's real limits (250
requests a minute, 5,000 an hour) and minutes-long imports that grow with file size:

* ``importer``: :func:`importer.pipeline.run_import` with default settings, sizing the
  files first as ``importer run`` does;
* ``pydo``: the official client used the obvious way (:mod:`tests.perf.baseline`), cut off
  at ``CUTOFF_FACTOR`` times the lower bound, or after ``max_requests`` requests;
* ``lower bound``: when every image could be available at the earliest, given each image's
  actual import time and the request limits (:func:`lower_bound`).

Each tool's row runs in a child process of its own (``--row importer|baseline``, printing
one JSON object), so that its CPU time and peak RSS are its own. Inside the child the
simulator and the tool share one virtual-time loop (:class:`BenchLoop`) and one
:class:`~importer.clock.LoopClock`, so hours of imports take seconds, every simulated time
is exact, and a run is the same every time. The building blocks (:func:`measure_importer`,
:func:`measure_baseline`, :func:`lower_bound`) can also be called in-process, on a
virtual-time loop.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, TypeVarTuple

import anyio

from importer.clock import LoopClock, VirtualTimeLoop
from importer.governor import SlidingLog, Window
from importer.logs import configure_logging
from importer.manifest import Entry, Manifest
from importer.pipeline import run_import
from importer.report import Outcome
from importer.settings import Settings, Token
from importer.simulator import Simulator, SimulatorConfig, World, run_simulator
from importer.sizing import HeadSizer

#: Where simulated wall time starts (2026-09-21T14:13:20Z): fixed, so runs are reproducible.
EPOCH = 1_790_000_000.0
PER_MINUTE = 250
PER_HOUR = 5000
#: The simulator accepts any token; each token has its own budget, and each row its own world.
TOKEN = "bench-token-not-a-secret"
REGIONS = ("nyc3", "ams3", "fra1", "sfo3", "sgp1")
#: The baseline is stopped at this multiple of the lower bound...
CUTOFF_FACTOR = 3.0
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


# -- building blocks ------------------------------------------------------------------


def simulator_config(seed: int = 0) -> SimulatorConfig:
    """The simulated DigitalOcean every row runs against."""
    return SimulatorConfig.realistic(seed=seed, per_minute=PER_MINUTE, per_hour=PER_HOUR)


def bench_manifest(sim: Simulator, images: int) -> Manifest:
    """``images`` entries ``bench-00000``... whose files live on the simulator's file host.

    The simulator derives each file's size, and so each import's duration, from the file
    name and the seed: the same entry takes as long for every tool.
    """
    entries = tuple(
        Entry(
            index=i,
            name=f"bench-{i:05d}",
            url=sim.file_url(f"bench-{i:05d}.qcow2"),
            region=REGIONS[i % len(REGIONS)],
            distribution="Ubuntu",
            description=None,
            tags=("bench",),
        )
        for i in range(images)
    )
    return Manifest(version=1, entries=entries, source="<bench>")


def lower_bound(durations: Sequence[float], per_minute: int, per_hour: int) -> float:
    """The earliest moment every image could be available, in seconds from the start.

    Creates leave at the fastest pace both sliding windows allow (no latency, no status
    checks), longest import first: the send times do not depend on the order, and giving
    the earliest slots to the longest imports minimises the latest finish (an exchange
    argument). Nothing can finish earlier, so no tool can either.
    """
    logs = [SlidingLog(Window(per_minute, 60.0)), SlidingLog(Window(per_hour, 3600.0))]
    now = 0.0
    latest = 0.0
    for duration in sorted(durations, reverse=True):
        # Waiting for one window can leave the other full: wait until both have room.
        # (At least one step up: a wait below the float spacing at `now` would never end.)
        while (wait := max(log.wait_time(now) for log in logs)) > 0:
            now = max(now + wait, math.nextafter(now, math.inf))
        for log in logs:
            log.record(now)
        latest = max(latest, now + duration)
    return latest


def request_limits(settings: Settings) -> tuple[int, int]:
    """The per-minute and per-hour budgets the importer allows itself (less the reserve)."""
    return settings.effective_per_minute, settings.effective_per_hour


def planned_durations(world: World, manifest: Manifest) -> list[float]:
    """Each entry's import duration as the simulator will make it (for successful imports).

    The same as ``available_at - created_at`` of the images a run makes: the simulator
    decides an import's fate from the seed, the URL's path and the name alone.
    """
    durations = []
    for entry in manifest.entries:
        ready = world.plan_import(entry.name, entry.url).ready_after
        if ready is not None:
            durations.append(ready)
    return durations


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
    #: The lower bound this row is compared with.
    lower_bound: float | None
    #: How long the run lasted (to its end, or to the cutoff).
    ran: float
    #: ``/v2`` requests the simulator received, 429s included.
    requests: int
    #: 429 answers the simulator sent.
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            complete=self.complete,
            requests_per_image=self.requests_per_image,
            makespan_ratio=self.makespan_ratio,
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


async def measure_importer(images: int, *, seed: int = 0) -> Measurement:
    """Run this importer with default settings on ``images`` entries; its row.

    Runs on a :class:`VirtualTimeLoop` (the importer hands no work to threads) or a
    :class:`BenchLoop`.
    """
    loop = _virtual_loop(threads=False)
    jobs_before = _thread_jobs(loop)
    clock = LoopClock(epoch=EPOCH)
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    async with run_simulator(simulator_config(seed), clock) as sim:
        manifest = bench_manifest(sim, images)
        settings = Settings(token=Token(TOKEN), api_url=sim.base_url, state_path=None)
        started = clock.wall()
        # Sizing the files first (HEAD, no API budget) is what `importer run` does by default.
        report = await run_import(manifest, settings, clock=clock, sizer=HeadSizer(), seed=seed)
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
    return _row(
        "importer",
        images,
        world,
        detections=detections,
        lags=lags,
        errors=errors,
        started=started,
        ran=ran,
        cpu=cpu,
        wall=wall,
        capped=None,
        lower_bound=lower_bound(durations, *request_limits(settings)) if durations else None,
        durations=durations,
        thread_jobs=_thread_jobs(loop) - jobs_before,
    )


def _row(
    tool: str,
    images: int,
    world: World,
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
    return Measurement(
        tool=tool,
        images=images,
        available=len(detections),
        makespan=max(detections) - started if detections else None,
        ran=ran,
        requests=sum(world.request_counts.values()),
        rate_limited=world.rate_limited_count,
        lag_p50=percentile(lags, 50),
        lag_p95=percentile(lags, 95),
        cpu_seconds=cpu - world.cpu_seconds,
        simulator_cpu_seconds=world.cpu_seconds,
        peak_rss_mb=_peak_rss_mb(),
        wall_seconds=wall,
        errors=dict(errors),
        requests_by_route=dict(world.request_counts),
        **rest,
    )


async def measure_baseline(
    images: int,
    *,
    seed: int = 0,
    bound: float | None = None,
    max_requests: int = MAX_REQUESTS,
) -> Measurement:
    """Run the naive pydo baseline on ``images`` entries; its row.

    It is cancelled ``CUTOFF_FACTOR * bound`` simulated seconds after it started, or once
    the simulator has served ``max_requests`` requests. ``bound`` is the lower bound from
    the importer's run; without it, it is computed from the simulator's planned durations
    (which are the same) and the default settings' limits. Runs on a :class:`BenchLoop`:
    each of pydo's requests hands work to a thread pool.
    """
    loop = _virtual_loop(threads=True)
    jobs_before = _thread_jobs(loop)
    # pydo and azure-core are imported here, not at the top: the importer's row must not
    # carry their modules in its memory, and the test suite runs without them.
    from tests.perf.baseline import NaiveImporter, open_client  # noqa: PLC0415

    clock = LoopClock(epoch=EPOCH)
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    async with run_simulator(simulator_config(seed), clock) as sim:
        manifest = bench_manifest(sim, images)
        world = sim.world
        if bound is None:
            limits = request_limits(Settings(token=Token(TOKEN), api_url=sim.base_url))
            bound = lower_bound(planned_durations(world, manifest), *limits)
        started = clock.wall()
        capped: Capped | None = None
        client = open_client(TOKEN, sim.base_url)
        try:
            naive = NaiveImporter(client, clock, enforce_https=False)

            async def guard_requests(scope: anyio.CancelScope) -> None:
                nonlocal capped
                while sum(world.request_counts.values()) < max_requests:
                    await clock.sleep(GUARD_INTERVAL)
                capped = "requests"
                scope.cancel()

            async with anyio.create_task_group() as group:
                with anyio.move_on_after(CUTOFF_FACTOR * bound) as cutoff:
                    group.start_soon(guard_requests, cutoff)
                    await naive.run(manifest.entries)
                if cutoff.cancelled_caught and capped is None:
                    capped = "time"
                group.cancel_scope.cancel()
        finally:
            await client.close()
        ran = clock.wall() - started
    cpu = _cpu_seconds() - cpu_before
    wall = time.perf_counter() - wall_before

    detections: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    for result in naive.results.values():
        image = world.images.get(result.image_id) if result.image_id is not None else None
        available_at = image.available_at if image is not None else None
        if result.detected_at is not None and available_at is not None:
            detections.append(result.detected_at)
            lags.append(result.detected_at - available_at)
        else:
            errors[
                result.error or ("unfinished" if not result.finished else str(result.status))
            ] += 1
    unfinished = any(not result.finished for result in naive.results.values())
    return _row(
        "pydo",
        images,
        world,
        detections=detections,
        lags=lags,
        errors=errors,
        started=started,
        ran=ran,
        cpu=cpu,
        wall=wall,
        capped=capped if unfinished else None,
        lower_bound=bound,
        thread_jobs=_thread_jobs(loop) - jobs_before,
    )


# -- the command ------------------------------------------------------------------------


def _run_row(args: argparse.Namespace) -> int:
    """In a child: measure one row and print it as one JSON object on stdout."""
    # Logs go to stderr as JSON lines, as an unattended run writes them (structlog would
    # print to stdout otherwise, where the result goes).
    configure_logging("json", secrets=[TOKEN], stream=sys.stderr, level=logging.INFO)
    options = {"loop_factory": BenchLoop}
    measurement: Measurement
    if args.row == "importer":
        measurement = anyio.run(
            lambda: measure_importer(args.images, seed=args.seed), backend_options=options
        )
    else:
        measurement = anyio.run(
            lambda: measure_baseline(
                args.images, seed=args.seed, bound=args.bound, max_requests=args.max_requests
            ),
            backend_options=options,
        )
    json.dump(measurement.to_json(), sys.stdout)
    sys.stdout.write("\n")
    return 0


def _child(row: str, args: argparse.Namespace, *extra: str) -> tuple[Measurement, float]:
    """Run one row in a child process; its measurement and the child's whole wall time."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--row", row,
        "--images", str(args.images), "--seed", str(args.seed), *extra,
    ]  # fmt: skip
    print(f"running the {row} row ({args.images} images)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as log:
        began = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
        elapsed = time.perf_counter() - began
        if done.returncode != 0:
            log.seek(0)
            tail = log.read()[-4000:]
            raise SystemExit(f"the {row} row failed (exit {done.returncode}):\n{tail}")
    return Measurement.from_json(json.loads(done.stdout.strip().splitlines()[-1])), elapsed


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(rows: Sequence[Measurement], bound: float | None) -> str:
    """The rows as a text table, the lower bound first, with footnotes."""
    header = (
        "tool", "images", "finished", "makespan s", "x bound", "req/image", "429s",
        "lag p50 s", "lag p95 s", "tool CPU s", "peak RSS MB", "wall s",
    )  # fmt: skip
    lines: list[tuple[str, ...]] = [header]
    if bound is not None and rows:
        images = rows[0].images
        lines.append(
            ("lower bound", str(images), f"{images}/{images}", _number(bound), "1.00",
             "1.00", "0", "0", "0", "-", "-", "-")
        )  # fmt: skip
    for row in rows:
        finished = f"{row.available}/{row.images}" + (
            f" capped ({row.capped})" if row.capped else ""
        )
        if row.complete:
            makespan, ratio = _number(row.makespan), _number(row.makespan_ratio, 2)
        elif row.capped is not None:
            makespan = f"> {row.ran:,.0f}"
            ratio = f"> {row.ran / row.lower_bound:.2f}" if row.lower_bound else "-"
        else:
            makespan, ratio = "never", "-"
        lines.append(
            (row.tool, str(row.images), finished, makespan, ratio,
             _number(row.requests_per_image, 2), str(row.rate_limited),
             _number(row.lag_p50, 1), _number(row.lag_p95, 1), _number(row.cpu_seconds, 2),
             _number(row.peak_rss_mb, 0), _number(row.wall_seconds, 1))
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    text += [
        "",
        "makespan: simulated seconds from the start to the last image the tool saw available;",
        "  '> T': cut off at T s with images unfinished; 'never': some entries ended failed.",
        "lower bound: longest import first, creates at the fastest pace both rate windows",
        "  allow, no latency, no status checks; 1.00 request per image.",
        "lag: simulated seconds from the image turning available to the tool recording it.",
        "tool CPU: the child's CPU time during the run less the simulator's request handling;",
        "  an upper bound: aiohttp's server-side HTTP parsing is still charged to the tool.",
        "peak RSS: the child process's, simulator included (an upper bound).",
        "wall s: the run inside the child (interpreter start and imports excluded).",
    ]
    for row in rows:
        if row.errors:
            ended = ", ".join(f"{count} {why}" for why, count in sorted(row.errors.items()))
            text.append(f"{row.tool}: entries not available: {ended}")
    return "\n".join(text)


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    # Only the command needs psutil (an extra); the test suite imports this module without it.
    import psutil  # noqa: PLC0415

    return {
        "images": args.images,
        "seed": args.seed,
        "simulator": asdict(simulator_config(args.seed)),
        "cutoff_factor": CUTOFF_FACTOR,
        "max_requests": args.max_requests,
        "regions": list(REGIONS),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _compare(args: argparse.Namespace) -> int:
    rows: list[Measurement] = []
    walls: dict[str, float] = {}
    importer, walls["importer"] = _child("importer", args)
    rows.append(importer)
    bound = importer.lower_bound
    if not args.no_baseline:
        extra = ["--max-requests", str(args.max_requests)]
        if bound is not None:
            extra += ["--bound", repr(bound)]
        baseline, walls["pydo"] = _child("baseline", args, *extra)
        rows.append(baseline)
    print(format_table(rows, bound))
    print(
        "child process wall s (with interpreter start and imports): "
        + ", ".join(f"{tool} {seconds:.1f}" for tool, seconds in walls.items())
    )
    if args.json is not None:
        document = {
            "parameters": _parameters(args),
            "lower_bound": bound,
            "rows": [{**row.to_json(), "process_wall_seconds": walls[row.tool]} for row in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--images", type=int, required=True, help="manifest entries")
    parser.add_argument("--seed", type=int, default=0, help="simulator and jitter seed")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--no-baseline", action="store_true", help="skip the pydo row")
    parser.add_argument(
        "--max-requests", type=int, default=MAX_REQUESTS, help="stop the baseline after these"
    )
    parser.add_argument("--row", choices=("importer", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--bound", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    return _run_row(args) if args.row else _compare(args)


if __name__ == "__main__":
    # Run as a script, this file's directory leads sys.path; the baseline is imported as
    # tests.perf.baseline, from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
