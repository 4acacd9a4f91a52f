"""Durations as people write them on a command line: ``90``, ``45s``, ``15m``, ``1h30m``."""

from __future__ import annotations

import re

_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([hms]?)\s*")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0}
_HELP = "write e.g. 90 (seconds), 45s, 15m or 1h30m"


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ``ValueError`` with a usable message if it is not one."""
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError(f"empty duration; {_HELP}")
    parts = []
    position = 0
    while position < len(cleaned):
        match = _PART.match(cleaned, position)
        if match is None:
            raise ValueError(f"{text!r} is not a duration; {_HELP}")
        parts.append(match.groups())
        position = match.end()
    units = [unit for _, unit in parts]
    if ("" in units and len(parts) > 1) or len(set(units)) != len(units):
        raise ValueError(f"{text!r} is not a duration; {_HELP}")
    return sum(float(number) * _UNIT.get(unit, 1.0) for number, unit in parts)
