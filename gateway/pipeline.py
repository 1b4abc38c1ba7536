"""The request pipeline: ordered stages around one upstream call, per policy revision.

Transport-neutral: the HTTP front (and later the gRPC one) builds a
:class:`RequestContext`, then calls :meth:`Pipeline.admit` for every authenticated
surface and :meth:`Pipeline.infer` for inference. A ``Pipeline`` is frozen and belongs to
one policy revision; a reload builds a new one and swaps the reference, so a request in
flight finishes on the revision it started with.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog

from gateway.context import RequestContext, StageRecord
from gateway.errors import GatewayError
from gateway.kserve import InferRequest, InferResponse
from gateway.observability import tracing
from gateway.observability.metrics import Metrics
from gateway.stages.base import Mode, Stage

T = TypeVar("T")

log = structlog.get_logger("gateway.pipeline")

UpstreamCall = Callable[[RequestContext, InferRequest], Awaitable[InferResponse]]


@dataclass(frozen=True, slots=True)
class BoundStage:
    """A stage with its mode: the one place timing, counting and shadow mode happen."""

    stage: Stage
    mode: Mode

    @property
    def name(self) -> str:
        return self.stage.name

    async def run(self, ctx: RequestContext, metrics: Metrics, call: Awaitable[T], passthrough: T) -> T:
        if tracing.active():
            return await tracing.stage(self.name, lambda: self._run(ctx, metrics, call, passthrough), ctx.records)
        return await self._run(ctx, metrics, call, passthrough)

    async def _run(self, ctx: RequestContext, metrics: Metrics, call: Awaitable[T], passthrough: T) -> T:
        """Await one hook; in shadow mode a refusal is recorded and the input passes on."""
        start = time.perf_counter()
        try:
            result = await call
        except GatewayError as exc:
            elapsed = time.perf_counter() - start
            if self.mode is Mode.SHADOW:
                self._record(ctx, metrics, "shadow_denied", exc.reason, elapsed)
                return passthrough
            self._record(ctx, metrics, "denied", exc.reason, elapsed)
            raise
        elapsed = time.perf_counter() - start
        if self.mode is Mode.SHADOW:
            # SECURITY: shadow mode observes only; a rewrite would change what the client
            # or the model sees without the policy having enforced the stage.
            self._record(ctx, metrics, "shadow_allowed", None, elapsed)
            return passthrough
        self._record(ctx, metrics, "allowed", None, elapsed)
        return result

    def _record(self, ctx: RequestContext, metrics: Metrics, outcome: str, reason: str | None,
                elapsed: float) -> None:
        ctx.records.append(StageRecord(self.name, outcome, reason, elapsed))
        metrics.child(metrics.stage_decisions, self.name, outcome).inc()
        metrics.child(metrics.stage_duration, self.name).observe(elapsed)


class PreAuthentication(Protocol):
    """A check on the client address alone, before any credential is looked at."""

    async def admit(self, client_addr: str, ctx: RequestContext | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Pipeline:
    revision: str
    stages: tuple[BoundStage, ...]
    metrics: Metrics
    # SECURITY: token-guessing floods are refused per client address before verification.
    preauth: PreAuthentication | None = None

    def allows(self, ctx: RequestContext, permission: str) -> bool:
        """A gateway-level permission (``audit:read``, ``budget:admin``) by the stages that grant them."""
        return any(getattr(b.stage, "allows", None) is not None and b.stage.allows(ctx, permission)  # type: ignore[attr-defined]
                   for b in self.stages)

    def released_outputs(self, ctx: RequestContext) -> frozenset[str] | None:
        """The outputs of ``ctx.model`` the caller's grants release (None = no restriction)."""
        for bound in self.stages:
            released = getattr(bound.stage, "released_outputs", None)
            if released is not None:
                return released(ctx)  # type: ignore[no-any-return]
        return None

    async def admit(self, ctx: RequestContext) -> None:
        """Run every stage's ``on_call``: authentication and authorization of any call.

        A stage that decides kill switches (the flag stage) sets, for this call only, the
        stages to skip; the flag schema never lets authentication, authorization, PII
        masking or DP be switched off in production.
        """
        for bound in self.stages:
            if bound.name in ctx.skipped:
                continue
            if bound.stage.overrides("on_call"):
                await bound.run(ctx, self.metrics, bound.stage.on_call(ctx), None)
            switches = getattr(bound.stage, "kill_switched_stages", None)
            if switches is not None:
                ctx.skipped = frozenset(switches(ctx, [b.name for b in self.stages]))
                if ctx.skipped:
                    ctx.note("skipped_stages", sorted(ctx.skipped))

    async def complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        """Every stage's ``on_complete``, in reverse order; a failing hook is logged, never raised,
        so one stage's bookkeeping cannot turn an answered request into an error."""
        for bound in reversed(self.stages):
            if bound.stage.overrides("on_complete"):
                try:
                    await bound.stage.on_complete(ctx, error)
                except Exception:
                    log.exception("stage_on_complete_failed", stage=bound.name)
                    self.metrics.stage_decisions.labels(stage=bound.name, outcome="error").inc()

    async def infer(self, ctx: RequestContext, req: InferRequest, upstream: UpstreamCall) -> InferResponse:
        """Request stages in order, the upstream call, then response stages in reverse."""
        for bound in self.stages:
            if bound.stage.overrides("on_request") and bound.name not in ctx.skipped:
                req = await bound.run(ctx, self.metrics, bound.stage.on_request(ctx, req), req)
        resp = await upstream(ctx, req)
        for bound in reversed(self.stages):
            if bound.stage.overrides("on_response") and bound.name not in ctx.skipped:
                resp = await bound.run(ctx, self.metrics, bound.stage.on_response(ctx, resp), resp)
        return resp
