"""The PII engine under fuzz: masking never raises, a masked text masks to itself, and a
planted entity never survives, whatever text surrounds it or however it is split into
tensor elements."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from privacy.pii.normalize import normalize
from privacy.pii.operators import Mask, Redact, Replace
from security_tests.fuzz import targets
from security_tests.fuzz.corpus_examples import with_corpus
from security_tests.fuzz.profiles import fuzz_settings

ENGINE = targets.pii_engine()
TAGS = targets.pii_tags()
# Any text, biased towards what the recognizers look at: digits, separators, @, keywords,
# invisible and look-alike characters.
PIECES = st.sampled_from(["@", ".", "-", " ", "\n", "/", ":", "+1 ", "SSN ", "card ", "DOB ", "[at]", "(dot)",
                          "\u200b", "\u202e", "\u202c", "\uff11", "0", "4", "9", "com", "Street", "password="])
TEXT = st.lists(st.one_of(st.text(max_size=6), st.from_regex(r"[0-9 \-]{1,12}", fullmatch=True), PIECES),
                max_size=20).map("".join)
SEPARATORS = st.sampled_from([" ", "\n", ", ", "; ", " (", ") ", "\t"])


@st.composite
def ssns(draw: st.DrawFn) -> str:
    area = draw(st.integers(1, 899).filter(lambda a: a != 666))
    return f"{area:03d}-{draw(st.integers(1, 99)):02d}-{draw(st.integers(1, 9999)):04d}"


@st.composite
def cards(draw: st.DrawFn) -> str:
    """Luhn-valid 16-digit Visa-style numbers, contiguous or in groups of four."""
    body = [4, *draw(st.lists(st.integers(0, 9), min_size=14, max_size=14))]
    total = 0
    for index, digit in enumerate(reversed(body)):
        doubled = digit * 2 if index % 2 == 0 else digit
        total += doubled - 9 if doubled > 9 else doubled
    number = "".join(map(str, body)) + str((10 - total % 10) % 10)
    if draw(st.booleans()):
        return " ".join(number[i:i + 4] for i in range(0, 16, 4))
    return number


PHONES = st.one_of(
    st.builds(lambda a, b, c: f"{a}-555-{c:04d}", st.integers(201, 989), st.none(), st.integers(100, 199)),
    st.builds(lambda a, c: f"+1{a}555{c:04d}", st.integers(201, 989), st.integers(100, 199)),
    st.builds(lambda a, c: f"+1 {a} 555 {c:04d}", st.integers(201, 989), st.integers(100, 199)),
    st.sampled_from(["+44 20 7946 0958", "+442079460958", "020 7946 0958", "+49 30 901820", "(415) 555-0132"]),
)
EMAILS = st.builds(lambda user, host, tld: f"{user}@{host}.{tld}",
                   st.from_regex(r"[a-z][a-z0-9._]{0,10}[a-z0-9]", fullmatch=True),
                   st.from_regex(r"[a-z][a-z0-9]{1,10}", fullmatch=True), st.sampled_from(["com", "org", "de", "io"]))
ENTITIES = st.one_of(EMAILS, ssns(), cards(), PHONES)


@fuzz_settings()
@given(data=st.one_of(st.binary(max_size=512), TEXT.map(str.encode)))
@with_corpus("pii")
def test_mask_never_raises_and_is_a_fixed_point(data: bytes) -> None:
    """mask(text) masks to itself and holds no detection; mask_many never raises."""
    targets.pii(data)


def _glued(before: str, left: str, entity: str) -> bool:
    """Digits, a plain space, then a number ("0000/0 020 7946 0958") may be one number (an
    account, a reference): no recognizer can tell, so no property is claimed there."""
    # On the detection copy: invisible characters are dropped and look-alike digits folded there.
    if left not in (" ", "\t") or entity[:1] not in "+0123456789(" or not before:
        return False
    # Both orders the engine scans: a right-to-left override reorders the display copy.
    return any(normalize(before, display_order=order).text.rstrip(" \t-./")[-1:].isdigit()
               for order in (True, False))


# Leaks this suite found, fixed in privacy/pii (recognizers.py, engine.py), each with the
# value that used to survive masking.
FOUND_LEAKS = [
    ("call +14155550132 12 times", "+14155550132"),  # a run followed by any number
    ("tel +44 20 7946 0958 0A", "+44 20 7946 0958"),  # followed by a digit glued to a word
    ("+44 20 7946 0958 0000000A", "+44 20 7946 0958"),
    ("call +44 20 7946 0958 2nd floor", "+44 20 7946 0958"),
    ("0/0 020 7946 0958", "020 7946 0958"),  # after small numbers
    ("0/000 201-555-0100", "201-555-0100"),
    ("+14155550132/415-555-0199", "+14155550132"),  # two numbers written together
    ("call 415-555-0132/415-555-0199 now", "415-555-0132"),
    ("call 415-555-0132/415-555-0199 now", "415-555-0199"),
    ("+14155550132 415-555-0199", "+14155550132"),
    ("201-555-0100 001-01-0001", "201-555-0100"),  # next to another entity
    ("078-05-1120 415-555-0132", "415-555-0132"),
    ("4111 1111 1111 1111 415-555-0132", "415-555-0132"),
]


@pytest.mark.parametrize(("text", "value"), FOUND_LEAKS)
def test_found_leaks_stay_fixed(text: str, value: str) -> None:
    masked, _counts = ENGINE.mask(text, TAGS)
    assert value not in masked
    assert value[-4:] not in masked  # no part of it either ("415-[PHONE]-0199" was one)


@fuzz_settings()
@given(before=TEXT, after=TEXT, entity=ENTITIES, left=SEPARATORS, right=SEPARATORS,
       operator=st.sampled_from([Replace(), Mask(), Redact()]))
def test_planted_entity_never_survives(before: str, after: str, entity: str, left: str, right: str,
                                       operator: Replace | Mask | Redact) -> None:
    assume(not _glued(before, left, entity))
    text = f"{before}{left}{entity}{right}{after}"
    masked, counts = ENGINE.mask(text, dict.fromkeys(ENGINE.entities, operator))
    assert entity not in masked
    assert counts, "a planted entity was not counted"


@fuzz_settings()
@given(before=TEXT, entity=ENTITIES, cuts=st.lists(st.integers(0, 200), max_size=4))
def test_planted_entity_split_across_elements_never_survives(before: str, entity: str, cuts: list[int]) -> None:
    """Tensor elements are masked as they would read joined: no piece of the entity remains
    that, put back together, shows it."""
    assume(not _glued(before, " ", entity))
    text = f"{before} {entity} "
    positions = sorted({c % (len(text) + 1) for c in cuts})
    elements = [text[a:b] for a, b in zip([0, *positions], [*positions, len(text)], strict=True)]
    masked, _counts = ENGINE.mask_many(elements, TAGS)
    assert len(masked) == len(elements)
    assert entity not in "".join(masked)


@fuzz_settings()
@given(first=ENTITIES, second=ENTITIES, between=st.sampled_from([", ", "; ", " or ", "\n", " and "]),
       before=TEXT, after=TEXT)
def test_two_entities_side_by_side_both_masked(first: str, second: str, between: str, before: str,
                                               after: str) -> None:
    """Two entities next to each other are two entities, not one window of them. (Joined by
    a plain space or "/", two numbers can read as one: "+44 20 7946 0958 4000 0000 0000
    0002" still hides the card; see FOUND_LEAKS and the report of issue 10.)"""
    assume(not _glued(before, " ", first))
    masked, _counts = ENGINE.mask(f"{before} {first}{between}{second} {after}", TAGS)
    assert first not in masked
    assert second not in masked


@fuzz_settings()
@given(first=PHONES, second=PHONES, between=st.sampled_from(["/", ":", ", ", " ", " / ", ";"]))
def test_two_phones_glued_both_masked(first: str, second: str, between: str) -> None:
    """Alternative numbers written together ("+14155550132/415-555-0199") are both masked.
    (A number glued by "/" to another kind of number, "201-555-0100/078-05-1120", reads as
    one long number to the recognizers and is left alone: a precision choice.)"""
    masked, counts = ENGINE.mask(f"tel {first}{between}{second} x", TAGS)
    assert first not in masked and second not in masked
    assert counts.get("PHONE", 0) >= 1
