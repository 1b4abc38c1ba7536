"""Speed work on the PII engine leaves every detection where it was.

The reference is ``tests/privacy/data/pii_equivalence.json``: per block of 100 texts, a
digest of what the engine detected (type and offsets, and what ``mask_many`` made of the
text cut in two), written by the engine *before* an optimization. The sample is fixed:
the committed corpus (``bench/data/pii_corpus.jsonl``), seeded number-dense texts and card
layouts (:mod:`tests.support.pii_texts`). A change that is only faster keeps every digest;
a change of what is detected must say so by rewriting the file, from the engine whose
results are the new reference:

    .venv/bin/python -m tests.privacy.test_pii_equivalence --write

The fast paths that skip work are also checked against the slow path they skip, on the
same sample, so they stay sound when the rules behind them change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypedDict

import pytest

from privacy.pii import ENTITIES, PiiEngine, Replace, recognizers
from tests.support.pii_texts import card_layouts, dense_texts

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "bench" / "data" / "pii_corpus.jsonl"
REFERENCE = Path(__file__).resolve().parent / "data" / "pii_equivalence.json"
BLOCK = 100
OPERATORS = {entity: Replace() for entity in ENTITIES}


class Digests(TypedDict):
    texts: int
    block: int
    counts: dict[str, int]
    scan: list[str]
    mask_many: list[str]


def sample() -> list[str]:
    with CORPUS.open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    return texts + dense_texts(1, 3000) + dense_texts(2, 300, size=1024) + card_layouts(3, 2000)


def _blocks(texts: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(texts), BLOCK):
        yield texts[start:start + BLOCK]


def results(engine: PiiEngine, texts: Sequence[str]) -> Digests:
    """Digests per block of scan results and of ``mask_many`` on each text cut in two."""
    scans: list[str] = []
    many: list[str] = []
    counts: Counter[str] = Counter()
    for block in _blocks(texts):
        found = [[(d.entity, d.start, d.end) for d in engine.scan(text)] for text in block]
        counts.update(entity for spans in found for entity, _, _ in spans)
        scans.append(hashlib.sha256(repr(found).encode()).hexdigest()[:16])
        halves = [engine.mask_many([text[:len(text) // 2], text[len(text) // 2:]], OPERATORS) for text in block]
        many.append(hashlib.sha256(repr(halves).encode()).hexdigest()[:16])
    return {"texts": len(texts), "block": BLOCK, "counts": dict(sorted(counts.items())), "scan": scans,
            "mask_many": many}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample()


def test_detections_identical_to_reference(texts: list[str]) -> None:
    reference: Digests = json.loads(REFERENCE.read_text(encoding="utf-8"))
    ours = results(PiiEngine(), texts)
    assert ours["texts"] == reference["texts"], "the sample changed: rewrite the reference (see module docstring)"
    changed = [i for i, (a, b) in enumerate(zip(ours["scan"], reference["scan"], strict=True)) if a != b]
    changed_many = [i for i, (a, b) in enumerate(zip(ours["mask_many"], reference["mask_many"], strict=True))
                    if a != b]
    assert ours["counts"] == reference["counts"], f"detections per type changed; blocks {changed}"
    assert not changed, f"detections changed in blocks {changed} (texts {changed[0] * BLOCK}...)"
    assert not changed_many, f"mask_many changed in blocks {changed_many}"


def test_phone_fast_reject_is_sound(texts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``_maybe_strong`` only skips readings that would all fail: with it answering "maybe"
    every time (the full test for every candidate), nothing changes."""
    engine = PiiEngine()
    dense = texts[-5300:]
    answers: list[bool] = []
    real = recognizers._maybe_strong

    def counted(chunk: bytes) -> bool:
        answers.append(real(chunk))
        return answers[-1]

    monkeypatch.setattr(recognizers, "_maybe_strong", counted)
    fast = [engine.scan(text) for text in dense]
    assert answers.count(False) > 1000  # the sample does take the fast path, often
    monkeypatch.setattr(recognizers, "_maybe_strong", lambda chunk: True)
    assert [engine.scan(text) for text in dense] == fast


def main() -> None:
    parser = argparse.ArgumentParser(description="write the PII equivalence reference from this engine")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    ours = results(PiiEngine(), sample())
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(ours, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(ours["counts"]), ours["texts"], "texts")


if __name__ == "__main__":
    main()
