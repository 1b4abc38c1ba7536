"""The feature_flags stage on a RequestContext, then in a pipeline with authz and a real model.

The pipeline part runs the same security cases for a principal routed to the stable
variant and one routed to the canary, on the embedded onnxruntime backend serving a
temporary repository with ``digits`` versions 1 and 2: the canary path is no way around
exposure or authorization, and a canary that starts failing is rolled back.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from gateway.context import Action, Principal, RequestContext
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InputRejected,
    NotFound,
    PermissionDenied,
    UpstreamUnavailable,
)
from gateway.flags.rollback import ERROR_RATE, RollbackTracker
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.policy.loader import PolicySet, build_policy_set
from gateway.stages.authz import RoleAuthorizer, compile_grants
from gateway.stages.base import Mode, Stage
from gateway.stages.feature_flags import (
    VARIANT_HEADER,
    FeatureFlags,
    FlagsRuntime,
    build_flags_stage,
    flags_audit_fields,
    served_variant,
    variant_headers,
)
from gateway.stages.model_exposure import ModelExposure
from gateway.upstream.embedded import EmbeddedUpstream
from tests.flags import RecordingHooks, context, doc, policy, principal, route_flag

ROOT = Path(__file__).resolve().parents[2]

# Role-based targeting keeps the tests deterministic: testers get the canary.
TESTERS = {"if": [{"in": ["canary-tester", {"var": "roles"}]}, "canary", "stable"]}
STABLE_USER = principal("sam", roles=("analyst",))
CANARY_USER = principal("cat", roles=("analyst", "canary-tester"))


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def flags(rule: Any = TESTERS, *, runtime: FlagsRuntime | None = None, pol: PolicySet | None = None,
          **metadata: Any) -> FeatureFlags:
    return build_flags_stage(doc({"digits-version": route_flag(rule, **metadata)}), pol or policy(),
                             runtime or FlagsRuntime())


def request(model: str = "digits", version: str = "") -> InferRequest:
    return InferRequest(model, version, [Tensor("pixels", "FP32", (1, 64), np.zeros((1, 64), np.float32))])


class TestOnCall:
    async def test_routes_the_context_and_notes_the_variant(self) -> None:
        stage = flags()
        ctx = context(CANARY_USER)
        await stage.on_call(ctx)
        assert (ctx.model, ctx.version) == ("digits", "2")
        assert ctx.notes["flags"] == {"flag": "digits-version", "variant": "canary", "reason": "targeting_match"}
        ctx = context(STABLE_USER)
        await stage.on_call(ctx)
        assert (ctx.model, ctx.version) == ("digits", "1")
        assert served_variant(ctx) == ("digits-version", "stable")

    async def test_metadata_calls_follow_the_same_route(self) -> None:
        ctx = context(CANARY_USER, action=Action.METADATA)
        await flags().on_call(ctx)
        assert ctx.version == "2"

    @pytest.mark.parametrize("ctx", [
        context(model="risk"),  # a model no flag routes
        context(model=None, action=Action.SERVER),  # server metadata
    ])
    async def test_leaves_other_calls_alone(self, ctx: RequestContext) -> None:
        before = (ctx.model, ctx.version)
        await flags().on_call(ctx)
        assert (ctx.model, ctx.version) == before and "flags" not in ctx.notes

    async def test_needs_a_principal(self) -> None:
        ctx = RequestContext(request_id="r", revision="x", action=Action.INFER, transport="t", client_addr="",
                             model="digits")
        with pytest.raises(GatewayError, match="internal"):
            await flags().on_call(ctx)


class TestCanaryForcing:
    """Catalogue AUTHZ-17: nothing the client sends chooses the canary."""

    async def test_naming_the_canary_version_is_refused_when_not_assigned(self) -> None:
        with pytest.raises(NotFound) as info:
            await flags().on_call(context(STABLE_USER, version="2"))
        assert info.value.reason == "flags_variant_not_assigned"
        assert info.value.client_message() == "not found: unknown model or version"

    @pytest.mark.parametrize("version", ["01", "3", "2 ", "0"])
    async def test_versions_outside_the_flag_are_refused(self, version: str) -> None:
        with pytest.raises(NotFound) as info:
            await flags().on_call(context(CANARY_USER, version=version))
        assert info.value.reason == "flags_version_not_routed"

    async def test_opting_out_to_stable_is_allowed(self) -> None:
        ctx = context(CANARY_USER, version="1")
        await flags().on_call(ctx)
        assert ctx.version == "1"
        assert ctx.notes["flags"] == {"flag": "digits-version", "variant": "stable", "reason": "client_pinned"}

    async def test_assigned_canary_version_may_be_named(self) -> None:
        ctx = context(CANARY_USER, version="2")
        await flags().on_call(ctx)
        assert served_variant(ctx) == ("digits-version", "canary")

    async def test_a_green_model_is_reachable_only_through_its_flag(self) -> None:
        variants = {"blue": {"model": "digits", "version": ""}, "green": {"model": "green", "version": ""}}
        stage = build_flags_stage(doc({"digits-colour": route_flag(variants=variants, default="green",
                                                                  gateway__stable="blue")}), policy(), FlagsRuntime())
        with pytest.raises(NotFound) as info:
            await stage.on_call(context(CANARY_USER, model="green"))
        assert info.value.reason == "flags_route_target_direct"
        ctx = context(CANARY_USER)
        await stage.on_call(ctx)
        assert (ctx.model, ctx.version) == ("green", "")


class TestOnRequest:
    async def test_returns_a_routed_copy(self) -> None:
        stage = flags()
        ctx = context(CANARY_USER)
        await stage.on_call(ctx)
        original = request()
        routed = await stage.on_request(ctx, original)
        assert (routed.model, routed.version) == ("digits", "2")
        assert (original.model, original.version) == ("digits", "")  # untouched
        assert routed.inputs is original.inputs

    async def test_unrouted_request_is_passed_on_as_is(self) -> None:
        original = request("risk")
        assert await flags().on_request(context(model="risk"), original) is original
        ctx = context(CANARY_USER, version="2")
        await flags().on_call(ctx)
        same = request(version="2")
        assert await flags().on_request(ctx, same) is same


class TestHelpers:
    async def test_header_and_audit_fields(self) -> None:
        ctx = context(CANARY_USER)
        await flags().on_call(ctx)
        assert variant_headers(ctx) == {VARIANT_HEADER: "canary"}
        assert flags_audit_fields(ctx) == {"flag": "digits-version", "variant": "canary",
                                           "variant_reason": "targeting_match"}
        plain = context(model="risk")
        assert variant_headers(plain) == {} and flags_audit_fields(plain) == {} and served_variant(plain) is None


class TestAutomaticRollback:
    def runtime(self) -> tuple[FlagsRuntime, RecordingHooks, Clock]:
        clock = Clock()
        hooks = RecordingHooks()
        return FlagsRuntime(hooks=hooks, tracker=RollbackTracker(clock=clock)), hooks, clock

    async def call(self, stage: FeatureFlags, who: Principal, error: GatewayError | None,
                   **notes: Any) -> RequestContext:
        ctx = context(who)
        await stage.on_call(ctx)
        ctx.notes.update(notes)
        await stage.on_complete(ctx, error)
        return ctx

    async def test_failing_canary_rolled_back_within_the_window_until_the_flag_changes(self) -> None:
        runtime, hooks, clock = self.runtime()
        stage = flags(runtime=runtime, rollback__window_s=60, rollback__min_requests=10,
                      rollback__max_error_rate=0.2)
        start = clock.now
        ctx = context(CANARY_USER)
        for i in range(40):
            clock.now = start + i  # one call a second
            ctx = await self.call(stage, CANARY_USER, UpstreamUnavailable(reason="upstream_5xx"))
            if hooks.trips:
                break
        assert ctx.notes["flags"]["variant"] == "canary"
        assert len(hooks.trips) == 1 and clock.now - start < 60  # within the window
        assert hooks.trips[0].reason == ERROR_RATE and hooks.trips[0].to_variant == "stable"
        # the next canary call is served by stable, and says why
        ctx = context(CANARY_USER)
        await stage.on_call(ctx)
        assert (ctx.version, ctx.notes["flags"]["reason"]) == ("1", "rolled_back")
        # it stays there: an hour later, and across a reload that edits another flag
        clock.now += 3600
        other_edit = build_flags_stage(doc({
            "digits-version": route_flag(TESTERS, rollback__window_s=60, rollback__min_requests=10,
                                         rollback__max_error_rate=0.2),
            "ui-theme": {"state": "ENABLED", "variants": {"dark": "d"}, "defaultVariant": "dark"},
        }), policy(), runtime)
        ctx = context(CANARY_USER)
        await other_edit.on_call(ctx)
        assert ctx.notes["flags"]["reason"] == "rolled_back"
        # a person edits the flag: the canary serves again
        edited = flags(runtime=runtime, rollback__window_s=60, rollback__min_requests=10,
                       rollback__max_error_rate=0.25)
        ctx = context(CANARY_USER)
        await edited.on_call(ctx)
        assert ctx.notes["flags"] == {"flag": "digits-version", "variant": "canary", "reason": "targeting_match"}
        assert len(hooks.trips) == 1

    async def test_client_errors_do_not_count(self) -> None:
        runtime, hooks, _ = self.runtime()
        stage = flags(runtime=runtime, rollback__min_requests=5)
        for _ in range(20):
            await self.call(stage, CANARY_USER, InputRejected(reason="input_shape"))
            await self.call(stage, CANARY_USER, PermissionDenied(reason="authz_denied"))
        route = stage.routes["digits"]
        assert runtime.tracker.stats(route.flag, route.definition_hash, "canary").requests == 0
        # a 4xx that reached the model counts as a call, not as an error
        await self.call(stage, CANARY_USER, InputRejected(reason="upstream_4xx"), upstream_called=True)
        assert runtime.tracker.stats(route.flag, route.definition_hash, "canary").requests == 1
        assert hooks.trips == []

    async def test_stable_failures_never_roll_back(self) -> None:
        runtime, hooks, _ = self.runtime()
        stage = flags(runtime=runtime, rollback__min_requests=5)
        for _ in range(20):
            await self.call(stage, STABLE_USER, UpstreamUnavailable())
        assert hooks.trips == []

    @pytest.mark.parametrize(("notes", "error", "setting", "reason"), [
        ({"detectors_fired": ["mahalanobis"]}, None, "rollback__max_detector_rate", "detector_rate"),
        ({}, InputRejected(reason="input_adversarial"), "rollback__max_detector_rate", "detector_rate"),
        ({"pii": {"in": {}, "out": {"EMAIL": 1}}}, None, "rollback__max_pii_rate", "pii_rate"),
    ])
    async def test_security_signals_roll_back(self, notes: dict[str, Any], error: GatewayError | None,
                                              setting: str, reason: str) -> None:
        runtime, hooks, _ = self.runtime()
        metadata: dict[str, Any] = {setting: 0.1}
        stage = flags(runtime=runtime, rollback__min_requests=5, **metadata)
        cohort = [principal(f"cat{i}", roles=("analyst", "canary-tester")) for i in range(3)]
        for i in range(6):
            await self.call(stage, cohort[i % 3], error, **notes)
        assert [t.reason for t in hooks.trips] == [reason]

    @pytest.mark.parametrize(("notes", "error", "setting"), [
        ({"detectors_fired": ["mahalanobis"]}, None, "rollback__max_detector_rate"),
        ({}, InputRejected(reason="input_adversarial"), "rollback__max_detector_rate"),
        ({"pii": {"in": {}, "out": {"EMAIL": 1}}}, None, "rollback__max_pii_rate"),
    ])
    async def test_one_cohort_client_cannot_roll_the_canary_back(self, notes: dict[str, Any],
                                                                 error: GatewayError | None, setting: str) -> None:
        """Probe (s8): one caller in the canary cohort sending adversarial-looking inputs
        (or texts the model echoes with PII) tripped the rollback for everyone. The
        signals now need `rollback.min_signal_callers` (default 3) distinct callers."""
        runtime, hooks, _ = self.runtime()
        metadata: dict[str, Any] = {setting: 0.1}
        stage = flags(runtime=runtime, rollback__min_requests=5, **metadata)
        for _ in range(50):
            await self.call(stage, CANARY_USER, error, **notes)
        helper = principal("cat2", roles=("analyst", "canary-tester"))
        await self.call(stage, helper, error, **notes)  # two distinct callers: still not enough
        assert hooks.trips == []
        route = stage.routes["digits"]
        assert runtime.tracker.stats(route.flag, route.definition_hash, "canary").requests == 51

    async def test_pii_in_the_input_is_the_clients(self) -> None:
        runtime, hooks, _ = self.runtime()
        stage = flags(runtime=runtime, rollback__min_requests=5, rollback__max_pii_rate=0.1)
        for _ in range(10):
            await self.call(stage, CANARY_USER, None, pii={"in": {"EMAIL": 3}, "out": {}})
        assert hooks.trips == []

    async def test_metadata_calls_are_not_statistics(self) -> None:
        runtime, _, _ = self.runtime()
        stage = flags(runtime=runtime)
        ctx = context(CANARY_USER, action=Action.METADATA)
        await stage.on_call(ctx)
        await stage.on_complete(ctx, UpstreamUnavailable())
        route = stage.routes["digits"]
        assert runtime.tracker.stats(route.flag, route.definition_hash, "canary").requests == 0

    async def test_latency_comes_from_the_request_start(self) -> None:
        runtime, hooks, _ = self.runtime()
        stage = flags(runtime=runtime, rollback__min_requests=5, rollback__max_p99_ms=100)
        for _ in range(5):
            ctx = context(CANARY_USER)
            ctx.started = time.monotonic() - 2.0
            await stage.on_call(ctx)
            await stage.on_complete(ctx, None)
        assert [t.reason for t in hooks.trips] == ["latency_p99"]


# -- in a pipeline, on a real model -----------------------------------------------------------


class FakeAuthn(Stage):
    """Authentication stand-in: the bearer names a principal of the table, else 401."""

    name: ClassVar[str] = "authn"

    def __init__(self, principals: dict[str, Principal]) -> None:
        self.principals = principals

    async def on_call(self, ctx: RequestContext) -> None:
        found = self.principals.get(ctx.bearer or "")
        if found is None:
            raise AuthenticationFailed(reason="authn_missing_token")
        ctx.principal, ctx.bearer = found, None


PRINCIPALS = {
    "stable": STABLE_USER,
    "canary": CANARY_USER,
    "stable-v1only": principal("vic", roles=("v1only",)),
    "canary-v1only": principal("val", roles=("v1only", "canary-tester")),
    "stable-nogrant": principal("ned", roles=("nobody",)),
    "canary-nogrant": principal("nat", roles=("nobody", "canary-tester")),
    "stable-othertenant": principal("sam", tenant="evil", roles=("analyst",)),
    "canary-othertenant": principal("cat", tenant="evil", roles=("analyst", "canary-tester")),
}

GATEWAY_YAML = b"models:\n  digits:\n    versions: ['1', '2']\n  risk: {}\n"
ACCESS_YAML = b"""
tenants:
  acme:
    models: [digits]
roles:
  analyst:
    - actions: [infer, metadata]
      models: [digits]
  v1only:
    - actions: [infer]
      models: [digits]
      versions: ['1']
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits versions 1 and 2 (a copy of 1), every version served."""
    root = tmp_path_factory.mktemp("repo")
    # The shipped version 2 (DP-SGD) is replaced by a copy of 1: these tests are about routing.
    shutil.copytree(ROOT / "triton_repo" / "digits", root / "digits", ignore=shutil.ignore_patterns("2"))
    shutil.copytree(root / "digits" / "1", root / "digits" / "2")
    config = root / "digits" / "config.pbtxt"
    text = re.sub(r"version_policy\s*\{.*?\n\}\n", "version_policy: { all: {} }\n", config.read_text(), flags=re.S)
    config.write_text(text)
    return root


@pytest.fixture
async def upstream(repo: Path) -> AsyncIterator[EmbeddedUpstream]:
    up = EmbeddedUpstream(repo, workers=1)
    await up.start()
    yield up
    await up.close()


class Gateway:
    """The pipeline the lead will wire: authn, feature_flags, model_exposure, authz."""

    def __init__(self, upstream: EmbeddedUpstream, runtime: FlagsRuntime, *, fail_version: str | None = None,
                 **metadata: Any) -> None:
        pol = build_policy_set({"gateway.yaml": GATEWAY_YAML, "access.yaml": ACCESS_YAML})
        grants, role_actions = compile_grants(pol.access)
        self.flags = build_flags_stage(doc({"digits-version": route_flag(TESTERS, **metadata)}), pol, runtime)
        self.pipeline = Pipeline(pol.revision, (
            BoundStage(FakeAuthn(PRINCIPALS), Mode.ENFORCE),
            BoundStage(self.flags, Mode.ENFORCE),
            BoundStage(ModelExposure(models=pol.gateway.models), Mode.ENFORCE),
            BoundStage(RoleAuthorizer(grants=grants, role_actions=role_actions), Mode.ENFORCE),
        ), Metrics())
        self.upstream = upstream
        self.fail_version = fail_version
        self.seen: list[tuple[str, str]] = []

    async def call_upstream(self, ctx: RequestContext, req: InferRequest) -> InferResponse:
        ctx.notes["upstream_called"] = True
        self.seen.append((req.model, req.version))
        if req.version == self.fail_version:
            raise UpstreamUnavailable(reason="upstream_5xx")
        return await self.upstream.infer(req, timeout_s=5)

    async def infer(self, bearer: str, version: str = "", **headers: str) -> tuple[RequestContext, Any]:
        """One call as the service makes it: admit, infer, complete (always)."""
        ctx = RequestContext(request_id="r", revision="x", action=Action.INFER, transport="test",
                             client_addr="", model="digits", version=version, bearer=bearer)
        ctx.notes["client_headers"] = headers  # nothing reads them: routing uses verified identity only
        error: GatewayError | None = None
        result: Any = None
        try:
            await self.pipeline.admit(ctx)
            result = await self.pipeline.infer(ctx, request(version=version), self.call_upstream)
        except GatewayError as exc:
            error = exc
            result = exc
        await self.pipeline.complete(ctx, error)
        return ctx, result


@pytest.mark.parametrize("variant", ["stable", "canary"])
class TestSameSecurityOnEveryRoute:
    async def test_allowed_call_runs_every_stage_and_reaches_the_routed_version(
            self, upstream: EmbeddedUpstream, variant: str) -> None:
        gw = Gateway(upstream, FlagsRuntime())
        ctx, resp = await gw.infer(variant, X_Canary="true" if variant == "stable" else "false")
        assert isinstance(resp, InferResponse)
        version = "2" if variant == "canary" else "1"
        assert gw.seen == [("digits", version)] and resp.model_version == version
        assert variant_headers(ctx) == {VARIANT_HEADER: variant}
        calls = [("authn", "allowed"), ("feature_flags", "allowed"), ("model_exposure", "allowed"),
                 ("authz", "allowed")]
        assert [(r.stage, r.outcome) for r in ctx.records] == [*calls, ("feature_flags", "allowed")]  # + on_request

    @pytest.mark.parametrize(("who", "error", "reason"), [
        ("nogrant", NotFound, "authz_model_not_visible"),  # no grant: looks like an unknown model
        ("othertenant", PermissionDenied, "authz_unknown_tenant"),
    ])
    async def test_refusals_are_the_same(self, upstream: EmbeddedUpstream, variant: str, who: str,
                                         error: type[GatewayError], reason: str) -> None:
        gw = Gateway(upstream, FlagsRuntime())
        _, result = await gw.infer(f"{variant}-{who}")
        assert isinstance(result, error) and result.reason == reason
        assert gw.seen == []

    async def test_no_token_no_route(self, upstream: EmbeddedUpstream, variant: str) -> None:
        gw = Gateway(upstream, FlagsRuntime())
        ctx, result = await gw.infer("")
        assert isinstance(result, AuthenticationFailed) and "flags" not in ctx.notes and gw.seen == []

    async def test_authorization_is_for_the_routed_version(self, upstream: EmbeddedUpstream, variant: str) -> None:
        """A version-scoped grant (v1 only, catalogue AUTHZ-04) holds on the canary route too."""
        gw = Gateway(upstream, FlagsRuntime())
        _, result = await gw.infer(f"{variant}-v1only")
        if variant == "canary":
            assert isinstance(result, PermissionDenied) and gw.seen == []
        else:
            assert isinstance(result, InferResponse) and gw.seen == [("digits", "1")]


async def test_failing_canary_falls_back_to_the_stable_model_end_to_end(upstream: EmbeddedUpstream) -> None:
    hooks = RecordingHooks()
    gw = Gateway(upstream, FlagsRuntime(hooks=hooks), fail_version="2", rollback__min_requests=5)
    statuses = []
    for _ in range(8):
        ctx, result = await gw.infer("canary")
        statuses.append((ctx.notes["flags"]["variant"], type(result).__name__))
    assert statuses[:5] == [("canary", "UpstreamUnavailable")] * 5
    assert statuses[5:] == [("stable", "InferResponse")] * 3
    assert gw.seen[5:] == [("digits", "1")] * 3
    assert len(hooks.trips) == 1 and hooks.trips[0].flag == "digits-version"
