"""The flagd document, its JsonLogic subset, fractional bucketing and the OpenFeature provider."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import FlagNotFoundError, GeneralError, TypeMismatchError
from openfeature.flag_evaluation import Reason

from gateway.flags.provider import (
    MAX_FLAG_FILE_BYTES,
    FlagdFileProvider,
    FlagFileError,
    evaluate_logic,
    fractional_bucket,
    parse_flag_file,
)

COLORS = {"red": "#f00", "blue": "#00f", "green": "#0f0", "yellow": "#ff0"}


def provider(flags: dict[str, Any], **top: Any) -> FlagdFileProvider:
    return FlagdFileProvider.from_bytes(json.dumps({"flags": flags, **top}).encode())


def color_flag(targeting: Any) -> dict[str, Any]:
    return {"state": "ENABLED", "variants": COLORS, "defaultVariant": "red", "targeting": targeting}


QUARTERS = [["red", 25], ["blue", 25], ["green", 25], ["yellow", 25]]


class TestFlagdConformance:
    """Vectors from flagd's own ``core/pkg/evaluator/fractional_test.go``: the same subject
    lands in the same bucket here and in a flagd daemon."""

    @pytest.mark.parametrize(("email", "expected"), [
        ("rachel@faas.com", "blue"), ("monica@faas.com", "yellow"),
        ("joey@faas.com", "red"), ("ross@faas.com", "blue"),
    ])
    def test_flag_key_seeded_bucketing(self, email: str, expected: str) -> None:
        targeting = {"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "email"}]}, *QUARTERS]}
        p = provider({"headerColor": color_flag(targeting)})
        variant, reason = p.resolve_variant("headerColor", EvaluationContext(attributes={"email": email}))
        assert (variant, reason) == (expected, Reason.TARGETING_MATCH)

    @pytest.mark.parametrize(("email", "expected"), [
        ("rachel@faas.com", "green"), ("monica@faas.com", "red"),
        ("joey@faas.com", "blue"), ("ross@faas.com", "green"),
    ])
    def test_custom_seed(self, email: str, expected: str) -> None:
        targeting = {"fractional": [{"cat": ["my-seed", {"var": "email"}]}, *QUARTERS]}
        p = provider({"customSeededHeaderColor": color_flag(targeting)})
        ctx = EvaluationContext(attributes={"email": email})
        assert p.resolve_variant("customSeededHeaderColor", ctx)[0] == expected

    def test_shorthand_buckets_by_flag_key_and_targeting_key(self) -> None:
        p = provider({"headerColor": color_flag({"fractional": [["blue", 50], ["green", 50]]})})
        assert p.resolve_variant("headerColor", EvaluationContext(targeting_key="foo@foo.com"))[0] == "green"

    def test_missing_bucketing_value_falls_back_to_targeting_key(self) -> None:
        p = provider({"headerColor": color_flag({"fractional": [{"var": "email"}, ["red", 50], ["blue", 50]]})})
        assert p.resolve_variant("headerColor", EvaluationContext(targeting_key="foo@foo.com"))[0] == "blue"

    @pytest.mark.parametrize("weights", [[["red", 25], ["blue", 25]], [["red"], ["blue"]]])
    def test_relative_and_implicit_weights(self, weights: list[Any]) -> None:
        p = provider({"headerColor": color_flag({"fractional": [{"var": "email"}, *weights]})})
        assert p.resolve_variant("headerColor", EvaluationContext(attributes={"email": "foo@foo.com"}))[0] == "blue"

    def test_no_bucketing_value_and_no_targeting_key_gives_default(self) -> None:
        p = provider({"headerColor": color_flag({"fractional": [{"var": "email"}, *QUARTERS]})})
        assert p.resolve_variant("headerColor", EvaluationContext()) == ("red", Reason.DEFAULT)


class TestFractionalBucket:
    def test_weights_must_be_positive_and_bounded(self) -> None:
        assert fractional_bucket("x", [0, 0]) is None
        assert fractional_bucket("x", [2_147_483_647, 1]) is None
        assert fractional_bucket("x", [1]) == 0

    def test_zero_weight_bucket_is_never_chosen(self) -> None:
        assert all(fractional_bucket(f"s{i}", [100, 0]) == 0 for i in range(2000))


class TestStrictDocument:
    """A flag file is policy: anything ambiguous is refused at load, with the place named."""

    @pytest.mark.parametrize(("raw", "fragment"), [
        # unknown top-level key (typo of $evaluators)
        (b'{"flags": {}, "evaluators": {}}', "evaluators"),
        # a field's Python name is no alias for flagd's key
        (b'{"flags": {}, "$evaluators": {}, "evaluators": {}}', "evaluators"),
        # typo inside a flag
        (b'{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVarient": "a"}}}', "defaultVarient"),
        # duplicate key: a reviewer would read one value, the parser keep another
        (b'{"flags": {}, "flags": {}}', "duplicate key"),
        # NaN is not JSON
        (b'{"flags": {"f": {"state": "ENABLED", "variants": {"a": NaN}, "defaultVariant": "a"}}}', "NaN"),
        (b'\xff\xfe', "UTF-8"),
        (b'{"flags": ', "invalid JSON"),
        # state must be one of flagd's two
        (b'{"flags": {"f": {"state": "ON", "variants": {"a": 1}, "defaultVariant": "a"}}}', "state"),
        # defaultVariant must be a variant
        (b'{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "b"}}}', "not one of"),
        # a variant name goes into a header: no spaces or control characters
        (b'{"flags": {"f": {"state": "ENABLED", "variants": {"a b": 1}, "defaultVariant": null}}}', "variants"),
        (b'[' * 100_000, "nested too deeply"),
    ])
    def test_refused(self, raw: bytes, fragment: str) -> None:
        with pytest.raises(FlagFileError, match=None) as info:
            parse_flag_file(raw)
        assert fragment in str(info.value)

    def test_size_limit(self) -> None:
        with pytest.raises(FlagFileError, match="larger than"):
            parse_flag_file(b" " * (MAX_FLAG_FILE_BYTES + 1))

    @pytest.mark.parametrize(("targeting", "fragment"), [
        ({"sem_ver": ["1.0.0", ">=", "0.1.0"]}, "unsupported operator 'sem_ver'"),
        ({"if": [True, "a"], "var": "x"}, "exactly one operator"),
        ({"in": ["a"]}, "takes 2..2 arguments"),
        ({"fractional": [["a", 100]]}, "takes 2..n arguments"),
        ({"$ref": "nope"}, "unknown $ref 'nope'"),
        ({"if": json.loads("[" * 40 + "1" + "]" * 40)}, "deeper than"),
    ])
    def test_rules_checked_at_load(self, targeting: Any, fragment: str) -> None:
        raw = json.dumps({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
                                          "targeting": targeting}}}).encode()
        with pytest.raises(FlagFileError) as info:
            parse_flag_file(raw)
        assert fragment in str(info.value)

    def test_evaluator_cycle_refused(self) -> None:
        raw = json.dumps({"flags": {}, "$evaluators": {"a": {"$ref": "b"}, "b": {"$ref": "a"}}}).encode()
        with pytest.raises(FlagFileError, match="reference cycle"):
            parse_flag_file(raw)

    def test_evaluators_expand_and_an_evaluator_edit_changes_the_definition_hash(self) -> None:
        def build(weight: int) -> Any:
            return parse_flag_file(json.dumps({
                "flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
                                "targeting": {"$ref": "split"}}},
                "$evaluators": {"split": {"fractional": [["a", weight], ["b", 100 - weight]]}},
            }).encode())

        first, second = build(90), build(50)
        assert first.flags["f"].targeting == {"fractional": [["a", 90], ["b", 10]]}
        assert first.flags["f"].definition_hash != second.flags["f"].definition_hash
        assert build(90).flags["f"].definition_hash == first.flags["f"].definition_hash


@pytest.mark.parametrize(("rule", "data", "expected"), [
    ({"if": [{"==": [{"var": "tenant"}, "beta"]}, "canary", "stable"]}, {"tenant": "beta"}, "canary"),
    ({"if": [{"==": [{"var": "tenant"}, "beta"]}, "canary", "stable"]}, {"tenant": "acme"}, "stable"),
    ({"if": [False, "a", False, "b"]}, {}, None),  # no else branch
    ({"in": ["tester", {"var": "roles"}]}, {"roles": ["analyst", "tester"]}, True),
    ({"in": ["@x.com", {"var": "email"}]}, {"email": "a@x.com"}, True),
    ({"in": ["a", {"var": "missing"}]}, {}, False),
    ({"and": [True, "x", 0]}, {}, 0),  # JsonLogic returns the deciding value
    ({"or": [0, "", "x"]}, {}, "x"),
    ({"!": [[]]}, {}, True),  # an empty list is false, an object is true
    ({"!!": [{"var": "obj"}]}, {"obj": {}}, True),
    ({"==": [1, 1.0]}, {}, True),
    ({"==": [1, "1"]}, {}, False),  # no type coercion (documented subset)
    ({"!=": ["a", "b"]}, {}, True),
    ({"cat": ["v", 2, 1.0, True, None]}, {}, "v21true"),
    ({"<": [1, {"var": "n"}, 3]}, {"n": 2}, True),
    ({"<=": [1, 1]}, {}, True),
    ({">": ["b", "a"]}, {}, True),
    ({">=": [1, "a"]}, {}, False),
    ({"starts_with": [{"var": "id"}, "svc-"]}, {"id": "svc-7"}, True),
    ({"ends_with": [{"var": "id"}, 7]}, {"id": "svc-7"}, None),
    ({"var": ["a.b.1", "dflt"]}, {"a": {"b": [10, 20]}}, 20),
    ({"var": ["a.c", "dflt"]}, {"a": {"b": 1}}, "dflt"),
    ({"var": ""}, {"k": 1}, {"k": 1}),
])
def test_json_logic(rule: Any, data: Any, expected: Any) -> None:
    assert evaluate_logic(rule, data) == expected


class TestProvider:
    def test_static_default_and_disabled(self) -> None:
        p = provider({
            "static": {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off"},
            "nulled": {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on",
                       "targeting": {"if": [False, "off"]}},
            "disabled": {"state": "DISABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"},
        })
        static = p.resolve_boolean_details("static", True)
        assert (static.value, static.variant, static.reason) == (False, "off", Reason.STATIC)
        nulled = p.resolve_boolean_details("nulled", False)
        assert (nulled.value, nulled.variant, nulled.reason) == (True, "on", Reason.DEFAULT)
        # flagd ADR "disabled-flag-evaluation": the caller's default, reason DISABLED, no variant.
        disabled = p.resolve_boolean_details("disabled", False)
        assert (disabled.value, disabled.variant, disabled.reason) == (False, None, Reason.DISABLED)

    def test_errors(self) -> None:
        p = provider({
            "s": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": "a"},
            "rogue": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": "a",
                      "targeting": {"var": "pick"}},
        })
        with pytest.raises(FlagNotFoundError):
            p.resolve_string_details("nope", "d")
        with pytest.raises(TypeMismatchError):
            p.resolve_integer_details("s", 0)
        # a rule may only choose a declared variant
        with pytest.raises(GeneralError):
            p.resolve_string_details("rogue", "d", EvaluationContext(attributes={"pick": "b"}))

    def test_types_and_metadata(self) -> None:
        p = provider({
            "n": {"state": "ENABLED", "variants": {"a": 3}, "defaultVariant": "a", "metadata": {"team": "x"}},
            "o": {"state": "ENABLED", "variants": {"a": {"k": [1]}}, "defaultVariant": "a"},
        }, metadata={"team": "set", "env": "test"})
        as_float = p.resolve_float_details("n", 0.0)
        assert as_float.value == 3.0
        assert isinstance(as_float.value, float)
        assert as_float.flag_metadata == {"team": "x", "env": "test"}  # flag metadata wins over the set's
        assert p.resolve_integer_details("n", 0).value == 3
        assert p.resolve_object_details("o", {}).value == {"k": [1]}
        assert p.get_metadata().name == "infergate-flagd-file"

    def test_no_clock_in_the_evaluation_data(self) -> None:
        """Routing must not change with time: ``$flagd.timestamp`` is not provided."""
        p = provider({"t": {"state": "ENABLED", "variants": {"a": "x", "b": "y"}, "defaultVariant": "a",
                            "targeting": {"if": [{"var": "$flagd.timestamp"}, "b", "a"]}}})
        assert p.resolve_variant("t", EvaluationContext())[0] == "a"
