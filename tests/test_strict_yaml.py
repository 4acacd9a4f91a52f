"""Strict YAML reading: libyaml's fast path gives what the pure-Python loader gives, or defers."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from importer import strict_yaml
from tests.examples import example_manifest

pytestmark = pytest.mark.skipif(
    strict_yaml._C_LOADER is None, reason="PyYAML is built without libyaml here"
)


def outcome(text: str, *, libyaml: bool, patch: pytest.MonkeyPatch) -> tuple[str, str]:
    """What reading ``text`` gives (its repr, so order and NaN compare) or raises (type, text)."""
    with patch.context() as inner:
        if not libyaml:
            inner.setattr(strict_yaml, "_C_LOADER", None)
        try:
            return "value", repr(strict_yaml.load(text))
        except (yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
            return type(exc).__name__, str(exc)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.dates(),
    st.sampled_from(["on", "no", "~", "0x1f", "1_000", "0o17", ".inf", "-.NaN", "2024-01-02", "="]),
)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
SNIPPETS = [
    "a: &x {b: 1}\nc: *x\n",
    "base: &b {region: nyc3, tags: [x]}\nimages:\n  - {<<: *b, name: a}\n  - {<<: [*b], name: b}\n",
    "a: 1\na: 2\n",
    "a: !!str 1\nb: !!binary aGk=\n",
    "--- 1\n--- 2\n",
    "a: [1, 2\n",
    "x: 2024-13-45\n",
    "? [a]\n: b\n",
    "=: 1\n",
    "a: =\n",
    "%YAML 1.1\n--- {a: 1}\n",
    "1: a\ntrue: b\n1.0: c\n",
    ".nan: a\n.nan: b\n",
    "- " * 150 + "x\n",
    "[" * 150 + "]" * 150,
    "a: \x00\n",
    "a: '\ud800'\n",
    "",
    "---\n",
    "a:\n\tb: 1\n",
]


@settings(max_examples=300, deadline=None)
@given(
    document=documents,
    style=st.sampled_from([None, True, False]),
    extra=st.sampled_from(["", *SNIPPETS]),
)
def test_libyaml_reads_what_the_pure_loader_reads(
    document: Any, style: bool | None, extra: str
) -> None:
    """Any document, dumped in any style, or with YAML's rarer features, reads the same."""
    text = yaml.safe_dump(document, default_flow_style=style) + extra
    with pytest.MonkeyPatch.context() as patch:
        assert outcome(text, libyaml=True, patch=patch) == outcome(text, libyaml=False, patch=patch)


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("ab:-[]{},&*!<=? \n\t'\"#%|>.~01\x85")))
def test_any_text_reads_the_same_on_both(text: str) -> None:
    """Text made of YAML's indicators gives the same value, or the same error, on both."""
    with pytest.MonkeyPatch.context() as patch:
        assert outcome(text, libyaml=True, patch=patch) == outcome(text, libyaml=False, patch=patch)


@pytest.mark.parametrize("text", SNIPPETS)
def test_rare_features_read_the_same_on_both(text: str) -> None:
    """Anchors, merges, tags, repeats, errors, deep nesting: the same value or error on both."""
    with pytest.MonkeyPatch.context() as patch:
        assert outcome(text, libyaml=True, patch=patch) == outcome(text, libyaml=False, patch=patch)


def test_a_plain_manifest_never_builds_a_node_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest of mappings, lists and scalars is read from libyaml's events alone."""

    def no_full_loader(*args: object, **kwargs: object) -> object:
        raise AssertionError("the full loader ran")

    text = example_manifest(50) + "\nextra: {'1': [1, 2.5, true, null, 2024-01-02, '', ~]}\n"
    monkeypatch.setattr(yaml, "load", no_full_loader)
    data = strict_yaml.load(text)
    assert isinstance(data, dict)
    assert len(data["images"]) == 50
    assert data["extra"] == {"1": [1, 2.5, True, None, datetime.date(2024, 1, 2), "", None]}


def test_merge_keys_are_read_by_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anchors and ``<<`` merges go to the strict loader on libyaml's parser, not the slow one."""

    class Refused(strict_yaml.StrictLoader):
        def __init__(self, stream: str) -> None:
            raise AssertionError("the pure-Python loader ran")

    monkeypatch.setattr(strict_yaml, "StrictLoader", Refused)
    data = strict_yaml.load("a: &x {k: 1}\nb: {<<: *x, j: 2}\n")
    assert data == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


def test_errors_are_told_by_the_pure_loader() -> None:
    """A repeated key is reported with the pure-Python loader's message and position."""
    with pytest.raises(yaml.constructor.ConstructorError) as caught:
        strict_yaml.load("images:\n  - name: a\n    name: b\n")
    assert "found the key 'name' twice" in str(caught.value)
    mark = caught.value.problem_mark
    assert mark is not None
    assert (mark.line, mark.column) == (2, 4)
    # The pure-Python parser's marks carry the source line; libyaml's carry none.
    assert mark.buffer is not None


def test_nan_key_repeated_is_a_repeat() -> None:
    """Two ``.nan`` keys are one key written twice, as the strict loader has always said."""
    with pytest.raises(yaml.constructor.ConstructorError, match="twice"):
        strict_yaml.load(".nan: a\n.nan: b\n")
    assert math.isnan(next(iter(strict_yaml.load(".nan: a\n"))))  # type: ignore[call-overload]
