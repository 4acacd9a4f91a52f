"""Waiting for submitted images to finish importing.

An import takes minutes, and DigitalOcean says nothing until it is done, so an
image is first checked ``first_poll`` seconds after submission, then every
``poll_interval`` seconds with +/-20% jitter, so that many images submitted
together do not poll in lockstep. A transient error while polling is not the
image's failure: the next check tries again, up to the per-image timeout that the
pipeline puts around :meth:`StatusPoller.wait`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import structlog

from importer.api import Image
from importer.client import ImagesClient
from importer.clock import Clock
from importer.errors import RejectedError, TransientApiError

#: Called with each status seen, so the caller can record it.
StatusCallback = Callable[[Image], None]


class ImageVanishedError(RejectedError):
    """The image is gone (404): deleted by someone else while it imported."""


class StatusPoller:
    """Polls one image by id until it is ``available`` or has failed."""

    def __init__(
        self,
        client: ImagesClient,
        clock: Clock,
        *,
        first_poll: float,
        poll_interval: float,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._first_poll = first_poll
        self._interval = poll_interval
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log = structlog.get_logger("importer.poller")

    def _jittered(self, seconds: float) -> float:
        return seconds * self._rng.uniform(0.8, 1.2)

    async def wait(self, image_id: int, on_status: StatusCallback) -> Image:
        """The image once it is ``available`` or ``deleted``/``retired``."""
        await self._clock.sleep(self._jittered(self._first_poll))
        while True:
            try:
                image = await self._client.get(image_id)
            except TransientApiError as exc:
                self._log.warning("image.poll_failed", image_id=image_id, reason=str(exc))
            except RejectedError as exc:
                if exc.status == 404:
                    raise ImageVanishedError(
                        "the image no longer exists (404): it was deleted while importing",
                        status=404,
                        method=exc.method,
                        path=exc.path,
                    ) from None
                raise
            else:
                on_status(image)
                if image.is_available or image.has_failed:
                    return image
            await self._clock.sleep(self._jittered(self._interval))
