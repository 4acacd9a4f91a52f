"""A faithful simulator of DigitalOcean's custom-image API, for tests, demos and benchmarks.

It reproduces DigitalOcean's documented behaviour: the asynchronous
``NEW -> pending -> available`` lifecycle and its asynchronous failures, both
sliding rate-limit windows with their headers, DigitalOcean's error bodies, and
injectable faults (5xx, dropped connections, lost creates, slow and garbled
answers, revoked tokens). Where DigitalOcean's behaviour is unknown, a switch
picks either side. All time comes from an injected clock, so it runs on virtual
time in tests.
"""

from importer.simulator.app import Simulator, create_app, run_simulator
from importer.simulator.config import SimulatorConfig
from importer.simulator.persist import SimulatorStateError
from importer.simulator.world import (
    MARKERS,
    Admission,
    Answer,
    ApiProblem,
    FaultPlan,
    FileVersion,
    ImagePage,
    ImportPlan,
    SimAction,
    SimImage,
    World,
)

__all__ = [
    "MARKERS",
    "Admission",
    "Answer",
    "ApiProblem",
    "FaultPlan",
    "FileVersion",
    "ImagePage",
    "ImportPlan",
    "SimAction",
    "SimImage",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStateError",
    "World",
    "create_app",
    "run_simulator",
]
