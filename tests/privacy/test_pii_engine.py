"""The engine as a whole: split entities, linear work, redaction for logs, no values kept."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.pii_pathological import PATHOLOGICAL
from privacy.pii import PiiEngine, Replace
from privacy.pii import redact as redact_module
from privacy.pii.redact import REDACTION_FAILED, redact_text, redact_value
from privacy.pii.regex import PatternSet

ENGINE = PiiEngine()
TAGS = {entity: Replace() for entity in ENGINE.entities}


class TestSplitAcrossElements:
    @pytest.mark.parametrize(("elements", "entity"), [
        (["reach me at john.doe@exa", "mple.com please"], "EMAIL"),  # joined with ""
        (["john.doe@example", ".com"], "EMAIL"),  # split at the dot
        (["card 4111 1111", "1111 1111"], "CARD"),  # joined with " "
        (["SSN 078-05-", "1120"], "SSN"),  # joined with ""
        (list("078-05-1120"), "SSN"),  # one character per element
        (["-----BEGIN PRIVATE KEY-----", "MIIEvQIBADANBg", "-----END PRIVATE KEY-----"], "SECRET"),  # multi-line
        (["DOB:", "03/14/1985"], "DOB"),  # keyword in another element
    ])
    def test_joined_only_entity_masked_in_every_element(self, elements: list[str], entity: str) -> None:
        masked, counts = ENGINE.mask_many(elements, TAGS)
        assert counts == {entity: 1}
        joined = "".join(masked)
        assert f"[{entity}]" in joined
        for digits_or_at in ("@", "1120", "4111", "MIIE", "1985"):
            assert digits_or_at not in joined

    def test_whole_entities_stay_per_element(self) -> None:
        masked, counts = ENGINE.mask_many(["a john@example.com", "b 415-555-0132", "nothing here"], TAGS)
        assert masked == ["a [EMAIL]", "b [PHONE]", "nothing here"]
        assert counts == {"EMAIL": 1, "PHONE": 1}

    def test_no_joins_means_per_element_only(self) -> None:
        masked, counts = ENGINE.mask_many(["john.doe@exa", "mple.com"], TAGS, joins=())
        assert counts == {} and masked == ["john.doe@exa", "mple.com"]


class _Work:
    """What the engine asks RE2 to do: counted by wrapping the compiled patterns.

    ``bytes`` is what a search reads forward: from where it starts to the end of its match,
    or to the end of its window when nothing matches (RE2's DFA stops once the leftmost
    match is complete). An anchored search (``spans_at``) is counted by its match; one that
    fails reads a prefix of a bounded pattern. The sets read each copy of the text once.
    """

    def __init__(self, engine: PiiEngine) -> None:
        self.searches = self.bytes = self.set_bytes = 0
        for pattern in engine._patterns:
            pattern.spans = self._counted(pattern.spans, anchored=False)
            pattern.spans_at = self._counted(pattern.spans_at, anchored=True)
        engine._sets = tuple((_CountedSet(pattern_set, self), group) for pattern_set, group in engine._sets)

    def _counted(self, search: Callable[[bytes, int, int], list[tuple[int, int]]],
                 anchored: bool) -> Callable[[bytes, int, int], list[tuple[int, int]]]:
        def counted(data: bytes, position: int, end: int) -> list[tuple[int, int]]:
            spans = search(data, position, end)
            self.searches += 1
            matched = spans[0][0] >= 0
            self.bytes += (spans[0][1] if matched else position if anchored else end) - position
            return spans
        return counted



class _CountedSet(PatternSet):
    """A pattern set that counts the bytes it reads (one pass over each text)."""

    __slots__ = ("_inner", "_work")

    def __init__(self, inner: PatternSet, work: _Work) -> None:
        self._inner, self._work = inner, work

    def matching(self, data: bytes) -> list[int]:
        self._work.set_bytes += len(data)
        return self._inner.matching(data)


def _work_per_byte(make: Callable[[int], str], size: int) -> tuple[float, float, float]:
    engine = PiiEngine()
    work = _Work(engine)
    text = make(size)
    engine.mask(text, TAGS)
    length = len(text.encode("utf-8"))
    return work.bytes / length, work.searches / length, work.set_bytes / length


@pytest.mark.parametrize(("name", "make"), PATHOLOGICAL, ids=[p[0] for p in PATHOLOGICAL])
def test_work_grows_linearly(name: str, make: Callable[[int], str]) -> None:
    """Catalogue PII-08 without a clock: the bytes RE2 reads and the number of searches
    (each check is bounded work per search) are at most a constant times the text, and
    that constant does not grow from 10 KB to 100 KB. A quadratic scan loop (a search
    resumed before the previous one's start, a window re-read per candidate) multiplies
    the work per byte by ~10 between the two sizes; the CPU time per 64 KiB of each input
    is printed by bench/bench_pii.py."""
    small, large = _work_per_byte(make, 10_000), _work_per_byte(make, 100_000)
    for what, at_10k, at_100k, bound in zip(("bytes read", "searches", "set bytes"), small, large,
                                            (16.0, 0.5, 6.0), strict=True):
        assert at_100k <= bound, f"{name}: {what} per byte {at_100k:.3f} at 100 KB"
        assert at_100k <= at_10k * 1.25 + 0.01, f"{name}: {what} per byte {at_10k:.3f} at 10 KB, {at_100k:.3f}"


def test_work_counting_sees_the_searches() -> None:
    """The counters are wired to the searches the engine makes (else the test above
    would pass on zeros): 1,000 glued phones take a plain reading each and a glued one
    at each of the 999 glues between two of them (the text's last "-" is followed by
    nothing a phone opens with: no search there)."""
    read, searches, set_bytes = _work_per_byte(dict(PATHOLOGICAL)["phones glued by -"], 13_000)
    assert searches >= (1000 + 999) / 13_000 and read >= 1.0 and set_bytes >= 3.0


class TestRedact:
    def test_log_line(self) -> None:
        line = "bad datatype in {'data': ['john.doe@example.com 078-05-1120 4111111111111111']}"
        assert redact_text(line) == "bad datatype in {'data': ['[EMAIL] [SSN] [CARD]']}"

    def test_short_and_clean_pass_through(self) -> None:
        assert redact_text("ok") == "ok"
        assert redact_text("request rejected by input policy") == "request rejected by input policy"

    def test_fails_closed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken() -> PiiEngine:
            raise RuntimeError("boom")

        monkeypatch.setattr(redact_module, "_engine", broken)
        assert redact_text("john.doe@example.com") == REDACTION_FAILED

    def test_nested_values(self) -> None:
        event = {"msg": "from 10.1.2.3", "n": 3, "items": ["a@b.co", ("x", b"078-05-1120")]}
        assert redact_value(event) == {"msg": "from [IP]", "n": 3, "items": ["[EMAIL]", ("x", "[SSN]")]}


def test_detections_hold_no_values() -> None:
    detection = ENGINE.scan("john.doe@example.com")[0]
    assert "john" not in repr(detection)
    assert set(detection.__slots__) == {"entity", "start", "end"}


def test_unknown_entity_refused() -> None:
    with pytest.raises(ValueError, match="unknown PII entity"):
        PiiEngine({"EMAIL", "PASSPORT"})
