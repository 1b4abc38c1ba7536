"""Output differential privacy: noise every released row and charge the tenant for it.

Runs last among the request stages (it needs the verified tenant, and only requests that
passed every other check may spend budget) and therefore first among the response
stages, so PII masking and the rest only ever see noised values.

- ``on_request`` — for a model in ``policies/privacy.yaml``: refuses any requested output
  the policy does not release, then **reserves** the cost of the request's rows (batch
  dimension of the inputs) for the principal's tenant and model in the current period;
  budget gone → 429 ``dp_budget_exhausted`` with ``Retry-After`` to the next period. An
  exact repeat of an earlier request of the same tenant is instead answered from a
  bounded cache of the noisy answer at no charge (post-processing of an answer already
  paid for); any other variation, however small, is charged.
- ``on_response`` — clamps and noises every released output (OpenDP, on an exact grid,
  :mod:`privacy.dp.mechanisms`), drops any output the policy does not release,
  **commits** the reservation, and notes ``dp`` (ε, rows) for the audit record and
  ``dp_budget_remaining`` for the ``X-Privacy-Budget-Remaining`` header.
- ``finalize`` — the service calls it in ``finally`` for every inference call: a
  reservation that was not committed (upstream failure, a later stage refused, the
  client went away) is **refunded**, because no noisy answer left. A committed answer is
  never refunded.

Charging rule (catalogue DP-10): refused before the upstream → no charge; upstream or
later failure before the answer → reservation refunded; success → charged once, ε of
every answered row; a retry with the same request id → charged again unless it is a
byte-identical repeat answered from the cache. Accounting: Laplace → basic composition,
Gaussian → RDP at fixed orders (:mod:`privacy.dp.accounting`), per (tenant, model, period).

What this does and does not protect (``notes/PRIVACY.md`` §8): the noise bounds what the
*released answers* reveal, per the policy's privacy unit, and only up to the budget per
period; averaging more answers is what the budget caps. It is not training-time DP and
adds no robustness against evasion.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Final, Literal, Protocol
from urllib.parse import quote

import numpy as np
import structlog
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from gateway.context import RequestContext
from gateway.errors import (
    DependencyUnavailable,
    GatewayError,
    InputRejected,
    InternalError,
    PayloadTooLarge,
    RateLimited,
    UpstreamBadResponse,
)
from gateway.kserve import DTYPES, FLOAT_TYPES, InferRequest, InferResponse, Tensor
from gateway.policy.model import StrictModel
from gateway.stages.base import Stage
from privacy.dp.accounting import RDP_ORDERS, Accountant, BasicCompositionAccountant, RdpAccountant
from privacy.dp.ledger import (
    DAY_S,
    BudgetLedger,
    Clock,
    LedgerUnavailable,
    Period,
    PeriodScheme,
    Refused,
    Reservation,
    fits,
)
from privacy.dp.mechanisms import GridMechanism, NoiseSpec

log = structlog.get_logger("gateway.dp_noise")

# Context notes: "dp" and "dp_budget_remaining" are for the audit record and the header;
# the leading underscore marks per-request working state that is never audited.
NOTE_DP: Final = "dp"
NOTE_REMAINING: Final = "dp_budget_remaining"
NOTE_STATE: Final = "_dp_state"
HEADER_REMAINING: Final = "X-Privacy-Budget-Remaining"
LEDGER_RETRY_AFTER_S: Final = 1.0
MAX_MECHANISMS_PER_OUTPUT: Final = 8  # (width, datatype) combinations kept per output

# -- policy (policies/privacy.yaml) ----------------------------------------------------


Number = StrictFloat | StrictInt
PositiveEpsilon = Annotated[Number, Field(gt=0, le=1000)]
Delta = Annotated[StrictFloat, Field(gt=0, lt=1e-2)]


class DpOutputPolicy(StrictModel):
    """How one output is released: clamp range, mechanism and cost per answered row."""

    mechanism: Literal["laplace", "gaussian"] = Field(
        description="laplace: pure ε-DP, basic composition; gaussian: (ε, δ) per row, RDP accounting.",
    )
    bounds: tuple[Number, Number] = Field(
        description="[lower, upper]: every element is clamped to it before noise; this fixes the sensitivity "
                    "(L1 width*(upper-lower) for Laplace, L2 sqrt(width)*(upper-lower) for Gaussian).",
    )
    epsilon: PositiveEpsilon = Field(description="ε charged per answered row of this output.")
    delta: Delta | None = Field(None, description="Gaussian only: the δ at which one row is (ε, δ)-DP.")
    width: Annotated[StrictInt, Field(gt=0, le=1_000_000)] | None = Field(
        None, description="Elements per row. Optional; when set, a response of another width is refused "
                          "and the noise is prepared at load time.",
    )

    @model_validator(mode="after")
    def _check(self) -> DpOutputPolicy:
        lower, upper = (float(v) for v in self.bounds)
        if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
            raise ValueError("bounds must be two finite numbers with lower < upper")
        if self.mechanism == "gaussian" and self.delta is None:
            raise ValueError("a gaussian output needs delta")
        if self.mechanism == "laplace" and self.delta is not None:
            raise ValueError("a laplace output takes no delta (it is pure ε-DP)")
        return self

    def spec(self) -> NoiseSpec:
        return NoiseSpec(self.mechanism, float(self.bounds[0]), float(self.bounds[1]), float(self.epsilon),
                         self.delta)


class DpBudgetPolicy(StrictModel):
    """A tenant's budget on one model per period."""

    epsilon: PositiveEpsilon = Field(description="Total ε per period.")
    delta: Delta | None = Field(None, description="δ of the (ε, δ) guarantee; required for gaussian outputs.")
    period_s: Annotated[StrictInt, Field(ge=60, le=366 * DAY_S)] = Field(
        DAY_S, description="Period length in seconds, aligned to UTC midnight; must divide a day or be whole "
                           "days. Default: one UTC day.",
    )

    @model_validator(mode="after")
    def _period(self) -> DpBudgetPolicy:
        PeriodScheme(self.period_s)  # raises ValueError when misaligned
        return self


class DpModelPolicy(StrictModel):
    """One DP-protected model: what its outputs cost and what a tenant may spend."""

    privacy_unit: StrictStr = Field(
        min_length=10, description="What one unit of privacy protects, in words (e.g. one patient's record).",
    )
    outputs: dict[StrictStr, DpOutputPolicy] = Field(
        min_length=1, description="Released outputs; any other output is refused or dropped.",
    )
    budget: DpBudgetPolicy
    tenants: dict[StrictStr, DpBudgetPolicy] = Field(
        default_factory=dict, description="Per-tenant budgets that replace `budget`.",
    )
    batched: StrictBool = Field(True, description="The first dimension is the batch: each element of it is a row.")
    repeat_cache_entries: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = Field(
        0, description="Byte-identical repeats answered from a cache of noisy answers at no charge (0: off).",
    )
    timing_jitter_ms: Annotated[Number, Field(ge=0, le=1000)] = Field(
        1.0, description="Random delay (uniform in [0, this]) added after noising: the exact sampler's run time "
                         "grows with the noise's magnitude, a timing side channel (Jin et al. 2022). 0: off.",
    )

    @model_validator(mode="after")
    def _check(self) -> DpModelPolicy:
        mechanisms = {o.mechanism for o in self.outputs.values()}
        if len(mechanisms) != 1:
            raise ValueError("all outputs of a model must use the same mechanism (one accountant per model)")
        for name, budget in [("budget", self.budget), *((f"tenants.{t}", b) for t, b in self.tenants.items())]:
            accountant = accountant_for(self, budget, tuple(self.outputs))
            one_row = accountant.charge(1)
            # SECURITY: a budget that cannot pay for a single row is a misconfiguration, not
            # a model nobody may query: refuse the policy.
            if not _fits_alone(one_row, accountant.limit()):
                raise ValueError(
                    f"{name}: epsilon {budget.epsilon} is smaller than one query's cost "
                    f"({accountant.request_epsilon(1):.6g} for one row of every output)"
                )
        return self


class DpPolicy(StrictModel):
    """``privacy.yaml``: output differential privacy per model. Models not listed get no noise."""

    models: dict[StrictStr, DpModelPolicy] = Field(default_factory=dict)


def _fits_alone(amount: Sequence[float], limit: Sequence[float]) -> bool:
    return fits([0.0] * len(amount), amount, limit)


def accountant_for(model: DpModelPolicy, budget: DpBudgetPolicy, outputs: Sequence[str]) -> Accountant:
    """The accountant charging one row of ``outputs`` against ``budget``."""
    chosen = [model.outputs[o] for o in outputs]
    if chosen[0].mechanism == "laplace":
        return BasicCompositionAccountant(epsilon_per_row=math.fsum(float(o.epsilon) for o in chosen),
                                          budget_epsilon=float(budget.epsilon))
    if budget.delta is None:
        raise ValueError("a model with gaussian outputs needs budget.delta")
    rho = math.fsum(o.spec().rho_per_row() for o in chosen)
    return RdpAccountant(rho_per_row=rho, budget_epsilon=float(budget.epsilon), budget_delta=budget.delta,
                         orders=RDP_ORDERS)


# -- compiled form ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Budget:
    scheme: PeriodScheme
    epsilon: float
    delta: float | None
    limit: tuple[float, ...]


@dataclass(slots=True)
class _Output:
    policy: DpOutputPolicy
    spec: NoiseSpec
    fast_ffi: bool
    mechanisms: dict[tuple[int, str], GridMechanism] = field(default_factory=dict)

    def mechanism(self, width: int, datatype: str) -> GridMechanism:
        key = (width, datatype)
        found = self.mechanisms.get(key)
        if found is None:
            found = GridMechanism(self.spec, width, datatype, fast_ffi=self.fast_ffi)
            if len(self.mechanisms) < MAX_MECHANISMS_PER_OUTPUT:
                self.mechanisms[key] = found
        return found


@dataclass(frozen=True, slots=True)
class _CachedAnswer:
    model_version: str
    outputs: tuple[Tensor, ...]


class RepeatCache:
    """Bounded LRU of noisy answers by (tenant, model, version, SHA-256 of the canonical request).

    Why it is safe: returning an answer that was already released and charged is
    post-processing. Why exact bytes: a variation of any bit is a new query and must be
    charged, or an attacker would average answers to near-identical inputs for free.
    """

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._data: OrderedDict[bytes, _CachedAnswer] = OrderedDict()

    def get(self, key: bytes) -> _CachedAnswer | None:
        found = self._data.get(key)
        if found is not None:
            self._data.move_to_end(key)
        return found

    def put(self, key: bytes, answer: _CachedAnswer) -> None:
        self._data[key] = answer
        self._data.move_to_end(key)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

    def drop(self, key: bytes) -> None:
        self._data.pop(key, None)


@dataclass(frozen=True, slots=True)
class _Model:
    name: str
    policy: DpModelPolicy
    outputs: Mapping[str, _Output]
    default_budget: _Budget
    tenant_budgets: Mapping[str, _Budget]
    # (budget owner, outputs) -> accountant; filled lazily for subsets of the outputs
    accountants: dict[tuple[str, frozenset[str]], Accountant]
    cache: RepeatCache | None
    jitter_s: float

    def budget(self, tenant: str) -> tuple[str, _Budget]:
        if tenant in self.tenant_budgets:
            return tenant, self.tenant_budgets[tenant]
        return "", self.default_budget

    def accountant(self, tenant: str, outputs: frozenset[str]) -> Accountant:
        owner, budget = self.budget(tenant)
        found = self.accountants.get((owner, outputs))
        if found is None:
            policy = self.policy.tenants.get(owner, self.policy.budget) if owner else self.policy.budget
            found = accountant_for(self.policy, policy, sorted(outputs))
            self.accountants[(owner, outputs)] = found
        return found


@dataclass(slots=True)
class _DpState:
    """One request's working state between the hooks (in ``ctx.notes[NOTE_STATE]``)."""

    model: _Model
    tenant: str
    rows: int
    outputs: frozenset[str]
    accountant: Accountant
    ledger_key: str
    cache_key: bytes | None = None
    cached: _CachedAnswer | None = None
    reservation: Reservation | None = None
    committed: bool = False


@lru_cache(maxsize=4096)
def ledger_key(tenant: str, model: str) -> str:
    """The budget account of a (tenant, model); both parts escaped so none can forge another."""
    return f"dp:{quote(tenant, safe='')}:{quote(model, safe='')}"


def _compile_budget(model: DpModelPolicy, budget: DpBudgetPolicy) -> _Budget:
    accountant = accountant_for(model, budget, tuple(model.outputs))
    return _Budget(PeriodScheme(budget.period_s), float(budget.epsilon), budget.delta, accountant.limit())


class DpMetrics(Protocol):
    """Where spending is counted (``gateway.observability.metrics.Metrics``); tenants never become labels."""

    def dp_spent(self, model: str, epsilon: float) -> None: ...
    def dp_remaining(self, model: str, tenant: str, remaining: float, period_end_s: float) -> None: ...
    def dp_budgets_configured(self, full_epsilon: Mapping[str, float]) -> None: ...


def build_dp_stage(
    policy: DpPolicy, ledger: BudgetLedger, clock: Clock = time.time, *, fast_ffi: bool = True,
    metrics: DpMetrics | None = None,
) -> DpNoiser:
    """Compile ``privacy.yaml`` into the stage. ``clock`` must be the ledger's clock
    (periods come from one clock). Raises ValueError for a policy that cannot be served."""
    models: dict[str, _Model] = {}
    for name, model in policy.models.items():
        outputs = {o: _Output(p, p.spec(), fast_ffi) for o, p in model.outputs.items()}
        for oname, out in outputs.items():
            # A policy whose noise no float grid can carry (FP64, the widest) is refused here
            # (reload and `policy check` report it), never by OpenDP on a request.
            try:
                GridMechanism(out.spec, out.policy.width or 1, "FP64", fast_ffi=False)
            except ValueError as exc:
                raise ValueError(f"models.{name}.outputs.{oname}: {exc}") from exc
            if out.policy.width is not None:
                with contextlib.suppress(ValueError):  # beyond FP32's range: a 502 if ever answered so
                    out.mechanism(out.policy.width, "FP32")  # build OpenDP measurements now, not on a request
        accountants: dict[tuple[str, frozenset[str]], Accountant] = {}
        everything = frozenset(model.outputs)
        for owner, budget in [("", model.budget), *model.tenants.items()]:
            accountants[(owner, everything)] = accountant_for(model, budget, sorted(everything))
        models[name] = _Model(
            name=name,
            policy=model,
            outputs=outputs,
            default_budget=_compile_budget(model, model.budget),
            tenant_budgets={t: _compile_budget(model, b) for t, b in model.tenants.items()},
            accountants=accountants,
            cache=RepeatCache(model.repeat_cache_entries) if model.repeat_cache_entries else None,
            jitter_s=float(model.timing_jitter_ms) / 1000.0,
        )
    if metrics is not None:
        metrics.dp_budgets_configured({name: float(model.budget.epsilon) for name, model in policy.models.items()})
    return DpNoiser(models=models, ledger=ledger, clock=clock, metrics=metrics)


# -- the stage --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DpNoiser(Stage):
    """Noise and budget for the models of ``privacy.yaml``; other models pass untouched."""

    name: ClassVar[str] = "dp_noise"
    models: Mapping[str, _Model]
    ledger: BudgetLedger
    clock: Clock
    metrics: DpMetrics | None = None
    # The timing-jitter delay; tests inject a recorder to measure the jitter without waiting.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        model = self.models.get(req.model)
        if model is None:
            return req
        # SECURITY: the account comes from the verified principal, never from a header,
        # parameter or claim the client chose (catalogue DP-03).
        tenant = ctx.require_principal().tenant
        outputs = self._released_outputs(model, req)
        rows = _rows(req, model.policy.batched)
        accountant = model.accountant(tenant, outputs)
        state = _DpState(model=model, tenant=tenant, rows=rows, outputs=outputs, accountant=accountant,
                         ledger_key=ledger_key(tenant, model.name))
        ctx.notes[NOTE_STATE] = state
        if model.cache is not None:
            state.cache_key = _cache_key(tenant, req, outputs)
            state.cached = model.cache.get(state.cache_key)
            if state.cached is not None:
                return req  # answered from the cache in on_response, at no charge
        await self._reserve(ctx, state)
        return req

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        state = ctx.notes.get(NOTE_STATE)
        if not isinstance(state, _DpState):
            if resp.model_name in self.models:
                # SECURITY: never release a DP model's raw output because on_request was skipped.
                raise InternalError(reason="dp_state_missing")
            return resp
        model = state.model
        if state.cached is not None and state.cache_key is not None and model.cache is not None:
            if state.cached.model_version == resp.model_version:
                ctx.note(NOTE_DP, self._note(state, epsilon=0.0, cached=True))
                await self._note_remaining_from_ledger(ctx, state)
                return InferResponse(model_name=resp.model_name, model_version=resp.model_version,
                                     outputs=[_copy(t) for t in state.cached.outputs], id=resp.id)
            # The model changed under a versionless request: a new answer, charged now.
            model.cache.drop(state.cache_key)
            state.cached = None
            await self._reserve(ctx, state)
        reservation = state.reservation
        if reservation is None and state.rows > 0:
            raise InternalError(reason="dp_state_missing")
        names = [t.name for t in resp.outputs]
        if len(set(names)) != len(names):
            # SECURITY: two copies of an output would be two noisy answers for one charge.
            raise UpstreamBadResponse("the model answered an output twice", reason="dp_output_invalid")
        # SECURITY: outputs the policy does not release (or that were not charged) are dropped.
        released = [self._noised(model, state, t) for t in resp.outputs if t.name in state.outputs]
        if reservation is not None:
            try:
                await self.ledger.commit(reservation)
            except LedgerUnavailable as exc:
                # Fail closed: no answer whose charge is not recorded.
                raise DependencyUnavailable("privacy budget ledger unavailable", reason="dp_ledger_unavailable",
                                            retry_after_s=LEDGER_RETRY_AFTER_S) from exc
        state.committed = True
        if reservation is not None and self.metrics is not None:
            self.metrics.dp_spent(model.name, state.accountant.request_epsilon(state.rows))
        if model.jitter_s > 0:
            # SECURITY: OpenDP's exact sampler loops longer for larger noise, so the response
            # time would hint at |noise| and with it at the true value; a random delay far
            # wider than that signal drowns it (in-process: r 0.3 → below 0.05).
            await self.sleep(model.jitter_s * secrets.randbelow(1 << 20) / (1 << 20))
        if state.cache_key is not None and model.cache is not None:
            model.cache.put(state.cache_key, _CachedAnswer(resp.model_version, tuple(_copy(t) for t in released)))
        ctx.note(NOTE_DP, self._note(state, epsilon=state.accountant.request_epsilon(state.rows)))
        if reservation is not None:
            self._note_remaining(ctx, state, reservation.used_after)
        return InferResponse(model_name=resp.model_name, model_version=resp.model_version, outputs=released,
                             id=resp.id)

    async def on_complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        """The pipeline's completion hook: refund whatever was reserved and not released."""
        await self.finalize(ctx, error is None)

    async def finalize(self, ctx: RequestContext, ok: bool) -> None:
        """Refund a reservation no answer was released for. Call once per inference call in
        ``finally``, before the audit record is written; ``ok`` is informational: any
        reservation not committed by ``on_response`` is refunded, whatever the outcome."""
        state = ctx.notes.get(NOTE_STATE)
        if not isinstance(state, _DpState) or state.reservation is None or state.committed:
            return
        reservation, state.reservation = state.reservation, None
        try:
            await self.ledger.refund(reservation)
        except LedgerUnavailable:
            # The reservation stays counted until the period ends: under-use, never overspend.
            log.warning("dp_refund_failed", model=state.model.name)
            ctx.note(NOTE_DP, self._note(state, epsilon=state.accountant.request_epsilon(state.rows),
                                         period=reservation.period, refund_failed=True))
            return
        ctx.note(NOTE_DP, self._note(state, epsilon=0.0, period=reservation.period, refunded=True, ok=ok))

    # ------------------------------------------------------------------ helpers

    def _released_outputs(self, model: _Model, req: InferRequest) -> frozenset[str]:
        if not req.outputs:
            return frozenset(model.outputs)
        names = frozenset(o.name for o in req.outputs)
        if not names <= model.outputs.keys():
            # SECURITY: an output the policy does not noise is never computed for release
            # (raw logits, side outputs): refuse before the upstream call, no charge.
            raise InputRejected("a requested output is not released under the privacy policy",
                                reason="dp_output_not_released")
        return names

    async def _reserve(self, ctx: RequestContext, state: _DpState) -> None:
        if state.rows == 0:
            return
        owner_budget = state.model.budget(state.tenant)[1]
        if state.rows > state.accountant.max_rows():
            raise PayloadTooLarge("this many rows cost more privacy budget than one period allows; send fewer rows",
                                  reason="dp_request_exceeds_budget")
        amount = state.accountant.charge(state.rows)
        period = owner_budget.scheme.at(self.clock())
        try:
            result = await self.ledger.reserve(state.ledger_key, period, amount, owner_budget.limit)
        except LedgerUnavailable as exc:
            # SECURITY: fail closed: an unknown balance is never a full one (catalogue DP-08, RL-11).
            raise DependencyUnavailable("privacy budget ledger unavailable", reason="dp_ledger_unavailable",
                                        retry_after_s=LEDGER_RETRY_AFTER_S) from exc
        if isinstance(result, Refused):
            ctx.note(NOTE_DP, self._note(state, epsilon=0.0, refused=True, period=period))
            self._note_remaining(ctx, state, result.used)
            raise RateLimited(
                f"privacy budget for this model is exhausted until {period.end_iso()}",
                reason="dp_budget_exhausted",
                retry_after_s=float(max(1, math.ceil(result.retry_after_s))),
            )
        state.reservation = result

    def _noised(self, model: _Model, state: _DpState, tensor: Tensor) -> Tensor:
        output = model.outputs[tensor.name]
        if tensor.datatype not in FLOAT_TYPES:
            raise UpstreamBadResponse("a privacy-protected output is not a float tensor", reason="dp_output_invalid")
        shape = tensor.shape
        if model.policy.batched:
            if not shape or shape[0] > state.rows:
                # SECURITY: more rows than were charged would be released uncharged.
                raise UpstreamBadResponse("the model answered more rows than were asked",
                                          reason="dp_output_invalid")
            rows = shape[0]
        else:
            rows = 1
        size = math.prod(shape)
        values = np.asarray(tensor.data)
        width = size // rows if rows else (output.policy.width or 1)
        if values.size != size or (rows and size % rows) or (
                output.policy.width is not None and width != output.policy.width):
            raise UpstreamBadResponse("a privacy-protected output has an unexpected shape",
                                      reason="dp_output_invalid")
        try:
            mechanism = output.mechanism(max(width, 1), tensor.datatype)
        except ValueError as exc:
            # A width the policy left open, so wide that its noise overflows: refuse the answer.
            log.warning("dp_output_unservable", model=model.name, output=tensor.name, width=width,
                        error=str(exc)[:200])
            raise UpstreamBadResponse("a privacy-protected output cannot be noised at this width",
                                      reason="dp_output_invalid") from exc
        noisy = mechanism.release(values.reshape(-1))
        # Exact: every released value is on a grid the datatype represents (mechanisms doc).
        data = noisy.astype(DTYPES[tensor.datatype]).reshape(shape)
        return Tensor(name=tensor.name, datatype=tensor.datatype, shape=shape, data=data,
                      parameters=dict(tensor.parameters))

    def _note(self, state: _DpState, *, epsilon: float, period: Period | None = None, **flags: bool) -> dict[str, Any]:
        reservation = state.reservation
        chosen = period or (reservation.period if reservation is not None else None)
        note: dict[str, Any] = {
            "epsilon": epsilon,
            "rows": state.rows,
            "accounting": state.accountant.kind,
            "outputs": sorted(state.outputs),
            "cached": False,
        }
        if chosen is not None:
            note["period"] = chosen.id
        note.update(flags)
        return note

    def _note_remaining(self, ctx: RequestContext, state: _DpState, used: Sequence[float]) -> None:
        budget = state.model.budget(state.tenant)[1]
        remaining = max(0.0, budget.epsilon - state.accountant.epsilon(used))
        ctx.note(NOTE_REMAINING, f"{remaining:.6g}")
        if self.metrics is not None:
            self.metrics.dp_remaining(state.model.name, state.tenant, remaining, budget.scheme.at(self.clock()).end_s)

    async def _note_remaining_from_ledger(self, ctx: RequestContext, state: _DpState) -> None:
        budget = state.model.budget(state.tenant)[1]
        period = budget.scheme.at(self.clock())
        try:
            used = await self.ledger.usage(state.ledger_key, period, len(budget.limit))
        except LedgerUnavailable:
            return  # the header is informational; the cached answer costs nothing
        self._note_remaining(ctx, state, used)


def _rows(req: InferRequest, batched: bool) -> int:
    """Rows charged: the largest batch dimension among the inputs (1 when not batched)."""
    if not batched:
        return 1
    dims = [t.shape[0] for t in req.inputs if t.shape]
    return max(dims) if dims else 1


def _copy(tensor: Tensor) -> Tensor:
    return Tensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape, data=np.array(tensor.data),
                  parameters=dict(tensor.parameters))


def _cache_key(tenant: str, req: InferRequest, outputs: frozenset[str]) -> bytes:
    """SHA-256 over a length-prefixed canonical form: same bytes ⇔ same question."""
    digest = hashlib.sha256()

    def put(chunk: bytes) -> None:
        digest.update(struct.pack("<Q", len(chunk)))
        digest.update(chunk)

    for part in (tenant, req.model, req.version, *sorted(outputs)):
        put(part.encode())
    for tensor in sorted(req.inputs, key=lambda t: t.name):
        put(tensor.name.encode())
        put(tensor.datatype.encode())
        put(struct.pack(f"<{len(tensor.shape)}q", *tensor.shape))
        if tensor.datatype == "BYTES":
            for element in np.asarray(tensor.data).reshape(-1):
                put(bytes(element))
        else:
            data = np.ascontiguousarray(tensor.data)
            put(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.digest()


# -- budget report (GET /v2/privacy/budget) ---------------------------------------------


async def budget_report(
    policy: DpPolicy, ledger: BudgetLedger, tenant: str, *, clock: Clock = time.time
) -> dict[str, Any]:
    """The tenant's budget on every DP model in the current period, for ``GET /v2/privacy/budget``.

    Authorization is the caller's: the tenant's own principals, or ``budget:admin``.
    Raises :class:`LedgerUnavailable` when the ledger cannot answer.
    """
    now = clock()
    models: dict[str, Any] = {}
    for name, model in policy.models.items():
        budget = model.tenants.get(tenant, model.budget)
        accountant = accountant_for(model, budget, tuple(model.outputs))
        period = PeriodScheme(budget.period_s).at(now)
        used = await ledger.usage(ledger_key(tenant, name), period, len(accountant.limit()))
        spent = accountant.epsilon(used)
        models[name] = {
            "privacy_unit": model.privacy_unit,
            "accounting": accountant.kind,
            "epsilon_budget": float(budget.epsilon),
            "delta": budget.delta,
            "epsilon_spent": spent,
            "epsilon_remaining": max(0.0, float(budget.epsilon) - spent),
            "epsilon_per_row": accountant.request_epsilon(1),
            "rows_remaining": accountant.rows_remaining(used),
            "period": {"id": period.id, "start": period.start_iso(), "end": period.end_iso(),
                       "seconds_left": period.seconds_left(now)},
            "outputs": {o: {"mechanism": p.mechanism, "bounds": [float(b) for b in p.bounds],
                            "epsilon_per_row": float(p.epsilon), "delta": p.delta}
                        for o, p in model.outputs.items()},
        }
    return {"tenant": tenant, "models": models}
