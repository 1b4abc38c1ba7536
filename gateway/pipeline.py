"""The request pipeline: ordered stages around one upstream call, per policy revision.

Transport-neutral: the HTTP front (and later the gRPC one) builds a
:class:`RequestContext`, then calls :meth:`Pipeline.admit` for every authenticated
surface and :meth:`Pipeline.infer` for inference. A ``Pipeline`` is frozen and belongs to
one policy revision; a reload builds a new one and swaps the reference, so a request in
flight finishes on the revision it started with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter
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
_new_tuple = tuple.__new__

UpstreamCall = Callable[[RequestContext, InferRequest], Awaitable[InferResponse]]
# The flag stage's hook: the stages to skip for this call, given every stage name in order.
KillSwitches = Callable[[RequestContext, Iterable[str]], Iterable[str]]


@dataclass(frozen=True, slots=True)
class BoundStage:
    """A stage with its mode: the one place timing, counting and shadow mode happen."""

    stage: Stage
    mode: Mode
    # Read once at bind time (stages are frozen per revision): the hot path reads plain fields.
    name: str = field(init=False)
    shadow: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.stage.name)
        object.__setattr__(self, "shadow", self.mode is Mode.SHADOW)

    def run(self, ctx: RequestContext, meter: StageMeter, call: Awaitable[T], passthrough: T,
            traced: bool = False) -> Awaitable[T]:
        """The hook's awaitable, wrapped in a span when the call is traced (not a coroutine
        itself: one frame less per hook)."""
        if traced:
            return tracing.stage(self.name, lambda: self._run(ctx, meter, call, passthrough), ctx.records)
        return self._run(ctx, meter, call, passthrough)

    async def _run(self, ctx: RequestContext, meter: StageMeter, call: Awaitable[T], passthrough: T) -> T:
        """Await one hook; in shadow mode a refusal is recorded and the input passes on."""
        start = perf_counter()
        try:
            result = await call
        except GatewayError as exc:
            elapsed = perf_counter() - start
            if self.shadow:
                meter.record(ctx.records, "shadow_denied", exc.reason, elapsed)
                return passthrough
            meter.record(ctx.records, "denied", exc.reason, elapsed)
            raise
        elapsed = perf_counter() - start
        if self.shadow:
            # SECURITY: shadow mode observes only; a rewrite would change what the client
            # or the model sees without the policy having enforced the stage.
            meter.record(ctx.records, "shadow_allowed", None, elapsed)
            return passthrough
        meter.record(ctx.records, "allowed", None, elapsed)
        return result


class StageMeter:
    """One stage's record and metric children for one pipeline's ``Metrics``.

    Children are resolved on a stage's first use of each outcome (not at build time, so
    /metrics shows exactly the series it showed before); afterwards a record is a dict
    hit, a counter add and a histogram add (loop_metrics.py).
    """

    __slots__ = ("name", "_metrics", "_incs", "_observe")

    def __init__(self, name: str, metrics: Metrics) -> None:
        self.name = name
        self._metrics = metrics
        self._incs: dict[str, Callable[[], None]] = {}
        self._observe: Callable[[float], None] | None = None

    def record(self, records: list[StageRecord], outcome: str, reason: str | None, elapsed: float) -> None:
        # The same record as StageRecord(...), without its Python-level __new__ (~0.3 µs a hook).
        records.append(_new_tuple(StageRecord, (self.name, outcome, reason, elapsed)))
        inc = self._incs.get(outcome)
        if inc is None:
            m = self._metrics
            inc = self._incs[outcome] = m.child(m.stage_decisions, self.name, outcome).inc
        inc()
        observe = self._observe
        if observe is None:
            m = self._metrics
            observe = self._observe = m.child(m.stage_duration, self.name).observe
        observe(elapsed)


class PreAuthentication(Protocol):
    """A check on the client address alone, before any credential is looked at."""

    async def admit(self, client_addr: str, ctx: RequestContext | None = None) -> None: ...


_Hooked = tuple[tuple[BoundStage, StageMeter], ...]


@dataclass(frozen=True, slots=True)
class Pipeline:
    revision: str
    stages: tuple[BoundStage, ...]
    metrics: Metrics
    # SECURITY: token-guessing floods are refused per client address before verification.
    preauth: PreAuthentication | None = None
    # Built once per revision from the stages: which hooks each overrides, in the order they
    # run, with its meter; the per-request loops never ask a stage what it implements.
    _on_call: tuple[tuple[BoundStage, StageMeter, bool, KillSwitches | None], ...] = field(
        init=False, repr=False, compare=False)
    _on_request: _Hooked = field(init=False, repr=False, compare=False)
    _on_response: _Hooked = field(init=False, repr=False, compare=False)
    _on_complete: tuple[BoundStage, ...] = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        meters = [StageMeter(b.name, self.metrics) for b in self.stages]
        pairs = list(zip(self.stages, meters, strict=True))
        on_call = tuple((b, m, b.stage.overrides("on_call"), getattr(b.stage, "kill_switched_stages", None))
                        for b, m in pairs)
        object.__setattr__(self, "_on_call", on_call)
        object.__setattr__(self, "_on_request", tuple((b, m) for b, m in pairs if b.stage.overrides("on_request")))
        object.__setattr__(self, "_on_response",
                           tuple((b, m) for b, m in reversed(pairs) if b.stage.overrides("on_response")))
        object.__setattr__(self, "_on_complete",
                           tuple(b for b in reversed(self.stages) if b.stage.overrides("on_complete")))
        object.__setattr__(self, "_names", tuple(b.name for b in self.stages))

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

    def visible_versions(self, ctx: RequestContext) -> frozenset[str] | None:
        """Versions of ``ctx.model`` the caller may learn of: what every restricting stage
        (model exposure, version-scoped grants) allows; None = no stage restricts."""
        visible: frozenset[str] | None = None
        for bound in self.stages:
            restrict = getattr(bound.stage, "visible_versions", None)
            found = restrict(ctx) if restrict is not None else None
            if found is not None:
                visible = found if visible is None else visible & found
        return visible

    async def admit(self, ctx: RequestContext) -> None:
        """Run every stage's ``on_call``: authentication and authorization of any call.

        A stage that decides kill switches (the flag stage) sets, for this call only, the
        stages to skip; the flag schema never lets authentication, authorization, PII
        masking or DP be switched off in production.
        """
        traced = tracing.active()
        for bound, meter, calls, switches in self._on_call:
            if ctx.skipped and bound.name in ctx.skipped:
                continue
            if calls:
                await bound.run(ctx, meter, bound.stage.on_call(ctx), None, traced)
            if switches is not None:
                ctx.skipped = frozenset(switches(ctx, self._names))
                if ctx.skipped:
                    ctx.note("skipped_stages", sorted(ctx.skipped))

    async def complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        """Every stage's ``on_complete``, in reverse order; a failing hook is logged, never raised,
        so one stage's bookkeeping cannot turn an answered request into an error."""
        for bound in self._on_complete:
            try:
                await bound.stage.on_complete(ctx, error)
            except Exception:
                log.exception("stage_on_complete_failed", stage=bound.name)
                self.metrics.stage_decisions.labels(stage=bound.name, outcome="error").inc()

    async def infer(self, ctx: RequestContext, req: InferRequest, upstream: UpstreamCall) -> InferResponse:
        """Request stages in order, the upstream call, then response stages in reverse."""
        traced = tracing.active()
        for bound, meter in self._on_request:
            if not ctx.skipped or bound.name not in ctx.skipped:
                req = await bound.run(ctx, meter, bound.stage.on_request(ctx, req), req, traced)
        resp = await upstream(ctx, req)
        for bound, meter in self._on_response:
            if not ctx.skipped or bound.name not in ctx.skipped:
                resp = await bound.run(ctx, meter, bound.stage.on_response(ctx, resp), resp, traced)
        return resp
