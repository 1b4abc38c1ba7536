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

import html.entities
import re
import unicodedata
from functools import lru_cache
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

# SECURITY: stdlib ``re`` is used only with single character classes and no quantifier
# nesting below; such a search is one linear pass in any engine.
_SPECIAL: Final = re.compile(r"[^\t\n\r\x20-\x7e]")
_PLAIN_ASCII: Final = bytes([0x09, 0x0A, 0x0D, *range(0x20, 0x7F)])

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
    # dashes and dots that are not Pd/Po-dot characters, so the category fold misses them:
    # modifier minus (Sk), heavy minus (So), Arabic full stop and Coptic dialect-p ni
    # (confusables.txt prototype "-"), the katakana prolonged sound mark written as the dash
    # of Japanese phone numbers ("０９０ー１２３４ー５６７８"), box-drawing lines, and the
    # Lisu, Syriac and Vai full stops (prototype ".").
    " ˗- ➖- ۔- Ⲻ- ⲻ- ー- ─- ━- ꓸ. ܁. ܂. ꘎."
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
        # A lone surrogate: a byte that was not UTF-8, kept under on_non_utf8 "pass".
        # SECURITY: a lenient decoder (errors="ignore", a byte-level model) drops it, so
        # like a NUL it must not split an entity ("john.doe\xff@example.com") for the
        # recognizers either; it is not in the copy at all (it cannot be UTF-8 encoded).
        return ""
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


class Normalized(NamedTuple):
    """The detection copy of ``original`` and the map from its offsets back.

    ``starts[i]`` is the original offset of the character that produced copy character
    ``i`` (each copy character comes from exactly one original character); None when the
    copy is the original itself.

    A tuple, not a frozen dataclass (immutable either way): one is built per scanned text,
    and a frozen dataclass's ``__init__`` cost three times as much.
    """

    original: str
    text: str
    starts: npt.NDArray[np.int64] | None = None
    reordered: bool = False  # a right-to-left override run was put in display order
    # Where the original characters of copy character ``i`` end (exclusive), when one copy
    # character stands for several (a decoded ``&#64;``); None: ``starts[i] + 1``.
    ends: npt.NDArray[np.int64] | None = None

    @property
    def identity(self) -> bool:
        return self.starts is None

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """The original span covering copy characters ``[start, end)``."""
        starts = self.starts
        if starts is None:
            return start, end
        if start >= end:
            position = int(starts[start]) if start < len(starts) else len(self.original)
            return position, position
        if self.reordered:
            window = starts[start:end]
            return int(window.min()), int(window.max()) + 1
        if self.ends is not None:
            return int(starts[start]), int(self.ends[end - 1])
        return int(starts[start]), int(starts[end - 1]) + 1


class _FoldTable(dict[int, str]):
    """Code point -> detection form, filled on first sight."""

    def __missing__(self, key: int) -> str:
        folded = fold_char(chr(key))
        if len(self) < _TABLE_LIMIT:  # SECURITY: bounded, whatever code points arrive
            self[key] = folded
        return folded


_TABLE_LIMIT: Final = 1 << 16
_FOLD: Final = _FoldTable()
_OVERRIDE_END_CODES: Final = np.array(sorted(ord(c) for c in _OVERRIDE_END), dtype=np.uint32)


# Up to this many characters outside printable ASCII, a Python loop over them beats the
# fixed cost of the vectorized path.
SPARSE_LIMIT: Final = 256


def normalize(text: str, *, display_order: bool = True) -> Normalized:
    """Build the detection copy; ``display_order=False`` keeps override runs in logical order.

    Three paths, all linear: printable ASCII is its own copy; when every character
    outside it folds to exactly one character (accents, curly quotes, Cyrillic,
    fullwidth digits) the copy has the same offsets and is made by ``str.replace`` per
    distinct character; otherwise an offset map is built, by a loop over the few
    special characters or vectorized over all of them.
    """
    if text.isascii() and not text.encode("ascii").translate(None, _PLAIN_ASCII):
        return Normalized(text, text)
    distinct = set(_specials(text))
    folds = {ch: _FOLD[ord(ch)] for ch in distinct}
    if len(distinct) <= SPARSE_LIMIT and all(len(f) == 1 for f in folds.values()):
        copy = text
        for ch, folded in folds.items():
            if folded != ch:
                copy = copy.replace(ch, folded)
        return Normalized(text, copy)
    if (display_order and RLO in distinct) or len(distinct) > SPARSE_LIMIT:
        return _normalize_vectorized(text, display_order)
    positions = [m.start() for m in _SPECIAL.finditer(text)]
    if len(positions) > SPARSE_LIMIT:
        return _normalize_vectorized(text, display_order)
    return _normalize_sparse(text, positions, folds)


def _specials(text: str) -> str:
    """What ``_SPECIAL.findall(text)`` finds, joined, at a third of its cost: the UTF-8
    bytes less the plain ASCII ones are exactly the encodings of the other characters (a
    multi-byte sequence holds no ASCII byte). surrogatepass: lone surrogates included."""
    return text.encode("utf-8", "surrogatepass").translate(None, _PLAIN_ASCII).decode("utf-8", "surrogatepass")


def _normalize_sparse(text: str, positions: list[int], folds: dict[str, str]) -> Normalized:
    pieces: list[str] = []
    lengths = np.ones(len(text), dtype=np.int64)
    previous = 0
    for position in positions:
        folded = folds[text[position]]
        pieces.append(text[previous:position])
        pieces.append(folded)
        if len(folded) != 1:
            lengths[position] = len(folded)
        previous = position + 1
    pieces.append(text[previous:])
    starts = np.repeat(np.arange(len(text), dtype=np.int64), lengths)
    return Normalized(text, "".join(pieces), starts)


def _normalize_vectorized(text: str, display_order: bool) -> Normalized:
    """Only the distinct special code points go through Python; the rest is numpy."""
    # surrogatepass: a lone surrogate (from surrogateescape) still has a code point.
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    special = (points < 0x20) | (points > 0x7E)
    special &= (points != 0x09) & (points != 0x0A) & (points != 0x0D)
    where = np.flatnonzero(special)
    distinct, inverse = np.unique(points[where], return_inverse=True)
    folds = [_FOLD[int(code)] for code in distinct]
    fold_lengths = np.fromiter((len(f) for f in folds), dtype=np.int64, count=len(folds))
    lengths = np.ones(len(points), dtype=np.int64)
    lengths[where] = fold_lengths[inverse]
    mapped = points.copy()
    mapped[where] = np.fromiter((ord(f[0]) if f else 0 for f in folds), dtype="<u4", count=len(folds))[inverse]
    out = np.repeat(mapped, lengths)
    starts = np.repeat(np.arange(len(points), dtype=np.int64), lengths)
    if fold_lengths.max(initial=0) > 1:
        # Expansions ("ﬁ" -> "fi", "½" -> "1/2"): write the remaining code points.
        offsets = np.cumsum(lengths) - lengths
        expanding = where[fold_lengths[inverse] > 1]
        for position, offset in zip(expanding.tolist(), offsets[expanding].tolist(), strict=True):
            folded = _FOLD[int(points[position])]
            out[offset:offset + len(folded)] = [ord(c) for c in folded]
    reordered = False
    if display_order and ord(RLO) in distinct:
        reordered = _display_order(points, out, starts)
    return Normalized(text, out.tobytes().decode("utf-32-le"), starts, reordered)


def _display_order(points: npt.NDArray[np.uint32], out: npt.NDArray[np.uint32],
                   starts: npt.NDArray[np.int64]) -> bool:
    """Reverse, in place, the copy of every RLO run (to PDF, PDI or the end of the line).

    Nested overrides are not modelled: a second RLO inside a run is ignored, which keeps
    the run reversed as a whole (what a reader sees for the common single override).
    """
    events = np.flatnonzero((points == ord(RLO)) | np.isin(points, _OVERRIDE_END_CODES)).tolist()
    runs: list[tuple[int, int]] = []
    opened: int | None = None
    for position in events:
        is_rlo = points[position] == ord(RLO)
        if opened is None:
            if is_rlo:
                opened = position
        elif not is_rlo:
            runs.append((opened, position))
            opened = None
    if opened is not None:
        runs.append((opened, len(points)))
    for begin, end in runs:
        first, stop = np.searchsorted(starts, [begin, end])
        out[first:stop] = out[first:stop][::-1].copy()
        starts[first:stop] = starts[first:stop][::-1].copy()
    return bool(runs)


def skeleton(text: str) -> str:
    """The detection copy alone, for canonical forms (pseudonyms, masks) of short values."""
    return normalize(text).text


# --- character references -------------------------------------------------------------

# SECURITY: each alternative is a fixed prefix and one bounded run of a single class (or
# a run of one fixed-width unit): one linear pass in any engine, whatever the text.
_REFERENCE: Final = re.compile(
    r"%[0-7][0-9A-Fa-f]|(?:%[89A-Fa-f][0-9A-Fa-f])+|&#[0-9]{1,7};?|&#[xX][0-9A-Fa-f]{1,6};?"
    r"|&[A-Za-z][A-Za-z0-9]{1,31};|\\u[0-9A-Fa-f]{4}|\\x[0-9A-Fa-f]{2}"
)
_NAMED: Final = html.entities.html5
# The printable ASCII characters' percent and decimal/hex references, precomputed: a text
# made of them (tens of thousands) then costs one dict lookup per reference.
_VALUES: Final[dict[str, str]] = {
    form: chr(code) for code in range(0x20, 0x7F)
    for form in (f"%{code:02X}", f"%{code:02x}", f"&#{code};", f"&#x{code:x};", f"&#x{code:X};", f"&#X{code:x};")
}


def decode_references(text: str) -> Normalized | None:
    """A detection copy of ``text`` with percent-encoding, HTML character references
    (decimal, hex, named) and ``\\uXXXX``/``\\xXX`` escapes decoded, then folded like
    :func:`normalize` (logical order); None when ``text`` has none.

    SECURITY: "john.doe&#64;example&#46;com", "4111%201111%201111%201111" and
    "078&#45;05&#45;1120" are what a browser, a URL decoder or a model reads as the entity;
    decoded once (the recognizers read ``%40`` themselves, so ``%2540`` is caught too). The
    copy is scanned in addition to the plain one, so decoding can only add detections.
    Every character a reference decodes to maps back to the whole reference.
    """
    if "%" not in text and "&" not in text and "\\" not in text:
        return None
    found: list[tuple[int, int, int]] = []  # start, end, decoded length

    def decode(match: re.Match[str]) -> str:
        reference = match.group()
        value = _VALUES.get(reference) or _reference_value(reference)
        if not value:
            return reference
        found.append((match.start(), match.end(), len(value)))
        return value

    decoded = _REFERENCE.sub(decode, text)
    if not found:
        return None
    size = len(text)
    spans = np.array(found, dtype=np.int64)
    # Per original character: how many copy characters it stands for, and their span.
    counts = np.ones(size, dtype=np.int64)
    inside = np.zeros(size + 1, dtype=np.int64)
    inside[spans[:, 0]] += 1  # matches do not overlap: starts (and ends) are distinct
    inside[spans[:, 1]] -= 1
    counts[np.cumsum(inside[:size]) > 0] = 0
    counts[spans[:, 0]] = spans[:, 2]
    first = np.arange(size, dtype=np.int64)
    last = first + 1
    last[spans[:, 0]] = spans[:, 1]
    starts, ends = np.repeat(first, counts), np.repeat(last, counts)
    folded = normalize(decoded, display_order=False)
    if folded.starts is not None:
        starts, ends = starts[folded.starts], ends[folded.starts]
    return Normalized(text, folded.text, starts, False, ends)


def _reference_value(reference: str) -> str | None:
    """What one reference or escape stands for (None: not one we read)."""
    if len(reference) == 3 and reference[0] == "%":
        return chr(int(reference[1:], 16))
    if reference[0] == "%":
        data = bytes.fromhex(reference.replace("%", ""))
        return data.decode("utf-8", "replace") if data[0] >= 0x80 else chr(data[0])
    if reference.startswith("&#"):
        body = reference[2:].rstrip(";")
        number = int(body[1:], 16) if body[:1] in ("x", "X") else int(body)
        return chr(number) if 0 < number <= 0x10FFFF else None
    if reference[0] == "&":
        return _NAMED.get(reference[1:])
    return chr(int(reference[2:], 16))
