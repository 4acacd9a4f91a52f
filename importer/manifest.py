"""The import manifest: read it, validate all of it, and hand back frozen entries.

Nothing is sent before the whole manifest is valid, and a run that cannot start says
everything that is wrong at once: :func:`parse_manifest` collects every problem and raises
one :class:`~importer.errors.ManifestError`.

Format (YAML, or JSON, which YAML reads too)::

    version: 1                 # optional; 1 is the only version there is
    set: web-images            # optional; the default is the file's stem (see below)
    defaults:                  # optional; any image key except name and url
      region: nyc3
      tags: [golden]
      keep: 2
    images:
      - name: web-base-2024-06
        url: https://images.example.com/web-base-2024-06.qcow2.gz
        region: nyc3           # required, here or in defaults (or regions)
        regions: [nyc3, ams3]  # optional; imported into the first, transferred to the others
        distribution: Ubuntu   # optional
        description: ...       # optional
        tags: [web, prod]      # optional; added after the defaults' tags
        checksum: sha256:...   # optional; the file's SHA-256 (64 hex digits)
        checksums_url: https://images.example.com/SHA256SUMS   # optional
        keep: 2                # optional; versions of the image kept in the account

Decisions (each one is tested):

- A missing ``version`` means 1: a manifest written before versions existed is a version 1
  manifest. Any other value is a problem, and then nothing else is checked, because rules of
  version 1 applied to another version would only produce noise.
- An entry's value replaces the default; tags are the defaults' tags followed by the entry's,
  without repeats. A ``null`` value (``region:`` with nothing after it) counts as not given.
- A value given but empty (``region: ""``) is a problem, not a fallback to the default: an
  empty value usually means a template went wrong, and guessing would import somewhere else.
- Types are strict: YAML turns ``name: 2024`` into a number and ``tags: [on]`` into a boolean;
  both are problems that say to quote the value.
- A key given twice in one mapping is a problem: YAML and JSON would silently keep the last.
- ``name``: at most 255 characters (DigitalOcean documents no limit; this keeps names sane).
- ``url``: absolute http(s), with a host, naming a file (DigitalOcean reads the file name),
  without whitespace, and not of a format DigitalOcean rejects, judged on the path alone.
- ``region`` and ``distribution`` must match the catalog exactly; a near miss is a problem with
  a suggestion. For ``distribution`` this matters most: the API silently turns any unknown
  value, even ``ubuntu``, into ``Unknown``.
- ``regions`` lists every region the image must be in: it is imported into the first and
  transferred to the others (:mod:`importer.transfers`). Each is checked like ``region``; a
  region listed twice, or an empty list, is a problem. ``region`` alone means that one region.
  Given both, ``region`` must be the first of ``regions`` (a problem otherwise: which one the
  import goes to would be a guess). The two are one setting: an entry that gives either
  replaces both of the defaults'. The entry's identity keeps the import region only, so
  adding a region to an entry is the same entry, which gains a transfer.
- Tags must be valid DigitalOcean tag names; at most 46 per image after merging, so that
  with the importer's four (set, entry, version, group) an image has at most 50 (our
  limit). Tags with the importer's own prefixes (``importer:``, ``importer-set:``...) are
  refused: they would pass for the importer's.
- Two images with the same name in the same region are a problem on the later one:
  DigitalOcean would accept both and create two images with one name. Every region of
  ``regions`` counts: an entry transferred to ``ams3`` and another entry of the same name
  imported there would leave two images with one name in ``ams3``.
- A problem in ``defaults`` is reported once (field ``defaults.<key>``, no index), not again
  for every image that inherits the value.
- ``set`` names the images this manifest owns (see :mod:`importer.identity`): letters,
  digits, ``_`` and ``-``, at most 64 characters. Without it, the set is the manifest file's
  stem cut to that alphabet (``nightly images.yaml`` -> ``nightly-images``; text without a file
  -> ``manifest``), so two manifests that share a file name must each name their own set.
- ``checksum`` is ``sha256:`` and 64 hex digits (stored in lowercase); another algorithm is a
  problem, because the version of a source is compared as a SHA-256 digest.
- ``checksums_url`` is an absolute http(s) URL naming a ``SHA256SUMS``-style file. An entry
  with both uses its ``checksum`` (a ``checksums_url`` in defaults stays useful for the others).
- ``keep`` is a whole number >= 1: how many versions of an image stay in the account, the
  newest (which carries the entry's name) included. The default, 2, keeps the previous version
  (renamed) beside the new one, so that a bad nightly build can be rolled back by hand, as
  osism's image manager keeps old versions; one image more per entry is the price. ``keep: 1``
  deletes the previous version once the new one is available.
- Messages never contain a URL's query string or password (:mod:`importer.redact`).
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from importer import strict_yaml
from importer.catalog import (
    ACCEPTED_FORMATS,
    DISTRIBUTIONS,
    REGIONS,
    REJECTED_SUFFIXES,
    rejected_suffix,
    tag_problem,
)
from importer.errors import ManifestError, Problem
from importer.identity import default_set, set_problem
from importer.redact import redact_text, redact_url

SUPPORTED_VERSION: Final = 1
NAME_MAX_LENGTH: Final = 255
#: Tags on one image, ours included (our limit; DigitalOcean documents none).
IMAGE_MAX_TAGS: Final = 50
#: The importer's own tags on every image it creates: set, entry, version and group.
IMPORTER_TAGS: Final = 4
#: The manifest's tags per image, counting the defaults'.
MAX_TAGS: Final = IMAGE_MAX_TAGS - IMPORTER_TAGS
#: Prefixes of the importer's own tags: a manifest tag with one would pass for the
#: importer's (an entry or a version it never made).
RESERVED_TAG_PREFIXES: Final = (
    "importer:",
    "importer-set:",
    "importer-version:",
    "importer-group:",
)
#: Versions of an image kept when the manifest does not say (see the module's docstring).
DEFAULT_KEEP: Final = 2
CHECKSUM_PREFIX: Final = "sha256:"
_CHECKSUM: Final = re.compile(r"^sha256:[0-9a-fA-F]{64}$")
_ALGORITHM: Final = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):")
_HEX_DIGEST: Final = re.compile(r"^[0-9a-fA-F]+$")
#: The characters ``str.isspace`` calls whitespace, found without a Python loop per character.
_WHITESPACE: Final = re.compile(r"\s")

Format = Literal["yaml", "json"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One image to import, with the defaults already merged in."""

    #: Position in the manifest's ``images`` list.
    index: int
    name: str
    url: str
    region: str
    distribution: str | None
    description: str | None
    tags: tuple[str, ...]
    #: ``sha256:<64 lowercase hex>``, when the manifest gives the file's digest.
    checksum: str | None = None
    #: A ``SHA256SUMS``-style file listing the digest of this entry's file.
    checksums_url: str | None = None
    #: Versions of the image kept in the account, the newest included (>= 1).
    keep: int = DEFAULT_KEEP
    #: The regions the image reaches by transfer, after ``region`` (where it is imported).
    transfer_regions: tuple[str, ...] = ()

    @property
    def regions(self) -> tuple[str, ...]:
        """Every region the image must be in, the one it is imported into first."""
        return (self.region, *self.transfer_regions)


@dataclass(frozen=True)
class Manifest:
    """A manifest that passed every check."""

    version: int
    entries: tuple[Entry, ...]
    #: Where it came from (a path, or ``<manifest>``), for messages.
    source: str
    #: The set whose images this manifest owns; ``""`` means the default from ``source``.
    set: str = ""

    def __post_init__(self) -> None:
        if not self.set:
            object.__setattr__(self, "set", default_set(self.source))


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest at ``path``; the suffix picks JSON or YAML."""
    source = os.fspath(path)
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ManifestError(source, [Problem(f"cannot read the manifest: {reason}")]) from exc
    except UnicodeDecodeError as exc:
        problem = Problem(
            f"the manifest is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
            f"at offset {exc.start})"
        )
        raise ManifestError(source, [problem]) from exc
    suffix = Path(path).suffix.lower()
    fmt: Format | None = None
    if suffix == ".json":
        fmt = "json"
    elif suffix in (".yaml", ".yml"):
        fmt = "yaml"
    return parse_manifest(text, source=source, fmt=fmt)


def parse_manifest(text: str, *, source: str = "<manifest>", fmt: Format | None = None) -> Manifest:
    """Validate manifest ``text``; without ``fmt``, read it as YAML (which JSON is a subset of).

    Raises :class:`ManifestError` carrying every problem found.
    """
    data = _load(text, fmt, source)
    problems: list[Problem] = []
    manifest = _check_document(data, source, problems)
    if problems or manifest is None:
        raise ManifestError(source, [_redacted(p) for p in problems])
    return manifest


# --- reading ---------------------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _load(text: str, fmt: Format | None, source: str) -> object:
    try:
        if fmt == "json":
            return _load_json(text)
        return strict_yaml.load(text)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON: {exc.msg} at {_at(exc.lineno, exc.colno)}"
    except _DuplicateKeyError as exc:
        message = f"not valid JSON: the key {exc.key!r} appears twice in one object"
    except yaml.MarkedYAMLError as exc:
        message = _yaml_message(exc)
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        message = (
            f"not valid YAML: the character #x{exc.character:04x} is not allowed "
            f"at {_at(line, column)}"
        )
    except RecursionError:
        message = "the manifest is nested too deeply to read"
    except Exception as exc:
        # The parsers raise more than their own errors (e.g. ValueError for an integer with
        # more digits than Python converts); a manifest must never end in a traceback.
        message = f"not valid {(fmt or 'yaml').upper()}: {exc}"
    raise ManifestError(source, [_redacted(Problem(message))])


def _load_json(text: str) -> object:
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise _DuplicateKeyError(key)
            result[key] = value
        return result

    return json.loads(text, object_pairs_hook=unique_keys)


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    message = f"not valid YAML: {exc.problem or exc.context or 'syntax error'}"
    if mark is not None:
        message += f" at {_at(mark.line + 1, mark.column + 1)}"
    context = exc.context_mark
    if exc.problem and exc.context and context is not None and context is not mark:
        message += f" ({exc.context} at {_at(context.line + 1, context.column + 1)})"
    return message


def _at(line: int, column: int) -> str:
    return f"line {line}, column {column}"


def _line_column(text: str, position: int) -> tuple[int, int]:
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


# --- the shape, checked by pydantic ----------------------------------------------------------


class _Strict(BaseModel):
    # Every field is optional here: "missing" and "empty" get the same, clearer message from
    # the checks below, and a model with a bad field dropped always validates (see _validate).
    model_config = ConfigDict(extra="forbid", strict=True)


class _Document(_Strict):
    version: int = SUPPORTED_VERSION
    set: str | None = None
    defaults: dict[Any, Any] | None = None
    images: list[Any] | None = None


class _Defaults(_Strict):
    region: str | None = None
    regions: list[str] | None = None
    distribution: str | None = None
    description: str | None = None
    tags: list[str] | None = None
    checksum: str | None = None
    checksums_url: str | None = None
    keep: int | None = None


class _Image(_Strict):
    name: str | None = None
    url: str | None = None
    region: str | None = None
    regions: list[str] | None = None
    distribution: str | None = None
    description: str | None = None
    tags: list[str] | None = None
    checksum: str | None = None
    checksums_url: str | None = None
    keep: int | None = None


_ModelT = TypeVar("_ModelT", bound=_Strict)


@dataclass(frozen=True)
class _Place:
    """Where problems go: an entry (index, name) or the document, and a prefix for fields."""

    index: int | None = None
    name: str | None = None
    prefix: str = ""

    def problem(self, message: str, field: str | None = None) -> Problem:
        where = f"{self.prefix}{field}" if field else (self.prefix.rstrip(".") or None)
        return Problem(message, index=self.index, name=self.name, field=where)


def _validate(
    model: type[_ModelT], raw: Mapping[Any, Any], place: _Place, problems: list[Problem]
) -> tuple[_ModelT, frozenset[str]]:
    """``raw`` as ``model``, and the fields that had problems (already added to ``problems``)."""
    try:
        return model.model_validate(raw), frozenset()
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    for error in errors:
        problems.append(place.problem(_explain(error, model), _dotted(error["loc"])))
    bad = frozenset(str(error["loc"][0]) for error in errors if error["loc"])
    # Validate again without the bad fields so that the good ones still get their checks: one
    # wrong type must not hide an unknown region next to it.
    kept = {k: v for k, v in raw.items() if k in model.model_fields and k not in bad}
    return model.model_validate(kept), bad


def _dotted(loc: tuple[int | str, ...]) -> str | None:
    return ".".join(str(part) for part in loc) or None


def _explain(error: ErrorDetails, model: type[_Strict]) -> str:
    kind, value = error["type"], error["input"]
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        allowed = list(model.model_fields)
        return f"unknown key {key!r}{_did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
    if kind == "invalid_key":
        return f"keys must be strings, not {_kind_of(value)}"
    if error["loc"] == ("version",):
        return f"must be {SUPPORTED_VERSION}, not {_describe(value)}"
    if kind == "string_type":
        hint = "; put it in quotes so that YAML keeps it as text" if _is_plain(value) else ""
        return f"must be a string, not {_describe(value)}{hint}"
    if kind == "list_type" and error["loc"] == ("images",):
        return f"must be a list of images (mappings with name, url, region), not {_kind_of(value)}"
    if kind == "list_type":
        return f"must be a list of strings, like [web, prod], not {_kind_of(value)}"
    if kind == "dict_type":
        return f"must be a mapping of keys to values, not {_kind_of(value)}"
    if kind == "int_type":
        return f"must be a whole number, not {_describe(value)}"
    return str(error["msg"])


def _is_plain(value: object) -> bool:
    """Whether ``value`` is a scalar YAML typed on its own, which quoting turns into text."""
    return isinstance(value, bool | int | float | datetime.date)


def _describe(value: object) -> str:
    # Numbers, booleans and dates cannot hold a secret; anything else is described by type only.
    if not _is_plain(value):
        return _kind_of(value)
    return f"{_kind_of(value)} ({_shown(value)})"


def _shown(value: object) -> str:
    # YAML reads 0x... of any length, and str() of a huge int raises; no one needs its digits.
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large number"
    return str(value)


def _kind_of(value: object) -> str:
    """How a YAML author would name the type of ``value``; never the value (it may be secret)."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "true/false"),
        ((int, float), "a number"),
        (str, "a string"),
        (datetime.date, "a date"),
        (list, "a list"),
        (dict, "a mapping"),
        (bytes, "binary data"),
        ((set, frozenset), "a set"),
    ]
    if value is None:
        return "null (nothing)"
    for types, name in kinds:
        if isinstance(value, types):
            return name
    return type(value).__name__


# --- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inherited:
    """Values from ``defaults``, and the keys whose problems were already reported there."""

    #: The defaults' regions (``region`` alone gives one), the import region first.
    regions: tuple[str, ...] | None = None
    distribution: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    checksum: str | None = None
    checksums_url: str | None = None
    keep: int | None = None
    broken: frozenset[str] = field(default_factory=frozenset)


_DEFAULT_KEYS: Final = frozenset(_Defaults.model_fields)


def _check_document(data: object, source: str, problems: list[Problem]) -> Manifest | None:
    top = _Place()
    if not isinstance(data, dict):
        what = "empty" if data is None else _kind_of(data)
        problems.append(
            top.problem(
                f"the manifest must be a mapping with 'version' and 'images', but it is {what}"
            )
        )
        return None
    document, bad = _validate(_Document, data, top, problems)
    if "version" not in bad and document.version != SUPPORTED_VERSION:
        problems.append(
            top.problem(
                f"unsupported version {_shown(document.version)}; this importer reads version "
                f"{SUPPORTED_VERSION}",
                "version",
            )
        )
        return None
    if document.set is not None and (message := set_problem(document.set)) is not None:
        problems.append(top.problem(message, "set"))

    if "defaults" in bad:
        inherited = _Inherited(broken=_DEFAULT_KEYS)
    else:
        inherited = _check_defaults(document.defaults or {}, problems)

    images = document.images
    if images is None:
        if "images" not in bad:
            problems.append(top.problem("missing 'images', the list of images to import", "images"))
        return None
    if not images:
        problems.append(top.problem("'images' is empty: there is nothing to import", "images"))
        return None

    entries: list[Entry] = []
    # (name, region) -> the first entry with an image of that name there, and whether
    # it is imported there (rather than transferred).
    first_index: dict[tuple[str, str], tuple[int, bool]] = {}
    for index, raw in enumerate(images):
        entry, key = _check_image(index, raw, inherited, problems)
        if entry is not None:
            entries.append(entry)
        if key is None:
            continue
        name, regions = key
        clash = next((r for r in regions if (name, r) in first_index), None)
        if clash is not None:
            first, imported = first_index[(name, clash)]
            verb = "imports" if imported and clash == regions[0] else "puts"
            problems.append(
                Problem(
                    f"images[{first}] already {verb} {name!r} into {clash}; "
                    "DigitalOcean would create two images with one name",
                    index=index,
                    name=name,
                    field="name",
                )
            )
        else:
            for position, region in enumerate(regions):
                first_index[(name, region)] = (index, position == 0)
    return Manifest(
        version=document.version, entries=tuple(entries), source=source, set=document.set or ""
    )


def _check_defaults(raw: Mapping[Any, Any], problems: list[Problem]) -> _Inherited:
    place = _Place(prefix="defaults.")
    defaults, bad = _validate(_Defaults, raw, place, problems)
    broken = set(bad)
    regions: tuple[str, ...] | None = None
    if not {"region", "regions"} & broken:
        count = len(problems)
        regions = _region_pair(defaults.region, defaults.regions, place, problems)
        if len(problems) > count:
            broken.update(("region", "regions"))
    if defaults.distribution is not None:
        message = _distribution_problem(defaults.distribution)
        if message is not None:
            problems.append(place.problem(message, "distribution"))
            broken.add("distribution")
    tags = tuple(defaults.tags or ())
    if _tag_problems(tags, place, problems):
        broken.add("tags")
    if len(tags) > MAX_TAGS:
        problems.append(place.problem(f"at most {MAX_TAGS} tags (here: {len(tags)})", "tags"))
    broken.update(_source_problems(defaults, place, problems))
    return _Inherited(
        regions=regions,
        distribution=defaults.distribution,
        description=defaults.description,
        tags=tags,
        checksum=_normal_checksum(defaults.checksum),
        checksums_url=defaults.checksums_url,
        keep=defaults.keep,
        broken=frozenset(broken),
    )


def _source_problems(
    values: _Defaults | _Image, place: _Place, problems: list[Problem]
) -> set[str]:
    """Check ``checksum``, ``checksums_url`` and ``keep``; the keys that had problems."""
    bad: set[str] = set()
    for key, message in (
        ("checksum", None if values.checksum is None else _checksum_problem(values.checksum)),
        (
            "checksums_url",
            None if values.checksums_url is None else _checksums_url_problem(values.checksums_url),
        ),
        ("keep", None if values.keep is None else _keep_problem(values.keep)),
    ):
        if message is not None:
            problems.append(place.problem(message, key))
            bad.add(key)
    return bad


def _normal_checksum(checksum: str | None) -> str | None:
    return None if checksum is None else checksum.lower()


def _checksum_problem(checksum: str) -> str | None:
    if _CHECKSUM.match(checksum):
        return None
    expected = f"write {CHECKSUM_PREFIX!r} followed by the file's 64 hex digits"
    if not checksum.strip():
        return f"'checksum' is empty; {expected}, or leave it out"
    algorithm = _ALGORITHM.match(checksum)
    if algorithm is not None and algorithm.group(1).lower() != "sha256":
        return f"only SHA-256 checksums are supported, not {algorithm.group(1)!r}; {expected}"
    if algorithm is not None and algorithm.group(1) != "sha256":
        return f"write the prefix in lowercase: {CHECKSUM_PREFIX!r}"
    digest = checksum.removeprefix(CHECKSUM_PREFIX)
    if algorithm is None and len(digest) == 64 and _HEX_DIGEST.match(digest):
        return f"the digest needs its algorithm: write {CHECKSUM_PREFIX}{digest[:8]}..."
    if not _HEX_DIGEST.match(digest):
        return f"a SHA-256 digest is hex digits (0-9, a-f) only; {expected}"
    return f"a SHA-256 digest has 64 hex digits (this one has {len(digest)}); {expected}"


def _checksums_url_problem(url: str) -> str | None:
    shown = repr(redact_url(url))
    if any(char.isspace() for char in url):
        return f"{shown} contains whitespace; percent-encode it (a space is %20)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return f"{shown} is not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        return f"{shown} must be an absolute http:// or https:// URL"
    if not parts.hostname:
        return f"{shown} has no host"
    if not parts.path or parts.path.endswith("/"):
        return f"{shown} must name the checksums file (for example .../SHA256SUMS)"
    return None


def _keep_problem(keep: int) -> str | None:
    if keep >= 1:
        return None
    return f"'keep' must be at least 1 (the newest version is always kept), not {_shown(keep)}"


def _check_image(
    index: int, raw: object, inherited: _Inherited, problems: list[Problem]
) -> tuple[Entry | None, tuple[str, tuple[str, ...]] | None]:
    """The entry (if valid) and its name and regions (if both are known)."""
    if not isinstance(raw, dict):
        problems.append(
            Problem(
                f"each image must be a mapping with name, url and region, not {_kind_of(raw)}",
                index=index,
            )
        )
        return None, None
    given_name = raw.get("name")
    place = _Place(index, given_name if isinstance(given_name, str) and given_name else None)
    count = len(problems)
    image, bad = _validate(_Image, raw, place, problems)

    name = _required(image.name, "name", bad, place, problems)
    if name is not None and len(name) > NAME_MAX_LENGTH:
        problems.append(
            place.problem(
                f"a name has at most {NAME_MAX_LENGTH} characters (this one has {len(name)})",
                "name",
            )
        )
    url = _required(image.url, "url", bad, place, problems)
    if url is not None and (message := _url_problem(url)) is not None:
        problems.append(place.problem(message, "url"))

    regions = _regions_of(image, inherited, bad, place, problems)
    region = regions[0] if regions else None
    # A bad default was reported once, under defaults; it needs no repeating here.
    distribution = image.distribution if image.distribution is not None else inherited.distribution
    if image.distribution is not None and (message := _distribution_problem(image.distribution)):
        problems.append(place.problem(message, "distribution"))
    description = image.description if image.description is not None else inherited.description

    own_tags = tuple(image.tags or ())
    _tag_problems(own_tags, place, problems)
    tags = tuple(dict.fromkeys(inherited.tags + own_tags))
    if len(tags) > MAX_TAGS:
        problems.append(
            place.problem(
                f"at most {MAX_TAGS} tags per image, counting the defaults' (this one has "
                f"{len(tags)}); the importer adds {IMPORTER_TAGS} of its own, up to "
                f"{IMAGE_MAX_TAGS}",
                "tags",
            )
        )

    _source_problems(image, place, problems)
    checksum = _normal_checksum(image.checksum) or inherited.checksum
    checksums_url = image.checksums_url or inherited.checksums_url
    keep = image.keep if image.keep is not None else inherited.keep

    key = (name, regions) if name is not None and regions else None
    if len(problems) > count or name is None or url is None or not regions:
        return None, key
    assert region is not None
    # Regions, distributions and tags repeat across entries, but each entry's YAML gives
    # it new copies: one copy each (four strings an entry, 11 MB of 50,000 entries).
    entry = Entry(
        index,
        name,
        url,
        sys.intern(region),
        None if distribution is None else sys.intern(distribution),
        description,
        tuple(map(sys.intern, tags)),
        checksum=checksum,
        checksums_url=checksums_url,
        keep=DEFAULT_KEEP if keep is None else keep,
        transfer_regions=tuple(map(sys.intern, regions[1:])),
    )
    return entry, key


def _regions_of(
    image: _Image,
    inherited: _Inherited,
    bad: frozenset[str],
    place: _Place,
    problems: list[Problem],
) -> tuple[str, ...] | None:
    """The entry's regions after merging defaults, the import region first; ``None`` when a
    problem was reported.

    ``region`` and ``regions`` are one setting: an entry that gives either replaces both
    of the defaults'.
    """
    if {"region", "regions"} & bad:
        return None
    if image.region is not None or image.regions is not None:
        count = len(problems)
        regions = _region_pair(image.region, image.regions, place, problems)
        return regions if len(problems) == count else None
    if {"region", "regions"} & inherited.broken:
        return None
    if inherited.regions is None:
        problems.append(place.problem("missing 'region'; set it here or under defaults", "region"))
    return inherited.regions


def _region_pair(
    region: str | None, regions: list[str] | None, place: _Place, problems: list[Problem]
) -> tuple[str, ...] | None:
    """``region`` and ``regions`` as given together (in an entry, or in defaults), checked:
    the regions, the import region first, or ``None`` when neither is given."""
    if region is not None:
        if not region.strip():
            problems.append(place.problem("'region' is empty", "region"))
            region = None
        elif (message := _region_problem(region)) is not None:
            problems.append(place.problem(message, "region"))
            region = None
    if regions is None:
        return None if region is None else (region,)
    if not regions:
        problems.append(
            place.problem(
                "'regions' is empty; list at least one region (the image is imported into the "
                "first and transferred to the others), or leave it out",
                "regions",
            )
        )
        return None
    seen: dict[str, int] = {}
    valid = True
    for position, slug in enumerate(regions):
        message = _region_problem(slug) if slug.strip() else "an empty region in 'regions'"
        if message is None and slug in seen:
            message = (
                f"{slug!r} is listed twice in 'regions' (also at position {seen[slug]}); "
                "list each region once"
            )
        if message is not None:
            problems.append(place.problem(message, f"regions.{position}"))
            valid = False
        seen.setdefault(slug, position)
    if not valid:
        return None
    if region is not None and region != regions[0]:
        problems.append(
            place.problem(
                f"'region' is {region!r} but 'regions' starts with {regions[0]!r}: the image is "
                "imported into the first of 'regions'; leave 'region' out, or make it the "
                "first of 'regions'",
                "region",
            )
        )
        return None
    return tuple(regions)


def _required(
    value: str | None, key: str, bad: frozenset[str], place: _Place, problems: list[Problem]
) -> str | None:
    if key in bad:
        return None
    if value is None:
        problems.append(place.problem(f"missing {key!r}", key))
        return None
    if not value.strip():
        problems.append(place.problem(f"{key!r} is empty", key))
        return None
    return value


def _url_problem(url: str) -> str | None:
    shown = repr(redact_url(url))
    if _WHITESPACE.search(url):
        return f"{shown} contains whitespace; percent-encode it (a space is %20)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return f"{shown} is not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        return f"{shown} must be an absolute http:// or https:// URL"
    if not parts.hostname:
        return f"{shown} has no host"
    path = unquote(parts.path)
    if not path or path.endswith("/"):
        return f"{shown} must name the image file (DigitalOcean reads its format from the name)"
    suffix = rejected_suffix(path)
    if suffix is not None:
        return (
            f"{shown} is a {suffix} file, and DigitalOcean rejects "
            f"{', '.join(REJECTED_SUFFIXES)} files; it accepts "
            f"{', '.join(ACCEPTED_FORMATS)} images, optionally compressed with gzip (.gz) "
            "or bzip2 (.bz2)"
        )
    return None


def _region_problem(region: str) -> str | None:
    if region in REGIONS:
        return None
    if not region.strip():
        return "'region' is empty"
    return (
        f"unknown region {region!r}{_did_you_mean(region, REGIONS)}; valid regions: "
        f"{', '.join(sorted(REGIONS))}"
    )


def _distribution_problem(distribution: str) -> str | None:
    if distribution in DISTRIBUTIONS:
        return None
    if not distribution.strip():
        return "'distribution' is empty; leave it out if the distribution is not known"
    return (
        f"unknown distribution {distribution!r}{_did_you_mean(distribution, DISTRIBUTIONS)}; "
        f"DigitalOcean would silently record it as 'Unknown'. Valid distributions: "
        f"{', '.join(sorted(DISTRIBUTIONS, key=str.casefold))}"
    )


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, ignoring case, or nothing."""
    by_folded = {choice.casefold(): choice for choice in choices}
    folded = value.strip().casefold()
    if folded in by_folded:
        match = by_folded[folded]
        return f" (did you mean {match!r}? The spelling must match exactly, case included)"
    close = difflib.get_close_matches(folded, list(by_folded), n=1)
    return f" (did you mean {by_folded[close[0]]!r}?)" if close else ""


def _tag_problems(tags: tuple[str, ...], place: _Place, problems: list[Problem]) -> bool:
    """Add a problem for every invalid tag; whether there was any."""
    count = len(problems)
    for position, tag in enumerate(tags):
        message = tag_problem(tag)
        if message is None and tag.startswith(RESERVED_TAG_PREFIXES):
            message = (
                f"tag {tag!r} starts with one of the importer's own prefixes "
                f"({', '.join(RESERVED_TAG_PREFIXES)}); choose another name"
            )
        if message is not None:
            problems.append(place.problem(message, f"tags.{position}"))
    return len(problems) > count


def _redacted(problem: Problem) -> Problem:
    # Keys and names are the manifest author's text too, and may hold a pasted presigned URL.
    return Problem(
        redact_text(problem.message),
        index=problem.index,
        name=None if problem.name is None else redact_text(problem.name),
        field=None if problem.field is None else redact_text(problem.field),
    )
