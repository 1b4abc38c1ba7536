"""Driving the dp_noise stage without a gateway: shared by its unit tests (tests/stages)
and the Redis-ledger tests (tests/state), so both run the stage exactly as the service does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import numpy as np

from gateway.context import Action, Principal, RequestContext
from gateway.errors import UpstreamUnavailable
from gateway.kserve import InferRequest, InferResponse, RequestedOutput, Tensor
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.stages.base import Mode
from gateway.stages.dp_noise import DpNoiser
from privacy.dp.ledger import BudgetLedger, LedgerUnavailable, Period, Reservation

# 2026-12-02T23:00:00Z: one hour before a UTC midnight, so a period roll-over is one clock step away.
T0 = datetime(2026, 12, 2, 23, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 12, 3, tzinfo=UTC).timestamp()

Upstream = Callable[[RequestContext, InferRequest], Awaitable[InferResponse]]


class Clock:
    """A clock the test moves by hand (no sleeps)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ctx_for(tenant: str = "alpha", subject: str = "u1", model: str = "risk") -> RequestContext:
    return RequestContext(
        request_id="r", revision="test", action=Action.INFER, transport="test", client_addr="127.0.0.1",
        model=model,
        principal=Principal(subject=subject, tenant=tenant, roles=frozenset({"predictor"}), issuer="test",
                            credential_id="c"),
    )


def risk_request(rows: int = 1, value: float = 1.0, outputs: tuple[str, ...] = (), version: str = "") -> InferRequest:
    data = np.full((rows, 30), value, dtype=np.float32)
    return InferRequest(model="risk", version=version, inputs=[Tensor("features", "FP32", (rows, 30), data)],
                        outputs=[RequestedOutput(o) for o in outputs])


class FakeUpstream:
    """Answers ``score`` = ``value`` per row (plus an unlisted ``logits`` output); counts calls."""

    def __init__(self, value: float = 0.25, *, extra: bool = True, fail: bool = False) -> None:
        self.value, self.extra, self.fail, self.calls = value, extra, fail, 0
        self.version = "1"

    async def __call__(self, ctx: RequestContext, req: InferRequest) -> InferResponse:
        self.calls += 1
        if self.fail:
            raise UpstreamUnavailable(reason="upstream_5xx")
        rows = req.inputs[0].shape[0]
        outputs = [Tensor("score", "FP32", (rows, 1), np.full((rows, 1), self.value, dtype=np.float32))]
        if self.extra:
            outputs.append(Tensor("logits", "FP32", (rows, 1), np.full((rows, 1), 7.0, dtype=np.float32)))
        return InferResponse(model_name=req.model, model_version=self.version, outputs=outputs)


async def call_stage(stage: DpNoiser, ctx: RequestContext, req: InferRequest, upstream: Upstream) -> InferResponse:
    """One inference call as the service runs it: a one-stage pipeline, then finalize in finally
    (which is where a failed call is refunded)."""
    pipeline = Pipeline(revision="test", stages=(BoundStage(stage, Mode.ENFORCE),), metrics=Metrics())
    ok = False
    try:
        resp = await pipeline.infer(ctx, req, upstream)
        ok = True
        return resp
    finally:
        await stage.finalize(ctx, ok)


async def spend_once(ledger: BudgetLedger, key: str, period: Period, costs: tuple[float, ...],
                     budgets: tuple[float, ...]) -> str:
    """One request against a ledger, as the stage spends: ``ok`` (reserved and committed),
    ``429`` (refused) or ``503`` (ledger unavailable)."""
    try:
        result = await ledger.reserve(key, period, costs, budgets)
    except LedgerUnavailable:
        return "503"
    if isinstance(result, Reservation):
        await ledger.commit(result)
        return "ok"
    return "429"
