"""What each entry's source file is now: its size and its version, one request per file.

The image host is asked once per entry, concurrently (bounded), with ``HEAD``. Hosts that
refuse ``HEAD`` (405, 403, 501: presigned URLs signed for ``GET`` answer 403) get a
one-byte ranged ``GET`` instead (``Range: bytes=0-0``), whose ``Content-Range: bytes
0-0/<size>`` tells the size; its body is never read beyond that byte. No request goes to
the API and no token is sent: the image host is not DigitalOcean.

The version (:class:`~importer.identity.Version`) is, in this order:

1. the entry's ``checksum``;
2. the digest listed for the file's name in the entry's ``checksums_url``, a
   ``SHA256SUMS``-style file fetched once per distinct URL (lines ``<hex>  <file>``,
   ``<hex> *<file>``, or ``SHA256 (<file>) = <hex>``). A file that cannot be read, or has no
   line for the file, gives that entry an error and no version; the other entries go on;
3. the answer's ``ETag``;
4. its ``Last-Modified`` with the file's size;
5. the URL without its query string (presigned URLs change their query every run).

A source that cannot be probed (no answer, 404, 5xx) has an error and, unless a checksum
decided, no version: an ETag missing for one night must not look like a new version.
Every request has a deadline on the injected clock; nothing here retries: a probe is one
request, and the caller decides what an error means.

Results are produced as they arrive (:meth:`SourceProber.probe` sends each to a memory
object stream; :meth:`SourceProber.stream` wraps that), so that submitting imports can
start before the last file has answered.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

import aiohttp
import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from importer.clock import Clock
from importer.identity import Version
from importer.manifest import Entry
from importer.redact import redact_text, redact_url

#: Maps a manifest URL to the URL to ask (the simulator's file host, under ``--simulate``).
UrlRewrite = Callable[[str], str]

#: Answers to ``HEAD`` that mean "this host does not do HEAD": try a ranged GET.
HEAD_REFUSED: Final = frozenset({403, 405, 501})
#: A checksums file larger than this is refused (Ubuntu's are a few kB).
MAX_CHECKSUMS_BYTES: Final = 8 * 2**20

_USER_AGENT: Final = "importer/0.1 (+bulk custom image importer; source probe)"
_GNU_LINE: Final = re.compile(r"^\\?([0-9a-fA-F]{64}) [ *](.+)$")
_BSD_LINE: Final = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")
_CONTENT_RANGE: Final = re.compile(r"^bytes\s+(?:\d+-\d+|\*)/(\d+|\*)$", re.IGNORECASE)

T = TypeVar("T")


@dataclass(frozen=True)
class SourceInfo:
    """What was learned about one entry's source.

    ``version`` and ``error`` are independent: a checksum gives a version even when the
    host does not answer (the version is right; the file may not be importable now), and
    an entry whose checksums file fails has an error and no version, its size still known.
    """

    entry: Entry
    #: Bytes, when the host said.
    size: int | None
    #: ``None`` when it could not be learned (see ``error``).
    version: Version | None
    #: Why the source could not be probed or versioned, for people (URLs redacted).
    error: str | None = None

    @property
    def index(self) -> int:
        return self.entry.index


class _ChecksumsError(Exception):
    """A checksums file that cannot be used; the message names it (redacted) and says why."""


@dataclass(frozen=True)
class _Answer:
    """The parts of the host's answer that matter: size and version headers."""

    size: int | None
    etag: str | None
    last_modified: str | None
    method: str


class _ProbeFailed(Exception):
    pass


class SourceProber:
    """Probes sources: sizes and versions, concurrently, one request per file.

    ``timeout`` bounds each request (and the reading of a checksums file) on ``clock``.
    ``rewrite`` changes the URL asked, never the URL the version is computed from.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        concurrency: int = 16,
        timeout: float = 10.0,
        rewrite: UrlRewrite | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._clock = clock
        self._concurrency = concurrency
        self._timeout = timeout
        self._rewrite = rewrite
        self._log = structlog.get_logger("importer.sources")

    async def probe(
        self, entries: Sequence[Entry], send: MemoryObjectSendStream[SourceInfo]
    ) -> None:
        """Probe every entry and send each :class:`SourceInfo` as it is known; then close ``send``.

        Start it in the caller's task group and read the other end of the stream, or use
        :meth:`stream` or :meth:`probe_all`. Closing the other end is no error: probing
        stops when the next result finds no reader (cancel the task group to stop at once).
        """
        sums = _ChecksumsCache(self._fetch_checksums)
        # Identity: a host compressing on the fly would announce the compressed length.
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        # A few workers take the entries in turn: a task per entry, waiting its turn, would
        # hold some kilobytes each for 50,000 entries at once.
        todo = iter(entries)
        async with send, aiohttp.ClientSession(headers=headers) as session:

            async def worker() -> None:
                for entry in todo:
                    info = await self._probe_one(session, sums, entry)
                    try:
                        await send.send(info)
                    except anyio.BrokenResourceError:
                        tg.cancel_scope.cancel()  # nobody reads the results any more
                        return

            async with anyio.create_task_group() as tg:
                for _ in range(min(self._concurrency, len(entries))):
                    tg.start_soon(worker)

    @asynccontextmanager
    async def stream(
        self, entries: Sequence[Entry]
    ) -> AsyncIterator[MemoryObjectReceiveStream[SourceInfo]]:
        """``async with prober.stream(entries) as results: async for info in results: ...``.

        Leaving the block early stops the probes still running.
        """
        send, receive = anyio.create_memory_object_stream[SourceInfo](math.inf)
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(self.probe, entries, send)
            yield receive
            tg.cancel_scope.cancel()

    async def probe_all(self, entries: Sequence[Entry]) -> dict[int, SourceInfo]:
        """Every entry's :class:`SourceInfo`, by entry index, once all have answered."""
        results: dict[int, SourceInfo] = {}
        async with self.stream(entries) as infos:
            async for info in infos:
                results[info.index] = info
        return results

    # -- one entry -----------------------------------------------------------------

    async def _probe_one(
        self, session: aiohttp.ClientSession, sums: _ChecksumsCache, entry: Entry
    ) -> SourceInfo:
        shown = redact_url(entry.url)
        version: Version | None = None
        problem: str | None = None
        if entry.checksum is not None:
            version = Version.from_checksum(entry.checksum)
        elif entry.checksums_url is not None:
            try:
                digests = await sums.get(session, entry.checksums_url)
                version = Version.from_checksum(
                    _digest_for(digests, entry.url, entry.checksums_url), "checksums_url"
                )
            except _ChecksumsError as exc:
                problem = str(exc)
        answer: _Answer | None = None
        try:
            answer = await self._ask(session, entry.url)
        except _ProbeFailed as exc:
            problem = f"{problem}; and {exc}" if problem else str(exc)
        if answer is not None and version is None and problem is None:
            version = _version_from(answer, entry.url)
        size = None if answer is None else answer.size
        if problem is not None or version is None:
            self._log.warning(
                "source.failed",
                index=entry.index,
                name=entry.name,
                url=shown,
                error=problem,
                version=None if version is None else version.label,
            )
            return SourceInfo(entry, size=size, version=version, error=problem)
        self._log.info(
            "source.probed",
            index=entry.index,
            name=entry.name,
            url=shown,
            method=None if answer is None else answer.method,
            size=size,
            version=version.label,
            version_source=version.source,
        )
        return SourceInfo(entry, size=size, version=version)

    async def _ask(self, session: aiohttp.ClientSession, url: str) -> _Answer:
        """``HEAD``, or a one-byte ranged ``GET`` when the host refuses ``HEAD``."""
        target = self._rewrite(url) if self._rewrite else url
        shown = redact_url(url)
        status = await self._deadline(lambda: self._head(session, target), f"HEAD {shown}")
        if isinstance(status, _Answer):
            return status
        if status not in HEAD_REFUSED:
            raise _ProbeFailed(
                f"the image host answered HEAD {shown} with {status}; {_advice(status)}"
            )
        answer = await self._deadline(lambda: self._ranged_get(session, target), f"GET {shown}")
        if isinstance(answer, _Answer):
            return answer
        raise _ProbeFailed(
            f"the image host refused HEAD {shown} ({status}) and answered a ranged GET with "
            f"{answer}; {_advice(answer)}"
        )

    async def _head(self, session: aiohttp.ClientSession, url: str) -> _Answer | int:
        async with session.head(url, allow_redirects=True) as response:
            if response.status != 200:
                return response.status
            return _answer(response.headers, _length(response.headers), "HEAD")

    async def _ranged_get(self, session: aiohttp.ClientSession, url: str) -> _Answer | int:
        headers = {"Range": "bytes=0-0"}
        # Leaving the block without reading the body closes the connection: a host that
        # ignores the range and sends the whole file sends no more than a few kB.
        async with session.get(url, headers=headers, allow_redirects=True) as response:
            if response.status == 206:
                return _answer(response.headers, _total(response.headers), "GET")
            if response.status == 200:
                return _answer(response.headers, _length(response.headers), "GET")
            if response.status == 416:  # an empty file: "bytes */0"
                return _answer(response.headers, _total(response.headers), "GET")
            return response.status

    # -- checksums files -----------------------------------------------------------

    async def _fetch_checksums(
        self, session: aiohttp.ClientSession, url: str
    ) -> Mapping[str, frozenset[str]]:
        target = self._rewrite(url) if self._rewrite else url
        shown = redact_url(url)

        async def fetch() -> bytes | int:
            async with session.get(target, allow_redirects=True) as response:
                if response.status != 200:
                    return response.status
                length = response.content_length
                if length is not None and length > MAX_CHECKSUMS_BYTES:
                    return -1
                raw = await response.content.read(MAX_CHECKSUMS_BYTES + 1)
                return -1 if len(raw) > MAX_CHECKSUMS_BYTES else raw

        try:
            raw = await self._deadline(fetch, f"GET {shown}")
        except _ProbeFailed as exc:
            raise _ChecksumsError(f"cannot read checksums_url: {exc}") from None
        if raw == -1:
            raise _ChecksumsError(
                f"checksums_url {shown} is larger than {MAX_CHECKSUMS_BYTES // 2**20} MiB; "
                "is it a SHA256SUMS file?"
            )
        if isinstance(raw, int):
            raise _ChecksumsError(
                f"cannot read checksums_url {shown}: the host answered {raw}; {_advice(raw)}"
            )
        digests = parse_checksums(raw.decode("utf-8", "replace"))
        if not digests:
            raise _ChecksumsError(
                f"checksums_url {shown} lists no SHA-256 digest (expected lines like "
                "'<64 hex digits>  <file name>'); is it a SHA256SUMS file?"
            )
        return digests

    # -- deadlines -----------------------------------------------------------------

    async def _deadline(self, work: Callable[[], Awaitable[T]], what: str) -> T:
        """``work``'s result, or :class:`_ProbeFailed` after ``timeout`` on the clock.

        The deadline is a race with ``clock.sleep`` so that it runs on the injected clock
        (anyio's own deadlines read the event loop's time, not a Clock).
        """
        outcome: list[T] = []
        failure: list[BaseException] = []

        async with anyio.create_task_group() as tg:

            async def run() -> None:
                try:
                    outcome.append(await work())
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    failure.append(exc)
                tg.cancel_scope.cancel()

            async def alarm() -> None:
                await self._clock.sleep(self._timeout)
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            tg.start_soon(alarm)
        if outcome:
            return outcome[0]
        if failure:
            reason = redact_text(str(failure[0]) or type(failure[0]).__name__)
            raise _ProbeFailed(f"{what} failed: {reason}; check the URL and the host")
        raise _ProbeFailed(f"{what} got no answer within {self._timeout:g} s")


class _ChecksumsCache:
    """Each checksums file is fetched once, however many entries name it, even concurrently."""

    def __init__(
        self,
        fetch: Callable[[aiohttp.ClientSession, str], Awaitable[Mapping[str, frozenset[str]]]],
    ) -> None:
        self._fetch = fetch
        self._locks: dict[str, anyio.Lock] = {}
        self._done: dict[str, Mapping[str, frozenset[str]] | _ChecksumsError] = {}

    async def get(self, session: aiohttp.ClientSession, url: str) -> Mapping[str, frozenset[str]]:
        lock = self._locks.setdefault(url, anyio.Lock())
        async with lock:
            if url not in self._done:
                try:
                    self._done[url] = await self._fetch(session, url)
                except _ChecksumsError as exc:
                    self._done[url] = exc
        result = self._done[url]
        if isinstance(result, _ChecksumsError):
            raise _ChecksumsError(str(result))
        return result


def parse_checksums(text: str) -> dict[str, frozenset[str]]:
    """File name -> the lowercase hex digests listed for it, from ``SHA256SUMS`` text.

    Reads GNU lines (``<hex>  <file>``, ``<hex> *<file>`` for binary mode) and BSD/``--tag``
    lines (``SHA256 (<file>) = <hex>``); anything else (comments, other algorithms, blank
    lines) is skipped. A leading ``./`` is dropped from names.
    """
    digests: dict[str, set[str]] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip("\r\n\t ")
        gnu = _GNU_LINE.match(line)
        bsd = _BSD_LINE.match(line) if gnu is None else None
        if gnu is not None:
            digest, name = gnu.group(1), gnu.group(2)
        elif bsd is not None:
            name, digest = bsd.group(1), bsd.group(2)
        else:
            continue
        digests.setdefault(name.removeprefix("./"), set()).add(digest.lower())
    return {name: frozenset(found) for name, found in digests.items()}


def _digest_for(digests: Mapping[str, frozenset[str]], url: str, sums_url: str) -> str:
    """The one digest listed for ``url``'s file name, or :class:`_ChecksumsError`.

    A name is matched exactly first, then by its last path segment (a list made in a parent
    directory names ``sub/dir/file``).
    """
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    found = digests.get(filename)
    if found is None:
        found = frozenset().union(
            *(values for name, values in digests.items() if name.rsplit("/", 1)[-1] == filename)
        )
    shown = redact_url(sums_url)
    if not found:
        raise _ChecksumsError(
            f"checksums_url {shown} has no line for {filename!r}; add it there, or give the "
            "entry its own 'checksum'"
        )
    if len(found) > 1:
        raise _ChecksumsError(
            f"checksums_url {shown} lists {len(found)} different digests for {filename!r}; "
            "give the entry its own 'checksum'"
        )
    return next(iter(found))


def _version_from(answer: _Answer, url: str) -> Version:
    if answer.etag:
        return Version.from_etag(answer.etag)
    if answer.last_modified:
        return Version.from_last_modified(answer.last_modified, answer.size)
    return Version.from_url(url)


def _answer(headers: Mapping[str, str], size: int | None, method: str) -> _Answer:
    return _Answer(
        size=size,
        etag=headers.get("ETag") or None,
        last_modified=headers.get("Last-Modified") or None,
        method=method,
    )


def _length(headers: Mapping[str, str]) -> int | None:
    length = headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


def _total(headers: Mapping[str, str]) -> int | None:
    match = _CONTENT_RANGE.match(headers.get("Content-Range", "").strip())
    if match is None or match.group(1) == "*":
        return None
    return int(match.group(1))


def _advice(status: int) -> str:
    if status in (401, 403):
        return "DigitalOcean must be able to fetch the file without credentials"
    if status == 404:
        return "check the URL"
    if status >= 500:
        return "the host failed; a later run asks again"
    return "check the URL and the host"
