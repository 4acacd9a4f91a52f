"""Shared fixtures: every async test runs on virtual time unless it asks otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from importer.clock import VirtualTimeLoop

SHARED = Path(__file__).resolve().parents[2] / "shared"
OPENAPI_PATH = SHARED / "digitalocean-images.openapi.yaml"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Run async tests on a loop whose time jumps forward whenever all tasks wait."""
    return ("asyncio", {"loop_factory": VirtualTimeLoop})
