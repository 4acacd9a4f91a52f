"""The README's Python example runs as written, and the README stands on its own."""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from importer.clock import VirtualTimeLoop
from importer.logs import reset_logging
from importer.settings import Settings, Token
from importer.simulator import SimulatorConfig, run_simulator
from tests.helpers import TEST_TOKEN

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_example() -> str:
    """The first ```python block after the "In Python" heading."""
    text = README.read_text()
    section = text[text.index("## In Python") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no Python example under 'In Python'"
    return match[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def _fresh_logging() -> Iterator[None]:
    yield
    reset_logging()


@pytest.mark.usefixtures("_fresh_logging")
def test_python_example_prints_only_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example, run literally against the simulator, prints the summary alone on stdout."""
    port = free_port()
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("DIGITALOCEAN_API_URL", f"http://127.0.0.1:{port}")
    # The example must reach the simulator through the environment, as the CLI would; checked
    # first so that no request can go to the real API.
    assert Settings(token=Token(TEST_TOKEN)).api_url == f"http://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    real_run = anyio.run

    def run_beside_simulator(func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        # The example's own event loop, made virtual, with the simulator serving inside it.
        async def both() -> Any:
            async with run_simulator(SimulatorConfig.demo(), port=port):
                return await func(*args)

        return real_run(both, backend_options={"loop_factory": VirtualTimeLoop})

    monkeypatch.setattr(anyio, "run", run_beside_simulator)
    code = python_example().replace('"images.yaml"', repr(str(ROOT / "manifests" / "example.yaml")))
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    out, err = capsys.readouterr()
    report = namespace["report"]
    assert report.all_available
    assert out == report.human_summary() + "\n"
    assert "run.started" in err
    assert TEST_TOKEN not in out + err
    assert (tmp_path / "import-report.json").exists()


def test_readme_points_nowhere_outside_the_repository() -> None:
    """No reference to files that are not in the repository."""
    text = README.read_text()
    assert "do-api-facts" not in text
    assert "../shared" not in text
    assert "What the importer relies on about DigitalOcean's API" in text
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
