"""The speed-ups of issue 5 keep what is detected (the digests of
tests/privacy/test_pii_equivalence.py are the proof on its sample); these pin the
reasoning each one rests on, so a later change of the rules cannot silently void it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy.pii import ENTITIES, PiiEngine, recognizers
from privacy.pii.engine import _set_groups
from privacy.pii.recognizers import RULES, phone_valid
from privacy.pii.regex import PatternSet
from tests.support.pii_texts import dense_texts

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "bench" / "data" / "pii_corpus.jsonl"


def test_every_rule_is_in_exactly_one_pattern_set() -> None:
    for entities in (ENTITIES, {"EMAIL"}, {"SECRET", "PHONE"}, {"CARD"}):
        rules = tuple(rule for rule in RULES if rule.entity in entities)
        groups = _set_groups(rules)
        flat = sorted(i for group in groups for i in group)
        assert flat == list(range(len(rules))), entities


def test_split_sets_report_the_rules_one_set_reports() -> None:
    """The sets are a filter: split, they must name the same rules as one set did."""
    engine = PiiEngine()
    whole = PatternSet(rule.source for rule in RULES)
    with CORPUS.open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:800] + dense_texts(5, 200)
    for text in texts:
        data = text.encode("utf-8")
        split = sorted(group[i] for pattern_set, group in engine._sets for i in pattern_set.matching(data))
        assert split == sorted(whole.matching(data)), text


def test_isbn_shaped_candidates_skip_the_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone "0" group or "00" inside a candidate is neither a trunk nor an international
    prefix: ISBNs are rejected without reading every window (keyword still looked up)."""
    for chunk in (b"978-0-9511532-1-5", b"978-1-00-780478-5", b"12 00 3456 789"):
        assert recognizers._maybe_strong(chunk) is False, chunk
    for chunk in (b"020 7946 0958", b"0044 20 7946 0958", b"1-07-736", b"+44 20 7946 0958", b"(0) 7946 0958"):
        assert recognizers._maybe_strong(chunk) is True, chunk
    # What the skipped readings would have said: none passes without a keyword.
    assert not phone_valid(b"0-9511532-1-5") and not phone_valid(b"0-9511532", inner=True)
    assert phone_valid(b"0-9511532", keyword=True, inner=True) is False
    engine = PiiEngine()
    texts = [f"{keyword}978-0-{n}-1-5 and 0 00 {n} 12 00 34" for keyword in ("ISBN ", "phone ", "call ", "")
             for n in ("9511532", "07-735773", "415-555-0132", "20 7946 0958")]
    fast = [engine.scan(text) for text in texts]
    monkeypatch.setattr(recognizers, "_maybe_strong", lambda chunk: True)
    assert [engine.scan(text) for text in texts] == fast
    assert any(fast) and not all(fast)


def test_regenerating_the_corpus_reproduces_the_committed_file() -> None:
    """bench/pii_corpus.py draws its dates against a fixed day, not the clock."""
    from bench.pii_corpus import ADJACENT, SEED, generate

    rows = generate(2400, SEED, ADJACENT)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    assert text == CORPUS.read_text(encoding="utf-8")
