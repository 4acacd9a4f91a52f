"""The wire format of DigitalOcean's image endpoints, as the client reads it.

Parsing is lenient where the API is known to drift (status casing, extra
fields) and strict where the importer depends on a value (``id``, ``status``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from importer.catalog import STATUSES
from importer.manifest import Entry


@dataclass(frozen=True)
class CreateRequest:
    """The body of ``images_create_custom``."""

    name: str
    url: str
    region: str
    distribution: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def from_entry(cls, entry: Entry, extra_tags: tuple[str, ...] = ()) -> CreateRequest:
        """The create for a manifest entry, carrying ``extra_tags`` after the entry's own."""
        tags = (*(tag for tag in entry.tags if tag not in extra_tags), *extra_tags)
        return cls(
            name=entry.name,
            url=entry.url,
            region=entry.region,
            distribution=entry.distribution,
            description=entry.description,
            tags=tags,
        )

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "url": self.url, "region": self.region}
        if self.distribution:
            body["distribution"] = self.distribution
        if self.description:
            body["description"] = self.description
        if self.tags:
            body["tags"] = list(self.tags)
        return body


class Image(BaseModel):
    """An image as ``images_get``/``images_list``/``images_create_custom`` return it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: int
    name: str = ""
    status: str
    error_message: str = ""
    regions: tuple[str, ...] = ()
    tags: tuple[str, ...] | None = ()
    created_at: str | None = None
    distribution: str | None = None

    @field_validator("status")
    @classmethod
    def _canonical_status(cls, value: str) -> str:
        # The API changed the casing of NEW once; compare case-insensitively and
        # keep one canonical spelling inside the importer.
        for known in STATUSES:
            if value.casefold() == known.casefold():
                return known
        return value

    @property
    def is_available(self) -> bool:
        return self.status == "available"

    @property
    def has_failed(self) -> bool:
        return self.status in ("deleted", "retired")


class ImageEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    image: Image


class Meta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    total: int = 0


class ImageList(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    images: tuple[Image, ...]
    meta: Meta = Field(default_factory=Meta)


class Action(BaseModel):
    """An image action as ``imageActions_post`` and ``actions_get`` return it (a transfer)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: int
    #: ``in-progress``, ``completed`` or ``errored``.
    status: str
    type: str | None = None
    region_slug: str | None = None
    resource_id: int | None = None

    @field_validator("status")
    @classmethod
    def _lower_status(cls, value: str) -> str:
        # Compared without regard to case, as image statuses are.
        return value.casefold()

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def errored(self) -> bool:
        return self.status == "errored"


class ActionEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    action: Action


class ErrorBody(BaseModel):
    """``{"id": ..., "message": ..., "request_id": ...}``."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    id: str
    message: str
    request_id: str | None = None


@dataclass(frozen=True)
class RateLimit:
    """What one response said about the token's budget."""

    limit: int | None
    remaining: int | None
    #: Unix time when the oldest counted request expires.
    reset: float | None
    #: Seconds to wait, on a burst 429.
    retry_after: float | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit:
        return cls(
            limit=_int(headers.get("ratelimit-limit")),
            remaining=_int(headers.get("ratelimit-remaining")),
            reset=_float(headers.get("ratelimit-reset")),
            retry_after=_float(headers.get("retry-after")),
        )


def _float(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    # NaN and infinities are garbage, not budgets.
    return value if math.isfinite(value) else None


def _int(raw: str | None) -> int | None:
    value = _float(raw)
    return int(value) if value is not None else None
