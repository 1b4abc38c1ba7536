"""Unicode tricks do not hide an entity, and masking replaces the original characters."""

from __future__ import annotations

import random

import pytest

from privacy.pii import PiiEngine, Replace
from privacy.pii.normalize import SPARSE_LIMIT, _normalize_sparse, _normalize_vectorized, normalize

ENGINE = PiiEngine()
TAGS = {entity: Replace() for entity in ENGINE.entities}

EVASIONS = [
    ("john\u200b.doe@exa\u200dmple.com", "EMAIL"),  # zero-width space and joiner inside an e-mail
    ("john\u00ad.doe@example.com", "EMAIL"),  # soft hyphen
    ("john\u2060.doe@example.com", "EMAIL"),  # word joiner
    ("john\ufeff.doe@example.com", "EMAIL"),  # BOM as zero-width no-break space
    ("john.doe\uff20example.com", "EMAIL"),  # fullwidth @
    ("john.doe\ufe6bexample.com", "EMAIL"),  # small commercial at
    ("\u0458ohn.doe@example.com", "EMAIL"),  # Cyrillic je for j
    ("j\u03bfhn.d\u03bfe@exampl\u0435.com", "EMAIL"),  # Greek omicron, Cyrillic ie
    ("john.doe@example\u3002com", "EMAIL"),  # ideographic full stop as the dot
    ("\u0660\u0667\u0668-\u0660\u0665-\u0661\u0661\u0662\u0660", "SSN"),  # Arabic-Indic digits
    ("\uff10\uff17\uff18-\uff10\uff15-\uff11\uff11\uff12\uff10", "SSN"),  # fullwidth digits
    ("078\u201105\u20111120", "SSN"),  # non-breaking hyphens
    ("078\u221205\u22121120", "SSN"),  # minus signs
    ("\U0001d7ce\U0001d7d5\U0001d7d6-05-1120", "SSN"),  # mathematical bold digits
    ("4\u0300111 1111 1111 1111", "CARD"),  # combining grave accent (PII-02)
    ("4111\u00a01111\u00a01111\u00a01111", "CARD"),  # no-break spaces
    ("4111\u20091111\u20091111\u20091111", "CARD"),  # thin spaces
    ("\u0664\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661", "CARD"),
    ("x \u202e0211-50-870\u202c y", "SSN"),  # right-to-left override shows 078-05-1120
    ("\u202a078-05-1120\u202c", "SSN"),  # LRE/PDF embedding around the value
    ("\u2066078-05-1120\u2069", "SSN"),  # isolate around the value
    ("078\u200e-05\u200f-1120", "SSN"),  # LRM/RLM marks inside
    ("\u0391\u039a\u0399\u0391IOSFODNN7EXAMPLE", "SECRET"),  # Greek capitals in an AWS key prefix
    ("192\u200b.168.1.20", "IP"),  # zero-width inside an IPv4
    ("john\x00.doe@example.com", "EMAIL"),  # NUL byte
    # s8 probe: separators outside the Pd category that read as a dash or a dot
    ("078\u02d705\u02d71120", "SSN"),  # modifier letter minus (Sk)
    ("4111\u27961111\u27961111\u27961111", "CARD"),  # heavy minus sign (So)
    ("+81 90\u30fc1234\u30fc5678", "PHONE"),  # katakana prolonged sound mark as the dash
    ("\uff10\uff19\uff10\uff70\uff11\uff12\uff13\uff14\uff70\uff15\uff16\uff17\uff18", "PHONE"),  # halfwidth form
    ("415\u2500555\u25000132", "PHONE"),  # box-drawing line
    ("john.doe@example\ua4f8com", "EMAIL"),  # Lisu letter tone mya ti (a dot)
]


@pytest.mark.parametrize(("text", "entity"), EVASIONS)
def test_evasion_is_masked_whole(text: str, entity: str) -> None:
    masked, counts = ENGINE.mask(f"before {text} after", TAGS)
    assert counts == {entity: 1}
    # Invisible characters around the entity may stay; nothing of the value does.
    rest = normalize(masked, display_order=False).text
    assert rest.count(f"[{entity}]") == 1
    assert not any(ch.isdigit() or ch == "@" for ch in rest.replace(f"[{entity}]", ""))
    assert "IOSFODNN" not in rest


def test_offsets_map_back_through_deletions_and_expansions() -> None:
    text = "\ufb01 x\u200b y \u00bd: mail j\u200bo@ex.com"
    normalized = normalize(text)
    assert normalized.text == "fi x y 1\u20442: mail jo@ex.com"
    start = normalized.text.index("jo@")
    assert normalized.to_original(start, len(normalized.text)) == (text.index("j\u200b"), len(text))


def test_display_and_logical_order_are_both_scanned() -> None:
    # Logical order spells an SSN; displayed (reversed) it is digits in another order.
    text = "\u202e078-05-1120\u202c"
    assert ENGINE.mask(text, TAGS)[1] == {"SSN": 1}


def test_paths_agree_on_random_text() -> None:
    """The sparse Python loop and the vectorized path build the same copy and map."""
    rng = random.Random(7)
    alphabet = "ab1@. \n\u200b\u00ad\ufb01\uff11\u0430\u00bd\u0301\U0001d7cf\udcff"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        vectorized = _normalize_vectorized(text, display_order=False)
        positions = [i for i, ch in enumerate(text) if not ("\x20" <= ch <= "\x7e" or ch in "\t\n\r")]
        assert len(positions) <= SPARSE_LIMIT
        folds = {text[i]: normalize(text[i]).text for i in positions}
        sparse = _normalize_sparse(text, positions, folds)
        assert sparse.text == vectorized.text
        assert sparse.starts is not None and vectorized.starts is not None
        assert sparse.starts.tolist() == vectorized.starts.tolist()


def test_plain_ascii_is_its_own_copy() -> None:
    normalized = normalize("plain text, 078-05-1120\n")
    assert normalized.identity and normalized.text == normalized.original
