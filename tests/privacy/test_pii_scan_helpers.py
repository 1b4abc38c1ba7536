"""The bookkeeping shortcuts of the scan loop answer what the forms they replace did.

Issue 5 (1 KB under 50 µs): covered intervals grow in place instead of being rebuilt
after every rule, the last digit is found without ``rstrip`` of 246 bytes, and ``mask``
merges plain tuples instead of frozen detections. Each is pinned here against the
reference it replaced, on seeded inputs that include the edge cases (touching and
nested intervals, texts without digits, equal spans of different types).
"""

from __future__ import annotations

import random

from privacy.pii.engine import _NOT_DIGITS, Detection, _Covered, _digits_end, _merge_spans, merge
from privacy.pii.recognizers import PRIORITY


def _intervals(covered: _Covered) -> list[tuple[int, int]]:
    return list(zip(covered._starts, covered._ends, strict=True))


def test_adding_spans_one_by_one_gives_their_union() -> None:
    rng = random.Random(3)
    merged_some = touching = 0
    for _ in range(3000):
        spans = []
        for _ in range(rng.randrange(1, 12)):
            start = rng.randrange(0, 60)
            spans.append((start, start + rng.randrange(1, 12)))
        covered = _Covered([])
        for start, end in spans:
            covered.add(start, end)
        union = _Covered.union(spans)
        assert _intervals(covered) == _intervals(union), spans
        merged_some += len(union._starts) < len(spans)
        touching += any(a[1] == b[0] for a, b in zip(_intervals(union), _intervals(union)[1:], strict=False))
    assert merged_some > 1000 and touching > 100  # the cases that could differ did occur


def test_answers_of_an_incremental_cover_match_the_rebuilt_one() -> None:
    rng = random.Random(4)
    for _ in range(500):
        spans = [(s, s + rng.randrange(1, 9)) for s in (rng.randrange(0, 80) for _ in range(rng.randrange(1, 9)))]
        covered = _Covered([])
        for start, end in spans:
            covered.add(start, end)
        union = _Covered.union(spans)
        for position in range(-1, 92):
            assert covered.end_of(position) == union.end_of(position)
            for length in (0, 1, 3, 9):
                span = (position, position + length)
                assert covered.contains(span) == union.contains(span)
                assert covered.overlaps(span) == union.overlaps(span)


def test_last_digit_is_found_as_rstrip_finds_it() -> None:
    rng = random.Random(5)
    alphabet = b"ab -.\n\xc3\xa9" + b"0123456789"
    without_digits = 0
    for _ in range(20_000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 160)))
        if rng.random() < 0.4:
            data = data.translate(bytes.maketrans(b"0123456789", b"abcdefghij"))
        if rng.random() < 0.3:
            data += b"x" * rng.randrange(40, 120)  # digits only before a long tail
        without_digits += not data.rstrip(_NOT_DIGITS)
        assert _digits_end(data) == len(data.rstrip(_NOT_DIGITS)), data
        views: dict[bytes | None, bytes] = {}
        assert _digits_end(data, views) == len(data.rstrip(_NOT_DIGITS)), data  # through the shape view
        assert _digits_end(data, views) == len(data.rstrip(_NOT_DIGITS)), data  # the view kept
    assert without_digits > 1000


def test_tuple_merge_is_the_detection_merge() -> None:
    rng = random.Random(6)
    for _ in range(3000):
        spans = [(rng.choice(PRIORITY), s, s + rng.randrange(1, 8))
                 for s in (rng.randrange(0, 40) for _ in range(rng.randrange(0, 9)))]
        expected = [(d.entity, d.start, d.end) for d in merge(Detection(*span) for span in spans)]
        assert _merge_spans(spans) == expected


def test_merging_new_spans_with_the_intervals_gives_the_union_of_all() -> None:
    """Many new spans of one rule are merged with the intervals, not with every span."""
    rng = random.Random(7)
    for _ in range(2000):
        old = [(s, s + rng.randrange(1, 9)) for s in (rng.randrange(0, 60) for _ in range(rng.randrange(1, 12)))]
        new = [(s, s + rng.randrange(1, 9)) for s in (rng.randrange(0, 60) for _ in range(rng.randrange(1, 12)))]
        merged = _Covered.union([*_Covered.union(old).spans(), *new])
        assert _intervals(merged) == _intervals(_Covered.union(old + new)), (old, new)
