"""The pipeline: order, reverse order on the way out, shadow mode, records and metrics."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from gateway.context import Action, RequestContext
from gateway.errors import InputRejected, PermissionDenied
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.stages.base import Mode, Stage


class Tracer(Stage):
    name: ClassVar[str] = "tracer"

    def __init__(self, label: str, trail: list[str], *, refuse: bool = False) -> None:
        self.label = label
        self.trail = trail
        self.refuse = refuse

    async def on_call(self, ctx: RequestContext) -> None:
        self.trail.append(f"call:{self.label}")
        if self.refuse:
            raise PermissionDenied(reason=f"denied_by_{self.label}")

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        self.trail.append(f"req:{self.label}")
        return InferRequest(req.model, req.version, [], id=f"rewritten-by-{self.label}")

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        self.trail.append(f"resp:{self.label}")
        if self.refuse:
            raise InputRejected(reason="refused_response")
        return InferResponse(resp.model_name, resp.model_version, [], id=f"rewritten-by-{self.label}")


class OnlyCall(Stage):
    name: ClassVar[str] = "only_call"

    async def on_call(self, ctx: RequestContext) -> None:
        return None


def _ctx() -> RequestContext:
    return RequestContext(request_id="r1", revision="rev", action=Action.INFER, transport="test", client_addr="")


def _req() -> InferRequest:
    return InferRequest("m", "", [Tensor("x", "FP32", (1,), np.zeros(1, np.float32))], id="orig")


async def test_request_stages_in_order_response_stages_reversed() -> None:
    trail: list[str] = []
    pipe = Pipeline("rev", (BoundStage(Tracer("a", trail), Mode.ENFORCE),
                            BoundStage(Tracer("b", trail), Mode.ENFORCE)), Metrics())
    ctx = _ctx()
    await pipe.admit(ctx)

    async def upstream(c: RequestContext, r: InferRequest) -> InferResponse:
        trail.append(f"upstream:{r.id}")
        return InferResponse("m", "1", [], id=r.id)

    resp = await pipe.infer(ctx, _req(), upstream)
    assert trail == ["call:a", "call:b", "req:a", "req:b", "upstream:rewritten-by-b", "resp:b", "resp:a"]
    assert resp.id == "rewritten-by-a"
    assert [r.outcome for r in ctx.records] == ["allowed"] * 6


async def test_enforced_refusal_stops_and_is_recorded() -> None:
    trail: list[str] = []
    metrics = Metrics()
    pipe = Pipeline("rev", (BoundStage(Tracer("a", trail, refuse=True), Mode.ENFORCE),
                            BoundStage(Tracer("b", trail), Mode.ENFORCE)), metrics)
    ctx = _ctx()
    with pytest.raises(PermissionDenied):
        await pipe.admit(ctx)
    assert trail == ["call:a"]
    assert ctx.records[0].outcome == "denied"
    assert ctx.records[0].reason == "denied_by_a"
    assert metrics.registry.get_sample_value("gateway_stage_decisions_total",
                                             {"stage": "tracer", "outcome": "denied"}) == 1


async def test_shadow_stage_never_blocks_and_never_rewrites() -> None:
    trail: list[str] = []
    pipe = Pipeline("rev", (BoundStage(Tracer("s", trail, refuse=True), Mode.SHADOW),), Metrics())
    ctx = _ctx()
    await pipe.admit(ctx)  # would deny in enforce mode

    async def upstream(c: RequestContext, r: InferRequest) -> InferResponse:
        assert r.id == "orig"  # the shadow rewrite did not reach the upstream
        return InferResponse("m", "1", [], id="up")

    resp = await pipe.infer(ctx, _req(), upstream)
    assert resp.id == "up"
    assert [r.outcome for r in ctx.records] == ["shadow_denied", "shadow_allowed", "shadow_denied"]


async def test_only_overridden_hooks_run() -> None:
    stage = OnlyCall()
    assert stage.overrides("on_call")
    assert not stage.overrides("on_request")
    pipe = Pipeline("rev", (BoundStage(stage, Mode.ENFORCE),), Metrics())
    ctx = _ctx()

    async def upstream(c: RequestContext, r: InferRequest) -> InferResponse:
        return InferResponse("m", "1", [])

    await pipe.infer(ctx, _req(), upstream)
    assert ctx.records == []


class Completer(Stage):
    name: ClassVar[str] = "completer"

    def __init__(self, trail: list[str], *, explode: bool = False) -> None:
        self.trail = trail
        self.explode = explode

    async def on_complete(self, ctx: RequestContext, error: object) -> None:
        self.trail.append(f"complete:{type(error).__name__}")
        if self.explode:
            raise RuntimeError("bookkeeping bug")


async def test_on_complete_runs_in_reverse_and_never_raises() -> None:
    trail: list[str] = []
    metrics = Metrics()
    pipe = Pipeline("rev", (BoundStage(Completer(trail), Mode.ENFORCE),
                            BoundStage(Completer(trail, explode=True), Mode.ENFORCE)), metrics)
    await pipe.complete(_ctx(), PermissionDenied())
    assert trail == ["complete:PermissionDenied", "complete:PermissionDenied"]
    assert metrics.registry.get_sample_value("gateway_stage_decisions_total",
                                             {"stage": "completer", "outcome": "error"}) == 1


class CountingOverrides(OnlyCall):
    asked: ClassVar[list[str]] = []

    def overrides(self, hook: str) -> bool:
        self.asked.append(hook)
        return super().overrides(hook)


async def test_hooks_are_looked_up_once_per_revision_not_per_request() -> None:
    pipe = Pipeline("rev", (BoundStage(CountingOverrides(), Mode.ENFORCE),), Metrics())
    asked_at_build = sorted(CountingOverrides.asked)
    assert asked_at_build == ["on_call", "on_complete", "on_request", "on_response"]

    async def upstream(c: RequestContext, r: InferRequest) -> InferResponse:
        return InferResponse("m", "1", [])

    for _ in range(3):
        ctx = _ctx()
        await pipe.admit(ctx)
        await pipe.infer(ctx, _req(), upstream)
        await pipe.complete(ctx, None)
        assert [(r.stage, r.outcome) for r in ctx.records] == [("only_call", "allowed")]
    assert sorted(CountingOverrides.asked) == asked_at_build
