"""Generated manifests for load and chaos tests (and ``manifests/generated-200.yaml``)."""

from __future__ import annotations

import random
from typing import Final

import yaml

from importer.manifest import SUPPORTED_VERSION

_EXAMPLE_ROLES: Final = ("web", "api", "worker", "db", "cache", "ci-runner", "bastion", "vpn")
_EXAMPLE_SYSTEMS: Final = (
    ("ubuntu-24.04", "Ubuntu"),
    ("ubuntu-22.04", "Ubuntu"),
    ("debian-12", "Debian"),
    ("rocky-9", "Rocky Linux"),
    ("fedora-40", "Fedora"),
    ("freebsd-14", "FreeBSD"),
    ("arch", "Arch Linux"),
)
_EXAMPLE_FORMATS: Final = ("qcow2", "qcow2.gz", "img", "img.gz", "raw.bz2", "vmdk", "vhdx", "vdi")
_EXAMPLE_REGIONS: Final = ("nyc3", "ams3", "fra1", "sfo3", "sgp1", "lon1", "tor1", "blr1", "syd1")
_EXAMPLE_STAGES: Final = ("prod", "staging", "dev")


def example_manifest(
    count: int, *, seed: int = 0, base_url: str = "https://images.example.com"
) -> str:
    """YAML text of a valid manifest of ``count`` images, the same for the same ``seed``."""
    # Not for secrets: a seeded generator is the point, so that the output is reproducible.
    rng = random.Random(seed)
    images: list[dict[str, object]] = []
    for number in range(1, count + 1):
        role = rng.choice(_EXAMPLE_ROLES)
        system, distribution = rng.choice(_EXAMPLE_SYSTEMS)
        name = f"{role}-{system}-{number:04d}"
        images.append(
            {
                "name": name,
                "url": f"{base_url.rstrip('/')}/{role}/{name}.{rng.choice(_EXAMPLE_FORMATS)}",
                "region": rng.choice(_EXAMPLE_REGIONS),
                "distribution": distribution,
                "description": f"{role} image on {distribution}, build {number}",
                "tags": [role, rng.choice(_EXAMPLE_STAGES)],
            }
        )
    document = {"version": SUPPORTED_VERSION, "defaults": {"tags": ["generated"]}, "images": images}
    call = f"example_manifest({count})" if seed == 0 else f"example_manifest({count}, seed={seed})"
    header = (
        f"# {count} generated images that all import cleanly, for load tests. Made with:\n"
        f'#   python -c "from tests.examples import example_manifest; print({call})"\n'
    )
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
    return (header + body).rstrip("\n")
