"""Building blocks for end-to-end tests: manifests in code, settings for a simulator."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from importer.manifest import Entry, Manifest
from importer.settings import Settings, Token

TEST_TOKEN = "test-token-not-a-secret"


def manifest_of(*urls: str, region: str = "nyc3", prefix: str = "img") -> Manifest:
    """A manifest with one entry per URL, named ``{prefix}-{i}``."""
    entries = tuple(
        Entry(
            index=i,
            name=f"{prefix}-{i}",
            url=url,
            region=region,
            distribution="Ubuntu",
            description=None,
            tags=("test",),
        )
        for i, url in enumerate(urls)
    )
    return Manifest(version=1, entries=entries, source="<test>")


def image_urls(count: int, marker: str = "ok") -> list[str]:
    return [f"https://images.example.com/{marker}-{i}.qcow2" for i in range(count)]


def settings_for(base_url: str, **overrides: Any) -> Settings:
    """Settings that poll at the demo's pace, pointed at a simulator."""
    base = Settings(
        token=Token(TEST_TOKEN),
        api_url=base_url,
        first_poll=1.0,
        poll_interval=2.0,
        progress_interval=30.0,
    )
    return replace(base, **overrides)
