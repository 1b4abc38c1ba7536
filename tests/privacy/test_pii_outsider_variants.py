"""Formats and placements an outsider tries that the engine once missed (session 6).

Each case failed before its fix: a character reference decoded by a browser, URL decoder
or model; an entity split across tensor elements whose neighbours glue to it; a date of
birth in a database or ISO basic form; an address with spaces around its "@".
"""

from __future__ import annotations

import pytest

from privacy.pii import ENTITIES, PiiEngine, Replace
from privacy.pii.normalize import decode_references

ENGINE = PiiEngine(ENTITIES)
TAGS = {entity: Replace() for entity in ENTITIES}


@pytest.mark.parametrize(("text", "tag"), [
    ("john&#46;doe&#64;example&#46;com", "[EMAIL]"),
    ("john.doe&commat;example&period;com", "[EMAIL]"),
    ("john.doe&#64example.com", "[EMAIL]"),
    ("john.doe%EF%BC%A0example.com", "[EMAIL]"),
    ("jo&#x200b;hn.doe@example.com", "[EMAIL]"),
    ("john.doe\\u0040example.com", "[EMAIL]"),
    ("4111%201111%201111%201111", "[CARD]"),
    ("4111&nbsp;1111&nbsp;1111&nbsp;1111", "[CARD]"),
    ("SSN 078&#45;05&#45;1120", "[SSN]"),
    ("192%2E168%2E1%2E23", "[IP]"),
])
def test_character_references_are_decoded(text: str, tag: str) -> None:
    masked, counts = ENGINE.mask(f"see {text} now", TAGS)
    assert masked == f"see {tag} now" or masked == f"see SSN {tag} now", masked
    assert sum(counts.values()) == 1


def test_decoded_spans_cover_whole_references() -> None:
    text = "a&#64;b %41"
    copy = decode_references(text)
    assert copy is not None and copy.text == "a@b A"
    assert copy.to_original(1, 2) == (1, 6)  # "@" is all of "&#64;"
    assert copy.to_original(4, 5) == (8, 11)
    assert copy.to_original(0, 3) == (0, 7)


@pytest.mark.parametrize("text", ["plain text", "50% off & more", "&#0; &#99999999; &bogus; %zz \\u12"])
def test_text_without_references_is_left_alone(text: str) -> None:
    copy = decode_references(text)
    assert copy is None or copy.text == text
    assert ENGINE.mask(text, TAGS)[0] == text


@pytest.mark.parametrize("left", ["", "x", "7", " ", "ab1", "."])
@pytest.mark.parametrize("right", ["", "x", "7", " ", "ab1", "."])
@pytest.mark.parametrize("pieces", [
    ("203.0.", "113.77"), ("AKIAIOSFOD", "NN7EXAMPLE"), ("(415) ", "555-0199"), ("GB82 WEST ", "1234 5698 7654 32"),
    ("2001:db8::", "ff00:42:8329"), ("ghp_abcdefghij", "klmnopqrstuvwxyz0123456789"), ("jane.roe@", "corp.example"),
    ("eyJhbGciOiJIUzI1NiJ9.", "eyJzdWIiOiJ1MSJ9.abcDEF123"), ("4111 1111 ", "1111 1111"), ("219-09-", "9999"),
])
def test_split_entity_glued_to_neighbours(pieces: tuple[str, str], left: str, right: str) -> None:
    elements = [e for e in (left, *pieces, right) if e]
    masked, counts = ENGINE.mask_many(elements, TAGS)
    assert not [p for p in pieces if p in masked], masked
    assert sum(counts.values()) >= 1


def test_whole_entity_does_not_read_on_into_a_word() -> None:
    """Precision kept: an element holding a whole address does not take its neighbour."""
    masked, _ = ENGINE.mask_many(["john@example.com", "bob"], TAGS)
    assert masked == ["[EMAIL]", "bob"]


@pytest.mark.parametrize("text", ["DOB: 14-Mar-1985", "born 14/mar/85", "DOB Mar-14-1985", "DOB 19850314",
                                  "dob: 14031985"])
def test_dates_of_birth_in_more_forms(text: str) -> None:
    assert "[DOB]" in ENGINE.mask(text, TAGS)[0]


@pytest.mark.parametrize("text", ["order 19850314 shipped", "DOB 99999999"])
def test_eight_digits_are_a_date_only_by_keyword_and_calendar(text: str) -> None:
    assert ENGINE.mask(text, TAGS)[0] == text


@pytest.mark.parametrize("text", ["john.doe @ example.com", "john.doe\t@example.com", "john.doe@ example.com"])
def test_spaces_around_at(text: str) -> None:
    assert ENGINE.mask(f"mail {text}", TAGS)[0] == "mail [EMAIL]"


@pytest.mark.parametrize("text", [
    "card 41111 111 1111 1111", "card 411 1 1111 1111 1111", "my visa: 41111111 11111111",
    "card number 4111 11111111 1111", "paid with 4111111 111111111", "Card no. 41111-111-1111-1111.",
    "card 411\u200a1 1111 1111 1111",  # a hair space inside a group: the same regrouping
])
def test_card_in_irregular_groups_after_a_keyword(text: str) -> None:
    """s8 probe: a card regrouped the way no card is printed (5-3-4-4, 8-8, 3-1-4-4-4) was
    left in clear, even right after "card"; a keyword-led reading masks it whole."""
    masked, counts = ENGINE.mask(text, TAGS)
    assert counts == {"CARD": 1}, (text, masked)
    assert sum(ch.isdigit() for ch in masked) == 0, masked


@pytest.mark.parametrize("text", [
    "order 41111 111 1111 1111",  # no card keyword: a run of numbers
    "card 41111 111 1111 1112",  # fails Luhn
    "card 2019 10 12 34 5",  # too few digits
    "card 4111-111.1111 1111",  # several kinds of separators: a list
])
def test_irregular_groups_need_keyword_luhn_and_one_separator(text: str) -> None:
    masked, counts = ENGINE.mask(text, TAGS)
    assert "CARD" not in counts, (text, masked)
