"""Subject names: the one form in which every name is stored and looked up.

Two strings that look the same must name the same subject: "José" typed on a keyboard is NFC (one code point
for the é) while a folder name from macOS is often NFD (an e and a combining accent), and a name copied from a
web page may carry a zero-width space or a byte-order mark at an end. So names are NFC-normalised and trimmed of
spaces and invisible characters at both ends before they are stored, looked up or renamed to. (Look-alike
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


# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt; Python's unicodedata lacks the
# property): characters that render as nothing. A copy-paste leaves them at the ends of a name (a zero-width space,
# a byte-order mark, a soft hyphen, a left-to-right mark), where they would make a second subject that displays
# exactly as the first.
_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
_BLANK = frozenset("\u2800")  # the braille blank: a symbol by category, drawn as nothing
# variation selectors and tag characters end emoji ("\u2764\ufe0f", a subdivision flag), variant kanji and
# Mongolian letters
_VARIANT_TAIL = ((0x180B, 0x180D), (0x180F, 0x180F), (0xFE00, 0xFE0F), (0xE0020, 0xE007F), (0xE0100, 0xE01EF))


def _in(c: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= ord(c) <= hi for lo, hi in ranges)


def _invisible(c: str) -> bool:
    """Drawn as nothing; a bidirectional override is not trimmed away but refused (``clean_name``)."""
    return (_in(c, _IGNORABLE) or c in _BLANK) and c not in _BIDI_CONTROLS


def _without_variants(c: str) -> bool:
    return c.isascii() or unicodedata.name(c, "").startswith(("LATIN ", "GREEK ", "CYRILLIC "))


def _invisible_edge(c: str) -> bool:
    return c.isspace() or _invisible(c)


def _trimmed(text: str, at_start: Callable[[str], bool], at_end: Callable[[str], bool]) -> str:
    """NFC ``text`` without the characters ``at_start`` / ``at_end`` accept at its start / end."""
    text = unicodedata.normalize("NFC", text)
    start, end = 0, len(text)
    while start < end and at_start(text[start]):
        start += 1
    while end > start and at_end(text[end - 1]):
        end -= 1
    # a variation selector or tags after a character with variants are part of it (an emoji's presentation, a
    # kanji's ideographic variant, a Mongolian letter's form, a flag) and stay; after a Latin, Greek or Cyrillic
    # letter, a digit or ASCII punctuation they change nothing drawn and go
    if end > start and not _without_variants(text[end - 1]):
        while end < len(text) and _in(text[end], _VARIANT_TAIL):
            end += 1
    return text[start:end]


def canonical_name(name: str) -> str:
    """NFC, without spaces or invisible characters at either end (a character with variants keeps its variation
    selector or tags: an emoji's, a kanji's). Inside a name they stay: Persian and Indic names and emoji sequences
    need the zero-width (non-)joiners."""
    return _trimmed(name, _invisible_edge, _invisible_edge)


def canonical_prefix(prefix: str) -> str:
    """A name prefix in the form names are stored in: NFC, trimmed at the start as names are, and of invisible
    characters at the end (a pasted "Alice" + U+200B found nothing); a trailing space stays ("Jo " is not "Jo")."""
    return _trimmed(prefix, _invisible_edge, _invisible)


def clean_name(name: str) -> str:
    """A subject name as stored (``canonical_name``), or ``BadParameter``.

    Refused: control, surrogate and private-use characters, bidirectional overrides, and names with nothing
    visible. Allowed: any script, a no-break or ideographic space, zero-width joiners inside the name."""
    name = canonical_name(name)
    visible = any(unicodedata.category(c)[0] not in "CZ" and not _invisible(c) for c in name)
    bad = any(unicodedata.category(c) in ("Cc", "Cs", "Co") or c in _BIDI_CONTROLS for c in name)
    if not visible or bad or len(name) > MAX_NAME_LENGTH:
        raise BadParameter(f"a subject name is 1 to {MAX_NAME_LENGTH} characters, some of them visible, without "
                           "control characters or direction overrides")
    return name
