"""The nightly benchmark's no-change row, small enough for the suite."""

from __future__ import annotations

import pytest

from tests.perf.nightly import measure_nights


@pytest.mark.anyio
async def test_a_night_without_changes_only_lists_the_set() -> None:
    """400 entries, nothing changed, state lost: the set's 2 listing pages, nothing written."""
    (row,) = await measure_nights(400, changed=0)
    assert row.listing_pages == 2
    assert row.requests <= row.listing_pages + 10, row.by_route
    assert row.creates == row.renames == row.deletes == 0
    assert row.available == 400
    assert row.meets_target
