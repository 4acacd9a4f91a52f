"""Nightly rows: what a scheduled run costs when nothing changed, and when 1% of sources did.

    python -m tests.perf.nightly --images 10000 [--changed 0.01] [--seed S] [--json PATH]

The account first holds every entry's image, as after an earlier night (made directly in
the simulator, already available). Then two nights run, each with a fresh in-memory state
(a CronJob without a volume), against the benchmark's simulator (DigitalOcean's limits,
realistic minutes-long imports, in-progress images hidden from listings):

* ``unchanged``: nothing changed. Target: at most ``ceil(images / 200) + 10`` API
  requests (the set's listing, 200 a page), and no POST, PUT or DELETE.
* ``changed``: the content behind ``--changed`` of the URLs changed (a new ETag). Target:
  beyond the listing, the creates, renames and deletes the plan names, plus at most 0.3
  status requests per changed entry, and no 429.

Everything runs in this process on one virtual-time loop shared by the importer and the
simulator: hours of imports take seconds, and a run is the same every time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from importer.clock import LoopClock, VirtualTimeLoop
from importer.journal import MEMORY, Journal
from importer.logs import configure_logging
from importer.manifest import Manifest
from importer.pipeline import run_import
from importer.plan import RunPlan, make_plan
from importer.report import Outcome
from importer.settings import Settings, Token
from importer.simulator import Simulator, run_simulator
from importer.sources import SourceProber
from tests.perf.bench import EPOCH, TOKEN, bench_manifest, simulator_config

#: Status requests allowed per changed entry, beyond the set's listing.
STATUS_PER_CHANGED = 0.3
#: Requests allowed beyond the listing when nothing changed.
SLACK = 10
PAGE = 200
SET = "bench"


@dataclass
class NightRow:
    """One night's requests, by kind."""

    night: str
    images: int
    changed: int
    listing_pages: int
    requests: int
    creates: int
    renames: int
    deletes: int
    #: GETs beyond the set's listing: group listings and reads by id.
    status: int
    rate_limited: int
    #: What the plan said it would send (creates, renames, deletes).
    planned: dict[str, int]
    available: int
    makespan: float
    cpu_seconds: float
    wall_seconds: float
    by_route: dict[str, int] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        """The most requests the night may send (see the module's targets)."""
        if self.changed == 0:
            return self.listing_pages + SLACK
        planned = sum(self.planned.values())
        return self.listing_pages + planned + math.floor(STATUS_PER_CHANGED * self.changed)

    @property
    def meets_target(self) -> bool:
        writes = self.creates + self.renames + self.deletes
        if self.changed == 0:
            return self.requests <= self.budget and writes == 0
        return (
            self.rate_limited == 0
            and self.creates == self.planned["create"] + self.planned["replace"]
            and self.renames == self.planned["rename"]
            and self.deletes == self.planned["delete"]
            and self.status <= STATUS_PER_CHANGED * self.changed
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "budget": self.budget, "meets_target": self.meets_target}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def nightly_manifest(sim: Simulator, images: int) -> Manifest:
    base = bench_manifest(sim.base_url, images)
    return Manifest(version=1, entries=base.entries, source="<bench>", set=SET)


async def _seed_account(sim: Simulator, manifest: Manifest, clock: LoopClock) -> None:
    """Every entry's image, as an earlier night left it: created directly, then a day passes."""
    sources = await SourceProber(clock).probe_all(manifest.entries)
    for item in make_plan(manifest, sources=sources):
        sim.world.create_image(item.create_request().body())
    await anyio.sleep(24 * 3600)


async def _night(
    sim: Simulator, manifest: Manifest, clock: LoopClock, name: str, changed: int, seed: int
) -> NightRow:
    world = sim.world
    listed = sum(
        1
        for image in world.images.values()
        if f"importer-set:{SET}" in image.tags
        and not image.deleted_by_user
        and image.status == "available"
    )
    settings = Settings(token=Token(TOKEN), api_url=sim.base_url, state_path=None)
    plans: list[RunPlan] = []
    before = Counter(world.request_counts)
    limited_before = world.rate_limited_count
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    started = clock.wall()
    with Journal(MEMORY) as journal:
        report = await run_import(
            manifest,
            settings,
            clock=clock,
            journal=journal,
            prober=SourceProber(clock),
            on_plan=plans.append,
            seed=seed,
        )
    sent = Counter(world.request_counts) - before
    pages = max(1, math.ceil(listed / PAGE))
    counts = plans[0].counts()
    gets = sent["GET /v2/images"] + sent["GET /v2/images/{id}"]
    return NightRow(
        night=name,
        images=len(manifest.entries),
        changed=changed,
        listing_pages=pages,
        requests=sum(sent.values()),
        creates=sent["POST /v2/images"],
        renames=sent["PUT /v2/images/{id}"],
        deletes=sent["DELETE /v2/images/{id}"],
        status=gets - pages,
        rate_limited=world.rate_limited_count - limited_before,
        planned={key: counts[key] for key in ("create", "replace", "rename", "delete")},
        available=sum(r.outcome is Outcome.AVAILABLE for r in report.images),
        makespan=clock.wall() - started,
        cpu_seconds=_cpu_seconds() - cpu_before,
        wall_seconds=time.perf_counter() - wall_before,
        by_route=dict(sent),
    )


async def measure_nights(images: int, *, changed: float = 0.01, seed: int = 0) -> list[NightRow]:
    """The ``unchanged`` and ``changed`` nights over an account seeded with every image.

    ``changed`` 0 measures the ``unchanged`` night alone.
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        raise RuntimeError("measure_nights runs on a VirtualTimeLoop")
    clock = LoopClock(epoch=EPOCH)
    async with run_simulator(simulator_config(seed), clock) as sim:
        manifest = nightly_manifest(sim, images)
        await _seed_account(sim, manifest, clock)
        rows = [await _night(sim, manifest, clock, "unchanged", 0, seed)]
        if changed <= 0:
            return rows
        count = max(1, round(images * changed))
        step = images // count if count else 1
        for entry in manifest.entries[::step][:count]:
            sim.world.change_file(entry.url.rsplit("/", 1)[-1])
        await anyio.sleep(3600)
        rows.append(await _night(sim, manifest, clock, "changed", count, seed))
    return rows


def format_table(rows: list[NightRow]) -> str:
    lines = [
        "| night | entries | changed | requests (budget) | listing pages | creates | renames "
        "| deletes | status | 429s | simulated | CPU s | meets target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.night} | {row.images:,} | {row.changed:,} | {row.requests:,} "
            f"({row.budget:,}) | {row.listing_pages} | {row.creates} | {row.renames} "
            f"| {row.deletes} | {row.status} | {row.rate_limited} | {row.makespan:,.0f} s "
            f"| {row.cpu_seconds:.1f} | {'yes' if row.meets_target else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of sources changed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    configure_logging("json", secrets=[TOKEN], stream=sys.stderr, level=logging.WARNING)
    rows = anyio.run(
        lambda: measure_nights(args.images, changed=args.changed, seed=args.seed),
        backend_options={"loop_factory": VirtualTimeLoop},
    )
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([row.to_json() for row in rows], indent=2) + "\n")
    return 0 if all(row.meets_target for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
