"""The diff's rule tables: one rule a line, and a misspelt judge fails at import time."""

from __future__ import annotations

import pytest

from gateway.policy.diff import _RULES, _file_rules, _pii_label


def test_a_table_gives_one_rule_a_line_with_the_file_and_label() -> None:
    rules = _file_rules("pii.yaml", _pii_label, """
        mode            mode
        entities.*      removed
    """)
    assert [(r.pattern, r.judge, r.label) for r in rules] == [
        ("pii.yaml:mode", "mode", _pii_label), ("pii.yaml:entities.*", "removed", _pii_label)]


def test_an_unknown_judge_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown judge 'weakest' for gateway.yaml:limits"):
        _file_rules("gateway.yaml", None, "limits  weakest")


def test_every_shipped_rule_names_its_file() -> None:
    files = {r.pattern.split(":", 1)[0] for r in _RULES}
    assert files == {"gateway.yaml", "access.yaml", "identity.yaml", "inputs.yaml", "limits.yaml", "pii.yaml",
                     "privacy.yaml", "flags.json"}
