"""Adversarial-input detection and output hardening, per model, against the training profile.

Runs after ``sanitize`` and before PII masking. Per model (``policies/inputs.yaml``,
section ``adversarial``) the policy picks a ``mode``:

- ``off``: no detector runs (output hardening still applies if configured);
- ``shadow``: detectors run and their scores are recorded; nothing else happens, and the
  audit notes what ``block`` would have done;
- ``flag``: as shadow, and fired detectors are listed in the audit record and metrics;
- ``block``: each fired detector's ``action`` applies.

Detectors (``gateway/adversarial/detectors.py``): ``range`` (IN-20: values outside the
input domain, or an all-constant row → 422 ``input_out_of_range``), ``training_range``,
``grid`` and ``mahalanobis`` (→ 422 ``input_adversarial``; the client is never told which
detector), ``squeezing`` (one more upstream call, on the response path, only after the
request itself was answered, so a request refused later never reaches the upstream) and
``query_pattern`` (stateful, per tenant and across tenants, by share and by count of
near-duplicate queries so interleaved ordinary queries do not hide a search: ``flag``, ``slow_down``,
``block`` → 429, or ``lower_precision`` of the outputs while it cools down). Measured
rates: ``security_tests/ml/detector_eval.py``.

Why ``block`` for a query pattern is a 429 (``RateLimited``) and not a 422: no single
query is invalid: the *volume* of near-duplicate queries from one caller is what is
refused, for a cooldown, like a rate limit. A 422 per query would also hand a
decision-based attacker a per-query oracle for the detector itself, while a 429 with
``Retry-After`` applies to every query of the caller until the cooldown ends and tells a
well-behaved client exactly what to do.

Every detector reports its score under ``ctx.notes["detectors"]`` (numbers only) and to
the :class:`DetectorMetrics` hook; names of fired detectors under
``ctx.notes["detectors_fired"]``.

Output hardening (``output``, or ``output_by_role`` per caller role) runs on the response
path after DP noise, so it is post-processing of what DP released: top-1 after noise
halves a confidence-threshold membership attack at no cost to the released label
(``security_tests/ml``, MI-01/MI-02).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Final, Literal, Protocol

import numpy as np
from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from gateway.adversarial.detectors import (
    FeatureSqueezer,
    GridDetector,
    MahalanobisDetector,
    QueryPatternDetector,
    RangeDetector,
    Score,
)
from gateway.adversarial.hardening import OutputHardener, strictest
from gateway.adversarial.profile import PROFILE_FILENAME, ModelProfile, NumericProfile, load_profile
from gateway.context import Principal, RequestContext
from gateway.errors import GatewayError, InputRejected, RateLimited
from gateway.kserve import FLOAT_TYPES, InferRequest, InferResponse, NDArray, Tensor
from gateway.policy.model import StrictModel
from gateway.stages.base import Mode, Stage
from gateway.stages.sanitize import SanitizePolicy

__all__ = [
    "AdversarialDetector",
    "AdversarialModelPolicy",
    "AdversarialPolicy",
    "DetectorMetrics",
    "GridCheck",
    "InputsPolicy",
    "MahalanobisCheck",
    "NullDetectorMetrics",
    "OutputHardeningPolicy",
    "QueryPatternCheck",
    "RangeCheck",
    "Reinfer",
    "SqueezingCheck",
    "TrainingRangeCheck",
    "build_adversarial_stage",
]

Reinfer = Callable[[InferRequest], Awaitable[InferResponse]]
"""A second upstream inference (feature squeezing). Wired by the app to the same upstream
and deadline as the request's own call; it must not run the pipeline again."""


class DetectorMetrics(Protocol):
    """Where detector scores go (Prometheus in the app). ``model`` is a policy model name."""

    def observe(self, detector: str, model: str, score: float, fired: bool) -> None: ...


class NullDetectorMetrics:
    def observe(self, detector: str, model: str, score: float, fired: bool) -> None:
        return None


_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
PositiveInt = Annotated[StrictInt, Field(gt=0)]
PositiveFloat = Annotated[StrictFloat | StrictInt, Field(gt=0)]
Action = Literal["block", "flag"]




# --------------------------------------------------------------------------- policy


class RangeCheck(StrictModel):
    """IN-20: values outside the declared input domain, or all-constant rows. Input
    validation with no false positives on valid data; a refusal is ``input_out_of_range``."""

    action: Action = "block"
    margin: Annotated[StrictFloat | StrictInt, Field(ge=0, le=10)] = Field(
        0.0, description="Allowed excess, in widths of the domain.")
    refuse_constant: StrictBool = Field(True, description="Refuse rows whose features are all equal.")


class TrainingRangeCheck(StrictModel):
    """Values outside each feature's *training* min/max (widened by ``margin``): an
    out-of-distribution signal with false positives (~1.3% of clean digits), so ``flag`` by
    default; a refusal is ``input_adversarial``."""

    action: Action = "flag"
    margin: Annotated[StrictFloat | StrictInt, Field(ge=0, le=10)] = Field(
        0.0, description="Allowed excess, in widths of the feature's training range.")


class GridCheck(StrictModel):
    """Values must lie on ``origin + k * step`` (digits: integers). Dataset-specific."""

    action: Action = "flag"
    step: PositiveFloat | None = Field(None, description="Grid step; omitted = 1 when the profile's domain "
                                                         "is integral.")
    tolerance: Annotated[StrictFloat, Field(gt=0, lt=0.5)] = Field(1e-3, description="Fraction of a step.")


class MahalanobisCheck(StrictModel):
    """Distance from the training distribution; give ``fpr`` (a threshold of the profile) or
    ``threshold``."""

    action: Action = "flag"
    fpr: Annotated[StrictFloat, Field(gt=0, lt=1)] | None = Field(
        None, description="Use the profile's threshold for this training false-positive rate.")
    threshold: PositiveFloat | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> MahalanobisCheck:
        if (self.fpr is None) == (self.threshold is None):
            raise ValueError("give exactly one of fpr and threshold")
        return self


class SqueezingCheck(StrictModel):
    """Feature squeezing: one more upstream call per request, on the response path."""

    action: Action = "flag"
    bits: Annotated[StrictInt, Field(ge=1, le=16)] = 4
    threshold: Annotated[StrictFloat | StrictInt, Field(gt=0, le=2)] = Field(
        description="L1 distance between output rows above which it fires.")
    calibrated_fpr: Annotated[StrictFloat, Field(ge=0, le=1)] | None = Field(
        None, description="False-positive rate measured when the threshold was chosen (documentation).")
    output: Annotated[StrictStr, Field(pattern=_NAME_PATTERN)] | None = Field(
        None, description="Output to compare; omitted = the first floating-point output.")
    on_error: Literal["deny", "allow"] = Field(
        "deny", description="If the second call fails in block mode: refuse (deny) or answer unchecked.")


class OutputHardeningPolicy(StrictModel):
    outputs: tuple[Annotated[StrictStr, Field(pattern=_NAME_PATTERN)], ...] = Field(
        (), description="Outputs to harden; empty = every floating-point output.")
    top_k: PositiveInt | None = None
    decimals: Annotated[StrictInt, Field(ge=0, le=8)] | None = None
    label_only: StrictBool = False

    def build(self) -> OutputHardener:
        return OutputHardener(outputs=frozenset(self.outputs) or None, top_k=self.top_k,
                              decimals=self.decimals, label_only=self.label_only)


class QueryPatternCheck(StrictModel):
    """Near-duplicate query bursts (HopSkipJump, boundary walking) per caller and across."""

    action: Literal["flag", "slow_down", "block", "lower_precision"] = "flag"
    scope: Literal["tenant", "principal"] = Field(
        "tenant", description="Whose queries share one history: the tenant (catches a user split "
                              "over several accounts) or one principal.")
    radius: PositiveFloat = Field(2.5, description="k-NN mean distance (standardised units) below which a "
                                                   "query is suspicious.")
    neighbours: Annotated[StrictInt, Field(ge=1, le=256)] = 20
    threshold: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)] = Field(
        0.5, description="Share of suspicious queries in the window that fires.")
    window: Annotated[StrictInt, Field(ge=10, le=10_000)] = 100
    min_queries: Annotated[StrictInt, Field(ge=1, le=10_000)] = 20
    max_suspicious: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = Field(
        30, description="Also fire once this many suspicious queries are among the caller's last "
                        "`suspicious_window`, whatever their share: ordinary queries interleaved with a "
                        "search (or padded into its batches) dilute the share but not this count. Firing by "
                        "count starts the count anew. null = the share rule only.")
    suspicious_window: Annotated[StrictInt, Field(ge=10, le=100_000)] = Field(
        1000, description="Queries over which `max_suspicious` counts (one byte each per caller).")
    sketch_dims: Annotated[StrictInt, Field(ge=4, le=128)] = 32
    history: Annotated[StrictInt, Field(ge=32, le=8192)] = 512
    global_history: Annotated[StrictInt, Field(ge=32, le=65_536)] = Field(
        1024, description="Recent queries of all callers kept for the cross-tenant check (cost is linear).")
    max_callers: Annotated[StrictInt, Field(ge=1, le=100_000)] = 256
    cross_tenant: StrictBool = True
    ignore_exact_repeats: StrictBool = True
    cooldown_s: Annotated[StrictFloat | StrictInt, Field(gt=0, le=86_400)] = 60
    delay_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=5)] = Field(
        0.5, description="slow_down: added latency per request while fired.")
    lowered_output: OutputHardeningPolicy = Field(
        OutputHardeningPolicy(label_only=True), description="lower_precision: the output policy while fired.")
    seed: StrictInt | None = Field(None, description="Projection seed, for reproducible tests only; "
                                                     "omitted = secret random seed.")


class AdversarialModelPolicy(StrictModel):
    """One model. A detector is on when its key is present (``range: {}`` = defaults)."""

    mode: Literal["off", "shadow", "flag", "block"] = "off"
    input: Annotated[StrictStr, Field(pattern=_NAME_PATTERN)] | None = Field(
        None, description="The numeric input the profile describes; omitted = the profile's.")
    range: RangeCheck | None = None
    training_range: TrainingRangeCheck | None = None
    grid: GridCheck | None = None
    mahalanobis: MahalanobisCheck | None = None
    squeezing: SqueezingCheck | None = None
    query_pattern: QueryPatternCheck | None = None
    output: OutputHardeningPolicy = OutputHardeningPolicy()
    output_by_role: dict[Annotated[StrictStr, Field(min_length=1, max_length=128)], OutputHardeningPolicy] = Field(
        default_factory=dict,
        description="Per-role output policy replacing `output` for callers holding that role (e.g. top_k 1 or "
                    "label_only for an untrusted role, full scores for a trusted one). A caller holding several "
                    "listed roles gets the strictest of them combined; a caller holding none gets `output`. "
                    "Default: empty (everyone gets `output`).")


class AdversarialPolicy(StrictModel):
    """Section ``adversarial`` of ``inputs.yaml``. Models not listed are not checked."""

    # Shadow the stage per model (``mode: shadow``): a stage-level shadow would still run
    # slow_down sleeps and squeezing calls, which are effects, not observations.
    mode: Literal[Mode.ENFORCE] = Field(Mode.ENFORCE, description="Always enforce; use each model's mode.")
    models: dict[StrictStr, AdversarialModelPolicy] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, AdversarialModelPolicy]) -> dict[str, AdversarialModelPolicy]:
        for name in value:
            if not re.match(_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} must match {_NAME_PATTERN}")
        return value


class InputsPolicy(StrictModel):
    """``inputs.yaml``: input sanitizing and adversarial checks."""

    sanitize: SanitizePolicy = SanitizePolicy()
    adversarial: AdversarialPolicy = AdversarialPolicy()


# --------------------------------------------------------------------------- compiled form


@dataclass(frozen=True, slots=True)
class _QueryRule:
    detector: QueryPatternDetector
    config: QueryPatternCheck
    lowered: OutputHardener


@dataclass(frozen=True, slots=True)
class _ModelDetectors:
    model: str
    mode: str
    input: str
    n_features: int
    checks: tuple[tuple[RangeDetector | GridDetector | MahalanobisDetector, str], ...]
    squeezer: FeatureSqueezer | None
    squeeze: SqueezingCheck | None
    query: _QueryRule | None
    output: OutputHardener
    role_outputs: tuple[tuple[str, OutputHardener], ...] = ()

    def output_for(self, principal: Principal | None) -> OutputHardener:
        # SECURITY: roles come from the verified token (after the issuer's role mapping); a
        # role can only ever select a policy the operator wrote for it.
        if principal is None or not self.role_outputs:
            return self.output
        chosen = [h for role, h in self.role_outputs if role in principal.roles]
        return strictest(chosen) if chosen else self.output


@dataclass(slots=True)
class _PendingSqueezes:
    """Squeezed copies waiting for their request's response (bounded, oldest dropped).

    Keyed by the context object's identity; the entry holds the context, so the id cannot be
    reused while the entry lives. Entries of calls that never reach the response path
    (refused later, upstream error) are dropped by ``on_complete``; age and capacity bound
    the table even if a front never calls it.
    """

    capacity: int = 4096
    ttl_s: float = 120.0
    entries: OrderedDict[int, tuple[RequestContext, InferRequest, float]] = field(default_factory=OrderedDict)

    def put(self, ctx: RequestContext, req: InferRequest, now: float) -> None:
        while self.entries:
            oldest = next(iter(self.entries.values()))
            if len(self.entries) < self.capacity and now - oldest[2] < self.ttl_s:
                break
            self.entries.popitem(last=False)
        self.entries[id(ctx)] = (ctx, req, now)

    def pop(self, ctx: RequestContext) -> InferRequest | None:
        entry = self.entries.get(id(ctx))
        if entry is None or entry[0] is not ctx:
            return None
        del self.entries[id(ctx)]
        return entry[1]


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True, slots=True)
class AdversarialDetector(Stage):
    """Scores requests against the model's training profile and hardens its outputs."""

    name: ClassVar[str] = "adversarial"
    models: Mapping[str, _ModelDetectors]
    reinfer: Reinfer | None = None
    metrics: DetectorMetrics = field(default_factory=NullDetectorMetrics)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    pending: _PendingSqueezes = field(default_factory=_PendingSqueezes)

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        m = self.models.get(req.model)
        if m is None or m.mode == "off" or not (m.checks or m.query or m.squeezer):
            return req
        tensor, x = self._features(m, req)
        scores = [(check.score(x), action) for check, action in m.checks]
        verdict = None
        recorded = [s for s, _ in scores]
        if m.query is not None:
            verdict = m.query.detector.observe(self._caller(ctx, m.query.config.scope), x)
            recorded.append(Score(QueryPatternDetector.name, verdict.score, verdict.fired))
        self._record(ctx, m, recorded)

        refusal: GatewayError | None = None
        for score, action in scores:
            if score.fired and action == "block":
                refusal = self._refusal(m, score)
                break
        if refusal is None and verdict is not None and verdict.fired and m.query is not None \
                and m.query.config.action == "block":
            # SECURITY: the whole caller is refused until the cooldown ends (see module doc).
            refusal = RateLimited(reason="query_pattern_blocked", retry_after_s=float(math.ceil(verdict.retry_after_s)))
        if m.mode == "shadow":
            if refusal is not None:
                ctx.note("adversarial_shadow", refusal.reason)
        elif m.mode == "block":
            if refusal is not None:
                raise refusal
            if verdict is not None and verdict.fired and m.query is not None \
                    and m.query.config.action == "slow_down":
                # Bounded by policy (<= 5 s) and cancelled with the request.
                await self.sleep(float(m.query.config.delay_s))
        if m.squeezer is not None:
            squeezed = m.squeezer.squeeze(x).astype(tensor.data.dtype).reshape(tensor.shape)
            inputs = [Tensor(t.name, t.datatype, t.shape, squeezed, dict(t.parameters)) if t is tensor else t
                      for t in req.inputs]
            self.pending.put(ctx, InferRequest(req.model, req.version, inputs, list(req.outputs), None,
                                               req.binary_data_output), self.clock())
        return req

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        m = self.models.get(ctx.model or resp.model_name)
        if m is None:
            return resp
        if m.squeezer is not None and m.squeeze is not None and m.mode != "off":
            await self._squeeze(ctx, m, m.squeezer, m.squeeze, resp)
        hardener = m.output_for(ctx.principal)
        if m.query is not None and m.mode == "block" and m.query.config.action == "lower_precision" \
                and m.query.detector.cooling_down(self._caller(ctx, m.query.config.scope)) > 0:
            hardener = strictest((hardener, m.query.lowered))  # never looser than the role's policy
            ctx.note("output_precision", "lowered")
        return hardener.apply(resp)

    async def on_complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        """Drop the squeezed copy of a call that ended before its response path ran (refused
        by a later stage, upstream error): the pending table only ever holds calls in flight."""
        self.pending.pop(ctx)

    async def _squeeze(self, ctx: RequestContext, m: _ModelDetectors, squeezer: FeatureSqueezer,
                       check: SqueezingCheck, resp: InferResponse) -> None:
        squeezed_req = self.pending.pop(ctx)
        if squeezed_req is None or self.reinfer is None:
            return
        try:
            other = await self.reinfer(squeezed_req)
            score = squeezer.score(_output(resp, check.output), _output(other, check.output))
        except (GatewayError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, GatewayError) else "squeezing_bad_output"
            ctx.note("squeezing_error", reason)
            # SECURITY: in block mode a check that could not run is a refusal, unless the
            # policy explicitly fails open (Envoy's failure_mode_allow).
            if m.mode == "block" and check.on_error == "deny":
                raise
            return
        self._record(ctx, m, [score], merge=True)
        if score.fired and check.action == "block":
            if m.mode == "block":
                raise InputRejected(reason="input_adversarial")
            if m.mode == "shadow":
                ctx.note("adversarial_shadow", "input_adversarial")

    def _features(self, m: _ModelDetectors, req: InferRequest) -> tuple[Tensor, NDArray]:
        for tensor in req.inputs:
            if tensor.name == m.input:
                if tensor.datatype not in FLOAT_TYPES or tensor.data.size % m.n_features or not tensor.data.size:
                    raise InputRejected(f"input '{m.input}' does not match the model's profile",
                                        reason="input_wrong_shape")
                x: NDArray = np.asarray(tensor.data, dtype=np.float64).reshape(-1, m.n_features)
                return tensor, x
        raise InputRejected(f"missing input '{m.input}'", reason="input_missing")

    @staticmethod
    def _caller(ctx: RequestContext, scope: str) -> str:
        principal = ctx.require_principal()
        if scope == "principal":
            # Length-prefixed, so no (tenant, subject) pair can spell another (catalogue RL-09).
            return f"{len(principal.tenant)}:{principal.tenant}:{principal.subject}"
        return principal.tenant

    def _record(self, ctx: RequestContext, m: _ModelDetectors, scores: list[Score], *, merge: bool = False) -> None:
        """Scores into the audit notes (numbers only) and the metrics hook."""
        detectors: dict[str, float] = {}
        fired: list[str] = []
        if merge:  # the response path adds to what the request path noted
            notes = ctx.notes.get("detectors")
            detectors = dict(notes) if isinstance(notes, dict) else {}
            before = ctx.notes.get("detectors_fired")
            fired = list(before) if isinstance(before, list) else []
        observe = self.metrics.observe
        for detector, value, hit in scores:
            detectors[detector] = round(value, 4)
            if hit and m.mode != "shadow":
                fired.append(detector)
            observe(detector, m.model, value, hit)
        ctx.note("detectors", detectors)
        if fired:
            ctx.note("detectors_fired", sorted(set(fired)))

    @staticmethod
    def _refusal(m: _ModelDetectors, score: Score) -> GatewayError:
        if score.detector == "range":
            # Input validation: the client is told the rule, not the threshold.
            return InputRejected(f"input '{m.input}' is outside the model's input domain or constant",
                                 reason="input_out_of_range")
        # SECURITY: never which detector, nor its score: that would be an oracle for tuning.
        return InputRejected(reason="input_adversarial")


def _output(resp: InferResponse, name: str | None) -> NDArray:
    for tensor in resp.outputs:
        if (name is None and tensor.datatype in FLOAT_TYPES) or tensor.name == name:
            array: NDArray = np.asarray(tensor.data, dtype=np.float64)
            return array.reshape(array.shape[0] if array.ndim else 1, -1)
    raise ValueError("the response has no output to compare")


# --------------------------------------------------------------------------- builder


def build_adversarial_stage(
    policy: AdversarialPolicy,
    repo_dir: Path,
    reinfer: Reinfer | None,
    metrics: DetectorMetrics | None = None,
    *,
    previous: AdversarialDetector | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AdversarialDetector:
    """Compile the ``adversarial`` section against ``repo_dir/<model>/profile.json``.

    Raises ``ValueError`` (``ProfileError`` included) naming the model when a profile is
    missing or invalid, a detector needs numbers the profile lacks, or squeezing is on
    without ``reinfer``. ``previous`` (the stage of the revision being replaced) hands over
    query-pattern state whose configuration did not change, so a policy reload does not
    give an attacker a clean slate.
    """
    compiled: dict[str, _ModelDetectors] = {}
    for model, entry in policy.models.items():
        try:
            compiled[model] = _compile_model(model, entry, repo_dir, reinfer, previous, clock)
        except ValueError as exc:
            raise ValueError(f"adversarial.models.{model}: {exc}") from exc
    return AdversarialDetector(models=compiled, reinfer=reinfer, metrics=metrics or NullDetectorMetrics(),
                               sleep=sleep, clock=clock)


def _compile_model(model: str, entry: AdversarialModelPolicy, repo_dir: Path, reinfer: Reinfer | None,
                   previous: AdversarialDetector | None, clock: Callable[[], float]) -> _ModelDetectors:
    numeric_on = any(c is not None for c in (entry.range, entry.training_range, entry.grid, entry.mahalanobis,
                                             entry.squeezing, entry.query_pattern))
    profile: ModelProfile | None = None
    if numeric_on:
        profile = load_profile(repo_dir / model / PROFILE_FILENAME, model=model)
        if profile.numeric is None:
            raise ValueError("its profile has no numeric features; numeric detectors cannot run")
        if entry.input is not None and entry.input != profile.input:
            raise ValueError(f"input {entry.input!r} is not the input the profile describes ({profile.input!r})")
    if entry.squeezing is not None and reinfer is None:
        raise ValueError("squeezing needs a reinfer callable (a second upstream call)")
    num: NumericProfile | None = profile.numeric if profile is not None else None
    checks: list[tuple[RangeDetector | GridDetector | MahalanobisDetector, str]] = []
    squeezer: FeatureSqueezer | None = None
    query: _QueryRule | None = None
    if num is not None:
        if entry.range is not None:
            checks.append((RangeDetector.from_profile(num, bounds="domain", margin=float(entry.range.margin),
                                                      refuse_constant=entry.range.refuse_constant),
                           entry.range.action))
        if entry.training_range is not None:
            checks.append((RangeDetector.from_profile(num, bounds="training",
                                                      margin=float(entry.training_range.margin),
                                                      refuse_constant=False), entry.training_range.action))
        if entry.grid is not None:
            checks.append((_grid(num, entry.grid), entry.grid.action))
        if entry.mahalanobis is not None:
            checks.append((MahalanobisDetector.from_profile(
                num, fpr=entry.mahalanobis.fpr,
                threshold=None if entry.mahalanobis.threshold is None else float(entry.mahalanobis.threshold)),
                entry.mahalanobis.action))
        if entry.squeezing is not None:
            squeezer = FeatureSqueezer.from_profile(num, bits=entry.squeezing.bits,
                                                    threshold=float(entry.squeezing.threshold))
        if entry.query_pattern is not None:
            query = _query_rule(model, num, entry.query_pattern, previous, clock)
    return _ModelDetectors(
        model=model, mode=entry.mode, input=profile.input if profile is not None else (entry.input or ""),
        n_features=num.n_features if num is not None else 0, checks=tuple(checks), squeezer=squeezer,
        squeeze=entry.squeezing, query=query, output=entry.output.build(),
        role_outputs=tuple((role, policy.build()) for role, policy in sorted(entry.output_by_role.items())),
    )


def _grid(num: NumericProfile, check: GridCheck) -> GridDetector:
    if check.step is None and not num.integral:
        raise ValueError("grid needs a step: the profile's domain is not integral")
    step = 1.0 if check.step is None else float(check.step)
    origin = num.domain_min if num.domain_min is not None else 0.0
    return GridDetector(origin=origin, step=step, tolerance=check.tolerance)


def _query_rule(model: str, num: NumericProfile, check: QueryPatternCheck, previous: AdversarialDetector | None,
                clock: Callable[[], float]) -> _QueryRule:
    if check.min_queries > check.window:
        raise ValueError("query_pattern.min_queries must not exceed window")
    if check.max_suspicious is not None and check.max_suspicious > check.suspicious_window:
        raise ValueError("query_pattern.max_suspicious must not exceed suspicious_window")
    old = previous.models.get(model) if previous is not None else None
    if old is not None and old.query is not None and old.query.config == check \
            and old.n_features == num.n_features:
        detector = old.query.detector  # same configuration: keep the history
    else:
        detector = QueryPatternDetector.from_profile(
            num, radius=float(check.radius), neighbours=check.neighbours, sketch_dims=check.sketch_dims,
            history=check.history, global_history=check.global_history, window=check.window,
            min_queries=check.min_queries, threshold=float(check.threshold), cooldown_s=float(check.cooldown_s),
            max_callers=check.max_callers, cross_tenant=check.cross_tenant,
            ignore_exact_repeats=check.ignore_exact_repeats, max_suspicious=check.max_suspicious,
            suspicious_window=check.suspicious_window, seed=check.seed, clock=clock)
    return _QueryRule(detector=detector, config=check, lowered=check.lowered_output.build())
