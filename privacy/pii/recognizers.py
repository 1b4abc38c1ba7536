"""What counts as PII: one RE2 pattern per rule, plus a bounded check in Python.

A rule's pattern finds candidates; its check decides (Luhn, mod 97, country calling
codes, keyword context, boundaries) and may narrow the span. Checks look at the matched
bytes and at most ``CONTEXT_BYTES`` around them, so each costs O(1) per candidate and a
scan stays linear in the text (see :mod:`privacy.pii.regex`).

Everything here runs on the UTF-8 bytes of the detection copy
(:mod:`privacy.pii.normalize`): digits are ASCII, look-alike letters are Latin, and
invisible characters are gone, so the patterns need not know any Unicode trick.

Entity types (the tag the ``replace`` operator writes is ``[TYPE]``):

======== ==============================================================================
EMAIL    addresses incl. IDN, plus-addressing, ``%40``/``&#64;``/``[at]``/``(dot)`` forms
PHONE    international (+cc or 00cc, checked against libphonenumber's country codes and
         lengths), NANP, national with trunk 0; 7-digit local numbers near a keyword
CARD     13-19 digits passing Luhn, IIN 1-6, any of `` -./_`` separators (1-3 chars);
         12 digits or other prefixes only near a card keyword (short Maestro); groups
         no card is printed in (5-3-4-4, 8-8) right after a card keyword
SSN      US SSN (area/group/serial rules); 9 bare digits only near a keyword
IBAN     ISO 13616 country length + mod-97 checksum, spaced or not
IP       IPv4 (no leading zeros), IPv6 in every RFC 4291/5952 form, with zone
SECRET   API keys with known prefixes (AWS, GitHub, GitLab, Slack, Stripe, OpenAI,
         Google, Hugging Face, npm, PyPI, SendGrid, Twilio), PEM private keys, JWTs,
         bearer/basic credentials, ``password=``/``api_key:`` style assignments
DOB      a date within ``CONTEXT_BYTES`` after a birth keyword (or before "birth...")
ADDRESS  optional: a US street line (number, capitalised name, USPS suffix, unit)
======== ==============================================================================
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Final

# How far around a candidate a check may look (keywords, boundaries).
CONTEXT_BYTES: Final = 48

EMAIL: Final = "EMAIL"
PHONE: Final = "PHONE"
CARD: Final = "CARD"
SSN: Final = "SSN"
IBAN: Final = "IBAN"
IP: Final = "IP"
SECRET: Final = "SECRET"  # noqa: S105 - an entity type name, not a credential
DOB: Final = "DOB"
ADDRESS: Final = "ADDRESS"

# Overlapping detections are merged; the merged span takes the type listed first here.
PRIORITY: Final[tuple[str, ...]] = (SECRET, IBAN, CARD, SSN, EMAIL, IP, PHONE, DOB, ADDRESS)
ENTITIES: Final[frozenset[str]] = frozenset(PRIORITY)
DEFAULT_ENTITIES: Final[frozenset[str]] = ENTITIES

Span = tuple[int, int]
# (data, start, end) of the entity group -> the accepted span (possibly narrower) or None.
Check = Callable[[bytes, int, int], "Span | None"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One candidate pattern and the check that accepts, narrows or rejects a candidate.

    ``group`` is the capture group holding the entity (0 = the whole match, -1 = the
    first group that took part). Patterns put their boundary conditions around that
    group, so the DFA itself skips positions inside a longer number or word: a run of
    60 KiB of "1-1-1-..." yields no candidate at all instead of thousands.
    """

    entity: str
    name: str
    source: str
    check: Check
    group: int = 1
    # Every match of ``source`` holds an ASCII digit: the engine does not search for one
    # after the text's last digit (a search that can only fail costs as much as one that
    # finds, ~1 µs through the binding). SECURITY: set only where each alternative of the
    # pattern has a mandatory ``[0-9]`` (tests/privacy/test_pii_fastpaths.py checks it too).
    needs_digit: bool = False
    # A second reading of a numeric entity glued to a neighbour by "-", "." or "_", with
    # boundaries that refuse only an adjacent digit. SECURITY: it runs after every other
    # rule, so it only adds to what they found: changing their boundaries instead moved
    # where their candidates start, and 101 phones they masked went unmasked (issue 5).
    glued: bool = False
    # For a glued reading: candidates are matched only where an entity found before ends
    # (anchored there), not searched for in the whole text. For glues the plain rule reads
    # as separators already ("-", "." for a phone): elsewhere ("94 3167-0433 (214) 280-6666")
    # a second reading found windows the plain rule refuses ("0433 (214) 280").
    after_entity: bool = False
    # For an ``after_entity`` rule: every byte its entity group can open with (the byte
    # right after the glue). The engine tries no anchored match where the byte after an
    # entity's glue is none of them (a sentence's full stop after a phone: "... 0132. Then").
    # SECURITY: a superset of what the pattern admits, or a candidate is never read
    # (tests/privacy/test_pii_fastpaths.py checks every other byte refuses).
    opens_with: bytes | None = None
    # Literals of which every match holds one, in the text seen through ``view`` (a
    # ``bytes.translate`` table; None: the text as it is). The engine does not search for the
    # rule past the last of them: a search that can only fail costs a call and a pass over the
    # rest of the text. Few and short: each is one more pass over the text (``rfind``).
    # SECURITY: each must hold for every alternative of the pattern (tests/privacy/
    # test_pii_fastpaths.py checks every match found holds one), or a match after the last
    # literal is never searched for.
    required: tuple[bytes, ...] = ()
    view: bytes | None = None
    # Every match holds this many of its required literal (one literal only).
    required_times: int = 1


# --- byte helpers ---------------------------------------------------------------------

_DIGITS: Final = frozenset(b"0123456789")
_LETTERS: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ALNUM: Final = _DIGITS | _LETTERS
_WORD: Final = _ALNUM | {ord("_")}
_NOT_DIGITS: Final = bytes(b for b in range(256) if b not in _DIGITS)
_NOT_LETTERS: Final = bytes(b for b in range(256) if b not in _LETTERS)
# SECURITY: stdlib ``re`` only on bounded slices (a candidate, a context window) and with
# no nested quantifiers: linear, and never run over a whole untrusted text.
_DIGIT_RUN: Final = re.compile(rb"[0-9]+")


def _byte_at(data: bytes, index: int) -> int:
    return data[index] if 0 <= index < len(data) else -1


def _has_keyword(window: bytes, keywords: re.Pattern[bytes]) -> bool:
    return keywords.search(window.lower()) is not None


def _keywords(*words: bytes) -> re.Pattern[bytes]:
    """One alternation of literals, searched over a bounded window only."""
    return re.compile(b"|".join(re.escape(w) for w in words))


def _before(data: bytes, start: int) -> bytes:
    return data[max(0, start - CONTEXT_BYTES):start]


# Every byte but an ASCII digit -> a space. ``translate`` with a table and ``replace`` of
# the spaces keep the digits at 2/3 of the cost of ``translate(None, _NOT_DIGITS)``, which
# builds its deletion table from 246 bytes on every call (checks run per candidate).
_NOT_DIGITS_TO_SPACE: Final = bytes(b if b in _DIGITS else 0x20 for b in range(256))
_NOT_ALNUM_TO_SPACE: Final = bytes(b if b in _ALNUM else 0x20 for b in range(256))


def _digits_only(chunk: bytes) -> bytes:
    return chunk.translate(_NOT_DIGITS_TO_SPACE).replace(b" ", b"")


def _digit_runs(chunk: bytes) -> list[bytes]:
    """``_DIGIT_RUN.findall(chunk)`` at a third of its cost: with every other byte a space,
    ``split`` keeps exactly the digit runs (checks split every candidate)."""
    return chunk.translate(_NOT_DIGITS_TO_SPACE).split()


def _bounded(before: str, body: str, after: str) -> str:
    """``body`` as group 1 between boundary conditions (RE2 has no look-around)."""
    return f"(?:{before})({body})(?:{after})"


def _glued(before: str, body: str, after: str, *, glue: str = r"[._\-]", before_too: bool = True) -> str:
    """Candidates of a glued reading (``Rule.glued``, group -1): ``body`` right after
    ``glue``, or followed by ``glue`` (and a digit), with the relaxed boundaries on the
    other side. Only glued candidates: the others are the plain rule's, and searching
    them all a second time doubled the cost of number-dense text."""
    glued_after = "_" if glue == "_" else f"{glue}[0-9]"
    return (f"{_bounded(glue, body, after)}|" if before_too else "") + _bounded(before, body, glued_after)


# Boundary fragments. Each consumes at most two characters; the engine resumes a scan
# at the end of the entity group, so a consumed boundary still serves the next entity.
# The glued readings (``Rule.glued``) of every numeric entity use one rule instead: only
# an adjacent digit refuses, "-", "." and "_" are separators (_NOT_AFTER/BEFORE_DIGIT).
_NOT_AFTER_NUMBER = r"^[\-./_]?|[^0-9\-./_]|[^0-9][\-./_]"  # not "7" or "7-" before
_NOT_BEFORE_NUMBER = r"$|[^0-9\-./_]|[\-./_](?:$|[^0-9])"  # not "7" or "-7" after
_NOT_AFTER_DIGIT = r"^|[^0-9]"
_NOT_BEFORE_DIGIT = r"$|[^0-9]"
_NOT_AFTER_ALNUM = r"^|[^0-9A-Za-z]"

# The view of ``Rule.required`` literals that stand for classes of bytes (byte for byte, so
# offsets are kept): every ASCII digit is "0" and every ASCII letter "a", so "aa00" stands
# for any two letters and two digits.
VIEW_SHAPE: Final = bytes(
    0x30 if b in _DIGITS else 0x61 if b in _LETTERS else b for b in range(256))


# Each ASCII digit -> the ASCII digit of its doubled digit sum (Luhn's doubled positions).
_LUHN_DOUBLE: Final = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_valid(digits: bytes) -> bool:
    """The Luhn (mod 10) check of ISO/IEC 7812-1 over ASCII digits.

    Slices and ``translate`` instead of a loop per digit: it runs on every card-shaped
    candidate, which number-dense text has many of.
    """
    total = sum(digits[-1::-2]) + sum(digits[-2::-2].translate(_LUHN_DOUBLE)) - 48 * len(digits)
    return total % 10 == 0


# --- EMAIL ----------------------------------------------------------------------------

# "john.doe @ example.com": spaces around a bare "@" are an old obfuscation, not a break.
_AT = r"(?:[ \t]{0,2}@[ \t]{0,2}|%40|&#0*64;|&#[xX]0*40;|&commat;|[ \t]?[\[({<][ \t]?(?i:at)[ \t]?[\])}>][ \t]?)"
_DOT = r"(?:\.|%2[eE]|&#0*46;|[ \t]?[\[({<][ \t]?(?i:dot)[ \t]?[\])}>][ \t]?)"
_LABEL = r"[\p{L}\p{N}](?:[\p{L}\p{N}-]*[\p{L}\p{N}])?"
_TLD = r"(?:(?i:xn--)[a-zA-Z0-9-]+|\p{L}\p{L}+)"
EMAIL_SOURCE: Final = r"[\p{L}\p{N}._%+'!#$*^`{|}~-]+" + _AT + f"(?:{_LABEL}{_DOT})+{_TLD}"


def _check_email(data: bytes, start: int, end: int) -> Span | None:
    # SECURITY: no boundary before the local part: a local part glued to other text (or
    # longer than RFC 5321's 64 octets) is still masked from its first matched byte.
    while start < end and data[start] in b".'":
        start += 1
    return (start, end) if start < end else None


# --- PHONE ----------------------------------------------------------------------------

_PH_PAREN = r"\([ \t]?[0-9]{1,5}[ \t]?\)[ \t\-.]?"
_PH_SEP = r"(?:[ \t]?[.\-/][ \t]?|[ \t]{1,2})"
_PH_EXT = r"(?:[ \t]*(?:x|ext\.?|extension|#)[ \t]*[0-9]{1,6})?"
# Separated groups (the first one followed by a separator or in parentheses, so a lone
# number is no candidate) or one run of 7-15 digits; never inside a longer number. The
# first group may be a whole run: "+14155550132 12 times" is a candidate whose window
# finds the number (otherwise a run followed by any number was never masked).
_PH_GROUPS = rf"(?:{_PH_PAREN}|[0-9]{{1,6}}{_PH_SEP}?){{0,6}}[0-9]{{1,6}}"
_PH_BODY = (
    rf"(?:\+[ \t]?|00[ \t]?)?"
    rf"(?:(?:{_PH_PAREN}|[0-9]{{1,15}}(?:{_PH_SEP}|[ \t]?{_PH_PAREN})){_PH_GROUPS}|[0-9]{{7,15}}){_PH_EXT}"
)
# The same, opening with "+" (then anything _PH_BODY reads after its prefix) or with "(".
_PH_BODY_PLUS = (
    rf"\+[ \t]?(?:(?:{_PH_PAREN}|[0-9]{{1,15}}(?:{_PH_SEP}|[ \t]?{_PH_PAREN})){_PH_GROUPS}|[0-9]{{7,15}}){_PH_EXT}"
)
_PH_BODY_PAREN = rf"{_PH_PAREN}{_PH_GROUPS}{_PH_EXT}"
# Any separator ends a candidate, also one before more digits: what follows may be a
# word ("... 0958 2nd floor"), a long run ("... 0958 00000000") or another entity, and
# requiring a non-digit there left such phones unmasked (found by security_tests/fuzz).
# Digits that can continue the number as groups still do (the match is greedy), and the
# windows of _check_phone trim them.
PHONE_SOURCE: Final = _bounded(r"^|[^0-9A-Za-z_+]", _PH_BODY, r"$|[^0-9A-Za-z_.\-/ \t]|[.\-/ \t]")
# SECURITY: the glued readings (see ``Rule.glued``) hold only glued candidates: a phone
# glued to anything by "_", which the rule above reads as a word character ("841-646-3080_
# 4780...", "..._+44 20 7155 3483"), and one glued by "-" or "." to an entity before it
# ("105-58-9855-838 563 1769": the rule above reads one candidate from "105" and refuses it
# whole, as it must for an IBAN's groups). A second reading of every phone candidate found
# weak keyword readings the first rule had passed over ("Call +33 3 58 41 32 94 / 4720-...").
# SECURITY: also a phone written right after a value with no space (issue 5): one that
# opens with "+" after a letter or digit ("born 08.08.1930+17425248733") or with "(" after a
# digit ("...2210(11) 99918-1565"), and one followed by a letter ("020 7082 4043Jan 18,
# 1939"). The rule above refuses a word character on either side, and left every such
# phone in clear; the phone's own start ("+", "(") or a letter after it cannot continue the
# number, so only the check's verdict on the phone itself decides.
_PH_AFTER_GLUED = r"$|[^0-9A-Za-z.\-/_ \t]|[.\-/_ \t]"
PHONE_GLUED_SOURCE: Final = "|".join((
    _bounded("_", _PH_BODY, _PH_AFTER_GLUED),
    _bounded(r"^|[^0-9A-Za-z_+]", _PH_BODY, "_|[A-Za-z]"),
    _bounded("[0-9A-Za-z]", _PH_BODY_PLUS, _PH_AFTER_GLUED + "|[A-Za-z]"),
    _bounded("[0-9]", _PH_BODY_PAREN, _PH_AFTER_GLUED + "|[A-Za-z]"),
))
PHONE_AFTER_ENTITY_SOURCE: Final = _bounded(r"[.\-]", _PH_BODY, _PH_AFTER_GLUED)
# What _PH_BODY opens with: its "+" or "00" prefix, a "(" group or a digit group.
PHONE_OPENS_WITH: Final = b"+(0123456789"
_PH_EXT_RE: Final = re.compile(rb"[ \t]*(?:x|ext\.?|extension|#)[ \t]*[0-9]{1,6}$")
_PH_TOKEN: Final = re.compile(rb"\([ \t]?[0-9]+[ \t]?\)|[0-9]+")
_PHONE_KEYWORDS: Final = _keywords(
    b"phone", b"tel", b"call", b"mobile", b"cell", b"fax", b"whatsapp", b"contact", b"reach", b"text me",
    b"sms", b"number", b"telefon", b"handy", b"portable", b"t\xc3\xa9l", b"movil", b"m\xc3\xb3vil",
)
# Group sizes a North American number is written in: 415-555-0132, 1-415-555-0132, 4155550132.
_NANP_LAYOUTS: Final = frozenset({(3, 3, 4), (1, 3, 3, 4), (3, 7), (1, 3, 7), (10,), (1, 10), (11,)})
_NANP_LEADING: Final = frozenset(b"23456789")


@cache
def _calling_codes() -> dict[str, frozenset[int]]:
    """Country calling code -> possible national number lengths, from libphonenumber."""
    from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

    table: dict[str, frozenset[int]] = {}
    for code, regions in COUNTRY_CODE_TO_REGION_CODE.items():
        lengths: set[int] = set()
        for region in regions:
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
            if metadata is not None and metadata.general_desc is not None:
                lengths.update(metadata.general_desc.possible_length or ())
        if lengths:
            table[str(code)] = frozenset(lengths)
    return table


@cache
def _calling_codes_ascii() -> dict[bytes, frozenset[int]]:
    """:func:`_calling_codes` keyed by ASCII bytes, as candidates come."""
    return {code.encode("ascii"): lengths for code, lengths in _calling_codes().items()}


def _international_ok(digits: bytes) -> bool:
    table = _calling_codes_ascii()
    for size in (1, 2, 3):
        lengths = table.get(digits[:size])
        if lengths is None:
            continue
        national = len(digits) - size
        if national in lengths or (digits[size:size + 1] == b"0" and national - 1 in lengths):
            return True
    return False


def _looks_like_date(sizes: list[int], groups: list[bytes], chunk: bytes) -> bool:
    if len(sizes) != 3 or chunk.find(b" ") >= 0:
        return False
    if sizes[0] == 4 and sizes[1] <= 2 and sizes[2] <= 2:
        return 1 <= int(groups[1]) <= 12
    if sizes[0] <= 2 and sizes[1] <= 2 and sizes[2] in (2, 4):
        return 1 <= int(groups[0]) <= 31 and 1 <= int(groups[1]) <= 31
    return False


def phone_strong_within(chunk: bytes) -> bool:
    """Can a reading inside ``chunk`` pass :func:`phone_strong`? A necessary condition: its
    shape is found in the chunk's (see :func:`_maybe_strong`), a "00" prefix anywhere."""
    return chunk.find(b"00") >= 0 or _maybe_strong(chunk)


def phone_strong(chunk: bytes) -> bool:
    """Is this reading a phone without a keyword's help (an extension cut off)?"""
    extension = _PH_EXT_RE.search(chunk) if chunk.find(b"x") >= 0 or chunk.find(b"#") >= 0 else None
    return phone_valid(chunk[:len(chunk) - len(extension.group())] if extension else chunk)


def phone_valid(chunk: bytes, keyword: bool = False, *, inner: bool = False) -> bool:
    """Is this exact text (no extension) a phone number? ``keyword``: the text says so.

    ``inner``: the text starts after other digits of the candidate, so a leading "00"
    is not an international prefix ("... 3704 0044 0532" is no call to +44).
    """
    chunk = chunk.strip()
    return _phone_ok(chunk, _digit_runs(chunk), keyword, inner)


def _phone_ok(chunk: bytes, groups: list[bytes], keyword: bool, inner: bool) -> bool:
    """:func:`phone_valid` with the digit runs of ``chunk`` already split out.

    SECURITY: a shape accepted here without ``keyword`` must also be one that
    :func:`_maybe_strong` admits, or :func:`_check_phone` never gets to test it
    (tests/privacy/test_pii_equivalence.py checks the two agree on its sample).
    """
    digits = b"".join(groups)
    count = len(digits)
    if not 7 <= count <= 15:
        return False
    if chunk[:1] == b"+":
        return count >= 8 and _international_ok(digits)
    if chunk[:2] == b"00" and count >= 10 and not inner:
        return _international_ok(digits[2:])
    sizes = [len(g) for g in groups]
    if _looks_like_date(sizes, groups, chunk):
        return False
    if sizes == [3, 2, 4] and chunk.find(b"(") < 0:
        return False  # the US SSN layout
    if len(groups) == 4 and max(sizes) <= 3 and chunk.count(b".") == 3:
        return False  # an IPv4 address or a version string
    # NANP: area code 2-9; the exchange is not checked, written 3-3-4 is shape enough.
    nanp_shape = tuple(sizes) in _NANP_LAYOUTS and (count == 10 or groups[0] == b"1" or sizes == [11])
    if nanp_shape and digits[-10:][0] in _NANP_LEADING and (len(groups) > 1 or keyword):
        return True
    if groups[0][:1] == b"0" and groups[0][1:2] not in (b"0", b"") and 9 <= count <= 11:
        # National format with a trunk prefix: "020 7946 0958", "01 23 45 67 89", "03231 12345".
        if len(groups) >= 3 and min(sizes) >= 2:
            return True
        if len(groups) == 2 and 3 <= sizes[0] <= 5 and sizes[1] >= 4:
            return True
        if chunk.startswith(b"(") or keyword:
            return True
    if chunk.startswith(b"(") and len(groups) >= 2 and 8 <= count <= 11 and min(sizes[1:]) >= 3:
        return True  # "(11) 91234-5678", "(02) 1234 5678"
    return keyword and len(groups) >= 2 and min(sizes) >= 2


def _check_phone(data: bytes, start: int, end: int) -> Span | None:
    chunk = data[start:end]
    if len(chunk) - len(chunk.translate(None, b"0123456789")) < 7:
        return None  # most candidates in prose ("pages 12 - 20"): cheapest test first
    keyword: bool | None = None  # a phone keyword before the candidate; looked up once, if needed
    # The separator right before the candidate, if any: where a value before it ends.
    lead = data[start - 1:start] if start > 0 and data[start - 1] in _PH_SEPARATORS else b""
    if not _maybe_strong(lead + chunk):
        if chunk.isdigit() and len(chunk) not in (10, 11):
            return None  # one run, not led by 0: only 10 or 11 digits pass, keyword or not
        keyword = _has_keyword(_before(data, start), _PHONE_KEYWORDS)
        if not keyword:
            # No reading can have a shape that passes without a keyword, and there is none:
            # every reading below would fail. Most number-dense text (ISBNs, order, card-like
            # and version numbers) ends here, before the candidate is split into readings.
            return None
    # x, ext, extension, #. (``find``, not ``in``: CPython 3.11 tests a bytes operand of
    # ``in`` as an integer first, and raises and clears a TypeError per test.)
    has_extension = chunk.find(b"x") >= 0 or chunk.find(b"#") >= 0
    extension = _PH_EXT_RE.search(chunk) if has_extension else None
    body = chunk[:len(chunk) - len(extension.group())] if extension else chunk
    # Every digit run of the body is one token (a run, or a run in parentheses): the
    # runs are split out once and every reading below reuses them. Without a "(" a token
    # is a digit run, and the token spans are needed only if the whole reading fails.
    tokens: list[tuple[int, int]] | None = None
    if body.find(b"(") >= 0:
        tokens = [t.span() for t in _PH_TOKEN.finditer(body)]
        runs = [body[s:e].strip(b"() \t") for s, e in tokens]
    else:
        runs = _digit_runs(body)
    if not runs:
        return None
    # Layout and country-code evidence first; a nearby keyword ("call", "tel") only
    # admits weaker forms when no strong reading exists. The whole candidate is read
    # first, and its windows only when it fails (the usual phone needs none).
    whole = body.strip()
    weak = len(runs) >= 2
    passed, shaped = _unaided((whole, runs, False, start, end))
    if passed:
        return start, end
    weak = weak or shaped
    if tokens is None:
        tokens = [t.span() for t in _DIGIT_RUN.finditer(body)]
    # A window that ends with the body's last group keeps the extension after it. Windows
    # are made as they are read, and kept for the keyword pass: the first one usually
    # passes, and making all of them (each with its leftover test) cost ~20 µs a candidate
    # on phones glued back to back ("415-555-0132-415-555-0132-...").
    windows: list[_PhoneReading] = []
    for s, e, first, last in _phone_windows(body, tokens, runs):
        windows.append((body[s:e].strip(), runs[first:last + 1], s > 0, start + s,
                        end if last == len(tokens) - 1 else start + e))
        passed, maybe = _unaided(windows[-1])
        if passed:
            return windows[-1][3], windows[-1][4]
        weak = weak or maybe
    if weak:
        keyword = _has_keyword(_before(data, start), _PHONE_KEYWORDS) if keyword is None else keyword
        found = _keyed((whole, runs, False, start, end), *windows) if keyword else None
        if found is not None:
            return found
    # SECURITY: no reading passed; a group after a change of separator may open a phone
    # of its own ("10/26/32 0044 20 7667 7897", "born 1992-01-14 1-216-861-7379"): what
    # comes before is another value, and the phone is read as it would be alone (a
    # leading "00" included) where the leftover rule refused it (issue 5). Only windows
    # that run to the candidate's end, so the search resumes where it did when the
    # candidate was refused: what was masked before still is.
    fresh = _fresh_windows(body, tokens, runs, lead, start, end)
    for reading in fresh:
        passed, maybe = _unaided(reading)
        if passed:
            return reading[3], reading[4]
        weak = weak or maybe
    if fresh and weak:
        keyword = _has_keyword(_before(data, start), _PHONE_KEYWORDS) if keyword is None else keyword
        if keyword:
            return _keyed(*fresh)
    return None


# A reading of a phone candidate: its text, digit groups, ``inner`` (it starts after other
# digits of the candidate) and its span in the scanned bytes.
_PhoneReading = tuple[bytes, list[bytes], bool, int, int]


def _unaided(reading: _PhoneReading) -> tuple[bool, bool]:
    """Whether ``reading`` passes without a keyword, and whether a keyword could admit it.

    Without a keyword only these shapes can pass (+cc, 00cc, trunk 0, "(", NANP layouts;
    see _phone_ok): the rest skip the full test. A keyword admits only those shapes or
    two or more groups.
    """
    text, groups, inner, _, _ = reading
    if text[:1] in (b"+", b"(") or groups[0][:1] == b"0" or tuple(map(len, groups)) in _NANP_LAYOUTS:
        return _phone_ok(text, groups, False, inner), True
    return False, len(groups) >= 2


def _keyed(*readings: _PhoneReading) -> Span | None:
    """The span of the first of ``readings`` that passes with a phone keyword before it."""
    for text, groups, inner, begin, stop in readings:
        if _phone_ok(text, groups, True, inner):
            return begin, stop
    return None


def _fresh_windows(body: bytes, tokens: list[tuple[int, int]], runs: list[bytes], lead: bytes,
                   start: int, end: int) -> list[_PhoneReading]:
    """The readings of a candidate from a group that opens a value (:func:`_opens`) to
    its end, leftmost first: text, groups, ``inner`` (False), span."""
    found: list[_PhoneReading] = []
    digits = 0
    for first in range(len(tokens) - 1, 0, -1):
        digits += len(runs[first])
        if digits > 15:
            break
        if digits >= 7 and _opens(body, tokens, first, lead):
            begin = _group_start(body, tokens, first)
            found.append((body[begin:].strip(), runs[first:], False, start + begin, end))
    found.reverse()
    return found


# A digit run led by 0 then 1-9 (the same answer on a candidate and on its shape), and the
# NANP layouts as consecutive group sizes (one byte per group) for :func:`_maybe_strong`.
# SECURITY: stdlib ``re`` on a bounded candidate.
_TRUNK_LED: Final = re.compile(rb"(?<![0-9])0[1-9]")
_NANP_SIZES: Final = re.compile(b"|".join(re.escape(bytes(layout)) for layout in _NANP_LAYOUTS))
# Digits 1-9 -> "1", "0" kept: what :func:`_maybe_strong` depends on (signs, runs led by 0,
# run sizes) and nothing more of the number. Number-dense text repeats few shapes.
_SHAPE: Final = bytes.maketrans(b"23456789", b"11111111")
_STRONG_SHAPES: Final[dict[bytes, bool]] = {}
# What may separate a phone's groups (_PH_SEP), as single bytes.
_PH_SEPARATORS: Final = frozenset(b" \t.-/")
_STRONG_SHAPES_MAX: Final = 4096


def _maybe_strong(chunk: bytes) -> bool:
    """Can any reading of this phone candidate have a shape that :func:`_phone_ok`
    accepts without a keyword: a "+" or "(" start, a "00" start, a first group with a
    trunk 0 (0 then 1-9), or group sizes of a NANP layout?

    A necessary condition only, so False proves that no reading passes without a
    keyword. Every reading is a run of consecutive digit groups of the candidate (the
    extension cut off is whole groups too), so its first character, first group and
    group sizes are found in the candidate's. Answers are kept per shape (bounded; a
    shape holds no digit value beyond where the zeros are).
    """
    shape = chunk.translate(_SHAPE)
    known = _STRONG_SHAPES.get(shape)
    if known is None:
        known = _strong_shape(shape)
        if len(_STRONG_SHAPES) >= _STRONG_SHAPES_MAX:
            _STRONG_SHAPES.clear()
        _STRONG_SHAPES[shape] = known
    return known


def _strong_shape(shape: bytes) -> bool:
    # A shape may open with the separator byte before the candidate (``lead``): a candidate
    # itself opens with "+", "(" or a digit.
    chunk = shape[1:] if shape[:1] and shape[0] in _PH_SEPARATORS else shape
    # A run led by 0 is strong only as a trunk prefix ("020", "01") or as "00" opening the
    # candidate: inside it, "00" is no international prefix (``inner``), and a lone "0" or
    # "00..." is no trunk prefix. ISBNs ("978-0-9511532-1-5") end here, not in 16 readings.
    if b"+" in chunk or b"(" in chunk or len(chunk) > 255 or chunk[:2] == b"00" or _TRUNK_LED.search(chunk):
        return True  # (a run of 256+ digits would not fit a size byte: the full test decides)
    if b"00" in chunk and _opens_with_00(shape):
        return True
    return _NANP_SIZES.search(bytes(map(len, _digit_runs(chunk)))) is not None


def _opens_with_00(shape: bytes) -> bool:
    """Whether a group led by "00" opens a window read as if alone (:func:`_fresh_windows`),
    where "00" is an international prefix."""
    lead = shape[:1] if shape[:1] and shape[0] in _PH_SEPARATORS else b""
    chunk = shape[len(lead):]
    tokens = [t.span() for t in _DIGIT_RUN.finditer(chunk)]
    digits = len(chunk.translate(None, _NOT_DIGITS))
    return any(chunk[begin:begin + 2] == b"00" and _opens(chunk, tokens, index, lead)
               and digits - len(chunk[:begin].translate(None, _NOT_DIGITS)) >= 10
               for index, (begin, _) in enumerate(tokens) if index > 0)


def _opens(body: bytes, tokens: list[tuple[int, int]], index: int, lead: bytes) -> bool:
    """Whether group ``index`` may open a value of its own: after a change of separator,
    or as "00" after one lone group ("ref 2020 0044 20 7196 4855") unless the groups are
    in an IBAN's print layout, fours and a shorter last ("3704 0044 0532 0130 00")."""
    if _separator_changes(body, tokens, index, lead):
        return True
    if index != 1 or body[tokens[1][0]:tokens[1][0] + 2] != b"00":
        return False
    sizes = [end - begin for begin, end in tokens]
    return not (all(size == 4 for size in sizes[:-1]) and sizes[-1] <= 4)


def _phone_windows(body: bytes, tokens: list[tuple[int, int]],
                   runs: list[bytes]) -> Iterator[tuple[int, int, int, int]]:
    """Every run of consecutive digit groups of the candidate with 7-15 digits, leftmost
    first and longest first: byte span, first and last token.

    A candidate may have run into neighbouring numbers ("Room 12 415-555-0132", "0/0 020
    7946 0958", "415-555-0132/415-555-0199", "+14155550132 12 times"). The leftmost reading
    that passes is masked and the scan resumes after it, so a second number in the same
    candidate gets its own reading. (Trimming only the first or last group left a number
    behind a "0/0" or next to another number in clear: found by security_tests/fuzz.)
    What a window leaves out before it must pass :func:`_leftover_ok`; what follows it is
    searched again anyway.
    """
    count = len(tokens)
    for first in range(count):
        # SECURITY: a group that opens with "(" or "+" starts a number of its own, whatever
        # comes before it: "94 3167-0433 (214) 280-6666" left both in clear (issue 5).
        marked = first > 0 and body[_group_start(body, tokens, first):][:1] in (b"(", b"+")
        if not marked and not _leftover_ok(body, tokens, runs, 0, first):
            continue
        digits = 0
        spans: list[tuple[int, int, int, int]] = []
        for last in range(first, count):
            digits += len(runs[last])
            if digits > 15:
                break
            if digits < 7 or (first == 0 and last == count - 1):
                continue  # too short, or the whole candidate (already the first reading)
            spans.append((_group_start(body, tokens, first), tokens[last][1], first, last))
        yield from reversed(spans)


def _separator(body: bytes, tokens: list[tuple[int, int]], index: int) -> bytes:
    """What separates group ``index`` (1 or more) from the group before it."""
    return body[tokens[index - 1][1]:_group_start(body, tokens, index)]


def _separator_changes(body: bytes, tokens: list[tuple[int, int]], index: int, lead: bytes = b"") -> bool:
    """Whether the separator before group ``index`` differs from the one before the
    previous group (``lead`` before the first: the separator character right before the
    candidate, if any) or from the one after this group: where one written value ends."""
    before = _separator(body, tokens, index)
    previous = _separator(body, tokens, index - 1) if index >= 2 else lead
    return ((bool(previous) and previous != before)
            or (index + 1 < len(tokens) and _separator(body, tokens, index + 1) != before))


def _group_start(body: bytes, tokens: list[tuple[int, int]], index: int) -> int:
    """Where group ``index`` starts, a "+" (or "+ ") right before it included."""
    if index == 0:
        return 0
    begin = tokens[index][0]
    return begin - (1 if body[begin - 1:begin] == b"+" else 2 if body[begin - 2:begin] == b"+ " else 0)


def _leftover_ok(body: bytes, tokens: list[tuple[int, int]], runs: list[bytes], first: int, stop: int) -> bool:
    """May groups ``first:stop`` be left outside a window? One group ("Room 12", any
    size), small numbers only ("0/0", "1 12"), or a phone number of its own; anything
    else means the window is a phone-shaped piece of a longer number (an IBAN)."""
    if stop - first <= 1 or all(len(run) <= 3 for run in runs[first:stop]):
        return True
    text = body[_group_start(body, tokens, first):tokens[stop - 1][1]].strip()
    return _phone_ok(text, runs[first:stop], False, first > 0)


# --- CARD -----------------------------------------------------------------------------

_SEP = r"[ \t\-./_]{1,3}"
CARD_SOURCE: Final = _bounded(
    _NOT_AFTER_DIGIT,
    rf"[0-9]{{4}}(?:{_SEP}[0-9]{{4}}){{2,3}}(?:{_SEP}[0-9]{{1,4}})?"
    rf"|[0-9]{{4}}{_SEP}[0-9]{{6}}{_SEP}[0-9]{{4,5}}"
    r"|[0-9]{12,19}",
    _NOT_BEFORE_DIGIT,
)
# Digits written in equal small groups ("4 1 1 1 ...", "41 11 11 ..."): only a whole run.
CARD_SPREAD_SOURCE: Final = _bounded(
    r"^[ \t\-./_]?|[^0-9 \t\-./_]|[^0-9][ \t\-./_]",
    rf"[0-9]{{1,3}}(?:{_SEP}[0-9]{{1,3}}){{4,18}}",
    r"$|[^0-9 \t\-./_]|[ \t\-./_](?:$|[^0-9 \t\-./_])",
)


# Digits written in groups no card is printed in ("card 41111 111 1111 1111", "visa:
# 41111111 11111111"): a whole run of 2-5 groups right after a card keyword (nothing but
# non-digits between them). SECURITY: the keyword is part of the pattern, so number-dense
# text without one costs this rule nothing; without the keyword one run of numbers in
# sixteen would pass the Luhn and issuer checks, and lists of numbers are common.
_CARD_WORDS: Final = (b"card", b"visa", b"mastercard", b"maestro", b"amex", b"cc", b"credit", b"debit", b"paid with",
                      b"payment", b"pan", b"karte", b"carte", b"tarjeta")
_CARD_KEYWORD_SOURCE = "(?i:" + "|".join(word.decode() for word in _CARD_WORDS) + ")"  # letters and spaces only
CARD_GROUPED_SOURCE: Final = (
    rf"{_CARD_KEYWORD_SOURCE}[^0-9]{{0,24}}"
    rf"([0-9]{{1,16}}(?:{_SEP}[0-9]{{1,16}}){{1,4}})"
    r"(?:$|[^0-9 \t\-./_]|[ \t\-./_](?:$|[^0-9 \t\-./_]))"
)


_CARD_KEYWORDS: Final = _keywords(*_CARD_WORDS)


def card_number_ok(digits: bytes, keyword: bool = False) -> bool:
    """Luhn-valid; 13-19 digits with an issuer prefix 1-6 (ISO/IEC 7812 major industry).

    With a card keyword nearby, 12-digit numbers (short Maestro) and other prefixes count.
    """
    verdict = _card_verdict(digits)
    return keyword if verdict is None else verdict


def _card_verdict(digits: bytes) -> bool | None:
    """:func:`card_number_ok` without the keyword: None when only a keyword would decide."""
    if not 12 <= len(digits) <= 19 or not luhn_valid(digits):
        return False
    if len(digits) >= 13 and digits[0] in b"123456":
        return True
    return None


def _card_keyword(data: bytes, start: int) -> bool:
    return _has_keyword(_before(data, start), _CARD_KEYWORDS)


# A card group after a candidate: the candidate pattern stops after five groups, so a
# card that starts at its second group or later ends after it. SECURITY: stdlib ``re``
# anchored on a bounded slice.
_CARD_NEXT_GROUP: Final = re.compile(rb"[ \t\-./_]{1,3}([0-9]{1,6})")
_CARD_REACH: Final = 38  # digits read on after a candidate: two card numbers


def _card_layout(sizes: tuple[int, ...]) -> bool:
    """Group sizes a card is printed in: 4-4-4-4 (a shorter last group) or 4-6-4/4-6-5."""
    return sizes[0] == 4 and (all(size == 4 for size in sizes[:-1]) or sizes in ((4, 6, 4), (4, 6, 5)))


def _check_card(data: bytes, start: int, end: int) -> Span | None:
    chunk = data[start:end]
    digits = _digits_only(chunk)
    verdict = _card_verdict(digits)
    whole = bool(verdict or (verdict is None and _card_keyword(data, start)))
    following = _CARD_NEXT_GROUP.match(data, end, end + 4)
    if following is None:
        if whole:
            return start, end
        if len(digits) < 14:
            return None  # a window leaves out one group at least, and needs 13 digits
        first_run = len(chunk) - len(chunk.lstrip(b"0123456789"))
        last_run = len(chunk) - len(chunk.rstrip(b"0123456789"))
        if len(digits) - min(first_run, last_run) < 13:
            return None  # every window leaves out the first or the last group: none has 13 digits
    return _card_cluster(data, start, end, whole)


def _card_cluster(data: bytes, start: int, end: int, whole: bool) -> Span | None:
    """The card readings of a run of digit groups that starts with the candidate.

    A neighbouring number may have been taken in ("... 2671 4111 1111 1111 1111" after a
    phone), or the candidate may end inside the card (it holds five groups at most). Every
    window of whole groups that starts in the candidate, may run on into the groups that
    follow it (up to ``_CARD_REACH`` digits, in a printed card layout), and is a card
    number is a reading; SECURITY: the span returned covers every reading that overlaps the
    leftmost one, and the readings of the groups it takes in, so when two readings compete
    (a phone's last group is Luhn-valid with the card's first three) the digits of both are
    masked. Picking one of them left the other card's last group in clear (issue 5). Bounded
    work: at most ``_CARD_REACH`` digits read on, windows of at most 19 digits.
    """
    found = [(r.start(), r.end(), r.group()) for r in _DIGIT_RUN.finditer(data, start, end)]
    inside = len(found)
    position, reach = end, 0
    while reach < _CARD_REACH:
        following = _CARD_NEXT_GROUP.match(data, position, position + 10)
        if following is None or _byte_at(data, following.end()) in _DIGITS:
            break  # no group, or the start of a longer run: not a card group
        found.append((following.start(1), following.end(1), following.group(1)))
        reach += len(following.group(1))
        position = following.end()
    readings: list[Span] = [(start, end)] if whole else []
    for first in range(inside):
        readings += _card_readings(found, first, inside)
    if not readings:
        return None
    readings.sort()
    span_start, span_end = readings[0]
    # SECURITY: the readings that overlap, and those of the groups they take in (a chance
    # reading may end in the first group of the next card: that card is read too).
    first = inside
    while True:
        for reading_start, reading_end in readings:
            if span_start <= reading_start < span_end:
                span_end = max(span_end, reading_end)
        if first >= len(found) or found[first][0] >= span_end:
            return span_start, span_end
        readings = _card_readings(found, first, inside)
        first += 1


def _card_readings(found: list[tuple[int, int, bytes]], first: int, inside: int) -> list[Span]:
    """The card numbers among the windows of ``found`` that start at group ``first``."""
    readings: list[Span] = []
    window = b""
    for last in range(first, len(found)):
        window += found[last][2]
        if len(window) > 19:
            break
        if len(window) < 13 or (first, last) == (0, inside - 1):
            continue
        # Past the candidate only a printed card layout reads on (a 4-6-5 Amex after a
        # phone's last group); any group size let a card take in a neighbour's digits.
        if last >= inside and not _card_layout(tuple(len(f[2]) for f in found[first:last + 1])):
            continue
        if _card_verdict(window):
            readings.append((found[first][0], found[last][1]))
    return readings


def _check_card_spread(data: bytes, start: int, end: int) -> Span | None:
    groups = _digit_runs(data[start:end])
    size = len(groups[0])
    if any(len(g) != size for g in groups[:-1]) or len(groups[-1]) > size:
        return None
    verdict = _card_verdict(b"".join(groups))
    return (start, end) if verdict or (verdict is None and _card_keyword(data, start)) else None


_GROUP_GAP: Final = re.compile(rb"[^0-9]+")


def _check_card_grouped(data: bytes, start: int, end: int) -> Span | None:
    """A card in irregular groups after a card keyword: 13-19 digits, Luhn and issuer valid.

    SECURITY: the printed layouts (4-4-4-4, 4-6-5, equal small groups) are read by the
    other card rules without a keyword; this one adds the regroupings a writer (or a
    model asked to slip a number past a filter) may choose.
    """
    chunk = data[start:end]
    digits = _digits_only(chunk)
    if not 13 <= len(digits) <= 19 or not _card_verdict(digits):
        return None
    # One separator throughout ("41111 111 1111 1111"): a run joined by several kinds of
    # punctuation is a list of numbers, not a number written down.
    if len(set(_GROUP_GAP.findall(chunk))) != 1:
        return None
    return start, end


# --- SSN ------------------------------------------------------------------------------

_SSN_SEP = r"(?:[ \t]?[\-.][ \t]?|[ \t]{1,2}|_)"
# A slash is no SSN separator, so it ends one: "078-05-1120/415-555-0132" and "078-05-1120/
# 219-09-9999" are lists (issue 5: the general boundaries read them as one longer number
# and left both SSNs in clear).
_SSN_NOT_AFTER = r"^[\-._]?|[^0-9\-._]|[^0-9][\-._]"
_SSN_NOT_BEFORE = r"$|[^0-9\-._]|[\-._](?:$|[^0-9])"
_SSN_BODY = rf"[0-9]{{3}}{_SSN_SEP}[0-9]{{2}}{_SSN_SEP}[0-9]{{4}}|[0-9]{{9}}"
SSN_SOURCE: Final = _bounded(_SSN_NOT_AFTER, _SSN_BODY, _SSN_NOT_BEFORE)
# Glued by "-", "." or "_" to a number ("635-11-2881.173-52-1064"), see ``Rule.glued``.
SSN_GLUED_SOURCE: Final = _glued(_NOT_AFTER_DIGIT, _SSN_BODY, _NOT_BEFORE_DIGIT)
_SSN_KEYWORDS: Final = _keywords(b"ssn", b"social security", b"social sec", b"ss#", b"ss #", b"taxpayer", b"tin")


def ssn_valid(digits: bytes) -> bool:
    """SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in (b"000", b"666") and area[:1] != b"9" and group != b"00" and serial != b"0000"


def _check_ssn(data: bytes, start: int, end: int) -> Span | None:
    digits = _digits_only(data[start:end])
    if len(digits) != 9 or not ssn_valid(digits):
        return None
    if end - start == 9 and not _has_keyword(_before(data, start), _SSN_KEYWORDS):
        return None  # nine bare digits are an SSN only when the text says so
    return start, end


# --- IBAN -----------------------------------------------------------------------------

IBAN_SOURCE: Final = _bounded(
    _NOT_AFTER_ALNUM, r"[A-Za-z]{2}[0-9]{2}(?:[ \t\-]?[A-Za-z0-9]{4}){2,7}(?:[ \t\-]?[A-Za-z0-9]{1,4})?", r"",
)
# ISO 13616 registry (SWIFT IBAN registry): country -> IBAN length.
IBAN_LENGTHS: Final[dict[bytes, int]] = {
    b"AD": 24, b"AE": 23, b"AL": 28, b"AT": 20, b"AZ": 28, b"BA": 20, b"BE": 16, b"BG": 22, b"BH": 22, b"BI": 27,
    b"BR": 29, b"BY": 28, b"CH": 21, b"CR": 22, b"CY": 28, b"CZ": 24, b"DE": 22, b"DJ": 27, b"DK": 18, b"DO": 28,
    b"EE": 20, b"EG": 29, b"ES": 24, b"FI": 18, b"FK": 18, b"FO": 18, b"FR": 27, b"GB": 22, b"GE": 22, b"GI": 23,
    b"GL": 18, b"GR": 27, b"GT": 28, b"HN": 28, b"HR": 21, b"HU": 28, b"IE": 22, b"IL": 23, b"IQ": 23, b"IS": 26,
    b"IT": 27, b"JO": 30, b"KW": 30, b"KZ": 20, b"LB": 28, b"LC": 32, b"LI": 21, b"LT": 20, b"LU": 20, b"LV": 21,
    b"LY": 25, b"MC": 27, b"MD": 24, b"ME": 22, b"MK": 19, b"MN": 20, b"MR": 27, b"MT": 31, b"MU": 30, b"NI": 28,
    b"NL": 18, b"NO": 15, b"OM": 23, b"PK": 24, b"PL": 28, b"PS": 29, b"PT": 25, b"QA": 29, b"RO": 24, b"RS": 22,
    b"RU": 33, b"SA": 24, b"SC": 31, b"SD": 18, b"SE": 24, b"SI": 19, b"SK": 24, b"SM": 27, b"SO": 23, b"ST": 25,
    b"SV": 28, b"TL": 23, b"TN": 24, b"TR": 26, b"UA": 29, b"VA": 22, b"VG": 24, b"XK": 20, b"YE": 30,
}


# Letter -> its ISO 7064 value as decimal digits (A = 10 ... Z = 35), for ``str.translate``.
# Indexed by code point over ASCII (the only input, checked first): every character maps,
# digits to themselves. A dict of the letters only made ``str.translate`` raise and clear
# a KeyError per digit: 17k of the 20k instructions of checking "IT21P2144662369373527521445".
_IBAN_VALUES: Final = tuple(str(int(chr(c), 36)) if chr(c).isalpha() else chr(c) for c in range(128))


# ASCII letter -> its ISO 7064 value as decimal digits, for an IBAN's country code.
_LETTER_DIGITS: Final = {letter: str(int(chr(letter), 36)).encode() for letter in _LETTERS}


def iban_valid(compact: bytes) -> bool:
    """ISO 7064 mod 97-10 over an IBAN without separators (letters of either case)."""
    if not compact.isalnum() or not compact.isascii():
        return False
    if compact[4:].isdigit() and compact[:2].isalpha() and compact[2:4].isdigit():
        # The usual IBAN (a digit-only BBAN): two letter values to expand, not a translate.
        number = compact[4:] + _LETTER_DIGITS[compact[0]] + _LETTER_DIGITS[compact[1]] + compact[2:4]
        return int(number) % 97 == 1
    rearranged = (compact[4:] + compact[:4]).decode("ascii")
    return int(rearranged.translate(_IBAN_VALUES)) % 97 == 1


def _check_iban(data: bytes, start: int, end: int) -> Span | None:
    expected = IBAN_LENGTHS.get(data[start:start + 2].upper())
    if expected is None:
        return None
    chunk = data[start:end]
    compact = chunk.translate(_NOT_ALNUM_TO_SPACE).replace(b" ", b"")
    if len(compact) < expected or not iban_valid(compact[:expected]):
        return None
    # The span ends at the byte that completes the country's length.
    stop = end
    if len(compact) > expected or chunk[-1] not in _ALNUM:
        seen = 0
        for offset, byte in enumerate(chunk):
            if byte in _ALNUM:
                seen += 1
                if seen == expected:
                    stop = start + offset + 1
                    break
    return start, stop


# --- IP -------------------------------------------------------------------------------

_IPV4_BODY = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
IPV4_SOURCE: Final = _bounded(r"^|[^0-9A-Za-z_.]", _IPV4_BODY, r"$|[^0-9A-Za-z_.]|\.(?:$|[^0-9])")
# Glued by "_" ("10.0.0.1_10.0.0.2"), which the rule above reads as a word character.
IPV4_GLUED_SOURCE: Final = _glued(r"^|[^0-9A-Za-z.]", _IPV4_BODY, r"$|[^0-9A-Za-z.]|\.(?:$|[^0-9])", glue="_")
# SECURITY: two addresses glued by "." ("10.1.2.3.10.1.2.4"), which the rule above reads as
# one longer dotted number: each is read with the other as its context (two rules, one
# group each), and both must be addresses. Exactly eight octets: in 453 MB of local text
# (site-packages, docs) such a run occurred twice, an eight-arc OID, against 12,745
# four-octet runs the rule above already reads.
_IPV4_END = r"$|[^0-9A-Za-z_.]|\.(?:$|[^0-9])"
IPV4_PAIR_FIRST_SOURCE: Final = _bounded(r"^|[^0-9A-Za-z_.]", _IPV4_BODY, rf"\.{_IPV4_BODY}(?:{_IPV4_END})")
IPV4_PAIR_SECOND_SOURCE: Final = _bounded(rf"(?:^|[^0-9A-Za-z_.]){_IPV4_BODY}\.", _IPV4_BODY, _IPV4_END)
# SECURITY: stdlib ``re`` anchored on a bounded slice.
_IPV4_NEXT: Final = re.compile(rb"\.([0-9]{1,3}(?:\.[0-9]{1,3}){3})")
_IPV4_PREVIOUS: Final = re.compile(rb"([0-9]{1,3}(?:\.[0-9]{1,3}){3})\.$")
_HEX = r"[0-9A-Fa-f]{0,4}"
IPV6_SOURCE: Final = _bounded(
    r"^|[^0-9A-Za-z_:]",
    rf"{_HEX}(?::{_HEX}){{1,6}}:[0-9]{{1,3}}(?:\.[0-9]{{1,3}}){{3}}(?:%[0-9A-Za-z._~\-]{{1,32}})?"
    rf"|{_HEX}(?::{_HEX}){{2,7}}(?:%[0-9A-Za-z._~\-]{{1,32}})?",
    r"",
)


def _octets_ok(chunk: bytes) -> bool:
    """Each octet 0-255 without leading zeros (which some parsers read as octal)."""
    return all(int(part) <= 255 and (len(part) == 1 or part[:1] != b"0") for part in chunk.split(b"."))


def _check_ipv4(data: bytes, start: int, end: int) -> Span | None:
    return (start, end) if _octets_ok(data[start:end]) else None


def _check_ipv4_first(data: bytes, start: int, end: int) -> Span | None:
    """The first of two addresses glued by "." (both must be addresses)."""
    following = _IPV4_NEXT.match(data, end, end + 16)
    ok = following is not None and _octets_ok(following.group(1)) and _octets_ok(data[start:end])
    return (start, end) if ok else None


def _check_ipv4_second(data: bytes, start: int, end: int) -> Span | None:
    """The second of two addresses glued by "." (both must be addresses)."""
    previous = _IPV4_PREVIOUS.search(data, max(0, start - 16), start)
    ok = previous is not None and _octets_ok(previous.group(1)) and _octets_ok(data[start:end])
    return (start, end) if ok else None


def _check_ipv6(data: bytes, start: int, end: int) -> Span | None:
    address = data[start:end].partition(b"%")[0]
    if address.endswith(b":") and not address.endswith(b"::"):
        address = address[:-1]  # "... at fe80::1: it answered": the colon is prose
        end = start + len(address)
    elif _byte_at(data, end) in _WORD:
        return None
    try:
        # The C parser (RFC 4291 text forms, dotted-quad tail without leading zeros): what
        # ``ipaddress.IPv6Address`` accepts, at a tenth of its cost (checked on 200k forms).
        parsed = socket.inet_pton(socket.AF_INET6, address.decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if parsed == bytes(16):
        return None
    if not any(b in _DIGITS for b in address) and address.count(b":") < 7:
        return None  # "dead::beef", "a::b": words, not addresses
    return start, end


# --- SECRET ---------------------------------------------------------------------------

_SECRET_PREFIXED: Final = (
    ("aws_access_key", r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA)[A-Z0-9]{16}"),
    ("github", r"gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255}"),
    ("gitlab", r"gl(?:pat|dt|ptt|rt)-[A-Za-z0-9_\-]{20,64}"),
    ("slack", r"xox[abposre]-[A-Za-z0-9\-]{10,250}|https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,120}"),
    ("stripe", r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,247}|whsec_[A-Za-z0-9]{24,64}"),
    ("openai", r"sk-(?:proj-|svcacct-|admin-|ant-[a-z0-9]{2,8}-)?[A-Za-z0-9_\-]{20,250}"),
    ("google", r"AIza[0-9A-Za-z_\-]{35}"),
    ("huggingface", r"hf_[A-Za-z0-9]{30,40}"),
    ("npm", r"npm_[A-Za-z0-9]{36}"),
    ("pypi", r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,300}"),
    ("sendgrid", r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"),
    ("twilio", r"SK[0-9a-fA-F]{32}"),
    ("jwt", r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*"),
)
# ``Rule.required`` of each prefixed key: its fixed prefixes, as written above.
_SECRET_LITERALS: Final[dict[str, tuple[bytes, ...]]] = {
    "aws_access_key": (),  # eleven prefixes: eleven passes over the text cost more than a search
    "github": (b"gh", b"github_pat_"),
    "gitlab": (b"gl",),
    "slack": (b"xox", b"https://hooks.slack.com/services/"),
    "stripe": (b"k_live_", b"k_test_", b"whsec_"),
    "openai": (b"sk-",),
    "google": (b"AIza",),
    "huggingface": (b"hf_",),
    "npm": (b"npm_",),
    "pypi": (b"pypi-AgEIcHlwaS5vcmc",),
    "sendgrid": (b"SG.",),
    "twilio": (b"SK",),
    "jwt": (b"eyJ",),
}
PEM_SOURCE: Final = (
    r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    r"(?s:.*?-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s:,\-]*)"
)
# Names a secret follows in "name=value" text, not secrets themselves.
_KEY_NAMES = (
    r"(?:password|passwd|pwd|passphrase|secret(?:[_\-]?access)?(?:[_\-]?key)?|api[_\-]?key|apikey|api[_\-]?token"
    r"|access[_\-]?token|auth[_\-]?token|refresh[_\-]?token|client[_\-]?secret|private[_\-]?key|token)"
)
ASSIGNED_SECRET_SOURCE: Final = (
    rf"(?i:{_KEY_NAMES})[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"'<>,;\[\]]{{6,200}})"
)
AUTH_HEADER_SOURCE: Final = (
    r"(?i:authorization)[\"']?[ \t]*[:=][ \t]*[\"']?(?i:(?:basic|bearer|token|digest)[ \t]+)?([^\s\"'<>,;]{8,})"
    r"|(?i:bearer)[ \t]+([A-Za-z0-9\-._~+/]{16,}=*)"
)


def _check_prefixed_secret(data: bytes, start: int, end: int) -> Span | None:
    chunk = data[start:end]
    if chunk.startswith(b"sk-"):
        body = chunk[3:]
        # Precision: "sk-learn-compatible-estimators" is prose; a key is random, so it has
        # letters and digits.
        if len(body.translate(None, _NOT_DIGITS)) == 0 or len(body.translate(None, _NOT_LETTERS)) == 0:
            return None
    return start, end


def _accept(data: bytes, start: int, end: int) -> Span | None:
    return start, end


# --- DOB ------------------------------------------------------------------------------

_MONTHS = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_YEAR8 = r"(?:18[89][0-9]|19[0-9]{2}|20[0-9]{2}|2100)"
_MONTH2 = r"(?:0[1-9]|1[0-2])"
_DAY2 = r"(?:0[1-9]|[12][0-9]|3[01])"
_DATE_BODY = (
    r"[0-9]{1,2}[/.\-][0-9]{1,2}[/.\-](?:[0-9]{4}|[0-9]{2})"
    r"|[0-9]{4}[/.\-][0-9]{1,2}[/.\-][0-9]{1,2}"
    rf"|(?i:[0-9]{{1,2}}(?:st|nd|rd|th)?[ \t]+(?:of[ \t]+)?{_MONTHS},?[ \t]+[0-9]{{4}})"
    rf"|(?i:{_MONTHS}[ \t]+[0-9]{{1,2}}(?:st|nd|rd|th)?,?[ \t]+[0-9]{{4}})"
    # "14-Mar-1985", "14/mar/85", "Mar-14-1985": forms and databases (DD-MON-YY)
    rf"|(?i:[0-9]{{1,2}}[\-/]{_MONTHS}[\-/](?:[0-9]{{4}}|[0-9]{{2}}))"
    rf"|(?i:{_MONTHS}[\-/][0-9]{{1,2}}[\-/](?:[0-9]{{4}}|[0-9]{{2}}))"
    # "19850314" (ISO 8601 basic), "14031985", "03141985": read as a date only after a DOB
    # keyword. Only runs whose parts are in range (year 1880-2100, as ``_date_ok``): any
    # eight digits made every order number a candidate (+12% on number-dense text).
    rf"|{_YEAR8}{_MONTH2}{_DAY2}|{_DAY2}{_MONTH2}{_YEAR8}|{_MONTH2}{_DAY2}{_YEAR8}"
)
DATE_SOURCE: Final = _bounded(_NOT_AFTER_DIGIT, _DATE_BODY, _NOT_BEFORE_NUMBER)
# Glued by "-", "." or "_" to a number after it ("born 01/02/1990-415-555-0132").
DATE_GLUED_SOURCE: Final = _glued(_NOT_AFTER_DIGIT, _DATE_BODY, _NOT_BEFORE_DIGIT, before_too=False)
_DOB_BEFORE: Final = _keywords(
    b"dob", b"d.o.b", b"date of birth", b"birth date", b"birthdate", b"birthday", b"born", b"b-day",
    b"geboren", b"geb.", b"geburtsdatum", b"n\xc3\xa9 le", b"n\xc3\xa9e le", b"date de naissance",
    b"fecha de nacimiento", b"nacido", b"nacida", b"data di nascita",
)
_DOB_AFTER: Final = _keywords(b"birth", b"dob", b"born")
_MONTH_NAMES: Final = {
    name: number for number, names in enumerate((
        ("jan", "january"), ("feb", "february"), ("mar", "march"), ("apr", "april"), ("may",), ("jun", "june"),
        ("jul", "july"), ("aug", "august"), ("sep", "sept", "september"), ("oct", "october"),
        ("nov", "november"), ("dec", "december"),
    ), start=1) for name in names
}
_DAYS_IN_MONTH: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_WORD_RE: Final = re.compile(rb"[A-Za-z]+")


def _date_ok(day: int, month: int, year: int) -> bool:
    if year < 100:
        year += 1900
    return 1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month - 1] and 1880 <= year <= 2100


def date_valid(chunk: bytes) -> bool:
    """A real calendar date in one of the written forms DATE_SOURCE finds."""
    runs = _digit_runs(chunk)
    numbers = [int(n) for n in runs]
    month_words = [_MONTH_NAMES[w] for w in (w.decode().lower() for w in _WORD_RE.findall(chunk))
                   if w in _MONTH_NAMES]
    if month_words:
        return len(numbers) == 2 and _date_ok(numbers[0], month_words[0], numbers[1])
    if len(runs) == 1 and len(runs[0]) == 8:
        run = runs[0]
        return (_date_ok(int(run[6:]), int(run[4:6]), int(run[:4]))  # yyyymmdd
                or _date_ok(int(run[:2]), int(run[2:4]), int(run[4:]))  # ddmmyyyy
                or _date_ok(int(run[2:4]), int(run[:2]), int(run[4:])))  # mmddyyyy
    if len(numbers) != 3:
        return False
    first, second, third = numbers
    if len(runs[0]) == 4:
        return _date_ok(third, second, first)
    return _date_ok(first, second, third) or _date_ok(second, first, third)


def _check_dob(data: bytes, start: int, end: int) -> Span | None:
    if not (_has_keyword(_before(data, start), _DOB_BEFORE)
            or _has_keyword(data[end:end + 24], _DOB_AFTER)):
        return None
    return (start, end) if date_valid(data[start:end]) else None


# --- ADDRESS (optional) ---------------------------------------------------------------

# USPS Publication 28, appendix C1: street suffix names and their standard abbreviations.
_STREET_SUFFIXES = (
    "Alley Aly Annex Anx Arcade Arc Avenue Ave Av Bayou Byu Beach Bch Bend Bnd Bluff Blf Bluffs Blfs Bottom Btm "
    "Boulevard Blvd Branch Br Bridge Brg Brook Brk Brooks Brks Burg Bg Burgs Bgs Bypass Byp Camp Cp Canyon Cyn "
    "Cape Cpe Causeway Cswy Center Ctr Centers Ctrs Circle Cir Circles Cirs Cliff Clf Cliffs Clfs Club Clb "
    "Common Cmn Commons Cmns Corner Cor Corners Cors Course Crse Court Ct Courts Cts Cove Cv Coves Cvs Creek Crk "
    "Crescent Cres Crest Crst Crossing Xing Crossroad Xrd Crossroads Xrds Curve Curv Dale Dl Dam Dm Divide Dv "
    "Drive Dr Drives Drs Estate Est Estates Ests Expressway Expy Extension Ext Extensions Exts Fall Falls Fls "
    "Ferry Fry Field Fld Fields Flds Flat Flt Flats Flts Ford Frd Fords Frds Forest Frst Forge Frg Forges Frgs "
    "Fork Frk Forks Frks Fort Ft Freeway Fwy Garden Gdn Gardens Gdns Gateway Gtwy Glen Gln Glens Glns Green Grn "
    "Greens Grns Grove Grv Groves Grvs Harbor Hbr Harbors Hbrs Haven Hvn Heights Hts Highway Hwy Hill Hl Hills "
    "Hls Hollow Holw Inlet Inlt Island Is Islands Iss Isle Junction Jct Junctions Jcts Key Ky Keys Kys Knoll Knl "
    "Knolls Knls Lake Lk Lakes Lks Land Landing Lndg Lane Ln Light Lgt Lights Lgts Loaf Lf Lock Lck Locks Lcks "
    "Lodge Ldg Loop Mall Manor Mnr Manors Mnrs Meadow Mdw Meadows Mdws Mews Mill Ml Mills Mls Mission Msn "
    "Motorway Mtwy Mount Mt Mountain Mtn Mountains Mtns Neck Nck Orchard Orch Oval Overpass Opas Park Prk Parks "
    "Parkway Pkwy Parkways Pass Passage Psge Path Pike Pine Pne Pines Pnes Place Pl Plain Pln Plains Plns Plaza "
    "Plz Point Pt Points Pts Port Prt Ports Prts Prairie Pr Radial Radl Ramp Ranch Rnch Rapid Rpd Rapids Rpds "
    "Rest Rst Ridge Rdg Ridges Rdgs River Riv Road Rd Roads Rds Route Rte Row Rue Run Shoal Shl Shoals Shls Shore "
    "Shr Shores Shrs Skyway Skwy Spring Spg Springs Spgs Spur Spurs Square Sq Squares Sqs Station Sta Stravenue "
    "Stra Stream Strm Street St Streets Sts Summit Smt Terrace Ter Throughway Trwy Trace Trce Track Trak "
    "Trafficway Trfy Trail Trl Trailer Trlr Tunnel Tunl Turnpike Tpke Underpass Upas Union Un Unions Uns Valley "
    "Vly Valleys Vlys Via Viaduct Vdct View Vw Views Vws Village Vlg Villages Vlgs Ville Vl Vista Vis Walk Walks "
    "Wall Way Ways Well Wl Wells Wls"
)
_SUFFIX_ALT = "|".join(sorted(set(_STREET_SUFFIXES.split()), key=lambda s: (-len(s), s)))
ADDRESS_SOURCE: Final = _bounded(
    r"^|[^0-9A-Za-z_]",
    r"[0-9]{1,6}[A-Za-z]?[ \t]+(?:(?:[NSEW]|North|South|East|West)\.?[ \t]+)?"
    r"(?:[A-Z][A-Za-z'\-]*[ \t]+|[0-9]{1,3}(?:st|nd|rd|th)[ \t]+){1,4}"
    rf"(?:{_SUFFIX_ALT})\b\.?"
    r"(?:,?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Fl\.?|Floor|Rm\.?|Room|#)[ \t]*#?[A-Za-z0-9\-]{1,6})?",
    r"",
)


# ``required`` literals, each held by every alternative: an SSN's serial (or its nine-digit
# run) is four digits, an IBAN opens with two letters and two check digits, an IPv4 address
# has a digit, a dot and a digit, an IPv6 address two colons (at most four hex digits
# apart), a key its prefix (_SECRET_LITERALS), a PEM key "-----BEGIN".
RULES: Final[tuple[Rule, ...]] = (
    Rule(EMAIL, "email", EMAIL_SOURCE, _check_email, group=0),
    Rule(PHONE, "phone", PHONE_SOURCE, _check_phone, needs_digit=True),
    Rule(PHONE, "phone_glued", PHONE_GLUED_SOURCE, _check_phone, group=-1, needs_digit=True, glued=True),
    Rule(PHONE, "phone_after_entity", PHONE_AFTER_ENTITY_SOURCE, _check_phone, needs_digit=True, glued=True,
         after_entity=True, opens_with=PHONE_OPENS_WITH),
    Rule(CARD, "card", CARD_SOURCE, _check_card, needs_digit=True),
    Rule(CARD, "card_spread", CARD_SPREAD_SOURCE, _check_card_spread, needs_digit=True),
    Rule(CARD, "card_grouped", CARD_GROUPED_SOURCE, _check_card_grouped, needs_digit=True),
    Rule(SSN, "ssn", SSN_SOURCE, _check_ssn, needs_digit=True, required=(b"0000",), view=VIEW_SHAPE),
    Rule(SSN, "ssn_glued", SSN_GLUED_SOURCE, _check_ssn, group=-1, needs_digit=True, glued=True, required=(b"0000",),
         view=VIEW_SHAPE),
    Rule(IBAN, "iban", IBAN_SOURCE, _check_iban, needs_digit=True, required=(b"aa00",), view=VIEW_SHAPE),
    Rule(IP, "ipv4", IPV4_SOURCE, _check_ipv4, needs_digit=True, required=(b"0.0",), view=VIEW_SHAPE),
    Rule(IP, "ipv4_glued", IPV4_GLUED_SOURCE, _check_ipv4, group=-1, needs_digit=True, glued=True,
         required=(b"0.0",), view=VIEW_SHAPE),
    Rule(IP, "ipv4_pair_first", IPV4_PAIR_FIRST_SOURCE, _check_ipv4_first, needs_digit=True, glued=True,
         required=(b"0.0",), view=VIEW_SHAPE),
    Rule(IP, "ipv4_pair_second", IPV4_PAIR_SECOND_SOURCE, _check_ipv4_second, needs_digit=True, glued=True,
         required=(b"0.0",), view=VIEW_SHAPE),
    Rule(IP, "ipv6", IPV6_SOURCE, _check_ipv6, required=(b":",), required_times=2),
    *(Rule(SECRET, name, _bounded(_NOT_AFTER_ALNUM, source, ""), _check_prefixed_secret,
           required=_SECRET_LITERALS[name]) for name, source in _SECRET_PREFIXED),
    Rule(SECRET, "pem_private_key", PEM_SOURCE, _accept, group=0, required=(b"-----BEGIN",)),
    Rule(SECRET, "assigned_secret", ASSIGNED_SECRET_SOURCE, _accept),
    Rule(SECRET, "auth_header", AUTH_HEADER_SOURCE, _accept, group=-1),
    Rule(DOB, "dob", DATE_SOURCE, _check_dob, needs_digit=True),
    Rule(DOB, "dob_glued", DATE_GLUED_SOURCE, _check_dob, group=-1, needs_digit=True, glued=True),
    Rule(ADDRESS, "address", ADDRESS_SOURCE, _accept, needs_digit=True),
)
