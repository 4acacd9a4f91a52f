"""What DigitalOcean accepts for a custom image: the facts both sides agree on.

Sources: DigitalOcean's OpenAPI description (enums) and the facts listed in README.md,
"What the importer relies on about DigitalOcean's API".
The manifest validates against these; the simulator enforces the same rules.
"""

from __future__ import annotations

import re
from typing import Final

#: Regions in the spec's ``region_slug`` enum, plus the newer ones the spec names elsewhere.
SPEC_REGIONS: Final = (
    "ams1", "ams2", "ams3", "blr1", "fra1", "lon1", "nyc1", "nyc2", "nyc3",
    "sfo1", "sfo2", "sfo3", "sgp1", "tor1", "syd1",
)  # fmt: skip
NEWER_REGIONS: Final = ("atl1", "ric1")
REGIONS: Final = frozenset(SPEC_REGIONS + NEWER_REGIONS)

#: The ``distribution`` enum. The API silently turns any other value into ``Unknown``.
DISTRIBUTIONS: Final = (
    "Arch Linux", "CentOS", "CoreOS", "Debian", "Fedora", "Fedora Atomic", "FreeBSD",
    "Gentoo", "openSUSE", "RancherOS", "Rocky Linux", "Ubuntu", "Unknown",
)  # fmt: skip

#: Image statuses, compared case-insensitively (the casing of ``NEW`` has changed before).
STATUSES: Final = ("NEW", "available", "pending", "deleted", "retired")

#: Tag names: ``^[a-zA-Z0-9_\-:]+$``, at most 255 characters.
TAG_PATTERN: Final = re.compile(r"^[a-zA-Z0-9_\-:]+$")
TAG_MAX_LENGTH: Final = 255

#: File endings the import rejects; checked on the URL's path, case-insensitively.
REJECTED_SUFFIXES: Final = (".xz", ".zip", ".tar.gz", ".tgz", ".iso", ".7z", ".rar")
#: Image formats the import takes, optionally compressed with gzip or bzip2.
ACCEPTED_FORMATS: Final = ("raw", "img", "qcow2", "vhdx", "vdi", "vmdk")

PER_PAGE_MAX: Final = 200
DEFAULT_API_URL: Final = "https://api.digitalocean.com"
TOKEN_ENV: Final = "DIGITALOCEAN_TOKEN"  # noqa: S105 - a variable name, not a secret
API_URL_ENV: Final = "DIGITALOCEAN_API_URL"

#: Real error message of a failed import (terraform-provider-digitalocean#613).
DECOMPRESS_ERROR: Final = (
    "We had a problem decompressing your file. This typically happens if the archive is "
    "corrupt or contains multiple files. Please try decompressing the file locally and "
    "uploading the uncompressed image, or recompressing using gzip or bzip2."
)


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` is not a valid DigitalOcean tag name, or ``None`` if it is."""
    if not tag:
        return "a tag must not be empty"
    if len(tag) > TAG_MAX_LENGTH:
        return f"a tag has at most {TAG_MAX_LENGTH} characters (this one has {len(tag)})"
    if not TAG_PATTERN.match(tag):
        return f"tag {tag!r} may contain only letters, digits, '_', '-' and ':'"
    return None


def rejected_suffix(path: str) -> str | None:
    """The rejected file ending ``path`` has, if any (``.xz``, ``.iso``, ...)."""
    lowered = path.lower()
    for suffix in REJECTED_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    return None
