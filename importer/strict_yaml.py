"""Strict YAML reading: PyYAML's safe loader without its silent behaviours, fast on large files.

Strict: a key given twice in one mapping raises (YAML would silently keep the last), and a
scalar PyYAML's constructors choke on (``2024-13-45`` as a date, an empty ``!!int``) raises a
:class:`~yaml.constructor.ConstructorError` with its position instead of a bare ValueError.

Fast: PyYAML's pure-Python loader takes about half a millisecond and 13 KB per manifest
entry (25 s and 670 MB for 50,000 entries), most of it spent building a graph of nodes,
each with two position marks, before the first value exists. When PyYAML was built with
libyaml, :func:`load` reads libyaml's parser events and builds the values directly, with
no node graph (about a tenth of the time and a small fraction of the memory). That reader
covers what manifests are made of: mappings, lists and untagged scalars. Anything else
(anchors, aliases, ``<<`` merges, explicit tags, repeated keys, more than one document,
deep nesting, or any error) is left to the full strict loader, on libyaml's parser when it
can build the document, and otherwise on the pure-Python one. So every error message, and
every position in one, is the pure-Python loader's whether or not libyaml is installed,
and libyaml only decides how fast a valid document is read. Where libyaml is more lenient
than PyYAML (tabs between tokens, a byte order mark inside the text, ``?`` inside a flow
scalar, a comment glued to a block scalar's header, a lone ``!`` tag), the document goes
to the pure-Python loader, so that both accept the same documents: tests/test_strict_yaml.py
holds them to it on generated documents and on text made of YAML's indicators.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any, Final

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    DocumentEndEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

_STR: Final = "tag:yaml.org,2002:str"
_NULL: Final = "tag:yaml.org,2002:null"
#: Implicitly typed scalars the event reader builds with SafeConstructor's own constructors.
_TYPED: Final = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp")
)
#: Deeper documents are left to the pure-Python loader, whose recursion limit decides.
#: Manifests are four levels deep.
_FAST_MAX_DEPTH: Final = 100
#: A block scalar's header directly followed by a comment: PyYAML refuses it, libyaml not.
_HEADER_WITH_COMMENT: Final = re.compile(r"[|>][-+0-9]*#")


class _StrictConstruction(SafeConstructor):
    """The safe constructor, minus its silent behaviours: duplicate keys and bad scalars raise."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:
            # PyYAML's constructors trust the scalars they get: ``2024-13-45`` makes datetime
            # raise ValueError, an empty ``!!int`` IndexError, an empty ``!!bool`` KeyError.
            detail = f" ({exc})" if isinstance(exc, ValueError) else ""
            problem = f"invalid {node.tag.rsplit(':', 1)[-1]} value{detail}"
            raise ConstructorError(None, None, problem, node.start_mark) from exc

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[type, object]] = set()
        for key_node, _ in node.value:
            # Keys brought in by a ``<<`` merge may be overridden on purpose; only repeats among
            # the mapping's own keys are mistakes.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            # The type is part of the identity so that ``1`` and ``true`` stay different keys.
            identity = (type(key), key)
            try:
                repeated = identity in seen
            except TypeError:
                continue  # an unhashable key: the base class reports it with its position
            if repeated:
                raise ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (the second would silently replace the first)",
                    key_node.start_mark,
                )
            seen.add(identity)
        return super().construct_mapping(node, deep)


class StrictLoader(_StrictConstruction, yaml.SafeLoader):
    """The strict constructor on PyYAML's pure-Python parser: the reference for every message."""


if yaml.__with_libyaml__:

    class _StrictCLoader(_StrictConstruction, yaml.CSafeLoader):
        """The strict constructor on libyaml's parser."""

    _C_LOADER: type[yaml.CSafeLoader] | None = _StrictCLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _C_LOADER = None


class _Unusual(Exception):
    """A document the event reader leaves to the strict loader on libyaml's parser."""


class _PureOnly(Exception):
    """A document only the pure-Python loader reads as the reference does.

    libyaml's parser is more lenient than PyYAML's in a few corners (``!`` alone is an empty
    string to one and null to the other; ``[a?b]`` and ``|#`` are errors to PyYAML only), so
    documents with those go there, as do documents nested too deep for the event reader and
    scalars that fail to construct.
    """


def load(text: str) -> object:
    """The one document in ``text``, read strictly; raises what :class:`StrictLoader` raises."""
    loader = _C_LOADER
    # Where the two parsers part, PyYAML's word is the reference: it refuses a tab that
    # separates tokens (after ``0`` at the end of a line, say), which libyaml skips, and
    # reads a byte order mark after the start as text, which libyaml skips too. A manifest
    # needs neither.
    if loader is not None and "\t" not in text and "\ufeff" not in text:
        try:
            return _read_events(loader, text)
        except _Unusual:
            try:
                return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader's rules
            except Exception:  # noqa: S110 - told again, and the same way, below
                pass
        except Exception:  # noqa: S110 - told again, and the same way, below
            pass
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


_NO_KEY: Final = object()


def _read_events(loader_type: type[yaml.CSafeLoader], text: str) -> object:
    """The document built straight from libyaml's events, as the strict loader would build it.

    Raises :class:`_Unusual` or :class:`_PureOnly` for what it leaves to another loader,
    after reading the whole document (a later tag or depth may call for the pure-Python
    loader), or the parser's error.
    """
    loader: Any = loader_type(text)  # a CParser: get_event() and resolve() are untyped
    try:
        return _build(loader, text)
    finally:
        loader.dispose()


def _build(loader: Any, text: str) -> object:
    get_event = loader.get_event
    constructors = loader.yaml_constructors
    # PyYAML's resolver, inlined: a plain scalar's type is the first implicit resolver (by
    # its first character) whose pattern matches; a quoted one is a string.
    table = loader.yaml_implicit_resolvers
    if None in table or loader.yaml_path_resolvers:
        raise _Unusual  # resolvers this reader does not apply; SafeLoader has none
    event = get_event()
    assert type(event) is StreamStartEvent
    if type(get_event()) is StreamEndEvent:
        return None  # an empty stream: no document
    root: object = None
    #: The open collections, innermost last, and for each mapping the key awaiting its value.
    open_: list[dict[Any, Any] | list[Any]] = []
    keys: list[object] = []
    shared_keys: dict[str, str] = {}
    #: Set once the document is left to another loader; the events are still read to the
    #: end, for what would send it to the pure-Python loader.
    deferred = False
    depth = 0
    #: How many of the open collections are flow style (``[...]``, ``{...}``).
    flow = 0
    while True:
        event = get_event()
        kind = type(event)
        value: object
        if kind is ScalarEvent:
            if event.tag is not None:
                raise _PureOnly
            scalar, style = event.value, event.style
            if style:  # quoted, or a block scalar
                if style in "|>" and _HEADER_WITH_COMMENT.search(
                    text, event.start_mark.index, event.end_mark.index
                ):
                    raise _PureOnly
            elif flow and "?" in scalar:
                raise _PureOnly
            if deferred:
                continue
            if event.anchor is not None:
                deferred = True
                continue
            tag = _STR
            if event.implicit[0]:  # plain
                for candidate, pattern in table.get(scalar[:1], ()):
                    if pattern.match(scalar):
                        tag = candidate
                        break
            if tag == _STR:
                value = scalar
            elif tag == _NULL:
                value = None
            elif tag in _TYPED:
                node = ScalarNode(tag, scalar, event.start_mark, event.end_mark, style)
                try:
                    value = constructors[tag](loader, node)
                except Exception:
                    raise _PureOnly from None  # it says what is wrong, and where
            else:
                deferred = True  # a merge key, ``=``, or a reserved indicator
                continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            depth -= 1
            if flow:
                flow -= 1
            if not deferred:
                open_.pop()
                keys.pop()
            continue
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            if event.tag is not None:
                raise _PureOnly
            depth += 1
            if depth > _FAST_MAX_DEPTH:
                raise _PureOnly
            if flow or event.flow_style:
                flow += 1  # a flow collection holds only flow collections
            if deferred:
                continue
            if event.anchor is not None:
                deferred = True
                continue
            value = {} if kind is MappingStartEvent else []
        elif kind is DocumentEndEvent:
            break
        else:  # an alias
            deferred = True
            continue

        if not open_:
            root = value
        else:
            top = open_[-1]
            if isinstance(top, list):
                top.append(value)
            elif keys[-1] is not _NO_KEY:
                top[keys[-1]] = value
                keys[-1] = _NO_KEY
            elif type(value) is dict or type(value) is list or value in top:
                # A collection as a key, or a key seen before: the strict loader reports both.
                deferred = True
                continue
            elif type(value) is str:
                # Every entry repeats the same few keys: one string each, not one per entry.
                keys[-1] = shared_keys.setdefault(value, value)
            else:
                keys[-1] = value
        if type(value) is dict or type(value) is list:
            open_.append(value)
            keys.append(_NO_KEY)
    if deferred or type(get_event()) is not StreamEndEvent:
        # Also a second document: the strict loader refuses it, saying so.
        raise _Unusual
    return root
