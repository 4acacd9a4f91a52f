"""Bulk importer of DigitalOcean custom images.

Embedding a run in your own job::

    import anyio
    from importer import Settings, Token, configure_logging, load_manifest, run_import

    token = Token.from_env_or_file()
    configure_logging(secrets=[token.value])  # logs to stderr, secrets masked
    manifest = load_manifest("images.yaml")
    settings = Settings(token=token)  # api_url: $DIGITALOCEAN_API_URL or DigitalOcean's
    report = anyio.run(run_import, manifest, settings)
    report.write(settings.report_path)
"""

from importer.errors import (
    ApiError,
    AuthenticationError,
    ConfigurationError,
    ImporterError,
    ManifestError,
)
from importer.logs import configure_logging
from importer.manifest import Entry, Manifest, load_manifest, parse_manifest
from importer.pipeline import run_import
from importer.report import ImageResult, Outcome, Report
from importer.settings import Settings, Token

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ConfigurationError",
    "Entry",
    "ImageResult",
    "ImporterError",
    "Manifest",
    "ManifestError",
    "Outcome",
    "Report",
    "Settings",
    "Token",
    "configure_logging",
    "load_manifest",
    "parse_manifest",
    "run_import",
]
