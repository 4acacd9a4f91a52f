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

A request is counted when it goes out on the wire, and as often as it does: an
attempt whose connection never opened is no request, and a GET or DELETE that
aiohttp sends a second time on its own (when the connection breaks under it) is
two, in the counts and in the governor's budget alike.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar, overload

import aiohttp
import anyio
import structlog
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from importer.api import (
    Action,
    ActionEnvelope,
    CreateRequest,
    ErrorBody,
    Image,
    ImageEnvelope,
    ImageList,
    RateLimit,
)
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
from importer.settings import Settings

_USER_AGENT = "importer/0.1 (+bulk custom image importer)"
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ApiRequest:
    """One API call: what to send, whether it may be repeated, and who waits for it."""

    method: str
    path: str
    #: The route, for counts, logs and errors: ``/v2/images/{id}``, not the id.
    template: str
    params: Mapping[str, str] | None = None
    body: Mapping[str, Any] | None = None
    #: Safe to send again when its answer is lost: every request but a create.
    idempotent: bool = True
    priority: Priority = Priority.STATUS
    #: Runs right before each attempt leaves, once the governor has admitted it.
    on_send: Callable[[], None] | None = None
    #: Runs when an attempt was certainly not processed (a 429, a 401, nothing sent).
    on_not_sent: Callable[[], None] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.template}"

    @property
    def context(self) -> dict[str, Any]:
        """What an error says of the request that failed."""
        return {"method": self.method, "path": self.template}


class _NotSent(TransientApiError):
    """Nothing left (the connection never opened): safe to repeat, even a create."""


class _Garbled(TransientApiError):
    """An answer that is not what the API promises (not JSON, missing fields)."""


class _Sends:
    """How many times one attempt went out on the wire.

    aiohttp (3.10 and later) sends a GET or DELETE a second time, on its own, when
    the connection breaks under it (a dropped or reset connection; there is no
    public switch to turn this off), and the API counts each send against the
    budget. Its ``on_request_headers_sent`` trace fires for every send and for
    nothing else: a connection that never opened has sent nothing.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class _SendTracing(aiohttp.TraceConfig):
    """Tells each request's :class:`_Sends` when its headers leave, resends included."""

    def __init__(self) -> None:
        super().__init__()
        self.on_request_headers_sent.append(self._headers_sent)

    @staticmethod
    async def _headers_sent(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        sends = context.trace_request_ctx
        if isinstance(sends, _Sends):
            sends.count += 1


@dataclass
class _Call:
    """One call's failed attempts so far, by kind: what the retry policy decides on."""

    request: ApiRequest
    model: type[BaseModel] | None
    rate_limited: int = 0
    transient: int = 0

    def failed(self, exc: ApiError) -> None:
        if isinstance(exc, RateLimitedError):
            self.rate_limited += 1
        elif isinstance(exc, TransientApiError):
            self.transient += 1


class ImagesClient:
    """``create``, ``get``, ``list``, ``update`` and ``delete`` for custom images, and their
    ``transfer`` actions.

    Open one with :meth:`open`: its session must report every send (see :class:`_Sends`).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        governor: Governor,
        clock: Clock,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not any(isinstance(config, _SendTracing) for config in session.trace_configs):
            raise ValueError("the session does not count sends: use ImagesClient.open()")
        self._session = session
        self._settings = settings
        self._base = settings.api_url
        self._headers = {
            "Authorization": f"Bearer {settings.token.value}",
            "Content-Type": "application/json",
            "User-Agent": _USER_AGENT,
        }
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
        self._governor = governor
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._auth_error: AuthenticationError | None = None
        self._log = structlog.get_logger("importer.client")
        # 429s and 401s are never retried here, and a create never raises a
        # TransientApiError (its lost answers are UncertainCreateError): so the
        # exception's type alone says whether to try again.
        self._retrying = AsyncRetrying(
            sleep=clock.sleep,
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception_type((RateLimitedError, TransientApiError)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        #: Requests actually sent, by ``"METHOD /path-template"``.
        self.sent: Counter[str] = Counter()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        governor: Governor,
        clock: Clock,
        *,
        rng: random.Random | None = None,
    ) -> AsyncIterator[ImagesClient]:
        """A client on a session of its own (closed on exit), pooled to the concurrency."""
        connector = aiohttp.TCPConnector(limit=settings.concurrency)
        tracing: list[aiohttp.TraceConfig] = [_SendTracing()]
        async with aiohttp.ClientSession(connector=connector, trace_configs=tracing) as session:
            yield cls(session, settings, governor, clock, rng=rng)

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
        call = ApiRequest(
            "POST",
            "/v2/images",
            "/v2/images",
            body=request.body(),
            idempotent=False,
            priority=Priority.CREATE,
            on_send=on_send,
            on_not_sent=on_not_sent,
        )
        envelope: ImageEnvelope = await self._call(call, ImageEnvelope)
        return envelope.image

    async def get(self, image_id: int, *, priority: Priority = Priority.STATUS) -> Image:
        call = ApiRequest("GET", f"/v2/images/{image_id}", "/v2/images/{id}", priority=priority)
        envelope: ImageEnvelope = await self._call(call, ImageEnvelope)
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
            call = ApiRequest("GET", "/v2/images", "/v2/images", params=params, priority=priority)
            listing: ImageList = await self._call(call, ImageList)
            images.extend(listing.images)
            if not listing.images or len(images) >= listing.meta.total:
                return images
            page += 1

    async def delete(self, image_id: int, *, priority: Priority = Priority.STATUS) -> None:
        call = ApiRequest("DELETE", f"/v2/images/{image_id}", "/v2/images/{id}", priority=priority)
        await self._call(call, None)

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
        call = ApiRequest(
            "PUT", f"/v2/images/{image_id}", "/v2/images/{id}", body=body, priority=priority
        )
        envelope: ImageEnvelope = await self._call(call, ImageEnvelope)
        return envelope.image

    async def transfer(
        self,
        image_id: int,
        region: str,
        *,
        on_send: Callable[[], None] | None = None,
        on_not_sent: Callable[[], None] | None = None,
    ) -> Action:
        """``imageActions_post``: copy the image to ``region``; the answer's action is in progress.

        Not repeated blindly, as a create is not: an answer that is lost may have
        started the copy (:class:`UncertainCreateError`). ``on_send`` and
        ``on_not_sent`` are as for :meth:`create`.
        """
        call = ApiRequest(
            "POST",
            f"/v2/images/{image_id}/actions",
            "/v2/images/{id}/actions",
            body={"type": "transfer", "region": region},
            idempotent=False,
            priority=Priority.CREATE,
            on_send=on_send,
            on_not_sent=on_not_sent,
        )
        envelope: ActionEnvelope = await self._call(call, ActionEnvelope)
        return envelope.action

    async def action(self, action_id: int, *, priority: Priority = Priority.STATUS) -> Action:
        """``actions_get``: one action's status."""
        call = ApiRequest("GET", f"/v2/actions/{action_id}", "/v2/actions/{id}", priority=priority)
        envelope: ActionEnvelope = await self._call(call, ActionEnvelope)
        return envelope.action

    # -- plumbing -----------------------------------------------------------------

    async def _call(self, request: ApiRequest, model: type[BaseModel] | None) -> Any:
        """The answer to ``request``, sent as often as the retry policy allows."""
        # A copy per call, as tenacity's own decorator does: the policy object
        # holds the progress of the call it runs.
        retrying = self._retrying.copy()
        try:
            return await retrying(self._attempt, _Call(request, model))
        except _NotSent as exc:
            raise ApiUnreachableError(exc.api_message, **request.context) from None

    async def _attempt(self, call: _Call) -> Any:
        request = call.request
        try:
            return await self._send_once(request, call.model)
        except ApiError as exc:
            call.failed(exc)
            refused = isinstance(exc, RateLimitedError | AuthenticationError | _NotSent)
            if refused and request.on_not_sent is not None:
                # Refused or never delivered: certainly not processed.
                request.on_not_sent()
            raise

    async def _send_once(self, request: ApiRequest, model: type[BaseModel] | None) -> Any:
        async with self._governor.slot(request.priority):
            # Checked after the wait too: a 401 may have arrived while we queued.
            if self._auth_error is not None:
                raise self._auth_error
            status, raw, rate = await self._exchange(request)
            self._governor.observe(status, rate)
        try:
            return interpret(
                model, status, raw, idempotent=request.idempotent, context=request.context
            )
        except AuthenticationError as exc:
            self._auth_error = exc
            raise

    async def _exchange(self, request: ApiRequest) -> tuple[int, bytes, RateLimit]:
        """Send once (aiohttp may send twice, see :class:`_Sends`) and read the answer."""
        sends = _Sends()
        try:
            # A create that has left must be allowed to finish, so that a stop
            # (cancellation) never turns a known answer into an unknown one.
            with anyio.CancelScope(shield=not request.idempotent):
                if request.on_send is not None:
                    request.on_send()
                async with self._session.request(
                    request.method,
                    self._base + request.path,
                    params=request.params,
                    json=request.body,
                    headers=self._headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                    trace_request_ctx=sends,
                ) as response:
                    raw = await response.read()
                    answer = response.status, raw, RateLimit.from_headers(response.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if sends.count == 0:
                raise _NotSent(f"cannot connect: {_describe(exc)}", **request.context) from None
            message = f"no answer: {_describe(exc)}"
            if request.idempotent:
                raise TransientApiError(message, **request.context) from None
            raise UncertainCreateError(message, **request.context) from None
        finally:
            self._count(request, sends.count)
        return answer

    def _count(self, request: ApiRequest, sends: int) -> None:
        """Count what went out; the governor admitted one send, the API counts each."""
        if sends:
            self.sent[request.endpoint] += sends
        for _ in range(sends - 1):
            self._governor.charge(self._clock.monotonic())

    # -- the retry policy (one per client; a call's progress is in its _Call) -------

    def _stop(self, state: RetryCallState) -> bool:
        call = _call_of(state)
        if isinstance(_exception(state), RateLimitedError):
            return call.rate_limited > self._settings.max_rate_limited
        return call.transient >= self._settings.max_attempts

    def _wait(self, state: RetryCallState) -> float:
        if isinstance(_exception(state), RateLimitedError):
            return 0.0  # the governor already holds every request until the pause ends
        cap = self._settings.backoff_initial * 2 ** (_call_of(state).transient - 1)
        return self._rng.uniform(0, min(self._settings.backoff_max, cap))

    def _log_retry(self, state: RetryCallState) -> None:
        request = _call_of(state).request
        self._log.warning(
            "request.retry",
            method=request.method,
            path=request.template,
            attempt=state.attempt_number,
            wait=round(state.upcoming_sleep, 3),
            reason=str(_exception(state)),
        )


@overload
def interpret(
    model: type[M], status: int, raw: bytes, *, idempotent: bool, context: Mapping[str, Any]
) -> M: ...


@overload
def interpret(
    model: None, status: int, raw: bytes, *, idempotent: bool, context: Mapping[str, Any]
) -> None: ...


def interpret(
    model: type[M] | None,
    status: int,
    raw: bytes,
    *,
    idempotent: bool,
    context: Mapping[str, Any],
) -> M | None:
    """What one answer means: its body as ``model``, or the :class:`ApiError` it is (raised).

    ``idempotent`` says whether the request may be repeated: when it may not (a
    create), an answer that does not say what happened is an
    :class:`UncertainCreateError` rather than a transient error. ``context``
    (``method``, ``path``) goes into the error.
    """
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
        raise AuthenticationError(message, **details)
    if status == 429:
        raise RateLimitedError(message, **details)
    if status >= 500:
        if idempotent:
            raise TransientApiError(message, **details)
        raise UncertainCreateError(message, **details)
    raise RejectedError(message, **details)


def _call_of(state: RetryCallState) -> _Call:
    call = state.args[0]
    assert isinstance(call, _Call)
    return call


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


__all__ = ["ApiError", "ApiRequest", "CreateRequest", "ImagesClient", "interpret"]
