"""The dp_noise stage: charging, refunds, the repeat cache, 429s, isolation, policy checks.

Driven through a one-stage :class:`Pipeline` with the wiring the service will use: run
``pipeline.infer`` and call ``stage.finalize(ctx, ok)`` in ``finally``. The clock is
injected (no sleeps); the upstream is a small fake, and the essentials run once more on
the embedded onnxruntime backend (``risk``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from gateway.context import RequestContext
from gateway.errors import (
    DependencyUnavailable,
    InputRejected,
    PayloadTooLarge,
    RateLimited,
    UpstreamBadResponse,
    UpstreamUnavailable,
)
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.stages.base import Mode
from gateway.stages.dp_noise import (
    HEADER_REMAINING,
    NOTE_DP,
    NOTE_REMAINING,
    DpNoiser,
    DpPolicy,
    budget_report,
    build_dp_stage,
    ledger_key,
)
from gateway.upstream.embedded import EmbeddedUpstream
from privacy.dp.ledger import InMemoryBudgetLedger, LedgerUnavailable, Period, PeriodScheme, Refused, Reservation
from privacy.dp.mechanisms import on_grid
from tests.support.dp_stage import MIDNIGHT, T0, Clock, FakeUpstream, call_stage, ctx_for, risk_request

ROOT = Path(__file__).resolve().parents[2]

RISK_POLICY: dict[str, Any] = {
    "privacy_unit": "one patient's record in the training data",
    "outputs": {"score": {"mechanism": "laplace", "bounds": [0.0, 1.0], "epsilon": 0.5, "width": 1}},
    "budget": {"epsilon": 5.0},
    "timing_jitter_ms": 0,
}
GAUSS_POLICY: dict[str, Any] = {
    "privacy_unit": "one image in the training data",
    "outputs": {"probabilities": {"mechanism": "gaussian", "bounds": [0.0, 1.0], "epsilon": 1.0,
                                  "delta": 1e-6, "width": 10}},
    "budget": {"epsilon": 4.0, "delta": 1e-5},
    "timing_jitter_ms": 0,
}


def policy(**models: dict[str, Any]) -> DpPolicy:
    return DpPolicy.model_validate({"models": models})


async def spent(ledger: InMemoryBudgetLedger, tenant: str = "alpha", model: str = "risk", t: float = T0) -> float:
    return (await ledger.usage(ledger_key(tenant, model), PeriodScheme().at(t), 1))[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> InMemoryBudgetLedger:
    return InMemoryBudgetLedger(clock)


@pytest.fixture
def stage(ledger: InMemoryBudgetLedger, clock: Clock) -> DpNoiser:
    return build_dp_stage(policy(risk=RISK_POLICY), ledger, clock)


class TestCharging:
    async def test_one_row_costs_its_epsilon_and_notes_it(self, stage: DpNoiser, ledger: InMemoryBudgetLedger) -> None:
        """One answered row costs ε 0.5; the audit note and the header value say so."""
        ctx = ctx_for()
        resp = await call_stage(stage, ctx, risk_request(), FakeUpstream())
        assert await spent(ledger) == 0.5
        assert ctx.notes[NOTE_DP]["epsilon"] == 0.5
        assert ctx.notes[NOTE_DP]["rows"] == 1
        assert ctx.notes[NOTE_DP]["accounting"] == "basic"
        assert ctx.notes[NOTE_REMAINING] == "4.5"
        assert HEADER_REMAINING == "X-Privacy-Budget-Remaining"
        assert [t.name for t in resp.outputs] == ["score"]

    async def test_batch_of_ten_rows_costs_ten_rows(self, stage: DpNoiser, ledger: InMemoryBudgetLedger) -> None:
        """A batch of 10 rows spends the whole day's ε 5; the next single row is refused."""
        ctx = ctx_for()
        await call_stage(stage, ctx, risk_request(rows=10), FakeUpstream())
        assert await spent(ledger) == 5.0
        assert ctx.notes[NOTE_DP]["epsilon"] == 5.0
        assert ctx.notes[NOTE_REMAINING] == "0"
        with pytest.raises(RateLimited):
            await call_stage(stage, ctx_for(), risk_request(), FakeUpstream())

    async def test_batch_larger_than_a_period_budget_is_refused_without_charge(
        self, stage: DpNoiser, ledger: InMemoryBudgetLedger
    ) -> None:
        """11 rows cost 5.5 > 5: no period could ever pay; 413 before the upstream."""
        upstream = FakeUpstream()
        with pytest.raises(PayloadTooLarge) as err:
            await call_stage(stage, ctx_for(), risk_request(rows=11), upstream)
        assert err.value.reason == "dp_request_exceeds_budget"
        assert upstream.calls == 0
        assert await spent(ledger) == 0.0

    async def test_exhausted_budget_is_429_with_retry_after_to_next_utc_midnight(
        self, stage: DpNoiser, clock: Clock
    ) -> None:
        """The 11th single-row query of the day: 429, reason dp_budget_exhausted, Retry-After
        = seconds to the next UTC midnight, no upstream call."""
        upstream = FakeUpstream()
        for _ in range(10):
            await call_stage(stage, ctx_for(), risk_request(value=float(_)), upstream)
        clock.t = MIDNIGHT - 30.5
        ctx = ctx_for()
        with pytest.raises(RateLimited) as err:
            await call_stage(stage, ctx, risk_request(value=99.0), upstream)
        assert err.value.http_status == 429
        assert err.value.reason == "dp_budget_exhausted"
        assert err.value.retry_after_s == 31
        assert "privacy budget" in err.value.client_message()
        assert "2026-12-03T00:00:00Z" in err.value.client_message()
        assert upstream.calls == 10
        assert ctx.notes[NOTE_DP]["refused"] is True
        assert ctx.notes[NOTE_DP]["epsilon"] == 0.0

    async def test_budget_resets_at_the_period_boundary_only(self, stage: DpNoiser, clock: Clock,
                                                             ledger: InMemoryBudgetLedger) -> None:
        """Exhausted at 23:00; still exhausted one second before midnight; fresh at midnight."""
        await call_stage(stage, ctx_for(), risk_request(rows=10), FakeUpstream())
        clock.t = MIDNIGHT - 1
        with pytest.raises(RateLimited):
            await call_stage(stage, ctx_for(), risk_request(), FakeUpstream())
        clock.t = MIDNIGHT
        await call_stage(stage, ctx_for(), risk_request(), FakeUpstream())
        assert await spent(ledger, t=MIDNIGHT) == 0.5

    async def test_tenants_have_separate_budgets(self, stage: DpNoiser) -> None:
        """alpha exhausting its budget leaves beta's untouched (the key is the verified tenant)."""
        await call_stage(stage, ctx_for("alpha"), risk_request(rows=10), FakeUpstream())
        with pytest.raises(RateLimited):
            await call_stage(stage, ctx_for("alpha", "u9"), risk_request(), FakeUpstream())
        await call_stage(stage, ctx_for("beta", "u2"), risk_request(), FakeUpstream())

    async def test_users_of_one_tenant_share_its_budget(self, stage: DpNoiser) -> None:
        """Sybils inside a tenant: 10 users x 1 row exhaust it; the next user is refused."""
        for i in range(10):
            await call_stage(stage, ctx_for("alpha", f"user{i}"), risk_request(value=float(i)), FakeUpstream())
        with pytest.raises(RateLimited):
            await call_stage(stage, ctx_for("alpha", "user10"), risk_request(value=42.0), FakeUpstream())

    async def test_per_tenant_budget_override(self, ledger: InMemoryBudgetLedger, clock: Clock) -> None:
        """A tenant listed under `tenants` gets its own budget."""
        stage = build_dp_stage(policy(risk={**RISK_POLICY, "tenants": {"gold": {"epsilon": 1.0}}}), ledger, clock)
        await call_stage(stage, ctx_for("gold"), risk_request(rows=2), FakeUpstream())
        with pytest.raises(RateLimited):
            await call_stage(stage, ctx_for("gold"), risk_request(value=2.0), FakeUpstream())


class TestRefunds:
    async def test_upstream_failure_refunds_the_reservation(self, stage: DpNoiser,
                                                            ledger: InMemoryBudgetLedger) -> None:
        """Reserved before the upstream call, refunded by finalize when it fails: no charge."""
        ctx = ctx_for()
        with pytest.raises(UpstreamUnavailable):
            await call_stage(stage, ctx, risk_request(rows=4), FakeUpstream(fail=True))
        assert await spent(ledger) == 0.0
        assert ledger.open_reservations() == 0
        assert ctx.notes[NOTE_DP]["refunded"] is True
        assert ctx.notes[NOTE_DP]["epsilon"] == 0.0

    async def test_bad_upstream_answer_is_refused_and_refunded(self, stage: DpNoiser,
                                                               ledger: InMemoryBudgetLedger) -> None:
        """More rows than were charged, an output twice, not a float, another width than the
        policy's: 502, nothing released, the reservation refunded."""

        async def extra_rows(ctx: RequestContext, req: InferRequest) -> InferResponse:
            return InferResponse("risk", "1", [Tensor("score", "FP32", (2, 1), np.zeros((2, 1), np.float32))])

        async def twice(ctx: RequestContext, req: InferRequest) -> InferResponse:
            t = Tensor("score", "FP32", (1, 1), np.zeros((1, 1), np.float32))
            return InferResponse("risk", "1", [t, t])

        async def integer(ctx: RequestContext, req: InferRequest) -> InferResponse:
            return InferResponse("risk", "1", [Tensor("score", "INT64", (1, 1), np.zeros((1, 1), np.int64))])

        async def wide(ctx: RequestContext, req: InferRequest) -> InferResponse:
            return InferResponse("risk", "1", [Tensor("score", "FP32", (1, 2), np.zeros((1, 2), np.float32))])

        for upstream in (extra_rows, twice, integer, wide):
            with pytest.raises(UpstreamBadResponse):
                await call_stage(stage, ctx_for(), risk_request(), upstream)
        assert await spent(ledger) == 0.0
        assert ledger.open_reservations() == 0

    async def test_a_committed_answer_is_never_refunded(self, stage: DpNoiser, ledger: InMemoryBudgetLedger) -> None:
        """finalize(ok=False) after on_response committed (a later stage failed): still charged."""
        ctx = ctx_for()
        pipeline = Pipeline(revision="t", stages=(BoundStage(stage, Mode.ENFORCE),), metrics=Metrics())
        await pipeline.infer(ctx, risk_request(), FakeUpstream())
        await stage.finalize(ctx, False)
        assert await spent(ledger) == 0.5

    async def test_refused_output_name_costs_nothing(self, stage: DpNoiser, ledger: InMemoryBudgetLedger) -> None:
        """Asking for an output the policy does not noise (raw logits): 422 before the upstream."""
        upstream = FakeUpstream()
        with pytest.raises(InputRejected) as err:
            await call_stage(stage, ctx_for(), risk_request(outputs=("logits",)), upstream)
        assert err.value.reason == "dp_output_not_released"
        assert "logits" not in err.value.client_message()
        assert upstream.calls == 0
        assert await spent(ledger) == 0.0

    async def test_ledger_outage_fails_closed(self, clock: Clock) -> None:
        """No ledger, no answer: 503, the upstream is never called."""

        class Down(InMemoryBudgetLedger):
            async def reserve(self, key: str, period: Period, amount: Any, limit: Any) -> Reservation | Refused:
                raise LedgerUnavailable("redis down")

        stage = build_dp_stage(policy(risk=RISK_POLICY), Down(clock), clock)
        upstream = FakeUpstream()
        with pytest.raises(DependencyUnavailable) as err:
            await call_stage(stage, ctx_for(), risk_request(), upstream)
        assert err.value.reason == "dp_ledger_unavailable"
        assert upstream.calls == 0


class TestRelease:
    async def test_unlisted_outputs_are_dropped_and_values_are_noised_on_the_grid(self, stage: DpNoiser) -> None:
        """Only `score` leaves; it is noised (not the upstream's 0.25), FP32, on the grid."""
        resp = await call_stage(stage, ctx_for(), risk_request(rows=10), FakeUpstream(0.25))
        (score,) = resp.outputs
        assert score.name == "score"
        assert score.data.dtype == np.float32
        assert score.shape == (10, 1)
        assert not np.all(score.data == np.float32(0.25))
        grid = stage.models["risk"].outputs["score"].mechanism(1, "FP32").grid
        assert on_grid(score.data.astype(np.float64), grid)

    async def test_other_models_pass_untouched(self, stage: DpNoiser, ledger: InMemoryBudgetLedger) -> None:
        """A model not in privacy.yaml gets no noise and no charge."""
        req = InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (1, 64),
                                                                         np.zeros((1, 64), np.float32))])

        async def digits(ctx: RequestContext, r: InferRequest) -> InferResponse:
            return InferResponse("digits", "1", [Tensor("probabilities", "FP32", (1, 10),
                                                        np.full((1, 10), 0.1, np.float32))])

        resp = await call_stage(stage, ctx_for(model="digits"), req, digits)
        assert np.all(resp.outputs[0].data == np.float32(0.1))
        assert NOTE_DP not in ctx_for().notes


    async def test_timing_jitter_delays_the_answer(self, ledger: InMemoryBudgetLedger, clock: Clock) -> None:
        """With timing_jitter_ms, the answer waits on the event loop's real timer (the
        side-channel mask), awaited before the answer is released; the delay is random, not
        constant. Checked without timing the answers: the stage as built for the gateway
        awaits ``asyncio.sleep`` itself, and the next test measures what it is asked for."""
        stage = build_dp_stage(policy(risk={**RISK_POLICY, "timing_jitter_ms": 30}), ledger, clock)
        assert stage.sleep is asyncio.sleep  # what the gateway runs: a real delay, not a recorder
        order: list[str] = []
        asked: list[float] = []

        async def sleep_then_note(seconds: float) -> None:
            order.append("sleep")
            asked.append(seconds)
            await asyncio.sleep(0)

        class Upstream(FakeUpstream):
            async def __call__(self, ctx: RequestContext, req: InferRequest) -> InferResponse:
                order.append("upstream")
                return await super().__call__(ctx, req)

        delayed = dataclasses.replace(stage, sleep=sleep_then_note)
        for i in range(6):
            await call_stage(delayed, ctx_for(), risk_request(value=float(i)), Upstream())
            order.append("answered")
        # Each answer: upstream, then the delay, and only then released.
        assert order == ["upstream", "sleep", "answered"] * 6
        assert max(asked) > 0.005
        assert max(asked) - min(asked) > 0.001

    async def test_timing_jitter_goes_through_the_injected_sleep(self, ledger: InMemoryBudgetLedger,
                                                                 clock: Clock) -> None:
        """The delay is uniform in [0, timing_jitter_ms) and awaited through ``sleep``
        (what security_tests/dp uses to measure 10,000 jittered answers without waiting)."""
        asked: list[float] = []

        async def record(seconds: float) -> None:
            asked.append(seconds)

        jittered = {**RISK_POLICY, "timing_jitter_ms": 30, "budget": {"epsilon": 1000.0}}
        stage = dataclasses.replace(build_dp_stage(policy(risk=jittered), ledger, clock), sleep=record)
        for i in range(200):
            await call_stage(stage, ctx_for(), risk_request(value=float(i % 2)), FakeUpstream())
        assert len(asked) == 200
        assert all(0.0 <= s < 0.030 for s in asked)
        assert 0.010 < float(np.mean(asked)) < 0.020
        assert len(set(asked)) > 190


class TestRepeatCache:
    @pytest.fixture
    def cached(self, ledger: InMemoryBudgetLedger, clock: Clock) -> DpNoiser:
        return build_dp_stage(policy(risk={**RISK_POLICY, "repeat_cache_entries": 8}), ledger, clock)

    async def test_exact_repeat_is_answered_from_cache_at_no_charge(
        self, cached: DpNoiser, ledger: InMemoryBudgetLedger
    ) -> None:
        """Same tenant, same bytes: the identical noisy answer, ε 0 (post-processing)."""
        first = await call_stage(cached, ctx_for(), risk_request(rows=2), FakeUpstream())
        ctx = ctx_for(subject="another-user-same-tenant")
        again = await call_stage(cached, ctx, risk_request(rows=2), FakeUpstream())
        assert np.array_equal(first.outputs[0].data, again.outputs[0].data)
        assert await spent(ledger) == 1.0
        assert ctx.notes[NOTE_DP]["cached"] is True
        assert ctx.notes[NOTE_DP]["epsilon"] == 0.0
        assert ctx.notes[NOTE_REMAINING] == "4"

    @pytest.mark.parametrize(
        "variant",
        [
            pytest.param(lambda: risk_request(rows=2, value=float(np.nextafter(np.float32(1), np.float32(2)))),
                         id="one-ulp-change"),
            pytest.param(lambda: risk_request(rows=3), id="more-rows"),
            pytest.param(lambda: risk_request(rows=2, version="1"), id="explicit-version"),
        ],
    )
    async def test_any_variation_is_charged(self, cached: DpNoiser, ledger: InMemoryBudgetLedger,
                                            variant: Callable[[], InferRequest]) -> None:
        """Anything but the exact bytes is a new question and is charged in full."""
        await call_stage(cached, ctx_for(), risk_request(rows=2), FakeUpstream())
        req = variant()
        await call_stage(cached, ctx_for(), req, FakeUpstream())
        assert await spent(ledger) == 1.0 + 0.5 * req.inputs[0].shape[0]

    async def test_naming_the_same_outputs_is_the_same_question(self, cached: DpNoiser,
                                                                 ledger: InMemoryBudgetLedger) -> None:
        """The cache key is canonical: listing the outputs that would be returned anyway, or
        asking for binary encoding, changes no released value, so it is still a repeat."""
        await call_stage(cached, ctx_for(), risk_request(rows=2), FakeUpstream())
        req = risk_request(rows=2, outputs=("score",))
        req.binary_data_output = True
        await call_stage(cached, ctx_for(), req, FakeUpstream())
        assert await spent(ledger) == 1.0

    async def test_cache_is_per_tenant(self, cached: DpNoiser, ledger: InMemoryBudgetLedger) -> None:
        """beta asking alpha's question pays for its own answer."""
        await call_stage(cached, ctx_for("alpha"), risk_request(), FakeUpstream())
        await call_stage(cached, ctx_for("beta"), risk_request(), FakeUpstream())
        assert await spent(ledger, "beta") == 0.5

    async def test_new_model_version_is_a_new_charged_answer(self, cached: DpNoiser,
                                                             ledger: InMemoryBudgetLedger) -> None:
        """A versionless repeat after the model changed is not served the old model's answer."""
        upstream = FakeUpstream()
        await call_stage(cached, ctx_for(), risk_request(), upstream)
        upstream.version = "2"
        ctx = ctx_for()
        await call_stage(cached, ctx, risk_request(), upstream)
        assert await spent(ledger) == 1.0
        assert ctx.notes[NOTE_DP]["cached"] is False

    async def test_exact_repeats_do_not_bypass_the_budget_for_new_questions(self, cached: DpNoiser) -> None:
        """Repeats are free, but an exhausted budget still refuses every new question."""
        await call_stage(cached, ctx_for(), risk_request(rows=10), FakeUpstream())
        await call_stage(cached, ctx_for(), risk_request(rows=10), FakeUpstream())
        with pytest.raises(RateLimited):
            await call_stage(cached, ctx_for(), risk_request(rows=1), FakeUpstream())


class TestConcurrency:
    async def test_two_replicas_200_concurrent_requests_never_overspend(self, ledger: InMemoryBudgetLedger,
                                                                        clock: Clock) -> None:
        """Two stages (two replicas of one revision) share a ledger: of 200 concurrent
        single-row requests exactly 10 are answered; the rest are 429; nothing stays open."""
        replicas = [build_dp_stage(policy(risk=RISK_POLICY), ledger, clock) for _ in range(2)]

        class Slow(FakeUpstream):
            async def __call__(self, ctx: RequestContext, req: InferRequest) -> InferResponse:
                await asyncio.sleep(0)  # interleave everything between reserve and commit
                return await super().__call__(ctx, req)

        upstream = Slow()
        results = await asyncio.gather(
            *(call_stage(replicas[i % 2], ctx_for(subject=f"u{i}"), risk_request(value=float(i)), upstream)
              for i in range(200)),
            return_exceptions=True,
        )
        answered = [r for r in results if isinstance(r, InferResponse)]
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert len(answered) == 10
        assert len(refused) == 190
        assert upstream.calls == 10
        assert await spent(ledger) == 5.0
        assert ledger.open_reservations() == 0

    async def test_concurrent_failures_refund_so_others_may_spend(self, ledger: InMemoryBudgetLedger,
                                                                  clock: Clock) -> None:
        """Half the upstream calls fail: their reservations come back; spend never passes 5."""
        stage = build_dp_stage(policy(risk=RISK_POLICY), ledger, clock)
        count = 0

        async def flaky(ctx: RequestContext, req: InferRequest) -> InferResponse:
            nonlocal count
            count += 1
            await asyncio.sleep(0)
            if count % 2:
                raise UpstreamUnavailable(reason="upstream_5xx")
            return await FakeUpstream()(ctx, req)

        for _ in range(3):
            await asyncio.gather(
                *(call_stage(stage, ctx_for(), risk_request(value=float(i)), flaky) for i in range(40)),
                return_exceptions=True)
            assert await spent(ledger) <= 5.0
        assert await spent(ledger) == 5.0
        assert ledger.open_reservations() == 0


class TestGaussian:
    async def test_rdp_accounting_charges_rows_until_the_converted_epsilon_is_spent(
        self, ledger: InMemoryBudgetLedger, clock: Clock
    ) -> None:
        """Gaussian rows of (1.0, 1e-6) against (4.0, 1e-5): RDP lets more rows through than
        basic composition would (4), and never past ε 4 at δ 1e-5."""
        stage = build_dp_stage(policy(digits=GAUSS_POLICY), ledger, clock)

        async def digits(ctx: RequestContext, r: InferRequest) -> InferResponse:
            rows = r.inputs[0].shape[0]
            return InferResponse("digits", "1", [Tensor("probabilities", "FP32", (rows, 10),
                                                        np.full((rows, 10), 0.1, np.float32))])

        answered = 0
        for i in range(100):
            req = InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (1, 64),
                                                                             np.full((1, 64), i, np.float32))])
            try:
                await call_stage(stage, ctx_for(model="digits"), req, digits)
            except RateLimited:
                break
            answered += 1
        report = await budget_report(policy(digits=GAUSS_POLICY), ledger, "alpha", clock=clock)
        entry = report["models"]["digits"]
        assert answered > 4
        assert entry["accounting"] == "rdp"
        assert entry["epsilon_spent"] <= 4.0 * (1 + 1e-9)
        assert entry["rows_remaining"] == 0


class TestBudgetReport:
    async def test_report_shows_spent_remaining_and_period(self, stage: DpNoiser, ledger: InMemoryBudgetLedger,
                                                           clock: Clock) -> None:
        """What GET /v2/privacy/budget serves: per model, ε spent / remaining, rows left, period end."""
        await call_stage(stage, ctx_for(), risk_request(rows=3), FakeUpstream())
        report = await budget_report(policy(risk=RISK_POLICY), ledger, "alpha", clock=clock)
        risk = report["models"]["risk"]
        assert report["tenant"] == "alpha"
        assert risk["epsilon_spent"] == 1.5
        assert risk["epsilon_remaining"] == 3.5
        assert risk["rows_remaining"] == 7
        assert risk["period"]["end"] == "2026-12-03T00:00:00Z"
        assert math.isclose(risk["period"]["seconds_left"], 3600.0)
        other = await budget_report(policy(risk=RISK_POLICY), ledger, "beta", clock=clock)
        assert other["models"]["risk"]["epsilon_spent"] == 0.0


class TestPolicy:
    def test_shipped_policy_file_is_valid(self) -> None:
        """policies/privacy.yaml: risk.score Laplace [0, 1], ε 0.5 per row, 5 per UTC day."""
        loaded = DpPolicy.model_validate(yaml.safe_load((ROOT / "policies" / "privacy.yaml").read_text()))
        risk = loaded.models["risk"]
        assert risk.outputs["score"].mechanism == "laplace"
        assert risk.budget.epsilon == 5.0
        assert risk.budget.period_s == 86_400

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            # a budget that cannot pay for one row
            ({"budget": {"epsilon": 0.4}}, "smaller than one query"),
            # ... also for a per-tenant override
            ({"tenants": {"t": {"epsilon": 0.1}}}, "smaller than one query"),
            # the Gaussian needs its delta
            ({"outputs": {"score": {"mechanism": "gaussian", "bounds": [0, 1], "epsilon": 1.0}}}, "needs delta"),
            # the Laplace is pure DP
            ({"outputs": {"score": {"mechanism": "laplace", "bounds": [0, 1], "epsilon": 1.0, "delta": 1e-6}}},
             "takes no delta"),
            # bounds must be ordered
            ({"outputs": {"score": {"mechanism": "laplace", "bounds": [1, 0], "epsilon": 1.0}}}, "lower < upper"),
            # one accountant per model
            ({"outputs": {"a": {"mechanism": "laplace", "bounds": [0, 1], "epsilon": 0.1},
                          "b": {"mechanism": "gaussian", "bounds": [0, 1], "epsilon": 0.1, "delta": 1e-6}}},
             "same mechanism"),
            # periods align to UTC midnight
            ({"budget": {"epsilon": 5.0, "period_s": 7000}}, "divide a day"),
            # misspelt keys are errors, not defaults
            ({"budget": {"epsilon": 5.0, "perod_s": 60}}, "Extra inputs"),
            # YAML 1.1 strings are not numbers
            ({"budget": {"epsilon": "5"}}, "valid number"),
            # a gaussian model needs the budget's delta
            ({"outputs": {"score": {"mechanism": "gaussian", "bounds": [0, 1], "epsilon": 1.0, "delta": 1e-6}}},
             "budget.delta"),
        ],
    )
    def test_invalid_policies_are_refused(self, change: dict[str, Any], message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            policy(risk={**RISK_POLICY, **change})


class TestEmbeddedUpstream:
    @pytest.fixture
    async def embedded(self) -> AsyncIterator[EmbeddedUpstream]:
        upstream = EmbeddedUpstream(ROOT / "triton_repo")
        await upstream.start()
        yield upstream
        await upstream.close()

    async def test_real_model_answers_are_noised_charged_and_capped(
        self, embedded: EmbeddedUpstream, stage: DpNoiser, ledger: InMemoryBudgetLedger
    ) -> None:
        """The risk model through the stage: noisy scores on the grid, 10 rows a day, then 429."""

        async def upstream(ctx: RequestContext, req: InferRequest) -> InferResponse:
            return await embedded.infer(req, timeout_s=5.0)

        raw = await embedded.infer(risk_request(rows=4, value=10.0), timeout_s=5.0)
        resp = await call_stage(stage, ctx_for(), risk_request(rows=4, value=10.0), upstream)
        assert resp.outputs[0].shape == raw.outputs[0].shape == (4, 1)
        assert not np.array_equal(resp.outputs[0].data, raw.outputs[0].data)
        await call_stage(stage, ctx_for(), risk_request(rows=6, value=11.0), upstream)
        with pytest.raises(RateLimited):
            await call_stage(stage, ctx_for(), risk_request(value=12.0), upstream)
        assert await spent(ledger) == 5.0
