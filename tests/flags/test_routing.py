"""Routing by flag edits (blue-green, instant rollback), targeting, kill switches, fail-safe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode, GeneralError
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

from gateway.context import Principal
from gateway.flags.provider import FlagFileError
from gateway.policy.loader import PolicyError, build_policy_set
from gateway.stages.feature_flags import (
    FeatureFlags,
    FlagsRuntime,
    Profile,
    build_flags_stage,
    compile_flags,
    switchable,
    targeting_key,
)
from tests.flags import RecordingHooks, context, doc, policy, principal, route_flag, split

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = [f"user-{i}" for i in range(300)]


async def variants(flags: FeatureFlags, who: list[Principal]) -> set[str]:
    seen = set()
    for p in who:
        ctx = context(p)
        await flags.on_call(ctx)
        seen.add(ctx.notes["flags"]["variant"])
    return seen


def everyone() -> list[Principal]:
    return [principal(s) for s in SUBJECTS]


class TestFlagEdits:
    """Each edit is a new policy revision: a new stage from new bytes, the same runtime."""

    async def test_blue_green_switch(self) -> None:
        runtime = FlagsRuntime()
        blue_green = {"blue": {"model": "digits", "version": "1"}, "green": {"model": "green", "version": ""}}
        blue = build_flags_stage(doc({"digits-version": route_flag(variants=blue_green, default="blue",
                                                                   gateway__stable="blue")}),
                                 policy(), runtime)
        assert await variants(blue, everyone()) == {"blue"}
        green = build_flags_stage(doc({"digits-version": route_flag(variants=blue_green, default="green",
                                                                    gateway__stable="blue")}),
                                  policy(), runtime)
        assert await variants(green, everyone()) == {"green"}
        ctx = context()
        await green.on_call(ctx)
        assert (ctx.model, ctx.version) == ("green", "")
        # the old revision still answers its pinned requests the old way
        assert await variants(blue, everyone()[:5]) == {"blue"}

    @pytest.mark.parametrize("rollback", [
        route_flag(split(100, 0)),  # weights to 100/0
        route_flag(split(90, 10), state="DISABLED"),  # or switch the flag off: stable
        route_flag(),  # or drop the targeting: defaultVariant
    ])
    async def test_instant_rollback_by_one_edit(self, rollback: dict[str, Any]) -> None:
        runtime = FlagsRuntime()
        canary = build_flags_stage(doc({"digits-version": route_flag(split(50, 50))}), policy(), runtime)
        assert await variants(canary, everyone()) == {"stable", "canary"}
        rolled = build_flags_stage(doc({"digits-version": rollback}), policy(), runtime)
        assert await variants(rolled, everyone()) == {"stable"}


class TestTargeting:
    async def test_by_tenant(self) -> None:
        rule = {"if": [{"==": [{"var": "tenant"}, "beta"]}, "canary", "stable"]}
        flags = build_flags_stage(doc({"digits-version": route_flag(rule)}), policy(), FlagsRuntime())
        assert await variants(flags, [principal("a", tenant="beta")]) == {"canary"}
        assert await variants(flags, [principal("a", tenant="acme")]) == {"stable"}

    async def test_by_role(self) -> None:
        rule = {"if": [{"in": ["canary-tester", {"var": "roles"}]}, "canary", split(100, 0)]}
        flags = build_flags_stage(doc({"digits-version": route_flag(rule)}), policy(), FlagsRuntime())
        assert await variants(flags, [principal("a", roles=("analyst", "canary-tester"))]) == {"canary"}
        assert await variants(flags, [principal("a", roles=("analyst",))]) == {"stable"}

    async def test_by_subject_pseudonym(self) -> None:
        """Authors target a subject by :func:`targeting_key`; the raw subject never enters."""
        rule = {"if": [{"in": [{"var": "subject"}, [targeting_key("acme", "qa-bot")]]}, "canary", "stable"]}
        flags = build_flags_stage(doc({"digits-version": route_flag(rule)}), policy(), FlagsRuntime())
        assert await variants(flags, [principal("qa-bot")]) == {"canary"}
        assert await variants(flags, [principal("qa-bot", tenant="beta"), principal("alice")]) == {"stable"}

    async def test_model_attribute(self) -> None:
        rule = {"if": [{"==": [{"var": "model"}, "digits"]}, "canary", "stable"]}
        flags = build_flags_stage(doc({"digits-version": route_flag(rule)}), policy(), FlagsRuntime())
        assert await variants(flags, [principal()]) == {"canary"}


class _Provider(AbstractProvider):
    """A provider standing in for a remote one that misbehaves in a chosen way."""

    def __init__(self, behaviour: str) -> None:
        super().__init__()
        self.behaviour = behaviour

    def get_metadata(self) -> Metadata:
        return Metadata(name="test")

    def _answer(self, default: Any) -> FlagResolutionDetails[Any]:
        if self.behaviour == "raise":
            raise GeneralError("flagd unreachable")
        if self.behaviour == "crash":
            raise RuntimeError("bug")
        if self.behaviour == "error_code":
            return FlagResolutionDetails(value=default, reason=Reason.ERROR, error_code=ErrorCode.PARSE_ERROR)
        if self.behaviour == "foreign_variant":
            return FlagResolutionDetails(value="7", variant="secret", reason=Reason.TARGETING_MATCH)
        if self.behaviour == "wrong_value":  # a known variant name carrying another target
            return FlagResolutionDetails(value="7", variant="canary", reason=Reason.TARGETING_MATCH)
        if self.behaviour == "off":
            return FlagResolutionDetails(value=False, variant="off", reason=Reason.STATIC)
        return FlagResolutionDetails(value="2", variant="canary", reason=Reason.TARGETING_MATCH)

    def resolve_boolean_details(self, flag_key: str, default_value: bool,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[bool]:
        return self._answer(default_value)

    def resolve_string_details(self, flag_key: str, default_value: str,
                               evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[str]:
        return self._answer(default_value)

    def resolve_integer_details(self, flag_key: str, default_value: int,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[int]:
        return self._answer(default_value)

    def resolve_float_details(self, flag_key: str, default_value: float,
                              evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[float]:
        return self._answer(default_value)

    def resolve_object_details(
        self, flag_key: str, default_value: Any, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Any]:
        return self._answer(default_value)


class TestFailSafe:
    """Any doubt about a flag serves the stable variant (and tells the hooks)."""

    @pytest.mark.parametrize("behaviour", ["raise", "crash", "error_code", "foreign_variant", "wrong_value"])
    async def test_provider_failures_serve_stable(self, behaviour: str) -> None:
        hooks = RecordingHooks()
        flags = build_flags_stage(doc({"digits-version": route_flag(split(0, 100))}), policy(),
                                  FlagsRuntime(hooks=hooks), provider=_Provider(behaviour))
        ctx = context()
        await flags.on_call(ctx)
        assert ctx.notes["flags"] == {"flag": "digits-version", "variant": "stable", "reason": "error"}
        assert (ctx.model, ctx.version) == ("digits", "1")
        assert hooks.failures and hooks.failures[0][0] == "digits-version"

    async def test_a_healthy_other_provider_routes(self) -> None:
        """Another OpenFeature provider plugs in without code changes."""
        flags = build_flags_stage(doc({"digits-version": route_flag()}), policy(), FlagsRuntime(),
                                  provider=_Provider("canary"))
        assert await variants(flags, [principal()]) == {"canary"}

    async def test_rule_choosing_an_undefined_variant_serves_stable(self) -> None:
        hooks = RecordingHooks()
        rule = {"if": [True, "ghost"]}
        flags = build_flags_stage(doc({"digits-version": route_flag(rule)}), policy(), FlagsRuntime(hooks=hooks))
        ctx = context()
        await flags.on_call(ctx)
        assert ctx.notes["flags"]["variant"] == "stable" and hooks.failures == [("digits-version", "GENERAL")]

    async def test_bucketing_on_a_missing_attribute_serves_the_default(self) -> None:
        rule = {"fractional": [{"var": "nonexistent"}, ["canary", 100]]}
        flags = build_flags_stage(doc({"digits-version": route_flag(rule)}), policy(), FlagsRuntime())
        # no "nonexistent": flagd falls back to flagKey + targetingKey, which always exists here
        assert await variants(flags, [principal()]) == {"canary"}


def kill_switch(value: bool = False, **extra: Any) -> dict[str, Any]:
    return {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on" if value else "off",
            **extra}


class TestKillSwitches:
    @pytest.mark.parametrize("stage", ["authn", "authz", "model_exposure", "pii_mask", "dp_noise"])
    def test_refused_for_protected_stages_in_production(self, stage: str) -> None:
        with pytest.raises(PolicyError, match=f"stage '{stage}' cannot have a kill switch") as info:
            build_flags_stage(doc({f"stage.{stage}.enabled": kill_switch()}), policy(), FlagsRuntime(),
                              profile="production")
        assert info.value.issues[0].file == "flags.json"

    def test_production_is_the_default_profile(self) -> None:
        with pytest.raises(PolicyError):
            build_flags_stage(doc({"stage.pii_mask.enabled": kill_switch()}), policy(), FlagsRuntime())

    @pytest.mark.parametrize(("stage", "profile", "allowed"), [
        ("pii_mask", "staging", True),
        ("dp_noise", "development", True),
        ("rate_limit", "production", True),
        ("sanitize", "production", True),
        ("adversarial", "production", True),
        # authentication and authorization are never switchable, in any profile
        ("authn", "development", False),
        ("authz", "staging", False),
        ("feature_flags", "development", False),
        ("made_up", "development", False),
    ])
    def test_switchable_matrix(self, stage: str, profile: Profile, allowed: bool) -> None:
        assert switchable(stage, profile) is allowed
        raw = doc({f"stage.{stage}.enabled": kill_switch()})
        if allowed:
            assert compile_flags(raw, policy().gateway.models, profile).kill_switches == {
                stage: f"stage.{stage}.enabled"}
        else:
            with pytest.raises(FlagFileError):
                compile_flags(raw, policy().gateway.models, profile)

    @pytest.mark.parametrize(("flags", "fragment"), [
        ({"stage.sanitize.enabled": kill_switch(targeting={"if": [{"var": "tenant"}, "off", "on"]})},
         "takes no targeting"),
        ({"stage.sanitize.enabled": {"state": "ENABLED", "variants": {"on": "yes"}, "defaultVariant": "on"}},
         "true/false"),
        ({"stage.sanitize.enable": kill_switch()}, "stage.<stage>.enabled"),
        ({"stage.sanitize.enabled": kill_switch(metadata={"gateway.model": "digits"})}, "no gateway"),
    ])
    def test_malformed_kill_switches(self, flags: dict[str, Any], fragment: str) -> None:
        with pytest.raises(FlagFileError) as info:
            compile_flags(doc(flags), policy().gateway.models, "development")
        assert fragment in str(info.value)

    async def test_kill_switched(self) -> None:
        raw = doc({"stage.sanitize.enabled": kill_switch(False), "stage.adversarial.enabled": kill_switch(True),
                   "digits-version": route_flag()})
        flags = build_flags_stage(raw, policy(), FlagsRuntime())
        assert await flags.kill_switched("sanitize") is True
        assert await flags.kill_switched("adversarial") is False
        assert await flags.kill_switched("rate_limit") is False  # no switch in the policy
        assert await flags.kill_switched("authn") is False
        ctx = context()
        await flags.on_call(ctx)
        names = ("authn", "sanitize", "adversarial", "rate_limit")
        assert flags.kill_switched_stages(ctx, names) == frozenset({"sanitize"})
        assert flags.kill_switched_stages(context(), names) == frozenset()  # not decided for that call

    @pytest.mark.parametrize("behaviour", ["raise", "crash", "error_code"])
    async def test_provider_failure_keeps_the_stage_on(self, behaviour: str) -> None:
        raw = doc({"stage.sanitize.enabled": kill_switch(False)})
        flags = build_flags_stage(raw, policy(), FlagsRuntime(), provider=_Provider(behaviour))
        assert await flags.kill_switched("sanitize") is False

    async def test_a_remote_provider_cannot_switch_a_protected_stage_off(self) -> None:
        """Defence in depth: even a switch that got into the table is checked against the profile."""
        flags = build_flags_stage(doc({"stage.sanitize.enabled": kill_switch()}), policy(), FlagsRuntime(),
                                  provider=_Provider("off"))
        forged = FeatureFlags(provider=flags.provider, routes={}, route_only=frozenset(),
                              kill_switches={"pii_mask": "stage.sanitize.enabled"}, profile="production",
                              runtime=flags.runtime, revision="r", generation=0,
                              may_switch_off=frozenset({"pii_mask"}))
        assert await forged.kill_switched("pii_mask") is False
        assert await flags.kill_switched("sanitize") is True

    async def test_a_switch_without_an_off_variant_cannot_be_turned_off(self) -> None:
        """A remote provider answering ``false`` for a switch the file only lets be ``true``."""
        only_on = {"state": "ENABLED", "variants": {"on": True}, "defaultVariant": "on"}
        flags = build_flags_stage(doc({"stage.sanitize.enabled": only_on}), policy(), FlagsRuntime(),
                                  provider=_Provider("off"))
        assert await flags.kill_switched("sanitize") is False


D1 = {"model": "digits", "version": "1"}


class TestRouteValidation:
    @pytest.mark.parametrize(("flags", "fragment"), [
        ({"d": route_flag(variants={"stable": "1", "canary": {"model": "digits", "version": "2"}})},
         "all variants must be"),
        ({"d": route_flag(variants={"stable": "1", "canary": "v2"})}, "must be digits"),
        ({"d": route_flag(variants={"stable": D1, "canary": {"model": "nowhere", "version": "2"}})}, "not exposed"),
        ({"d": route_flag(variants={"stable": D1, "canary": {"model": "other", "verison": "2"}})}, "verison"),
        ({"d": {"state": "ENABLED", "variants": {"stable": "1"}, "defaultVariant": None,
                "metadata": {"gateway.model": "digits"}}}, "stable variant"),
        ({"d": route_flag(rollback__max_error_rat=0.1)}, "unknown gateway key"),
        ({"d": route_flag(rollback__max_error_rate=5)}, "less than or equal to 1"),
        ({"d": route_flag(variants={"stable": "1", "same": "1"})}, "same target"),
        ({"d": route_flag(), "e": route_flag()}, "already routed"),
        ({"d": route_flag(variants={"stable": D1, "x": {"model": "other", "version": ""}}),
          "e": route_flag(gateway__model="other", variants={"stable": "1"})}, "itself routed"),
        ({"d": {"state": "ENABLED", "variants": {"a": "1"}, "defaultVariant": "a",
                "metadata": {"rollback.window_s": 10}}}, "gateway.model"),
    ])
    def test_refused(self, flags: dict[str, Any], fragment: str) -> None:
        raw = doc(flags)
        with pytest.raises(FlagFileError) as info:
            compile_flags(raw, policy().gateway.models, "production")
        assert fragment in str(info.value)

    def test_version_must_be_exposed(self) -> None:
        narrow = build_policy_set({"gateway.yaml": b"models:\n  digits:\n    versions: ['1']\n"})
        with pytest.raises(PolicyError, match="version '2' of 'digits' is not exposed"):
            build_flags_stage(doc({"digits-version": route_flag()}), narrow, FlagsRuntime())

    def test_other_flags_are_left_alone(self) -> None:
        raw = doc({"ui-theme": {"state": "ENABLED", "variants": {"dark": "d"}, "defaultVariant": "dark"}})
        compiled = compile_flags(raw, policy().gateway.models, "production")
        assert compiled.routes == {} and compiled.kill_switches == {}


async def test_shipped_flags_file() -> None:
    """policies/flags.json compiles against the shipped gateway.yaml in production and,
    with the canary at 0 %, routes every subject to digits version 1."""
    shipped = build_policy_set({"gateway.yaml": (ROOT / "policies" / "gateway.yaml").read_bytes()})
    flags = build_flags_stage((ROOT / "policies" / "flags.json").read_bytes(), shipped, FlagsRuntime())
    assert flags.kill_switches == {}
    assert await variants(flags, everyone()) == {"stable"}
    route = flags.routes["digits"]
    assert route.thresholds.max_error_rate == 0.05 and route.thresholds.max_p99_latency_s == 0.5
