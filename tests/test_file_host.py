"""The simulator's file host: sizes by HEAD, after a configurable latency."""

from __future__ import annotations

import aiohttp
import anyio
import pytest

from importer.clock import LoopClock
from importer.simulator import SimulatorConfig, run_simulator


@pytest.mark.anyio
@pytest.mark.parametrize("latency", [0.0, 0.1])
async def test_head_answers_after_the_configured_latency(latency: float) -> None:
    """``head_latency`` delays every HEAD by that much of the simulator's clock; GET is prompt."""
    clock = LoopClock()
    config = SimulatorConfig.demo(head_latency=latency)
    async with run_simulator(config, clock) as sim, aiohttp.ClientSession() as http:
        url = sim.file_url("size-2G-a.qcow2")
        started = clock.monotonic()
        async with http.head(url) as response:
            assert response.headers["Content-Length"] == str(2 * 2**30)
        assert clock.monotonic() - started == pytest.approx(latency, abs=1e-6)
        started = clock.monotonic()
        async with http.get(url) as response:
            assert response.status == 200
        assert clock.monotonic() - started == pytest.approx(0.0, abs=1e-6)

        async def head(name: str) -> None:
            async with http.head(sim.file_url(name)) as answer:
                assert answer.status == 200

        # Concurrent HEADs wait side by side, as on a real host.
        started = clock.monotonic()
        async with anyio.create_task_group() as group:
            for n in range(16):
                group.start_soon(head, f"f{n}.raw")
        assert clock.monotonic() - started == pytest.approx(latency, abs=1e-6)


def test_head_latency_must_be_a_duration() -> None:
    """A negative or infinite latency is refused."""
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match="head_latency"):
            SimulatorConfig(head_latency=bad)
