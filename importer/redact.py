"""Keep secrets out of anything the importer prints, logs or raises.

Presigned image URLs carry their credentials in the query string (``X-Amz-Signature=...``),
and a URL may carry a password before its host; the API token is a secret of its own. Every
message that may quote a URL or a token goes through these helpers first.

The helpers work on plain strings, not on a URL parser's view, so that garbage input (a
half-written URL, a stray ``?``) can never make them raise or let a secret through.

A secret is masked where it stands as a whole token: not glued to a letter, digit, ``_`` or
``-``, nor to a dotted neighbour (``.word``). Masking every substring would corrupt unrelated
text when the secret is short (a token ``term`` would turn ``terminated`` into
``***inated``, a token ``image`` the event ``image.submitted`` into ``***.submitted``),
while a real token never sits inside a longer word. Everywhere a token is written on its
own (``Bearer T``, ``token=T``, ``"T"``, ``T.`` at the end of a sentence, ``\nT`` in a
repr) it is masked.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Final

#: What replaces a URL's query string: shows there was one without showing it.
REDACTED_QUERY: Final = "?REDACTED"
#: What replaces a secret, and a URL's ``user:password``.
MASK: Final = "***"

# A URL runs to the next whitespace: its query may contain quotes or brackets, and stopping
# early would leave the rest of the query in the text. The optional opener lets a quoted or
# bracketed URL keep its closing character.
_URL_IN_TEXT: Final = re.compile(r"(?P<opener>[\"'(\[<]?)(?P<url>https?://\S+)", re.IGNORECASE)
_CLOSERS: Final = {'"': '"', "'": "'", "(": ")", "[": "]", "<": ">"}
_TRAILING_PUNCTUATION: Final = frozenset("\"')]}>.,;:!?")
# What a secret must not touch to stand on its own: a word character, or a dot that joins it
# to one (event names, file names). A backslash escape such as ``\n`` before it, as a repr
# writes a newline, is a boundary, not a word.
_BEFORE: Final = r"(?<!(?<!\\)[\w-])(?<![\w-]\.)"
_AFTER: Final = r"(?![\w-])(?!\.[\w-])"


def redact_url(url: str) -> str:
    """``url`` without its secrets: query -> ``?REDACTED``, fragment dropped, userinfo -> ``***``.

    Scheme, host and path are kept, so the result still says which file is meant.
    """
    cut = len(url)
    for separator in "?#":
        found = url.find(separator)
        if 0 <= found < cut:
            cut = found
    head = _without_userinfo(url[:cut])
    # The query starts at the first '?' unless a '#' comes first (then it is fragment text).
    return head + REDACTED_QUERY if url[cut : cut + 1] == "?" else head


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every http(s) URL passed through :func:`redact_url` and each secret masked."""
    unique = frozenset(s for s in secrets if s)
    if unique:
        text = _secrets_pattern(unique).sub(MASK, text)
    return _URL_IN_TEXT.sub(_redact_match, text)


@functools.lru_cache(maxsize=16)
def _secrets_pattern(secrets: frozenset[str]) -> re.Pattern[str]:
    # Longest first: where one secret contains another, the longer one is masked whole.
    alternatives = "|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))
    return re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}")


def _redact_match(match: re.Match[str]) -> str:
    opener, url = match["opener"], match["url"]
    tail = ""
    closer = _CLOSERS.get(opener)
    if closer is not None:
        end = url.rfind(closer)
        # Split off the closer only when nothing but punctuation follows it; anything else
        # may be more of the query and must be redacted with it.
        if end >= 0 and set(url[end + 1 :]) <= _TRAILING_PUNCTUATION:
            url, tail = url[:end], url[end:]
    return opener + redact_url(url) + tail


def _without_userinfo(head: str) -> str:
    scheme_end = head.find("://")
    if scheme_end < 0:
        return head
    start = scheme_end + 3
    slash = head.find("/", start)
    end = len(head) if slash < 0 else slash
    # rfind, like urllib's hostname: a password may itself contain '@'.
    at = head.rfind("@", start, end)
    if at < 0:
        return head
    return head[:start] + MASK + head[at:]
