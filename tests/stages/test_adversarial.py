"""The adversarial stage: IN-20, per-model modes, audit notes and metrics, feature squeezing
through a second upstream call, query-pattern actions, output hardening, policy errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from pydantic import ValidationError

from gateway.adversarial.detectors import MahalanobisDetector
from gateway.context import Action, Principal, RequestContext
from gateway.errors import GatewayError, InputRejected, RateLimited, UpstreamTimeout
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.stages.adversarial import (
    AdversarialDetector,
    AdversarialPolicy,
    InputsPolicy,
    Reinfer,
    SqueezingCheck,
    build_adversarial_stage,
)
from gateway.stages.base import Mode
from tests.adversarial import digits_split, hsj_like_stream

ROOT = Path(__file__).resolve().parent.parent.parent
TRITON_REPO = ROOT / "triton_repo"
F = npt.NDArray[np.float64]


class Recorder:
    """A DetectorMetrics that remembers every observation."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float, bool]] = []

    def observe(self, detector: str, model: str, score: float, fired: bool) -> None:
        self.seen.append((detector, model, score, fired))


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def _ctx(tenant: str = "acme", subject: str = "alice", model: str = "digits") -> RequestContext:
    ctx = RequestContext(request_id="r1", revision="rev", action=Action.INFER, transport="test", client_addr="",
                         model=model)
    ctx.principal = Principal(subject=subject, tenant=tenant, roles=frozenset({"analyst"}), issuer="test",
                              credential_id="c")
    return ctx


def _req(x: F, model: str = "digits") -> InferRequest:
    data = np.asarray(x, dtype=np.float32).reshape(-1, 64)
    return InferRequest(model, "", [Tensor("pixels", "FP32", data.shape, data)], id="client-id")


def _resp(probs: F | list[list[float]]) -> InferResponse:
    data = np.asarray(probs, dtype=np.float32)
    return InferResponse("digits", "1", [Tensor("probabilities", "FP32", data.shape, data)], id="client-id")


def _digit(i: int = 0) -> F:
    return digits_split()[1][i : i + 1].copy()


def _shipped() -> InputsPolicy:
    return InputsPolicy.model_validate(yaml.safe_load((ROOT / "policies" / "inputs.yaml").read_text()))


def _stage(models: dict[str, Any], *, reinfer: Reinfer | None = None, metrics: Recorder | None = None,
           clock: Clock | None = None, sleeps: list[float] | None = None,
           previous: AdversarialDetector | None = None) -> AdversarialDetector:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return build_adversarial_stage(AdversarialPolicy.model_validate({"models": models}), TRITON_REPO, reinfer,
                                   metrics, previous=previous, clock=clock or Clock(), sleep=sleep)


def _with(index: int, value: float) -> F:
    x = _digit()
    x[0, index] = value
    return x


# --------------------------------------------------------------------------- IN-20 (shipped policy)

IN20 = [
    # (case, input, refusal reason or None) -- shipped policy, digits in block mode
    ("clean held-out digit", _digit(0), None),
    ("64 clean digits in one batch", digits_split()[1][:64], None),
    ("the README's example digit", np.asarray(json.loads((ROOT / "examples" / "digits-request.json").read_text())
                                              ["inputs"][0]["data"], dtype=np.float64), None),
    ("one pixel 1e6", _with(12, 1e6), "input_out_of_range"),
    ("every pixel 1e6", np.full(64, 1e6), "input_out_of_range"),
    ("a negative pixel", _with(12, -1.0), "input_out_of_range"),
    ("all-constant zeros", np.zeros(64), "input_out_of_range"),
    ("all-constant ones", np.ones(64), "input_out_of_range"),
    ("one constant row in a batch", np.vstack([_digit(1), np.full((1, 64), 7.0)]), "input_out_of_range"),
    ("off-grid pixel (naive gradient attack)", _with(12, 3.25), "input_adversarial"),
]


@pytest.mark.parametrize(("x", "reason"), [pytest.param(x, r, id=c) for c, x, r in IN20])
async def test_shipped_policy_in20(x: F, reason: str | None) -> None:
    stage = build_adversarial_stage(_shipped().adversarial, TRITON_REPO, None)
    req = _req(x)
    ctx = _ctx()
    if reason is None:
        assert await stage.on_request(ctx, req) is req
        return
    with pytest.raises(InputRejected) as info:
        await stage.on_request(ctx, req)
    assert info.value.reason == reason and info.value.http_status == 422
    message = info.value.client_message()
    if reason == "input_out_of_range":
        assert "input 'pixels'" in message
    else:
        # SECURITY: the client never learns which detector fired, nor a score.
        assert not any(word in message for word in ("grid", "mahalanobis", "range", "score"))
    assert all(isinstance(v, float) for v in ctx.notes["detectors"].values())  # numbers only


# --------------------------------------------------------------------------- modes

NOISE = np.random.default_rng(3).uniform(0, 16, (1, 64)).round()  # on the grid, far from digits


@pytest.mark.parametrize(("mode", "refused", "fired_noted", "shadow_note"), [
    ("off", False, False, False),
    ("shadow", False, False, True),
    ("flag", False, True, False),
    ("block", True, True, False),
])
async def test_modes(mode: str, refused: bool, fired_noted: bool, shadow_note: bool) -> None:
    metrics = Recorder()
    stage = _stage({"digits": {"mode": mode, "range": {}, "mahalanobis": {"action": "block", "fpr": 0.001}}},
                   metrics=metrics)
    ctx = _ctx()
    req = _req(NOISE)
    if refused:
        with pytest.raises(InputRejected, match="rejected by input policy"):
            await stage.on_request(ctx, req)
    else:
        assert await stage.on_request(ctx, req) is req
    if mode == "off":
        assert ctx.notes == {} and metrics.seen == []
        return
    assert set(ctx.notes["detectors"]) == {"range", "mahalanobis"}
    assert ctx.notes["detectors"]["mahalanobis"] > 16.4
    assert ("detectors_fired" in ctx.notes) is fired_noted
    assert (ctx.notes.get("adversarial_shadow") == "input_adversarial") is shadow_note
    maha = [seen for seen in metrics.seen if seen[0] == "mahalanobis"]
    assert len(maha) == 1
    _, model, score, fired = maha[0]
    assert model == "digits" and fired and score == pytest.approx(ctx.notes["detectors"]["mahalanobis"], rel=1e-3)
    assert ("range", "digits", 0.0, False) in metrics.seen


async def test_unlisted_model_is_not_checked() -> None:
    stage = _stage({"digits": {"mode": "block", "range": {}}})
    req = InferRequest("risk", "", [Tensor("features", "FP32", (1, 30), np.full((1, 30), 1e9, np.float32))])
    ctx = _ctx(model="risk")
    assert await stage.on_request(ctx, req) is req
    assert ctx.notes == {}


async def test_profile_input_must_be_present_and_numeric() -> None:
    stage = _stage({"digits": {"mode": "block", "range": {}}})
    wrong = InferRequest("digits", "", [Tensor("pixels", "FP32", (1, 63), np.zeros((1, 63), np.float32))])
    with pytest.raises(InputRejected, match="profile"):
        await stage.on_request(_ctx(), wrong)
    with pytest.raises(InputRejected, match="missing"):
        await stage.on_request(_ctx(), InferRequest("digits", "", []))


# --------------------------------------------------------------------------- squeezing


def _fake_upstream(calls: list[InferRequest], probs_for: Any) -> Reinfer:
    async def reinfer(req: InferRequest) -> InferResponse:
        calls.append(req)
        return _resp(probs_for(req.inputs[0].data))
    return reinfer


async def test_squeezing_calls_upstream_once_more_with_the_squeezed_input() -> None:
    calls: list[InferRequest] = []
    reinfer = _fake_upstream(calls, lambda x: [[0.1, 0.9] + [0.0] * 8])
    stage = _stage({"digits": {"mode": "block", "squeezing": {"action": "block", "bits": 1, "threshold": 0.5}}},
                   reinfer=reinfer)
    ctx = _ctx()
    x = _digit(2)
    req = _req(x)
    assert await stage.on_request(ctx, req) is req
    assert calls == []  # nothing goes upstream before the request itself does
    with pytest.raises(InputRejected) as info:
        await stage.on_response(ctx, _resp([[0.9, 0.1] + [0.0] * 8]))
    assert info.value.reason == "input_adversarial"
    assert len(calls) == 1
    squeezed = calls[0].inputs[0].data
    assert set(np.unique(squeezed).tolist()) <= {0.0, 16.0}  # 1-bit squeeze of 0..16
    assert calls[0].id is None and calls[0].model == "digits"
    np.testing.assert_array_equal(req.inputs[0].data, x.astype(np.float32))  # original untouched
    assert ctx.notes["detectors"]["squeezing"] == pytest.approx(1.6)


async def test_squeezing_agreeing_outputs_pass_and_respect_flag_mode() -> None:
    calls: list[InferRequest] = []
    same = [[0.05, 0.95] + [0.0] * 8]
    stage = _stage({"digits": {"mode": "flag", "squeezing": {"action": "block", "threshold": 0.5}}},
                   reinfer=_fake_upstream(calls, lambda x: same))
    ctx = _ctx()
    await stage.on_request(ctx, _req(_digit()))
    resp = _resp(same)
    assert await stage.on_response(ctx, resp) is resp
    assert ctx.notes["detectors"] == {"squeezing": 0.0}
    # flag mode never refuses, even when it fires
    ctx2 = _ctx()
    await stage.on_request(ctx2, _req(_digit()))
    await stage.on_response(ctx2, _resp([[0.95, 0.05] + [0.0] * 8]))
    assert ctx2.notes["detectors_fired"] == ["squeezing"]


@pytest.mark.parametrize(("on_error", "raises"), [("deny", True), ("allow", False)])
async def test_squeezing_upstream_failure(on_error: str, raises: bool) -> None:
    async def failing(req: InferRequest) -> InferResponse:
        raise UpstreamTimeout()

    stage = _stage({"digits": {"mode": "block", "squeezing": {"threshold": 0.5, "on_error": on_error}}},
                   reinfer=failing)
    ctx = _ctx()
    await stage.on_request(ctx, _req(_digit()))
    resp = _resp([[1.0] + [0.0] * 9])
    if raises:
        with pytest.raises(UpstreamTimeout):
            await stage.on_response(ctx, resp)
    else:
        assert await stage.on_response(ctx, resp) is resp
    assert ctx.notes["squeezing_error"] == "upstream_timeout"


async def test_pending_squeezes_are_bounded_and_per_request() -> None:
    calls: list[InferRequest] = []
    stage = _stage({"digits": {"mode": "flag", "squeezing": {"threshold": 0.5}}},
                   reinfer=_fake_upstream(calls, lambda x: [[1.0] + [0.0] * 9]))
    stage.pending.capacity = 8
    for _ in range(50):  # requests refused later never reach on_response
        await stage.on_request(_ctx(), _req(_digit()))
    assert len(stage.pending.entries) <= 8
    other = _ctx()
    await stage.on_response(other, _resp([[1.0] + [0.0] * 9]))  # no entry for this context
    assert calls == [] and "squeezing" not in other.notes.get("detectors", {})


# --------------------------------------------------------------------------- query pattern


async def _send(stage: AdversarialDetector, stream: F, **ctx: str) -> tuple[int, GatewayError | None]:
    for index, row in enumerate(stream, start=1):
        try:
            await stage.on_request(_ctx(**ctx), _req(row))
        except GatewayError as exc:
            return index, exc
    return len(stream), None


QP = {"radius": 2.5, "seed": 11, "cooldown_s": 60}


async def test_query_pattern_block_is_a_429_with_retry_after() -> None:
    clock = Clock()
    stage = _stage({"digits": {"mode": "block", "query_pattern": {**QP, "action": "block"}}}, clock=clock)
    stream = hsj_like_stream(digits_split()[1][7], np.random.default_rng(7))
    sent, error = await _send(stage, stream)
    assert isinstance(error, RateLimited)
    assert sent <= 100 and error.reason == "query_pattern_blocked" and error.retry_after_s == 60.0
    # the whole tenant cools down: even a clean digit from another user of acme waits
    with pytest.raises(RateLimited):
        await stage.on_request(_ctx(subject="bob"), _req(_digit(1)))
    # another tenant is unaffected, and acme is served again after the cooldown
    assert (await stage.on_request(_ctx(tenant="globex"), _req(_digit(1)))).model == "digits"
    clock.now += 61
    assert (await stage.on_request(_ctx(subject="bob"), _req(_digit(3)))).model == "digits"


async def test_query_pattern_split_over_two_tokens_of_one_user_is_one_caller() -> None:
    """EV-03: the state is keyed by the verified principal, never by the credential."""
    stage = _stage({"digits": {"mode": "block", "query_pattern": {**QP, "action": "block", "scope": "principal"}}})
    stream = hsj_like_stream(digits_split()[1][8], np.random.default_rng(8))
    sent, error = await _send(stage, stream, subject="mallory")
    assert isinstance(error, RateLimited) and sent <= 100


async def test_query_pattern_slow_down_sleeps_while_fired() -> None:
    sleeps: list[float] = []
    stage = _stage({"digits": {"mode": "block", "query_pattern": {**QP, "action": "slow_down", "delay_s": 0.25}}},
                   sleeps=sleeps)
    stream = hsj_like_stream(digits_split()[1][9], np.random.default_rng(9))
    sent, error = await _send(stage, stream)
    assert error is None and sent == len(stream)
    assert sleeps and set(sleeps) == {0.25}
    assert len(sleeps) >= len(stream) - 100


async def test_query_pattern_lower_precision_hardens_outputs_while_fired() -> None:
    stage = _stage({"digits": {"mode": "block", "output": {"decimals": 2},
                               "query_pattern": {**QP, "action": "lower_precision"}}})
    probs = [[0.123, 0.877] + [0.0] * 8]
    ctx = _ctx()
    await stage.on_request(ctx, _req(_digit()))
    assert (await stage.on_response(ctx, _resp(probs))).outputs[0].data[0, :2].tolist() == \
        pytest.approx([0.12, 0.88])
    await _send(stage, hsj_like_stream(digits_split()[1][10], np.random.default_rng(10)))
    ctx = _ctx()
    out = await stage.on_response(ctx, _resp(probs))
    assert out.outputs[0].data[0].tolist() == [0.0, 1.0] + [0.0] * 8  # label only
    assert ctx.notes["output_precision"] == "lowered"


async def test_query_pattern_flag_only_notes() -> None:
    stage = _stage({"digits": {"mode": "block", "query_pattern": {**QP, "action": "flag"}}})
    stream = hsj_like_stream(digits_split()[1][11], np.random.default_rng(11))
    ctx = _ctx()
    for row in stream:
        ctx = _ctx()
        await stage.on_request(ctx, _req(row))
    assert ctx.notes["detectors_fired"] == ["query_pattern"]
    assert 0.5 <= ctx.notes["detectors"]["query_pattern"] <= 1.0


async def test_reload_keeps_query_history_when_its_configuration_is_unchanged() -> None:
    models = {"digits": {"mode": "flag", "query_pattern": QP}}
    first = _stage(models)
    second = _stage({"digits": {**models["digits"], "range": {}}}, previous=first)
    assert second.models["digits"].query is not None and first.models["digits"].query is not None
    assert second.models["digits"].query.detector is first.models["digits"].query.detector
    changed = _stage({"digits": {"mode": "flag", "query_pattern": {**QP, "radius": 2.0}}}, previous=first)
    assert changed.models["digits"].query is not None
    assert changed.models["digits"].query.detector is not first.models["digits"].query.detector


# --------------------------------------------------------------------------- output hardening


@pytest.mark.parametrize(("output", "expected"), [
    ({}, [0.1, 0.7, 0.2]),
    ({"top_k": 1}, [0.0, 0.7, 0.0]),
    ({"decimals": 0}, [0.0, 1.0, 0.0]),
    ({"label_only": True}, [0.0, 1.0, 0.0]),
    ({"label_only": True, "outputs": ["other"]}, [0.1, 0.7, 0.2]),
])
async def test_output_hardening_per_model_even_with_detectors_off(output: dict[str, Any],
                                                                  expected: list[float]) -> None:
    stage = _stage({"digits": {"mode": "off", "output": output}})
    out = await stage.on_response(_ctx(), _resp([[0.1, 0.7, 0.2]]))
    assert out.outputs[0].data[0].tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------- policy


def test_shipped_policy_builds_with_every_detector_it_names() -> None:
    stage = build_adversarial_stage(_shipped().adversarial, TRITON_REPO, None)
    digits = stage.models["digits"]
    assert [(c.name, action) for c, action in digits.checks] == [
        ("range", "block"), ("training_range", "flag"), ("grid", "block"), ("mahalanobis", "flag")]
    assert digits.query is not None and digits.mode == "block"
    maha = digits.checks[3][0]
    assert isinstance(maha, MahalanobisDetector) and math.isclose(maha.threshold, 11.2052)


@pytest.mark.parametrize(("models", "message"), [
    pytest.param({"text_echo": {"mode": "block", "range": {}}}, "no numeric features", id="text-model"),
    pytest.param({"nope": {"mode": "block", "range": {}}}, "cannot read", id="no-profile"),
    pytest.param({"digits": {"mode": "block", "input": "image", "range": {}}}, "not the input", id="wrong-input"),
    pytest.param({"digits": {"mode": "block", "squeezing": {"threshold": 0.5}}}, "reinfer", id="squeeze-no-reinfer"),
    pytest.param({"risk": {"mode": "block", "grid": {}}}, "not integral", id="grid-needs-step"),
    pytest.param({"digits": {"mode": "block", "mahalanobis": {"fpr": 0.05}}}, "no Mahalanobis threshold",
                 id="unknown-fpr"),
    pytest.param({"digits": {"mode": "block", "query_pattern": {"window": 50, "min_queries": 80}}},
                 "min_queries", id="min-over-window"),
    pytest.param({"digits": {"mode": "block", "query_pattern": {"suspicious_window": 20, "max_suspicious": 30}}},
                 "max_suspicious", id="count-over-its-window"),
])
def test_policies_the_repository_contradicts(models: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _stage(models)


@pytest.mark.parametrize("models", [
    pytest.param({"digits": {"mode": "enforce"}}, id="unknown-mode"),
    pytest.param({"digits": {"mode": "block", "range": {"bounds": "training"}}}, id="range-has-no-bounds-key"),
    pytest.param({"digits": {"mode": "block", "training_range": {"margin": -1}}}, id="negative-margin"),
    pytest.param({"digits": {"mode": "block", "mahalanobis": {}}}, id="no-threshold"),
    pytest.param({"digits": {"mode": "block", "mahalanobis": {"fpr": 0.01, "threshold": 3}}}, id="two-thresholds"),
    pytest.param({"digits": {"mode": "block", "query_pattern": {"action": "ban"}}}, id="unknown-action"),
    pytest.param({"digits": {"mode": "block", "query_pattern": {"delay_s": 60}}}, id="delay-too-long"),
    pytest.param({"digits": {"mode": "block", "query_pattern": {"max_suspicious": 0}}}, id="count-zero"),
    pytest.param({"digits": {"mode": "block", "rnage": {}}}, id="misspelt-detector"),
    pytest.param({"digits": {"output": {"top_k": 0}}}, id="top-k-zero"),
    pytest.param({"digits": {"squeezing": {}}}, id="squeeze-without-threshold"),
])
def test_invalid_policies_are_refused(models: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AdversarialPolicy.model_validate({"models": models})


def test_inputs_policy_refuses_unknown_sections() -> None:
    with pytest.raises(ValidationError):
        InputsPolicy.model_validate({"sanitise": {}})


async def test_shipped_policy_flags_out_of_training_range_without_refusing() -> None:
    stage = build_adversarial_stage(_shipped().adversarial, TRITON_REPO, None)
    ctx = _ctx()
    req = _req(_with(0, 1.0))  # pixel 0 is 0 in every training image; 1 is still a valid pixel
    assert await stage.on_request(ctx, req) is req
    assert ctx.notes["detectors_fired"] == ["training_range"]
    assert ctx.notes["detectors"]["range"] == 0.0 and ctx.notes["detectors"]["training_range"] > 0


# --------------------------------------------------------------------------- in a pipeline


async def test_in_a_pipeline_with_the_embedded_upstream() -> None:
    """Wired as the lead will: sanitize then adversarial, squeezing calling the same upstream."""
    from gateway.observability.metrics import Metrics
    from gateway.pipeline import BoundStage, Pipeline
    from gateway.stages.sanitize import build_sanitize_stage
    from gateway.upstream.embedded import EmbeddedUpstream

    upstream = EmbeddedUpstream(TRITON_REPO, workers=1)
    await upstream.start()
    calls: list[str] = []

    async def reinfer(req: InferRequest) -> InferResponse:
        calls.append("squeeze")
        return await upstream.infer(req, timeout_s=5)

    async def call_upstream(ctx: RequestContext, req: InferRequest) -> InferResponse:
        calls.append("infer")
        return await upstream.infer(req, timeout_s=5)

    try:
        policy = _shipped()
        digits = policy.adversarial.models["digits"].model_copy(
            update={"squeezing": SqueezingCheck(action="flag", bits=3, threshold=0.11)})
        adversarial = build_adversarial_stage(AdversarialPolicy(models={"digits": digits}), TRITON_REPO, reinfer)
        pipeline = Pipeline("rev", (BoundStage(build_sanitize_stage(policy.sanitize, TRITON_REPO), Mode.ENFORCE),
                                    BoundStage(adversarial, Mode.ENFORCE)), Metrics())
        x_test = digits_split()[1]
        ctx = _ctx()
        resp = await pipeline.infer(ctx, _req(x_test[:3]), call_upstream)
        assert resp.outputs[0].data.shape == (3, 10)
        assert calls == ["infer", "squeeze"]
        assert set(ctx.notes["detectors"]) == {"range", "training_range", "grid", "mahalanobis", "query_pattern",
                                               "squeezing"}
        assert [r.stage for r in ctx.records] == ["sanitize", "adversarial", "adversarial"]

        calls.clear()
        refused = _ctx()
        with pytest.raises(InputRejected) as info:
            await pipeline.infer(refused, _req(_with(0, 1e6)), call_upstream)
        assert info.value.reason == "input_out_of_range"
        assert calls == []  # UP=0: nothing forwarded, no squeeze call either
        assert [(r.stage, r.outcome, r.reason) for r in refused.records][-1] == \
            ("adversarial", "denied", "input_out_of_range")
    finally:
        await upstream.close()


def test_the_stage_switch_cannot_shadow() -> None:
    """Per-model ``mode: shadow`` is the way to shadow; a stage-level shadow would still sleep."""
    with pytest.raises(ValidationError):
        AdversarialPolicy.model_validate({"mode": "shadow"})
    assert AdversarialPolicy.model_validate({"mode": "enforce"}).mode is Mode.ENFORCE


async def test_on_complete_drops_the_squeezed_copy_of_an_unanswered_call() -> None:
    calls: list[InferRequest] = []
    stage = _stage({"digits": {"mode": "flag", "squeezing": {"threshold": 0.5}}},
                   reinfer=_fake_upstream(calls, lambda x: [[1.0] + [0.0] * 9]))
    ctx = _ctx()
    await stage.on_request(ctx, _req(_digit()))
    assert len(stage.pending.entries) == 1
    await stage.on_complete(ctx, RateLimited(reason="dp_budget_exhausted"))  # refused by a later stage
    assert len(stage.pending.entries) == 0
    await stage.on_complete(_ctx(), None)  # nothing pending: a no-op, never raises
    assert calls == []


# --------------------------------------------------------------------------- output hardening per role


def _ctx_roles(*roles: str) -> RequestContext:
    ctx = _ctx()
    assert ctx.principal is not None
    ctx.principal = Principal(subject="alice", tenant="acme", roles=frozenset(roles), issuer="test", credential_id="c")
    return ctx


ROLE_OUTPUTS = {"external": {"top_k": 1}, "partner": {"decimals": 1}, "analyst": {}}


@pytest.mark.parametrize(("roles", "expected"), [
    pytest.param(("predictor",), [0.0, 1.0, 0.0], id="no-listed-role-gets-the-model-policy"),
    pytest.param(("analyst",), [0.12, 0.66, 0.22], id="trusted-role-gets-full-scores"),
    pytest.param(("external",), [0.0, 0.66, 0.0], id="untrusted-role-gets-top-1"),
    pytest.param(("external", "partner"), [0.0, 0.7, 0.0], id="two-listed-roles-get-the-strictest-combined"),
    pytest.param(("external", "analyst"), [0.0, 0.66, 0.0], id="a-trusted-role-never-loosens-an-untrusted-one"),
])
async def test_output_hardening_per_role(roles: tuple[str, ...], expected: list[float]) -> None:
    stage = _stage({"digits": {"mode": "off", "output": {"label_only": True}, "output_by_role": ROLE_OUTPUTS}})
    out = await stage.on_response(_ctx_roles(*roles), _resp([[0.12, 0.66, 0.22]]))
    assert out.outputs[0].data[0].tolist() == pytest.approx(expected)


async def test_output_hardening_without_a_principal_uses_the_model_policy() -> None:
    stage = _stage({"digits": {"mode": "off", "output": {"top_k": 1}, "output_by_role": {"analyst": {}}}})
    ctx = _ctx()
    ctx.principal = None
    out = await stage.on_response(ctx, _resp([[0.12, 0.66, 0.22]]))
    assert out.outputs[0].data[0].tolist() == pytest.approx([0.0, 0.66, 0.0])


async def test_lowered_precision_never_loosens_a_role_policy() -> None:
    """The detector's lowered output (decimals 2 here) combines with a label-only role."""
    stage = _stage({"digits": {"mode": "block", "output_by_role": {"external": {"label_only": True}},
                               "query_pattern": {**QP, "action": "lower_precision",
                                                 "lowered_output": {"decimals": 2}}}})
    await _send(stage, hsj_like_stream(digits_split()[1][12], np.random.default_rng(12)))
    ctx = _ctx_roles("external")
    out = await stage.on_response(ctx, _resp([[0.123, 0.877] + [0.0] * 8]))
    assert out.outputs[0].data[0].tolist() == [0.0, 1.0] + [0.0] * 8
    assert ctx.notes["output_precision"] == "lowered"
    trusted = await stage.on_response(_ctx_roles("analyst"), _resp([[0.123, 0.877] + [0.0] * 8]))
    assert trusted.outputs[0].data[0, :2].tolist() == pytest.approx([0.12, 0.88])


@pytest.mark.parametrize("output_by_role", [{"": {"top_k": 1}}, {"external": {"top_k": 0}},
                                            {"external": {"bogus": 1}}])
def test_invalid_role_output_policies_are_refused(output_by_role: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AdversarialPolicy.model_validate({"models": {"digits": {"output_by_role": output_by_role}}})
