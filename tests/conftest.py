"""Shared fixtures: every async test runs on virtual time unless it asks otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from importer.clock import VirtualTimeLoop

# Property tests measure correctness, not speed: a loaded CI machine must not fail them
# for taking long on one example.
settings.register_profile("importer", deadline=None)
settings.load_profile("importer")

SHARED = Path(__file__).resolve().parents[2] / "shared"
OPENAPI_PATH = SHARED / "digitalocean-images.openapi.yaml"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Run async tests on a loop whose time jumps forward whenever all tasks wait."""
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-seeds",
        default="1",
        help="Comma-separated seeds for tests/test_chaos.py's other-side test (one run each).",
    )
