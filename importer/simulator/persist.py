"""Keep a simulated account in a JSON file, so that a later simulator goes on with it.

``SimulatorConfig.state_file`` names the file: :func:`~importer.simulator.run_simulator`
loads it at start when it exists, saves it after every request that may change the account
(anything but ``GET`` and ``HEAD``) and once more when it stops. A save writes a temporary
file beside the target and renames it over the target, so a process killed at any instant
(``kill -9`` included) leaves the previous save or the new one, never half of one.

Each save writes the whole account: fine for demos and tests (hundreds of images), not meant
for benchmarks of thousands, which run without a state file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from importer.errors import ConfigurationError
from importer.simulator.world import World


class SimulatorStateError(ConfigurationError):
    """The simulator's state file cannot be read or written."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"simulator state file {path}: {reason}. Delete or move it to start with an "
            "empty simulated account."
        )


def load_world(world: World, path: Path) -> bool:
    """Restore ``world`` from ``path``; ``False`` (and nothing changed) if there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as exc:
        raise SimulatorStateError(path, f"cannot be read ({exc})") from exc
    try:
        world.restore(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is one
        raise SimulatorStateError(path, f"is not a simulator snapshot ({exc})") from exc
    return True


def save_world(world: World, path: Path) -> None:
    """Write ``world``'s snapshot to ``path`` atomically."""
    text = json.dumps(world.snapshot(), separators=(",", ":"), allow_nan=False)
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            Path(temporary).replace(path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise SimulatorStateError(path, f"cannot be written ({exc})") from exc
