"""The naive baseline: DigitalOcean's official Python client, pydo, used the obvious way.

Every entry is created at once (one task each, ``images.create_custom``), then each created
image is polled with ``images.get`` every 10 s until it is ``available`` or ``deleted``.
pydo's retry policy is left as shipped (azure-core's: GETs are retried on 408/429/5xx, POSTs
on 500/503/504 or when the answer carries ``Retry-After``, three status retries at most);
whatever pydo raises after that ends the entry as failed, as it would in a script that does
no error handling of its own. The point is to measure what the obvious script costs the
token's budget, not to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from azure.core.exceptions import HttpResponseError
from pydo.aio import Client

from importer.clock import Clock
from importer.manifest import Entry

#: Seconds between two status checks of one image (Terraform's provider polls about as often).
POLL_INTERVAL = 10.0
FINAL_STATUSES = frozenset({"available", "deleted"})


@dataclass
class BaselineResult:
    """What the naive tool knows of one entry; filled in as it goes, so a cut-off run keeps it."""

    index: int
    image_id: int | None = None
    status: str | None = None
    #: Clock wall time at which a status check first answered ``available``.
    detected_at: float | None = None
    #: Why the entry ended without an image: the exception type (and HTTP status) pydo
    #: raised, and whether on its create or on a status check.
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.status in FINAL_STATUSES


def open_client(token: str, endpoint: str) -> Client:
    """pydo's async client pointed at ``endpoint``, with its default retry policy."""
    return Client(token=token, endpoint=endpoint)


class NaiveImporter:
    """Creates everything at once, then polls each image on a fixed interval."""

    def __init__(
        self,
        client: Client,
        clock: Clock,
        *,
        poll_interval: float = POLL_INTERVAL,
        enforce_https: bool = True,
    ) -> None:
        self._client = client
        self._clock = clock
        self._poll_interval = poll_interval
        # azure-core refuses a bearer token over plain http unless each call says otherwise;
        # the simulator serves plain http on loopback.
        self._call_options: dict[str, Any] = {} if enforce_https else {"enforce_https": False}
        #: Entry index -> what is known of it.
        self.results: dict[int, BaselineResult] = {}

    async def run(self, entries: Sequence[Entry]) -> None:
        """Import every entry; returns when each is available, deleted or failed."""
        for entry in entries:
            self.results[entry.index] = BaselineResult(entry.index)
        async with anyio.create_task_group() as group:
            for entry in entries:
                group.start_soon(self._import_one, entry)

    async def _import_one(self, entry: Entry) -> None:
        result = self.results[entry.index]
        try:
            created = await self._client.images.create_custom(
                body=_create_body(entry), **self._call_options
            )
            image = created["image"]
            result.image_id = int(image["id"])
            result.status = str(image["status"])
            # pydo's generated signature types the id as a JSON object; it is the numeric id.
            image_id: Any = result.image_id
            while result.status not in FINAL_STATUSES:
                await self._clock.sleep(self._poll_interval)
                answer = await self._client.images.get(image_id=image_id, **self._call_options)
                # pydo answers a 404 with its error body instead of raising.
                if "image" not in answer:
                    result.error = f"not found: {answer.get('id')}"
                    return
                result.status = str(answer["image"]["status"])
            if result.status == "available":
                result.detected_at = self._clock.wall()
        except Exception as exc:  # a naive script has no other error handling
            # After a failed poll the image lives on, importing, and nobody watches it.
            during = "create" if result.image_id is None else "poll"
            result.error = f"{_error_name(exc)} on {during}"


def _create_body(entry: Entry) -> dict[str, Any]:
    body: dict[str, Any] = {"name": entry.name, "url": entry.url, "region": entry.region}
    if entry.distribution is not None:
        body["distribution"] = entry.distribution
    if entry.description is not None:
        body["description"] = entry.description
    if entry.tags:
        body["tags"] = list(entry.tags)
    return body


def _error_name(exc: Exception) -> str:
    """``HttpResponseError 429``: the type, and the HTTP status when there was an answer."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        return f"{type(exc).__name__} {exc.status_code}"
    return type(exc).__name__
