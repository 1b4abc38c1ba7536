"""A detection copy of a text in which Unicode tricks no longer hide an entity.

Recognizers never see the original text: they see a copy where invisible characters
are gone, compatibility forms are folded (NFKD: fullwidth, mathematical, circled),
combining marks are dropped, every decimal digit is ASCII, common look-alike letters
(Cyrillic, Greek, Armenian, Cherokee) are their Latin prototype, and a right-to-left
override run reads in display order. An offset map sends a span of the copy back to the
original characters, so masking replaces exactly what the reader would have seen,
evasion characters included (UTS #39 "skeleton" on a copy, spans mapped back).

Cost: a text that is printable ASCII plus tab/CR/LF (the common case) is its own copy,
checked by one linear scan; otherwise each other character is folded through a cache.
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

# SECURITY: stdlib ``re`` is used only with single character classes and no quantifier
# nesting below; such a search is one linear pass in any engine.
_SPECIAL: Final = re.compile(r"[^\t\n\r\x20-\x7e]")

RLO: Final = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: following characters display reversed
_OVERRIDE_END: Final = frozenset({"\u202c", "\u2069", "\n", "\r", "\u2029"})  # PDF, PDI, end of paragraph

# Characters that render as nothing or as a blank but are letters (Lo) or symbols, so the
# category test below would keep them.
_INVISIBLE: Final = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5\u180e\u034f")

# A subset of UTS #39 confusables.txt: characters whose prototype is an ASCII letter, digit
# or one of ``@ . -``, for scripts that mix into Latin text unnoticed.
_CONFUSABLE_PAIRS: Final = (
    # Cyrillic
    "аa вB еe оo рp сc уy хx ѕs іi јj ԁd ԛq ԝw һh ӏl ɡg ьb Ьb"
    " АA ВB ЕE КK МM НH ОO РP СC ТT УY ХX ЅS ІI ЈJ ԚQ ԜW ҮY ҺH ӀI З3 б6"
    # Greek
    " αa οo νv ιi ρp υu χx γy ϲc ϳj κk"
    " ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX ϹC"
    # Armenian
    " օo սu հh ոn զq ցg"
    # Latin look-alikes outside ASCII that NFKD keeps
    " ıi ȷj ɑa ɩi ǀl ɪi ʏy ᴀA ᴄc ᴏo ᴜu ᴠv ᴡw ᴢz"
    # Cherokee
    " ᎪA ᏴB ᏟC ᎠD ᎬE ᏀG ᎻH ᎫJ ᏦK ᏞL ᎷM ᏢP ᏚS ᎢT ᏙV ᎳW ᏃZ"
    # punctuation: ideographic and other full stops, minus signs, at signs
    " 。. ｡. ․. −- ⁃- ‐- ‑- ‒- –- —- ―- ﹣- ⸺- ⸻-"
)
CONFUSABLES: Final[dict[str, str]] = {pair[0]: pair[1] for pair in _CONFUSABLE_PAIRS.split()}

_SPACE_CONTROLS: Final = frozenset("\x0b\x0c\x1c\x1d\x1e\x1f\x85")


@lru_cache(maxsize=8192)
def fold_char(ch: str) -> str:
    """The detection form of one character outside printable ASCII ("" = invisible)."""
    if ch in _INVISIBLE:
        return ""
    category = unicodedata.category(ch)
    if category == "Cs":
        return "\ufffd"  # a lone surrogate (surrogateescape'd byte) cannot be UTF-8 encoded
    if category == "Cc":
        # SECURITY: a NUL or other control inside an address is invisible to a reader, so
        # it must not split the entity for the recognizers either.
        return " " if ch in _SPACE_CONTROLS else ""
    if category in ("Zl", "Zp"):
        return "\n"
    if ch in CONFUSABLES:
        return CONFUSABLES[ch]
    out: list[str] = []
    for c in unicodedata.normalize("NFKD", ch):
        if c < "\x80":
            out.append(c)
            continue
        cat = unicodedata.category(c)
        if cat in ("Mn", "Me", "Cf"):
            continue  # combining marks, zero-width and bidi controls, soft hyphen, tags
        if cat == "Zs":
            out.append(" ")
        elif cat == "Pd":
            out.append("-")
        elif cat == "Nd":
            out.append(str(unicodedata.decimal(c)))
        else:
            out.append(CONFUSABLES.get(c, c))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Normalized:
    """The detection copy of ``original`` and the map from its offsets back.

    ``starts[i]``/``ends[i]`` are the original offsets of the character that produced
    copy character ``i``; both are None when the copy is the original itself.
    """

    original: str
    text: str
    starts: array[int] | None = None
    ends: array[int] | None = None
    reordered: bool = False  # a right-to-left override run was put in display order

    @property
    def identity(self) -> bool:
        return self.starts is None

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """The original span covering copy characters ``[start, end)``."""
        starts, ends = self.starts, self.ends
        if starts is None or ends is None:
            return start, end
        if start >= end:
            position = starts[start] if start < len(starts) else len(self.original)
            return position, position
        if self.reordered:
            return min(starts[start:end]), max(ends[start:end])
        return starts[start], ends[end - 1]


def normalize(text: str, *, display_order: bool = True) -> Normalized:
    """Build the detection copy; ``display_order=False`` keeps override runs in logical order."""
    if _SPECIAL.search(text) is None:
        return Normalized(text, text)
    builder = _Builder(text, display_order)
    position = 0
    for match in _SPECIAL.finditer(text):
        index = match.start()
        if index > position:
            builder.ascii_run(position, index)
        builder.special(index)
        position = index + 1
    if position < len(text):
        builder.ascii_run(position, len(text))
    builder.close_override()
    return Normalized(text, "".join(builder.parts), builder.starts, builder.ends, builder.reordered)


class _Builder:
    """Accumulates the copy and its offset map; one instance per ``normalize`` call."""

    __slots__ = ("display_order", "ends", "override", "parts", "reordered", "starts", "text")

    def __init__(self, text: str, display_order: bool) -> None:
        self.text = text
        self.display_order = display_order
        self.parts: list[str] = []
        self.starts: array[int] = array("i")
        self.ends: array[int] = array("i")
        self.override: tuple[int, int] | None = None  # (parts index, map index) where an RLO run began
        self.reordered = False

    def ascii_run(self, start: int, stop: int) -> None:
        if self.override is not None:
            # An override run also ends at the end of a line.
            cut = min((i for i in (self.text.find("\n", start, stop), self.text.find("\r", start, stop))
                       if i != -1), default=-1)
            if cut != -1:
                self._copy(start, cut)
                self.close_override()
                start = cut
        self._copy(start, stop)

    def _copy(self, start: int, stop: int) -> None:
        if stop > start:
            self.parts.append(self.text[start:stop])
            self.starts.extend(range(start, stop))
            self.ends.extend(range(start + 1, stop + 1))

    def special(self, index: int) -> None:
        ch = self.text[index]
        if self.display_order:
            if self.override is not None and ch in _OVERRIDE_END:
                self.close_override()
            elif ch == RLO and self.override is None:
                self.override = (len(self.parts), len(self.starts))
                self.reordered = True
        folded = fold_char(ch)
        if folded:
            self.parts.append(folded)
            self.starts.extend([index] * len(folded))
            self.ends.extend([index + 1] * len(folded))

    def close_override(self) -> None:
        """Put the characters produced since the RLO in the order a reader sees them."""
        if self.override is None:
            return
        from_part, from_map = self.override
        self.override = None
        run = "".join(self.parts[from_part:])[::-1]
        del self.parts[from_part:]
        self.parts.append(run)
        self.starts[from_map:] = array("i", reversed(self.starts[from_map:]))
        self.ends[from_map:] = array("i", reversed(self.ends[from_map:]))


def skeleton(text: str) -> str:
    """The detection copy alone, for canonical forms (pseudonyms, masks) of short values."""
    return normalize(text).text
