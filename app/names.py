"""Subject names: the one form in which every name is stored and looked up.

Two strings that look the same must name the same subject: "José" typed on a keyboard is NFC (one code point
for the é) while a folder name from macOS is often NFD (an e and a combining accent), and a name copied from a
web page may carry a zero-width space or a byte-order mark at an end. So names are NFC-normalised and trimmed of
spaces and zero-width characters at both ends before they are stored, looked up or renamed to. (Look-alike
letters of other scripts and compatibility forms such as full-width letters stay distinct: folding them would
merge names that are different.)
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from app.errors import BadParameter

MAX_NAME_LENGTH = 200
# bidirectional overrides and isolates: they make a name display as another (U+202A-202E, U+2066-2069)
_BIDI_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))


# invisible characters a copy-paste leaves at the ends of a name: zero-width space, (non-)joiners, word joiner,
# byte-order mark. Not every format character: an emoji flag ends in tag characters, and a bidirectional override
# stays, to be refused by clean_name.
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff")


def _invisible_edge(c: str) -> bool:
    return c.isspace() or c in _INVISIBLE


def _trimmed(text: str, at_start: Callable[[str], bool], at_end: Callable[[str], bool]) -> str:
    """NFC ``text`` without the characters ``at_start`` / ``at_end`` accept at its start / end."""
    text = unicodedata.normalize("NFC", text)
    start, end = 0, len(text)
    while start < end and at_start(text[start]):
        start += 1
    while end > start and at_end(text[end - 1]):
        end -= 1
    return text[start:end]


def canonical_name(name: str) -> str:
    """NFC, without spaces or zero-width characters at either end. Inside a name they stay: Persian and Indic
    names and emoji sequences need the zero-width (non-)joiners."""
    return _trimmed(name, _invisible_edge, _invisible_edge)


def canonical_prefix(prefix: str) -> str:
    """A name prefix in the form names are stored in: NFC, trimmed at the start as names are, and of zero-width
    characters at the end (a pasted "Alice" + U+200B found nothing); a trailing space stays ("Jo " is not "Jo")."""
    return _trimmed(prefix, _invisible_edge, _INVISIBLE.__contains__)


def clean_name(name: str) -> str:
    """A subject name as stored (``canonical_name``), or ``BadParameter``.

    Refused: control, surrogate and private-use characters, bidirectional overrides, and names with nothing
    visible. Allowed: any script, a no-break or ideographic space, zero-width joiners inside the name."""
    name = canonical_name(name)
    visible = any(unicodedata.category(c)[0] not in "CZ" for c in name)
    bad = any(unicodedata.category(c) in ("Cc", "Cs", "Co") or c in _BIDI_CONTROLS for c in name)
    if not visible or bad or len(name) > MAX_NAME_LENGTH:
        raise BadParameter(f"a subject name is 1 to {MAX_NAME_LENGTH} characters, some of them visible, without "
                           "control characters or direction overrides")
    return name
