"""Real processes for the tests that need them: a simulator to kill importers against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = {**os.environ, "DIGITALOCEAN_TOKEN": "process-test-token", "PYTHONUNBUFFERED": "1"}


@contextmanager
def simulator_process(*flags: str) -> Iterator[str]:
    """`importer simulate` on a free loopback port; yields its base URL."""
    command = [sys.executable, "-m", "importer", "simulate", "--port", "0", *flags]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV
    ) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:"), base_url
            yield base_url
        finally:
            process.kill()


def simulator_state(base_url: str) -> dict[str, Any]:
    """The simulator's whole truth, from its admin endpoint."""
    with urllib.request.urlopen(f"{base_url}/_simulator/state", timeout=10) as answer:
        state: dict[str, Any] = json.load(answer)
        return state


def importer_command(manifest: Path, base_url: str, tmp: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "importer", "run", str(manifest),
        "--api-url", base_url,
        "--state", str(tmp / "state.sqlite"),
        "--report", str(tmp / "report.json"),
        "--log-format", "json",
        *flags,
    ]  # fmt: skip
