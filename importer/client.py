"""An asyncio client for DigitalOcean's image endpoints, governed and retried.

Every request goes through the :class:`~importer.governor.Governor` and reads
the rate-limit headers of its answer. Failures are sorted into the error
hierarchy of :mod:`importer.errors`:

* 401 -> :class:`AuthenticationError`; the client then refuses to send anything more.
* 429 -> retried after the pause the API asked for (the request was not processed).
* 5xx, a dropped connection, a timeout, a malformed answer -> retried with
  exponential backoff and full jitter, **but only for requests that are safe to
  repeat**. A create whose outcome is unknown raises :class:`UncertainCreateError`
  instead: retrying it blindly is how duplicate images are made.
* any other 4xx -> :class:`RejectedError`, not retried.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import anyio
import structlog
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from importer.api import ErrorBody, Image, ImageEnvelope, ImageList, RateLimit
from importer.catalog import PER_PAGE_MAX
from importer.clock import Clock
from importer.errors import (
    ApiError,
    ApiUnreachableError,
    AuthenticationError,
    RateLimitedError,
    RejectedError,
    TransientApiError,
    UncertainCreateError,
)
from importer.governor import Governor, Priority
from importer.redact import redact_text
from importer.settings import Settings, Token

_USER_AGENT = "importer/0.1 (+bulk custom image importer)"
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class CreateRequest:
    """The body of ``images_create_custom``."""

    name: str
    url: str
    region: str
    distribution: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "url": self.url, "region": self.region}
        if self.distribution:
            body["distribution"] = self.distribution
        if self.description:
            body["description"] = self.description
        if self.tags:
            body["tags"] = list(self.tags)
        return body


class _NotSent(TransientApiError):
    """The connection failed before the request left: safe to repeat, even a create."""


class _Garbled(TransientApiError):
    """An answer that is not what the API promises (not JSON, missing fields)."""


class ImagesClient:
    """``create``, ``get``, ``list`` and ``delete`` for custom images."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        governor: Governor,
        clock: Clock,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._base = settings.api_url
        self._token: Token = settings.token
        self._governor = governor
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._auth_error: AuthenticationError | None = None
        self._log = structlog.get_logger("importer.client")
        #: Requests actually sent, by ``"METHOD /path-template"``.
        self.sent: Counter[str] = Counter()

    @property
    def requests_sent(self) -> int:
        return sum(self.sent.values())

    # -- operations ---------------------------------------------------------------

    async def create(
        self,
        request: CreateRequest,
        *,
        on_send: Callable[[], None] | None = None,
        on_not_sent: Callable[[], None] | None = None,
    ) -> Image:
        """Submit one import; the answer's image has status ``NEW``.

        ``on_send`` runs right before each attempt leaves, once the governor has
        admitted it: the moment from which the image may exist. ``on_not_sent``
        runs when an attempt was certainly not processed (a 429, a 401, or a
        connection that never opened).
        """
        envelope: ImageEnvelope = await self._call(
            ImageEnvelope,
            "POST",
            "/v2/images",
            template="/v2/images",
            body=request.body(),
            idempotent=False,
            on_send=on_send,
            on_not_sent=on_not_sent,
            priority=Priority.CREATE,
        )
        return envelope.image

    async def get(self, image_id: int, *, priority: Priority = Priority.STATUS) -> Image:
        path = f"/v2/images/{image_id}"
        envelope: ImageEnvelope = await self._call(
            ImageEnvelope, "GET", path, template="/v2/images/{id}", priority=priority
        )
        return envelope.image

    async def list(
        self,
        *,
        tag_name: str | None = None,
        per_page: int = PER_PAGE_MAX,
        priority: Priority = Priority.STATUS,
    ) -> list[Image]:
        """Every private image (with ``tag_name``, if given), all pages.

        Pages are counted here rather than followed through the answer's
        ``links``: a link is the server's word, and the token must go nowhere else.
        """
        images: list[Image] = []
        page = 1
        while True:
            params = {"private": "true", "per_page": str(per_page), "page": str(page)}
            if tag_name:
                params["tag_name"] = tag_name
            listing: ImageList = await self._call(
                ImageList,
                "GET",
                "/v2/images",
                template="/v2/images",
                params=params,
                priority=priority,
            )
            images.extend(listing.images)
            if not listing.images or len(images) >= listing.meta.total:
                return images
            page += 1

    async def delete(self, image_id: int, *, priority: Priority = Priority.STATUS) -> None:
        path = f"/v2/images/{image_id}"
        await self._call(None, "DELETE", path, template="/v2/images/{id}", priority=priority)

    async def update(
        self,
        image_id: int,
        *,
        name: str | None = None,
        description: str | None = None,
        distribution: str | None = None,
        priority: Priority = Priority.STATUS,
    ) -> Image:
        """``images_update``: set the given fields (``None`` leaves one as it is).

        A PUT of fixed values is idempotent, so it is retried like a GET.
        """
        given = {"name": name, "description": description, "distribution": distribution}
        body = {key: value for key, value in given.items() if value is not None}
        if not body:
            raise ValueError("update needs at least one of name, description, distribution")
        path = f"/v2/images/{image_id}"
        envelope: ImageEnvelope = await self._call(
            ImageEnvelope, "PUT", path, template="/v2/images/{id}", body=body, priority=priority
        )
        return envelope.image

    # -- plumbing -----------------------------------------------------------------

    async def _call(
        self,
        model: type[M] | None,
        method: str,
        path: str,
        *,
        template: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        on_send: Callable[[], None] | None = None,
        on_not_sent: Callable[[], None] | None = None,
        priority: Priority = Priority.STATUS,
    ) -> Any:
        tally: Counter[str] = Counter()

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, RateLimitedError | _NotSent):
                return True
            return idempotent and isinstance(exc, TransientApiError)

        def stop(state: RetryCallState) -> bool:
            exc = _exception(state)
            if isinstance(exc, RateLimitedError):
                tally["429"] += 1
                return tally["429"] > self._settings.max_rate_limited
            tally["transient"] += 1
            return tally["transient"] >= self._settings.max_attempts

        def wait(state: RetryCallState) -> float:
            if isinstance(_exception(state), RateLimitedError):
                return 0.0  # the governor already holds every request until the pause ends
            cap = self._settings.backoff_initial * 2 ** (tally["transient"] - 1)
            return self._rng.uniform(0, min(self._settings.backoff_max, cap))

        def before_sleep(state: RetryCallState) -> None:
            exc = _exception(state)
            self._log.warning(
                "request.retry",
                method=method,
                path=template,
                attempt=state.attempt_number,
                wait=round(state.upcoming_sleep, 3),
                reason=str(exc),
            )

        retrying = AsyncRetrying(
            sleep=self._clock.sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_exception(retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        return await self._send_once(
                            model,
                            method,
                            path,
                            template,
                            params,
                            body,
                            idempotent,
                            on_send,
                            priority,
                        )
                    except (RateLimitedError, AuthenticationError, _NotSent):
                        # Refused or never delivered: certainly not processed.
                        if on_not_sent is not None:
                            on_not_sent()
                        raise
        except _NotSent as exc:
            raise ApiUnreachableError(exc.api_message, method=method, path=template) from None
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _send_once(
        self,
        model: type[M] | None,
        method: str,
        path: str,
        template: str,
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        idempotent: bool,
        on_send: Callable[[], None] | None,
        priority: Priority,
    ) -> Any:
        context: dict[str, Any] = {"method": method, "path": template}
        async with self._governor.slot(priority):
            # Checked after the wait too: a 401 may have arrived while we queued.
            if self._auth_error is not None:
                raise self._auth_error
            headers = {
                "Authorization": f"Bearer {self._token.value}",
                "Content-Type": "application/json",
                "User-Agent": _USER_AGENT,
            }
            timeout = aiohttp.ClientTimeout(total=self._settings.request_timeout)
            try:
                # A create that has left must be allowed to finish, so that a stop
                # (cancellation) never turns a known answer into an unknown one.
                with anyio.CancelScope(shield=not idempotent):
                    if on_send is not None:
                        on_send()
                    self.sent[f"{method} {template}"] += 1
                    async with self._session.request(
                        method,
                        self._base + path,
                        params=params,
                        json=body,
                        headers=headers,
                        timeout=timeout,
                        allow_redirects=False,
                    ) as response:
                        status = response.status
                        raw = await response.read()
                        rate = RateLimit.from_headers(response.headers)
            except aiohttp.ClientConnectorError as exc:
                raise _NotSent(f"cannot connect: {_describe(exc)}", **context) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                message = f"no answer: {_describe(exc)}"
                if idempotent:
                    raise TransientApiError(message, **context) from None
                raise UncertainCreateError(message, **context) from None
            self._governor.observe(status, rate)
        return self._interpret(model, status, raw, idempotent, context)

    def _interpret(
        self,
        model: type[M] | None,
        status: int,
        raw: bytes,
        idempotent: bool,
        context: dict[str, Any],
    ) -> Any:
        if 200 <= status < 300:
            if model is None:
                return None
            try:
                return model.model_validate_json(raw)
            except ValidationError as exc:
                message = f"answer {status} has an unexpected body ({exc.error_count()} problems)"
                if idempotent:
                    raise _Garbled(message, status=status, **context) from None
                # The create may have worked; only its answer is unreadable.
                raise UncertainCreateError(message, status=status, **context) from None
        error = _error_body(raw)
        message = redact_text(error.message if error else _snippet(raw))
        details: dict[str, Any] = {
            "status": status,
            "error_id": error.id if error else None,
            "request_id": error.request_id if error else None,
            **context,
        }
        if status == 401:
            self._auth_error = AuthenticationError(message, **details)
            raise self._auth_error
        if status == 429:
            raise RateLimitedError(message, **details)
        if status >= 500:
            if idempotent:
                raise TransientApiError(message, **details)
            raise UncertainCreateError(message, **details)
        raise RejectedError(message, **details)


def _exception(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


def _error_body(raw: bytes) -> ErrorBody | None:
    try:
        return ErrorBody.model_validate_json(raw)
    except ValidationError:
        return None


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("<"):
        return "an HTML page instead of a JSON error (a proxy in front of the API?)"
    return (text[:limit] + "...") if len(text) > limit else (text or "an empty body")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return redact_text(text)


__all__ = ["ApiError", "CreateRequest", "ImagesClient"]
