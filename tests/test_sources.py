"""Probing sources: size and version per entry, one request per file, results as they come."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from importer.clock import LoopClock
from importer.identity import Version
from importer.manifest import Entry
from importer.simulator import Simulator, SimulatorConfig, run_simulator
from importer.simulator.world import GIB, MIB
from importer.sources import SourceInfo, SourceProber, parse_checksums

pytestmark = pytest.mark.anyio

DIGEST = "0f" * 32
OTHER = "1e" * 32


def entry(index: int, url: str, **fields: Any) -> Entry:
    return Entry(index, f"img-{index}", url, "nyc3", None, None, (), **fields)


@asynccontextmanager
async def simulator() -> AsyncIterator[Simulator]:
    async with run_simulator(SimulatorConfig.demo(), LoopClock(epoch=1_700_000_000.0)) as sim:
        yield sim


def prober(**options: Any) -> SourceProber:
    return SourceProber(LoopClock(), **options)


# -- a scripted image host -----------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Host:
    """An image host whose answers each test writes, counting what it is asked."""

    base_url: str = ""
    routes: dict[str, Handler] = field(default_factory=dict)
    asked: Counter[str] = field(default_factory=Counter)
    ranges: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked[f"{request.method} {request.path}"] += 1
        if request.method == "GET":
            self.ranges.append(request.headers.get("Range"))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            handler = self.routes.get(request.path[1:])
            if handler is None:
                return web.Response(status=404)
            return await handler(request)
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def host() -> AsyncIterator[Host]:
    script = Host()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address, port = runner.addresses[0][:2]
    script.base_url = f"http://{address}:{port}"
    try:
        yield script
    finally:
        await runner.cleanup()


def answer(status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"") -> Handler:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers or {}, body=body or None)

    return reply


def head_refused(head_status: int, get: Handler) -> Handler:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(status=head_status)
        return await get(request)

    return reply


def delayed(seconds: float, then: Handler) -> Handler:
    async def reply(request: web.Request) -> web.StreamResponse:
        await anyio.sleep(seconds)
        return await then(request)

    return reply


# -- the simulator's file host ------------------------------------------------------


async def test_head_gives_size_and_etag_version() -> None:
    """A HEAD-able file: size from Content-Length, version from the ETag."""
    async with simulator() as sim:
        url = sim.file_url("web-size-3G.qcow2")
        info = (await prober().probe_all([entry(0, url)]))[0]
        expected = sim.world.file_version("web-size-3G.qcow2")
    assert info == SourceInfo(entry(0, url), size=3 * GIB, version=Version.from_etag(expected.etag))
    assert info.version is not None
    assert info.version.source == "etag"


async def test_a_file_refusing_head_gets_the_same_answer_by_ranged_get() -> None:
    """HEAD refused (405): a one-byte ranged GET gives the same size and version as HEAD did."""
    async with simulator() as sim:
        url = sim.file_url("presigned-size-2G.raw")
        with_head = (await prober().probe_all([entry(0, url)]))[0]
        sim.world.set_file_head("presigned-size-2G.raw", answers=False)
        with capture_logs() as logs:
            without = (await prober().probe_all([entry(0, url)]))[0]
    assert without == with_head
    assert without.size == 2 * GIB
    assert [log["method"] for log in logs if log["event"] == "source.probed"] == ["GET"]


async def test_a_changed_file_has_a_new_version() -> None:
    """After the file's content changes, the probe sees another version (and the new size)."""
    async with simulator() as sim:
        url = sim.file_url("nightly.qcow2")
        before = (await prober().probe_all([entry(0, url)]))[0]
        sim.world.change_file("nightly.qcow2", size=5 * MIB)
        after = (await prober().probe_all([entry(0, url)]))[0]
    assert before.version is not None
    assert after.version is not None
    assert after.version.value != before.version.value
    assert after.size == 5 * MIB


async def test_rewrite_changes_the_url_asked_not_the_version() -> None:
    """Under --simulate the file host is asked; a URL-based version still names the real URL."""
    async with simulator() as sim:
        real = "https://images.example.com/dir/disk-size-1G.qcow2?sig=s"
        rewritten = prober(rewrite=lambda url: sim.file_url(url.split("?")[0].rsplit("/")[-1]))
        info = (await rewritten.probe_all([entry(0, real)]))[0]
    assert info.size == GIB
    assert info.error is None


async def test_checksums_from_the_simulator_file_host() -> None:
    """A SHA256SUMS served by the simulator gives each listed file its digest."""
    async with simulator() as sim:
        sim.world.define_checksums("SHA256SUMS", ["a.qcow2", "b.qcow2"])
        sums = sim.file_url("SHA256SUMS")
        entries = [
            entry(0, sim.file_url("a.qcow2"), checksums_url=sums),
            entry(1, sim.file_url("b.qcow2"), checksums_url=sums),
        ]
        infos = await prober().probe_all(entries)
        digests = [sim.world.file_version(n).sha256 for n in ("a.qcow2", "b.qcow2")]
    assert [infos[i].version for i in (0, 1)] == [
        Version.from_checksum(d, "checksums_url") for d in digests
    ]


# -- the order of versions ------------------------------------------------------------


async def test_checksum_wins_over_everything() -> None:
    """An entry's checksum decides even when a checksums_url and an ETag are there too."""
    async with host() as files:
        files.routes["a.qcow2"] = answer(headers={"ETag": '"e"', "Content-Length": "10"})
        files.routes["SHA256SUMS"] = answer(body=f"{OTHER}  a.qcow2\n".encode())
        item = entry(
            0, files.url("a.qcow2"), checksum=f"sha256:{DIGEST}", checksums_url=files.url("SUMS")
        )
        info = (await prober().probe_all([item]))[0]
    assert info.version == Version.from_checksum(DIGEST)
    assert info.size == 10
    assert files.asked == Counter({"HEAD /a.qcow2": 1})


async def test_last_modified_with_length_then_the_url() -> None:
    """No ETag: Last-Modified with the length; neither: the URL without its query string."""
    modified = "Sat, 01 Jun 2024 12:00:00 GMT"
    async with host() as files:
        files.routes["dated.img"] = answer(
            headers={"Last-Modified": modified, "Content-Length": "77"}
        )
        files.routes["bare.img"] = answer(headers={"Content-Length": "5"})
        infos = await prober().probe_all(
            [entry(0, files.url("dated.img")), entry(1, files.url("bare.img?X-Sig=s"))]
        )
        bare_url = files.url("bare.img")
    assert infos[0].version == Version.from_last_modified(modified, 77)
    assert infos[1].version == Version(f"url:{bare_url}", "url")


async def test_presigned_url_refusing_head_with_403_is_read_by_ranged_get() -> None:
    """403 to HEAD: one GET with ``Range: bytes=0-0``; the size comes from Content-Range."""
    async with host() as files:
        ranged = answer(206, {"Content-Range": "bytes 0-0/123456", "ETag": '"p"'}, body=b"\0")
        files.routes["p.qcow2"] = head_refused(403, ranged)
        info = (await prober().probe_all([entry(0, files.url("p.qcow2?X-Amz-Signature=x"))]))[0]
    assert (info.size, info.version, info.error) == (123456, Version.from_etag('"p"'), None)
    assert files.asked == Counter({"HEAD /p.qcow2": 1, "GET /p.qcow2": 1})
    assert files.ranges == ["bytes=0-0"]


@pytest.mark.parametrize("refusal", [405, 501])
async def test_a_host_ignoring_the_range_gives_its_size_in_content_length(refusal: int) -> None:
    """A 200 to the ranged GET: size from Content-Length, and the body is not read."""
    async with host() as files:
        whole = answer(200, {"Last-Modified": "Mon, 03 Jun 2024 00:00:00 GMT"}, body=b"x" * 5000)
        files.routes["w.raw"] = head_refused(refusal, whole)
        info = (await prober().probe_all([entry(0, files.url("w.raw"))]))[0]
    assert info.size == 5000
    assert info.version is not None
    assert info.version.source == "last_modified"


# -- errors that stay with their entry ------------------------------------------------


async def test_checksums_problems_stay_with_their_entries_and_the_file_is_read_once() -> None:
    """No line for the file, or an unreadable list: an error and no version; others go on."""
    async with host() as files:
        files.routes["SHA256SUMS"] = answer(
            body=f"{DIGEST}  a.qcow2\n{OTHER} *sub/b.qcow2\n".encode()
        )
        for name in ("a.qcow2", "b.qcow2", "c.qcow2", "d.qcow2"):
            files.routes[name] = answer(headers={"ETag": f'"{name}"', "Content-Length": "1"})
        sums, missing = files.url("SHA256SUMS"), files.url("gone/SHA256SUMS?sig=secret")
        entries = [
            entry(0, files.url("a.qcow2"), checksums_url=sums),
            entry(1, files.url("b.qcow2"), checksums_url=sums),
            entry(2, files.url("c.qcow2"), checksums_url=sums),
            entry(3, files.url("d.qcow2"), checksums_url=missing),
            entry(4, files.url("d.qcow2")),
        ]
        with capture_logs() as logs:
            infos = await prober().probe_all(entries)
    assert infos[0].version == Version.from_checksum(DIGEST, "checksums_url")
    assert infos[1].version == Version.from_checksum(OTHER, "checksums_url")
    assert (infos[2].version, infos[3].version) == (None, None)
    assert f"{sums} has no line for 'c.qcow2'" in str(infos[2].error)
    assert "cannot read checksums_url" in str(infos[3].error)
    assert "404" in str(infos[3].error)
    assert "secret" not in str(infos[3].error)
    assert infos[4].version == Version.from_etag('"d.qcow2"')
    assert infos[2].size == 1  # the file itself was still probed
    assert files.asked["GET /SHA256SUMS"] == 1
    failed = [log for log in logs if log["event"] == "source.failed"]
    assert sorted(log["index"] for log in failed) == [2, 3]
    assert all("secret" not in str(log) for log in logs)


async def test_a_list_with_two_digests_for_one_file_or_none_at_all_is_an_error() -> None:
    """Ambiguous lines, or a file that is not a SHA256SUMS list, give a clear error."""
    async with host() as files:
        files.routes["twice"] = answer(body=f"{DIGEST}  a.img\n{OTHER}  a.img\n".encode())
        files.routes["dirs"] = answer(body=f"{DIGEST}  x/a.img\n{OTHER}  y/a.img\n".encode())
        files.routes["exact"] = answer(body=f"{DIGEST}  x/a.img\n{OTHER}  a.img\n".encode())
        files.routes["html"] = answer(body=b"<html>not found</html>")
        files.routes["a.img"] = answer(headers={"ETag": '"a"'})
        infos = await prober().probe_all(
            [
                entry(i, files.url("a.img"), checksums_url=files.url(sums))
                for i, sums in enumerate(("twice", "dirs", "exact", "html"))
            ]
        )
    assert "lists 2 different digests for 'a.img'" in str(infos[0].error)
    assert "lists 2 different digests for 'a.img'" in str(infos[1].error)
    assert infos[2].version == Version.from_checksum(OTHER, "checksums_url")
    assert "lists no SHA-256 digest" in str(infos[3].error)


async def test_failed_probes_have_no_version_unless_a_checksum_gives_it() -> None:
    """404, 5xx, refused both ways: error, no size, no version, except from a checksum."""
    async with host() as files:
        files.routes["broken.img"] = answer(503)
        files.routes["locked.img"] = head_refused(403, answer(403))
        infos = await prober().probe_all(
            [
                entry(0, files.url("missing.img")),
                entry(1, files.url("broken.img")),
                entry(2, files.url("locked.img")),
                entry(3, files.url("missing.img"), checksum=f"sha256:{DIGEST}"),
            ]
        )
    assert [(i.size, i.version) for i in (infos[0], infos[1], infos[2])] == [(None, None)] * 3
    assert "answered HEAD" in str(infos[0].error)
    assert "404" in str(infos[0].error)
    assert "503" in str(infos[1].error)
    assert "refused HEAD" in str(infos[2].error)
    assert "without credentials" in str(infos[2].error)
    assert infos[3].version == Version.from_checksum(DIGEST)
    assert infos[3].error is not None


async def test_an_unreachable_host_is_an_error_and_a_silent_one_times_out() -> None:
    """Connection refused is an error at once; no answer is an error after the timeout."""
    async with host() as files:
        files.routes["hang.img"] = delayed(3600, answer())
        t0 = anyio.current_time()
        infos = await prober(timeout=7.0).probe_all(
            [entry(0, "http://127.0.0.1:9/x.img"), entry(1, files.url("hang.img"))]
        )
        elapsed = anyio.current_time() - t0
    assert "failed" in str(infos[0].error)
    assert "no answer within 7 s" in str(infos[1].error)
    assert elapsed == pytest.approx(7.0, abs=0.5)


# -- concurrency and streaming --------------------------------------------------------


async def test_concurrency_is_bounded_and_each_file_is_asked_once() -> None:
    """At most ``concurrency`` requests in flight; one request per file."""
    async with host() as files:
        for i in range(12):
            files.routes[f"{i}.img"] = delayed(1.0, answer(headers={"ETag": f'"{i}"'}))
        entries = [entry(i, files.url(f"{i}.img")) for i in range(12)]
        t0 = anyio.current_time()
        infos = await prober(concurrency=3).probe_all(entries)
        elapsed = anyio.current_time() - t0
    assert files.most_in_flight == 3
    assert sum(files.asked.values()) == 12
    assert elapsed == pytest.approx(4.0, abs=0.5)
    assert all(info.error is None for info in infos.values())


async def test_results_stream_as_they_arrive() -> None:
    """A quick file's result is read while a slow one is still being asked."""
    async with host() as files:
        files.routes["slow.img"] = delayed(5.0, answer(headers={"ETag": '"s"'}))
        files.routes["quick.img"] = answer(headers={"ETag": '"q"'})
        entries = [entry(0, files.url("slow.img")), entry(1, files.url("quick.img"))]
        t0 = anyio.current_time()
        arrivals: list[tuple[int, float]] = []
        async with prober().stream(entries) as results:
            async for info in results:
                arrivals.append((info.index, anyio.current_time() - t0))
    assert [index for index, _ in arrivals] == [1, 0]
    assert arrivals[0][1] < 1.0
    assert arrivals[1][1] == pytest.approx(5.0, abs=0.5)


async def test_leaving_the_stream_early_stops_the_remaining_probes() -> None:
    """Breaking out after the first result cancels the others at once."""
    async with host() as files:
        files.routes["slow.img"] = delayed(600.0, answer())
        files.routes["quick.img"] = answer()
        entries = [entry(0, files.url("slow.img")), entry(1, files.url("quick.img"))]
        t0 = anyio.current_time()
        async with prober(timeout=1000.0).stream(entries) as results:
            first = await results.receive()
        elapsed = anyio.current_time() - t0
    assert first.index == 1
    assert elapsed < 1.0


async def test_probe_sends_into_the_callers_stream_and_closes_it() -> None:
    """``probe`` works inside the caller's task group: results in, then end of stream."""
    async with host() as files:
        files.routes["a.img"] = answer(headers={"ETag": '"a"'})
        send, receive = anyio.create_memory_object_stream[SourceInfo](10)
        async with anyio.create_task_group() as tg:
            tg.start_soon(prober().probe, [entry(0, files.url("a.img"))], send)
            received = [info async for info in receive]
    assert [info.version for info in received] == [Version.from_etag('"a"')]


async def test_a_reader_that_stops_reading_ends_the_probes_quietly() -> None:
    """Closing the receiving end of ``probe``'s stream is no error: the probes stop sending."""
    async with host() as files:
        files.routes["quick.img"] = answer()
        files.routes["slow.img"] = delayed(30.0, answer())
        files.routes["slower.img"] = delayed(60.0, answer())
        send, receive = anyio.create_memory_object_stream[SourceInfo](0)
        names = ("quick.img", "slow.img", "slower.img")
        entries = [entry(i, files.url(name)) for i, name in enumerate(names)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(prober().probe, entries, send)
            async with receive:
                first = await receive.receive()
        asked = sum(files.asked.values())
    assert first.index == 0
    assert asked == 3


async def test_events_name_the_entry_and_redact_the_url() -> None:
    """``source.probed`` carries size, version label and source; no query string is logged."""
    async with host() as files:
        files.routes["a.img"] = answer(headers={"ETag": '"abc"', "Content-Length": "9"})
        with capture_logs() as logs:
            await prober().probe_all([entry(0, files.url("a.img?X-Amz-Signature=secret"))])
    (probed,) = [log for log in logs if log["event"] == "source.probed"]
    assert probed["url"] == files.url("a.img?REDACTED")
    assert (probed["index"], probed["name"], probed["size"]) == (0, "img-0", 9)
    assert (probed["version"], probed["version_source"], probed["method"]) == (
        "abc",
        "etag",
        "HEAD",
    )
    assert "secret" not in str(logs)


# -- the checksums parser -------------------------------------------------------------

NAMES = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\\"
    ),
    min_size=1,
    max_size=40,
).filter(lambda name: name == name.strip() and not name.startswith(("*", "./")))
HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)


@given(st.lists(st.tuples(HEX, NAMES, st.sampled_from(["  ", " *", "bsd"])), max_size=20))
def test_parser_reads_gnu_binary_and_bsd_lines(lines: list[tuple[str, str, str]]) -> None:
    """Every well-formed line is read back, digests in lowercase, whatever the style."""
    text = "".join(
        f"SHA256 ({name}) = {digest}\n" if style == "bsd" else f"{digest}{style}{name}\n"
        for digest, name, style in lines
    )
    parsed = parse_checksums(text)
    for digest, name, _ in lines:
        assert digest.lower() in parsed[name]


@given(st.text(max_size=500))
def test_parser_never_fails_on_any_text(text: str) -> None:
    """Comments, garbage and other algorithms are skipped, never an exception."""
    for name, digests in parse_checksums(text).items():
        assert name
        assert all(len(digest) == 64 for digest in digests)


def test_parser_drops_dot_slash_and_skips_other_lines() -> None:
    """``./name`` is ``name``; md5 lines, comments and blank lines are ignored."""
    text = f"# made by sha256sum\n\n{DIGEST}  ./a.img\r\n{'0' * 32}  md5.img\nMD5 (x) = 00\n"
    assert parse_checksums(text) == {"a.img": frozenset({DIGEST})}
