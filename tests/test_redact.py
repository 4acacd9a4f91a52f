"""Secrets never reach a message: URL queries, URL passwords and given secrets are masked."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from importer.redact import redact_text, redact_url

MODEST = settings(max_examples=200, deadline=None)

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/images/web.qcow2"
    "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef"
)


def test_query_is_replaced_and_path_kept() -> None:
    """A presigned URL keeps scheme, host and path, and loses its query."""
    assert redact_url(PRESIGNED) == "https://bucket.s3.amazonaws.com/images/web.qcow2?REDACTED"


def test_url_without_query_is_unchanged() -> None:
    """A URL with nothing secret in it comes back as it was."""
    url = "https://images.example.com/web-base.qcow2.gz"
    assert redact_url(url) == url


def test_fragment_is_dropped() -> None:
    """A fragment (where some services put tokens) is removed, even after a query."""
    assert redact_url("https://h/a.img#token=abc") == "https://h/a.img"
    assert redact_url("https://h/a.img?sig=1#token=abc") == "https://h/a.img?REDACTED"


def test_question_mark_inside_fragment_is_not_a_query() -> None:
    """A '?' after '#' belongs to the fragment, which is dropped whole."""
    assert redact_url("https://h/a.img#x?y=secret") == "https://h/a.img"


def test_userinfo_is_masked() -> None:
    """``user:password@`` before the host becomes ``***@``, even with '@' in the password."""
    assert redact_url("https://bob:p@ss@h.example/a.img") == "https://***@h.example/a.img"


def test_at_sign_in_path_is_not_userinfo() -> None:
    """An '@' after the host is part of the path and stays."""
    assert redact_url("https://h.example/v@2/a.img") == "https://h.example/v@2/a.img"


@pytest.mark.parametrize(
    "garbage", ["", "?", "#", "???", "://", "://@", "not a url?x=1", "\x00?\n"]
)
def test_garbage_does_not_raise(garbage: str) -> None:
    """Anything that is not a URL still comes back without what follows a '?'."""
    result = redact_url(garbage)
    assert "x=1" not in result
    assert result.count("?") <= 1


def test_text_redacts_every_url() -> None:
    """Every http(s) URL inside free text loses its query; the words around it stay."""
    text = f"failed: {PRESIGNED} and http://other.example/b.img?token=t0p"
    result = redact_text(text)
    assert "deadbeef" not in result
    assert "t0p" not in result
    assert result.startswith("failed: https://bucket.s3.amazonaws.com/images/web.qcow2?REDACTED")
    assert result.endswith(" and http://other.example/b.img?REDACTED")


def test_text_keeps_closing_quote() -> None:
    """A quoted URL keeps its closing quote, so messages stay readable."""
    assert (
        redact_text("url 'https://h/a.zip?sig=1' is bad") == "url 'https://h/a.zip?REDACTED' is bad"
    )
    assert redact_text('{"url": "https://h/a?s=1"}') == '{"url": "https://h/a?REDACTED"}'


def test_text_quote_inside_query_does_not_leak() -> None:
    """A quote inside the query does not end the URL early and expose the rest."""
    result = redact_text("'https://h/a?x='leaked-part-after-quote'")
    assert "leaked" not in result


def test_uppercase_scheme_is_recognised() -> None:
    """``HTTPS://`` is a URL too."""
    assert "s3cr3t" not in redact_text("see HTTPS://H/A.IMG?sig=s3cr3t")


def test_secrets_are_masked() -> None:
    """Each non-empty secret becomes ``***``; an empty one changes nothing."""
    assert redact_text("token dop_v1_abc used", ["dop_v1_abc", ""]) == "token *** used"


def test_longer_secret_masked_whole() -> None:
    """A secret containing another is masked whole, not left half visible."""
    assert redact_text("key abcdef", ["abc", "abcdef"]) == "key ***"


def test_text_without_secrets_is_unchanged() -> None:
    """Ordinary text passes through untouched."""
    text = "images[2] ('web'): region: unknown region 'nyc9'"
    assert redact_text(text) == text


_MARK = "SECRETQ"


@MODEST
@given(before=st.text(), query=st.text())
def test_redact_url_never_leaks_query(before: str, query: str) -> None:
    """For any string at all, nothing after its first '?' survives."""
    result = redact_url(f"{before}?{_MARK}{query}")
    if _MARK not in before:
        assert _MARK not in result


_HOSTLIKE = st.text(alphabet=st.characters(blacklist_characters="/?#@"), max_size=20)


@MODEST
@given(
    scheme=st.sampled_from(["http", "https", "HTTPS", "s3"]),
    user=_HOSTLIKE,
    password=st.text(max_size=10).filter(lambda p: "/" not in p and "?" not in p and "#" not in p),
    host=_HOSTLIKE,
    path=st.text(max_size=30),
    query=st.text(max_size=30),
    fragment=st.text(max_size=10),
)
def test_redact_url_never_leaks_query_password_or_fragment(
    scheme: str, user: str, password: str, host: str, path: str, query: str, fragment: str
) -> None:
    """In a URL with userinfo, query and fragment, the password, query and fragment are gone."""
    url = f"{scheme}://{user}:PASSMARK{password}@{host}/{path}?{_MARK}{query}#FRAGMARK{fragment}"
    result = redact_url(url)
    if not any(m in user + host + path for m in (_MARK, "PASSMARK", "FRAGMARK")):
        assert _MARK not in result
        assert "PASSMARK" not in result
        assert "FRAGMARK" not in result


@MODEST
@given(
    before=st.text(),
    opener=st.sampled_from(["", " ", "'", '"', "(", "<", "["]),
    path=st.text(alphabet=st.characters(blacklist_categories=("Z", "C")), max_size=20),
    query=st.text(alphabet=st.characters(blacklist_categories=("Z", "C")), max_size=30),
    after=st.text(),
)
def test_redact_text_never_leaks_query(
    before: str, opener: str, path: str, query: str, after: str
) -> None:
    """A URL anywhere in text, preceded by space or a bracket, loses its whole query."""
    secret = f"{_MARK}{query}"
    text = f"{before} {opener}https://h.example/{path}?{secret} {after}"
    result = redact_text(text)
    if _MARK not in before + path + after:
        assert _MARK not in result


# -- a secret is masked where it stands alone, and nowhere else -------------------------


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        ("term", "image.failed reason=terminated"),
        ("image", "image.submitted image_id=1 images[0] image-builder"),
        ("abc", "xabc abcx abc_d d-abc abc.def def.abc"),
    ],
)
def test_short_secret_inside_a_word_leaves_it_alone(secret: str, text: str) -> None:
    """A secret that is only part of a longer word or dotted name does not mangle it."""
    assert redact_text(text, [secret]) == text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Authorization: Bearer term", "Authorization: Bearer ***"),
        ("token=term&x=1", "token=***&x=1"),
        ('{"token": "term"}', '{"token": "***"}'),
        ("it was term.", "it was ***."),
        ("term", "***"),
        ("(term)", "(***)"),
        ("'a\\nterm'", "'a\\n***'"),
        ("tok:term,term;term", "tok:***,***;***"),
    ],
)
def test_secret_standing_alone_is_masked(text: str, masked: str) -> None:
    """Written on its own, after a space, '=', a quote, a repr's escape, the secret is masked."""
    assert redact_text(text, ["term"]) == masked


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-", max_size=12)
_SECRET = _WORD.filter(bool)
# Characters that end a token (no '.': it joins dotted names; no '?#@': URL syntax).
_SEPARATORS = " \t\n=:;,'\"()[]{}<>|/\\!*+&"


@MODEST
@given(
    secret=_SECRET,
    words=st.lists(st.one_of(_WORD, st.just("SECRET")), max_size=8),
    seps=st.lists(st.sampled_from(_SEPARATORS), min_size=9, max_size=9),
)
def test_standalone_secret_never_survives(secret: str, words: list[str], seps: list[str]) -> None:
    """Among any words and separators, no token of the result is the secret itself."""
    pieces = [secret if w == "SECRET" else w for w in words]
    text = seps[0] + "".join(p + s for p, s in zip(pieces, seps[1:], strict=False))
    result = redact_text(text, [secret])
    assert secret not in re.split(f"[{re.escape(_SEPARATORS)}]", result)


@MODEST
@given(
    secret=_SECRET,
    before=_WORD,
    after=_WORD,
    dotted=st.booleans(),
)
def test_secret_inside_a_longer_word_changes_nothing(
    secret: str, before: str, after: str, dotted: bool
) -> None:
    """Text where the secret only occurs glued to more word (or `word.`) is left as it is."""
    if dotted:
        before, after = before and before + ".", after and "." + after
    text = f"{before}{secret}{after}"
    if text != secret:  # at least one side is glued
        assert redact_text(text, [secret]) == text


@MODEST
@given(text=st.text(), secret=st.text(min_size=1))
def test_text_without_the_secret_is_unchanged(text: str, secret: str) -> None:
    """A secret that does not occur changes nothing (URLs aside); any secret at all is safe."""
    result = redact_text(text, [secret])
    if secret not in text and "://" not in text:
        assert result == text
