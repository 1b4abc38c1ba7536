"""Entities written next to each other are all masked, every digit of each (issue 5).

The leak: "call +1 415 555 2671 4111 1111 1111 1111 now" left the card's last group in
clear. Candidates of one rule take in a neighbour's digits (a phone's last group is
Luhn-valid with a card's first three 1 time in 10; a card's optional fifth group is a
phone's first), so the class is tested as a family: seeded pairs of cards (4-4-4-4 with
any separator, Amex 4-6-5, contiguous), phones (NANP, E.164 spaced, UK), SSNs and IBANs,
joined by the separators people put between two values.

Glued entities (issue 5, second part): the same family joined by a separator the entities
use inside a number ("-", ".", "_"). Boundaries that refused "7-" before or "-7" after
left 41.8 % of such texts with an entity in clear ("call 635-11-2881.173-52-1064" kept the
second SSN); the glued readings of the recognizers (``Rule.glued``) find them, and only add
to what the other rules find.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from privacy.pii import PiiEngine, Replace
from privacy.pii.recognizers import iban_valid
from tests.support.pii_texts import iban, luhn_complete

ENGINE = PiiEngine()
JOINS = (" ", "  ", ", ", "/", " / ", " - ", "; ", "\n", "\t", " and ", " | ", ": ", " -- ")
GLUES = ("-", ".", "_")
PREFIXES = ("call ", "card ", "pay ", "", "ref ", "ids: ")


def _card(rng: random.Random) -> str:
    number = luhn_complete(rng.choice("3456") + "".join(rng.choice("0123456789") for _ in range(14)))
    separator = rng.choice((" ", "-", "", ".", " - "))
    return separator.join(number[i:i + 4] for i in range(0, 16, 4)) if separator else number


def _amex(rng: random.Random) -> str:
    number = luhn_complete("3" + rng.choice("47") + "".join(rng.choice("0123456789") for _ in range(12)))
    separator = rng.choice((" ", "-"))
    return separator.join((number[:4], number[4:10], number[10:]))


def _phone(rng: random.Random) -> str:
    area, exchange, line = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    return rng.choice((
        f"+1 {area} {exchange} {line:04d}", f"{area}-{exchange}-{line:04d}", f"({area}) {exchange}-{line:04d}",
        f"+44 20 {rng.randint(7000, 7999)} {line:04d}", f"{area} {exchange} {line:04d}",
        f"+1{area}{exchange}{line:04d}",
    ))


def _ssn(rng: random.Random) -> str:
    return f"{rng.randint(100, 665):03d}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"


def _iban(rng: random.Random) -> str:
    while True:
        value = iban(rng)
        if iban_valid(value.replace(" ", "").encode()):
            return value


MAKERS = (_card, _amex, _phone, _ssn, _iban)


def adjacent_texts(seed: int, count: int,
                   joins: Sequence[str] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """Seeded texts of two or three entities in a row, with each entity's span.

    ``joins`` default to the module's ``JOINS``, read at call time (scripts that measure
    other joins set it).
    """
    joins = JOINS if joins is None else joins
    rng = random.Random(seed)
    out: list[tuple[str, list[tuple[int, int]]]] = []
    for _ in range(count):
        text = rng.choice(PREFIXES)
        spans: list[tuple[int, int]] = []
        for index in range(rng.choice((2, 2, 2, 3))):
            if index:
                text += rng.choice(joins)
            value = rng.choice(MAKERS)(rng)
            spans.append((len(text), len(text) + len(value)))
            text += value
        out.append((text + rng.choice((" now", ".", "", " thanks")), spans))
    return out


def _unmasked(text: str, spans: list[tuple[int, int]]) -> list[str]:
    masked = [False] * len(text)
    for detection in ENGINE.scan(text):
        masked[detection.start:detection.end] = [True] * (detection.end - detection.start)
    return [text[start:end] for start, end in spans
            if not all(masked[i] for i in range(start, end) if text[i].isalnum())]


@pytest.mark.parametrize("text", [
    "call +1 415 555 2671 4111 1111 1111 1111 now",  # the report: card after a spaced phone
    "call +1 415 555 2671 4111-1111-1111-1111 now",
    "020 7946 0958 4111 1111 1111 1111",  # the card ran past the five groups a candidate holds
    "+44 20 7792 7549 - 3740-317614-63499",  # an Amex after a phone's last group
    "card 4111 1111 1111 1111 415 555 2671",  # phone after a card that a 19-digit reading takes in
    "4111 1111 1111 1111 5555 5555 5555 4444",  # two cards
    "call +44 20 7946 0958 DE89 3704 0044 0532 0130 00",  # IBAN after a phone
    "078-05-1120/219-09-9999",  # two SSNs in a list
    "415-555-0132/078-05-1120",  # SSN after a phone
])
def test_every_entity_of_a_known_leak_is_masked(text: str) -> None:
    masked, _ = ENGINE.mask(text, {})
    digits = [c for c in masked if c.isdigit()]
    assert digits == [], f"{text!r} -> {masked!r}"
    assert masked.count("[") >= 1


def test_a_phone_opening_with_a_parenthesis_is_read_after_any_number() -> None:
    text = "94 3167-0433 (214) 280-6666 x535"  # before: nothing masked, the leftover blocked it
    assert [(d.entity, text[d.start:d.end]) for d in ENGINE.scan(text)] == [("PHONE", "(214) 280-6666 x535")]


def test_a_card_the_candidate_cut_off_keeps_its_type() -> None:
    text = "020 7946 0958 4111 1111 1111 1111"
    assert [(d.entity, text[d.start:d.end]) for d in ENGINE.scan(text)] == [
        ("PHONE", "020 7946 0958"), ("CARD", "4111 1111 1111 1111")]


def test_adjacent_family_leaves_nothing_in_clear() -> None:
    texts = adjacent_texts(20261203, 3000)
    leaks = [(text, left) for text, spans in texts if (left := _unmasked(text, spans))]
    assert leaks == [], f"{len(leaks)} of {len(texts)} texts leak, e.g. {leaks[:3]}"


def test_adjacent_family_masks_with_every_operator_path() -> None:
    """``mask`` (what the gateway calls) leaves no digit of the family either."""
    operators = {"CARD": Replace(), "PHONE": Replace(), "SSN": Replace(), "IBAN": Replace()}
    for text, _ in adjacent_texts(7, 300):
        masked, counts = ENGINE.mask(text, operators)
        assert counts, text
        assert not any(c.isdigit() for c in masked), (text, masked)


@pytest.mark.parametrize("text", [
    "call 635-11-2881.173-52-1064",  # the report: the second SSN stayed in clear
    "pay 841-646-3080_4780361397912274",  # the report: the phone stayed in clear
    "ref 367-31-3230-137-16-6609.",  # two SSNs glued by "-"
    "call +44 20 7344 6538_479-78-2518.",  # SSN after a phone, by "_"
    "ids: 946 326 0575_(685) 600-2104 thanks",  # a phone opening with "(" after "_"
    "3433-214688-19731_+44 20 7155 3483_FR38 1817 5604 8063 5817 8397 052.",  # "+" after "_"
    "105-58-9855-838 563 1769 thanks",  # the phone candidate from "105" is refused whole
    "call 430-25-4789-227-41-1610.",  # a keyword phone ends inside the second SSN
    "call 114-25-7482-600 614 2265",  # ... and holds the SSN, ending inside the next phone
    "ids: 279-258-7307-510-77-7237.676 673 0020 now",  # phone, SSN, phone
    "DOB: 15/01/1990_078-05-1120",  # a date of birth glued to an SSN
    "host 10.0.0.1_10.0.0.2 up",  # IPv4 addresses glued by "_"
])
def test_every_entity_of_a_known_glued_leak_is_masked(text: str) -> None:
    masked, _ = ENGINE.mask(text, {})
    assert [c for c in masked if c.isdigit()] == [], f"{text!r} -> {masked!r}"


@pytest.mark.parametrize("glue", GLUES)
def test_glued_family_leaves_nothing_in_clear(glue: str) -> None:
    texts = adjacent_texts(99, 3000, joins=(glue,)) + adjacent_texts(20261203, 3000, joins=(glue,))
    leaks = [(text, left) for text, spans in texts if (left := _unmasked(text, spans))]
    assert leaks == [], f"{len(leaks)} of {len(texts)} texts leak, e.g. {leaks[:3]}"


@pytest.mark.parametrize(("text", "expected"), [
    ("ISBN 978-0-306-40615-7", []),
    ("v1.2.3.4-5", []),
    ("build_20231205_1234", []),
    ("part 123-45-67890-1", []),  # an SSN shape inside a longer number: a digit glues it
    ("ticket 2024-06-01_15-30", []),
    ("job_4155550132", []),  # one run of ten digits without a keyword, glued or not
    ("94 3167-0433 (214) 280-6666 x535", [("PHONE", "(214) 280-6666 x535")]),
    ("ref 078-05-1120_078-05-1120", [("SSN", "078-05-1120"), ("SSN", "078-05-1120")]),
    ("pay 841-646-3080_4780361397912274", [("PHONE", "841-646-3080"), ("CARD", "4780361397912274")]),
])
def test_glued_readings_mask_only_entities(text: str, expected: list[tuple[str, str]]) -> None:
    """Numbers glued to numbers that are no entity stay in clear; the glued ones keep their
    own type and span."""
    assert [(d.entity, text[d.start:d.end]) for d in ENGINE.scan(text)] == expected


@pytest.mark.parametrize(("elements", "value"), [
    # The second element alone holds a weak phone reading ("4221/075_42") that only touches
    # the phone the two elements make together: the joined phone is masked in both.
    (["ip-555-714-3530; contact: 208-57", "3-4221/075_42 / 78466.308.01.29 "], "208-573-4221"),
    (["contact: 208-57", "3-4221 thanks"], "208-573-4221"),
])
def test_a_phone_split_across_elements_is_masked_next_to_a_reading_of_its_own(
        elements: list[str], value: str) -> None:
    masked, counts = ENGINE.mask_many(elements, {entity: Replace() for entity in ENGINE.entities})
    joined = "".join(masked)
    assert counts.get("PHONE", 0) >= 1
    for group in value.split("-"):
        assert group not in joined, (group, masked)


def test_an_entity_an_element_holds_whole_is_not_read_on_into_its_neighbour() -> None:
    masked, counts = ENGINE.mask_many(["write to john@example.com", "b is the next word"],
                                      {entity: Replace() for entity in ENGINE.entities})
    assert masked[1] == "b is the next word"
    assert "john@example.com" not in masked[0]
    assert counts == {"EMAIL": 1}
