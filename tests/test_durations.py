"""Durations on the command line parse to seconds, or fail with a usable message."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("45s", 45.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("2h", 7200.0),
        ("1h 0m 5s", 3605.0),
        ("0.5m", 30.0),
        (" 10M ", 600.0),
    ],
)
def test_parses_common_forms(text: str, seconds: float) -> None:
    """Plain seconds and h/m/s combinations mean what they say."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "1x", "1h1h", "5 5", "-3s", "1m2", "abc"])
def test_rejects_garbage(text: str) -> None:
    """Anything else is a ValueError that shows an example of the right form."""
    with pytest.raises(ValueError, match="1h30m"):
        parse_duration(text)


@given(h=st.integers(0, 99), m=st.integers(0, 59), s=st.integers(0, 59))
def test_round_trip(h: int, m: int, s: int) -> None:
    """`{h}h{m}m{s}s` is always h*3600 + m*60 + s seconds."""
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3600 + m * 60 + s


@given(st.text(max_size=30))
@settings(max_examples=300)
def test_never_raises_anything_but_value_error(text: str) -> None:
    """Arbitrary text parses to a non-negative number or raises ValueError, nothing else."""
    with contextlib.suppress(ValueError):
        assert parse_duration(text) >= 0
