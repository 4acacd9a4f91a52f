"""The run: submit every planned import under the governor, wait for each, report.

One task per image inside one task group. Each task turns its own failures into
an :class:`~importer.report.Outcome`; only bugs and cancellation escape it. Two
failures end the whole run instead, because nothing more can succeed after them:
a 401 (the token is refused) and an unreachable API. Then every other task is
cancelled, no request is sent after the 401, and the report is still written:
images already submitted are ``pending`` (with their ids), the rest
``not_submitted``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import aiohttp
import anyio
import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock, LoopClock
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RejectedError,
    TransientApiError,
    UncertainCreateError,
)
from importer.governor import Governor, Window
from importer.manifest import Manifest
from importer.plan import PlannedImport, make_plan
from importer.poller import StatusPoller
from importer.redact import redact_text
from importer.report import ImageResult, Outcome, Report
from importer.settings import Settings


@dataclass
class _Progress:
    """What is known of one entry so far (mutable: only the run touches it)."""

    result: ImageResult
    done: bool = False


class Importer:
    """Runs one plan against one API; :meth:`run` once, then :meth:`report`."""

    def __init__(
        self,
        plan: Sequence[PlannedImport],
        client: ImagesClient,
        poller: StatusPoller,
        clock: Clock,
        settings: Settings,
    ) -> None:
        self._plan = tuple(plan)
        self._client = client
        self._poller = poller
        self._clock = clock
        self._settings = settings
        self._log = structlog.get_logger("importer.pipeline")
        self._progress = {
            item.index: _Progress(
                ImageResult(
                    index=item.index,
                    name=item.entry.name,
                    region=item.entry.region,
                    tag=item.tag,
                    outcome=Outcome.NOT_SUBMITTED,
                )
            )
            for item in self._plan
        }
        self._scope: anyio.CancelScope | None = None
        self.stopped: str | None = None

    # -- running ------------------------------------------------------------------

    async def run(self) -> None:
        self._log.info("run.started", images=len(self._plan), api_url=self._settings.api_url)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._report_progress)
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as images:
                    for item in self._plan:
                        images.start_soon(self._import_one, item)
            outer.cancel_scope.cancel()
        self._finish_unfinished()
        counts = Counter(p.result.outcome.value for p in self._progress.values())
        self._log.info("run.finished", stopped=self.stopped, **counts)

    def stop(self, reason: str) -> None:
        """End the run early: no new request; unfinished images are reported as such."""
        if self.stopped is None:
            self.stopped = reason
            self._log.warning("run.stopping", reason=reason)
        if self._scope is not None:
            self._scope.cancel()

    async def _import_one(self, item: PlannedImport) -> None:
        log = self._log.bind(index=item.index, name=item.entry.name, region=item.entry.region)
        try:
            image = await self._submit(item, log)
            if image is None:
                return
            with anyio.move_on_after(self._settings.image_timeout):
                final = await self._poller.wait(image.id, lambda i: self._saw(item, i, log))
                self._finished_with(item, final, log)
                return
            self._finish(item, Outcome.TIMED_OUT, error="timed out waiting for the import")
            log.warning("image.timed_out", image_id=image.id, timeout=self._settings.image_timeout)
        except AuthenticationError as exc:
            self._fail_run(item, "authentication_failed", exc)
        except ApiUnreachableError as exc:
            self._fail_run(item, "api_unreachable", exc)
        except (RejectedError, TransientApiError) as exc:
            # Polling gave up on this image (e.g. it vanished): its own failure only.
            self._finish(item, Outcome.FAILED, error=_message(exc))
            log.warning("image.failed", error=_message(exc))

    async def _submit(self, item: PlannedImport, log: structlog.BoundLogger) -> Image | None:
        try:
            image = await self._client.create(item.create_request())
        except RejectedError as exc:
            self._finish(item, Outcome.REJECTED, error=_message(exc))
            log.warning("image.rejected", status=exc.status, error=_message(exc))
            return None
        except UncertainCreateError as exc:
            # The create may have worked. Never retry blindly: report what we know.
            self._finish(item, Outcome.FAILED, error=f"create outcome unknown: {_message(exc)}")
            log.error("image.uncertain", error=_message(exc))
            return None
        self._update(item, image_id=image.id, status=image.status, submitted_at=self._clock.wall())
        log.info("image.submitted", image_id=image.id, tag=item.tag)
        return image

    def _saw(self, item: PlannedImport, image: Image, log: structlog.BoundLogger) -> None:
        if self._progress[item.index].result.status != image.status:
            log.info("image.status", image_id=image.id, status=image.status)
        self._update(item, status=image.status)

    def _finished_with(self, item: PlannedImport, image: Image, log: structlog.BoundLogger) -> None:
        if image.is_available:
            self._finish(item, Outcome.AVAILABLE)
            log.info("image.available", image_id=image.id)
        else:
            error = redact_text(image.error_message) or f"the image turned {image.status}"
            self._finish(item, Outcome.FAILED, error=error)
            log.warning("image.failed", image_id=image.id, status=image.status, error=error)

    def _fail_run(self, item: PlannedImport, reason: str, exc: ApiError) -> None:
        self._log.error(f"run.{reason}", error=str(exc))
        self._update(item, error=_message(exc))
        self.stop(reason)

    # -- bookkeeping --------------------------------------------------------------

    def _update(self, item: PlannedImport, **changes: object) -> None:
        progress = self._progress[item.index]
        progress.result = replace(progress.result, **changes)  # type: ignore[arg-type]

    def _finish(self, item: PlannedImport, outcome: Outcome, *, error: str | None = None) -> None:
        progress = self._progress[item.index]
        progress.result = replace(
            progress.result, outcome=outcome, error=error, finished_at=self._clock.wall()
        )
        progress.done = True

    def _finish_unfinished(self) -> None:
        for progress in self._progress.values():
            if not progress.done and progress.result.image_id is not None:
                progress.result = replace(progress.result, outcome=Outcome.PENDING)

    async def _report_progress(self) -> None:
        while True:
            await self._clock.sleep(self._settings.progress_interval)
            counts = Counter(
                (
                    p.result.outcome.value
                    if p.done
                    else "importing"
                    if p.result.image_id is not None
                    else "queued"
                )
                for p in self._progress.values()
            )
            self._log.info("run.progress", total=len(self._progress), **counts)

    def results(self) -> tuple[ImageResult, ...]:
        return tuple(self._progress[item.index].result for item in self._plan)


async def run_import(
    manifest: Manifest,
    settings: Settings,
    *,
    clock: Clock | None = None,
    seed: int | None = None,
) -> Report:
    """Import every image of ``manifest``; the report says how each ended.

    Raises only for bugs and cancellation: every API failure becomes part of the
    report (``report.stopped`` says if the run ended early, and why).
    """
    clock = clock or LoopClock()
    rng = random.Random(seed)  # noqa: S311 - jitter, not cryptography
    governor = Governor(
        clock,
        concurrency=settings.concurrency,
        windows=(Window(settings.per_minute, 60.0), Window(settings.per_hour, 3600.0)),
    )
    started = clock.wall()
    connector = aiohttp.TCPConnector(limit=settings.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = ImagesClient(session, settings, governor, clock, rng=rng)
        poller = StatusPoller(
            client,
            clock,
            first_poll=settings.first_poll,
            poll_interval=settings.poll_interval,
            rng=rng,
        )
        importer = Importer(make_plan(manifest), client, poller, clock, settings)
        await importer.run()
    return Report(
        manifest=manifest.source,
        api_url=settings.api_url,
        started_at=started,
        finished_at=clock.wall(),
        images=importer.results(),
        requests=client.requests_sent,
        rate_limited=governor.rate_limited,
        stopped=importer.stopped,
        requests_by_endpoint=dict(client.sent),
    )


def _message(exc: ApiError) -> str:
    return redact_text(exc.api_message)
