"""The provider remembers targeting results per flag set, and only where that is safe."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import GeneralError
from openfeature.flag_evaluation import Reason

from gateway.flags import provider as provider_module
from gateway.flags.provider import FlagdFileProvider, _context_data, evaluate_logic, parse_flag_file

COLORS = {"red": "#f00", "blue": "#00f", "green": "#0f0", "yellow": "#ff0"}


def _doc(targeting: Any, *, weights: tuple[int, int] = (50, 50)) -> bytes:
    flag = {"state": "ENABLED", "variants": COLORS, "defaultVariant": "red",
            "targeting": targeting if targeting is not None else
            {"fractional": [["blue", weights[0]], ["green", weights[1]]]}}
    return json.dumps({"flags": {"route": flag}}).encode()


def _ctx(subject: str, **attributes: Any) -> EvaluationContext:
    return EvaluationContext(targeting_key=subject, attributes={"tenant": "acme", "roles": ["analyst"],
                                                                **attributes})


def test_cached_decisions_equal_a_fresh_evaluation_for_many_subjects() -> None:
    p = FlagdFileProvider.from_bytes(_doc(None))
    flag = p.flag_set.flags["route"]
    seen = set()
    for round_ in range(3):  # the second and third rounds are served from the cache
        for i in range(300):
            ctx = _ctx(f"subject-{i}")
            expected = evaluate_logic(flag.targeting, _context_data("route", ctx))
            variant, reason = p.resolve_variant("route", ctx)
            assert (variant, reason) == (expected, Reason.TARGETING_MATCH)
            seen.add(variant)
        assert len(p._decisions) == 300, round_
    assert seen == {"blue", "green"}


def test_a_new_flag_file_decides_at_once() -> None:
    """A canary split moved to 0/100 (or a rollback written into the file) is a new flag set:
    nothing decided under the old file is reused."""
    before = FlagdFileProvider.from_bytes(_doc(None, weights=(50, 50)))
    subjects = [_ctx(f"s{i}") for i in range(100)]
    assert {before.resolve_variant("route", c)[0] for c in subjects} == {"blue", "green"}
    after = FlagdFileProvider.from_bytes(_doc(None, weights=(0, 100)))
    assert {after.resolve_variant("route", c)[0] for c in subjects} == {"green"}
    # Even the same provider object, handed another set, forgets what it decided.
    before.flag_set = parse_flag_file(_doc(None, weights=(100, 0)))
    assert {before.resolve_variant("route", c)[0] for c in subjects} == {"blue"}


def test_bool_and_int_attributes_are_not_confused() -> None:
    """``True == 1`` in Python, not in JsonLogic: the cache key carries the type."""
    p = FlagdFileProvider.from_bytes(_doc({"if": [{"==": [{"var": "x"}, 1]}, "blue", "green"]}))
    assert p.resolve_variant("route", _ctx("s", x=1))[0] == "blue"
    assert p.resolve_variant("route", _ctx("s", x=True))[0] == "green"
    assert p.resolve_variant("route", _ctx("s", x=1))[0] == "blue"


def test_float_and_mapping_attributes_are_evaluated_every_time() -> None:
    p = FlagdFileProvider.from_bytes(_doc({"if": [{">": [{"var": "score"}, 0.5]}, "blue", "green"]}))
    assert p.resolve_variant("route", _ctx("s", score=0.75))[0] == "blue"
    assert p.resolve_variant("route", _ctx("s", score=0.25))[0] == "green"
    assert p.resolve_variant("route", _ctx("s", score=0.5, extra={"a": "b"}))[0] == "green"
    assert p._decisions == {}


def test_null_targeting_result_is_cached_as_the_default() -> None:
    p = FlagdFileProvider.from_bytes(_doc({"if": [{"==": [{"var": "tenant"}, "globex"]}, "blue", None]}))
    for _ in range(2):
        assert p.resolve_variant("route", _ctx("s")) == ("red", Reason.DEFAULT)
    assert len(p._decisions) == 1


def test_an_undefined_variant_is_an_error_on_every_call() -> None:
    p = FlagdFileProvider.from_bytes(_doc({"var": "tenant"}))  # "acme" is no variant
    for _ in range(2):
        with pytest.raises(GeneralError):
            p.resolve_variant("route", _ctx("s"))
    assert p._decisions == {}


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider_module, "MAX_CACHED_DECISIONS", 16)
    p = FlagdFileProvider.from_bytes(_doc(None))
    for i in range(100):
        p.resolve_variant("route", _ctx(f"subject-{i}"))
        assert len(p._decisions) <= 16
    assert p._decisions  # still caching after the clear
