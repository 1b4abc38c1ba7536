"""The writer's bytes on disk are pinned: a fixed workload must reproduce a golden segment.

The golden file was written by the audit log as it was before the issue-11 hot-path work
(canonical encoding, chain, MAC and AES-GCM blobs included), so any change of the writer
that moves a byte fails here. Regenerated once since, for an intended format change (s8: a
subject's owner is tenant + sub, so ``subject``, ``enc`` and the chain moved; nothing else).
Regenerate it only for an intended format change::

    .venv/bin/python tests/audit/equivalence_scenario.py tests/audit/data/equivalence_segment.jsonl
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from pathlib import Path

from gateway.audit.records import canonical, normalize, parse_line
from gateway.audit.verify import verify

from .equivalence_scenario import edge_records, gateway_record, write_scenario

GOLDEN = Path(__file__).parent / "data" / "equivalence_segment.jsonl"


def test_segment_bytes_match_the_golden_file(tmp_path: Path) -> None:
    produced = write_scenario(tmp_path)
    golden = GOLDEN.read_bytes()
    for number, (mine, theirs) in enumerate(zip(produced.splitlines(), golden.splitlines(), strict=False), 1):
        assert mine == theirs, f"line {number} differs"
    assert produced == golden


def test_golden_workload_verifies_and_covers_every_path(tmp_path: Path) -> None:
    write_scenario(tmp_path)
    result = verify(tmp_path / "log", anchor_dir=tmp_path / "anchors", key_dir=tmp_path / "keys")
    assert result.ok, result
    lines = [json.loads(line) for line in GOLDEN.read_bytes().splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    assert any("deferred" in line for line in lines)  # the failed write's refusal
    assert sum("enc" in line for line in lines) > 20  # encrypted personal fields
    [mutated] = [line for line in lines if line.get("request_id") == f"{99:032x}"]
    assert [s["stage"] for s in mutated["stages"]][-1] == "dp_noise"  # changed after append: not hashed
    assert mutated["notes"]["detectors"]["grid"] == 0


def test_normalize_matches_a_plain_reference_on_the_workload() -> None:
    """The fast normalizer gives what a straightforward reading of the canonical rule gives."""
    for record in [gateway_record(n) for n in range(30)] + edge_records():
        assert canonical(normalize(record)) == _reference(record)


def test_every_golden_line_parses_back_to_its_own_bytes() -> None:
    for raw in GOLDEN.read_bytes().splitlines():
        parsed = parse_line(raw)
        assert canonical(normalize({k: v for k, v in parsed.record.items() if k != "mac"})) == parsed.body


def _reference(value: object) -> bytes:
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _plain(value: object) -> object:
    """The canonical rule read literally (records.py docstring), written without any shortcut."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        assert math.isfinite(value)
        rounded = round(value, 6)
        return int(rounded) if rounded.is_integer() and abs(rounded) <= 2**53 - 1 else rounded
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=lambda v: _reference(v))
    raise AssertionError(type(value))
