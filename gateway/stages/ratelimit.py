"""Rate limits, quotas, concurrency caps and cost limits, shared by every replica.

Runs after authorization (the keys need the verified principal and a model the policy
exposes). One round trip to the shared state per hook decides every limit that applies,
all-or-nothing (:mod:`gateway.state.base`):

- ``on_call`` (every authenticated call): request rates (GCRA), calendar quotas and
  concurrency caps; a concurrency slot is a lease given back by ``on_complete`` (the
  pipeline's once-per-call hook; :func:`finish_call` for a caller without a pipeline).
- ``on_request`` (inference, tensors decoded): cost limits in tensor elements or bytes per
  period, so a batch of 64 costs 64 times a batch of 1.

Nothing is refunded once charged: a request that reached the upstream counts even if its
client went away before the answer. A refused request costs nothing: one refused by a
cost limit (decided after decode) gets back the rate and quota units ``on_call`` took.

Clock steps (NTP, a resumed VM) never lengthen a lockout or reopen a quota period: a GCRA
state later than an empty bucket is lowered to one, and a quota never counts in a period
earlier than the one it last counted in (:mod:`gateway.state.memory`, the Redis scripts).

:class:`PreAuthLimiter` is the front's per-client-address limit, called before any token
is looked at, so a token-guessing flood is refused for the price of one script call.

Backend failure (timeout, Redis down): each limit's ``on_backend_error`` decides. ``deny``
(default) answers 503; ``allow`` lets the request through and notes it; ``local`` applies
the same limit to this process's memory, so an outage never means unlimited.

Refusals are :class:`LimitExceeded` (429) carrying the IETF ``RateLimit-Limit``,
``RateLimit-Remaining``, ``RateLimit-Reset`` fields and ``Retry-After``
(draft-ietf-httpapi-ratelimit-headers); allowed calls leave the same fields in the
context for :func:`response_headers`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, Literal, Protocol

import structlog
from pydantic import Field, StrictFloat, StrictInt, StrictStr, model_validator

from gateway.context import NOTE_REQUESTED_MODEL, Principal, RequestContext
from gateway.errors import DependencyUnavailable, GatewayError, PayloadTooLarge, RateLimited
from gateway.fronts.client_addr import address_bucket
from gateway.kserve import InferRequest, Tensor, element_count
from gateway.policy.model import StrictModel
from gateway.stages.base import Stage
from gateway.state.base import (
    ConcurrencyCheck,
    Lease,
    LimitCheck,
    LimitDecision,
    QuotaCheck,
    RateCheck,
    SharedState,
    StateKey,
    StateUnavailable,
)
from gateway.state.memory import MemoryState

log = structlog.get_logger("gateway.ratelimit")

# The context note under which a call's leases and header values travel to the front.
NOTE_KEY: Final = "_rate_limit"  # live state (leases, headers): never audited
BACKEND_RETRY_AFTER_S: Final = 1.0
# Per-stage memo of the checks a caller's calls make (and of the pre-auth check per address):
# bounded, because subjects and addresses are chosen by clients; the oldest entry goes first.
PLAN_CACHE_MAX: Final = 4096

# -- policy (policies/limits.yaml) --------------------------------------------------------




PositiveNumber = Annotated[StrictFloat | StrictInt, Field(gt=0, le=1e12)]
PositiveInt = Annotated[StrictInt, Field(gt=0, le=10**15)]
Dimension = Literal["tenant", "subject", "role", "model"]
FailMode = Literal["deny", "allow", "local"]
ActionName = Literal["infer", "metadata", "server"]
QUOTA_PERIODS: Final = {"minute": 60, "hour": 3600, "day": 86_400}


class _LimitBase(StrictModel):
    name: StrictStr = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$",
                            description="Unique; the metrics label and the key namespace of this limit.")
    per: tuple[Dimension, ...] = Field(
        (), description="What one bucket is: e.g. [tenant], [tenant, subject], [tenant, role], [model]; "
                        "[] is one bucket for everyone.",
    )
    tenants: tuple[StrictStr, ...] | None = Field(None, description="Apply only to these tenants.")
    exclude_tenants: tuple[StrictStr, ...] = Field((), description="Never apply to these tenants.")
    roles: tuple[StrictStr, ...] | None = Field(
        None, description="Apply only to principals holding one of these roles (required with per: role).",
    )
    models: tuple[StrictStr, ...] | None = Field(None, description="Apply only to calls on these models.")
    actions: tuple[ActionName, ...] = Field(("infer",), description="Which calls count.")
    on_backend_error: FailMode | None = Field(
        None, description="deny (503), allow, or local (this process's memory) when Redis fails; "
                          "default: the file's on_backend_error.",
    )

    @model_validator(mode="after")
    def _dimensions(self) -> _LimitBase:
        if len(set(self.per)) != len(self.per):
            raise ValueError(f"limit {self.name}: a dimension is listed twice in per")
        if "subject" in self.per and "tenant" not in self.per:
            # SECURITY: a subject is unique only within its tenant; keying on it alone would
            # let tenants share (and exhaust) each other's buckets.
            raise ValueError(f"limit {self.name}: per: [subject] must be per: [tenant, subject]")
        if "role" in self.per and not self.roles:
            # SECURITY: roles come from tokens; without an explicit list, an issuer could mint
            # arbitrary role names and with them unlimited fresh buckets.
            raise ValueError(f"limit {self.name}: per: [role] needs the roles it applies to (roles: [...])")
        if not self.actions:
            raise ValueError(f"limit {self.name}: actions must not be empty")
        return self


class RateRule(_LimitBase):
    """Requests per period with a burst (GCRA)."""

    kind: Literal["rate"]
    rate: PositiveNumber = Field(description="Sustained requests per period.")
    period_s: PositiveNumber = Field(1, description="The period of `rate`, in seconds.")
    burst: PositiveInt | None = Field(None, description="Requests that may pass at once; default ceil(rate).")

    @property
    def capacity(self) -> int:
        return self.burst or max(1, math.ceil(self.rate))


class QuotaRule(_LimitBase):
    """A count per calendar period (UTC), reset at the boundary."""

    kind: Literal["quota"]
    limit: PositiveInt
    period: Literal["minute", "hour", "day"] = "day"


class ConcurrencyRule(_LimitBase):
    """Calls in flight at once."""

    kind: Literal["concurrency"]
    limit: PositiveInt
    lease_ttl_s: PositiveNumber | None = Field(
        None, description="A slot held longer than this is freed (a replica died); default: the file's.",
    )


class CostRule(_LimitBase):
    """Tensor elements or bytes per period (GCRA weighted by the request's size)."""

    kind: Literal["cost"]
    unit: Literal["elements", "bytes"]
    limit: PositiveInt = Field(description="Units per period.")
    period_s: PositiveNumber = Field(60, description="The period of `limit`, in seconds.")
    burst: PositiveInt | None = Field(None, description="Units that may pass at once; default `limit`. "
                                                        "A single request costing more is refused with 413.")

    @model_validator(mode="after")
    def _infer_only(self) -> CostRule:
        if self.actions != ("infer",):
            raise ValueError(f"limit {self.name}: cost limits apply to inference only (actions: [infer])")
        return self

    @property
    def capacity(self) -> int:
        return self.burst or self.limit


LimitRule = Annotated[RateRule | QuotaRule | ConcurrencyRule | CostRule, Field(discriminator="kind")]


class PreAuthRule(StrictModel):
    """Requests per client address before authentication (token-guessing floods)."""

    rate: PositiveNumber = 20
    period_s: PositiveNumber = 1
    burst: PositiveInt | None = Field(None, description="Default ceil(rate).")
    ipv6_prefix: Annotated[StrictInt, Field(ge=32, le=128)] = Field(
        64, description="IPv6 clients are counted per prefix of this length (one subscriber holds a /64).",
    )
    on_backend_error: FailMode | None = None

    @property
    def capacity(self) -> int:
        return self.burst or max(1, math.ceil(self.rate))


class RateLimitPolicy(StrictModel):
    """``limits.yaml``: every limit that applies applies; the most restrictive one decides."""

    on_backend_error: FailMode = Field("deny", description="Default fail mode of every limit.")
    lease_ttl_s: PositiveNumber = Field(60, description="Default lifetime of a concurrency slot.")
    pre_auth: PreAuthRule | None = None
    limits: tuple[LimitRule, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> RateLimitPolicy:
        names = [rule.name for rule in self.limits]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"limit names must be unique: {dupes}")
        return self


def check_references(policy: RateLimitPolicy, *, tenants: set[str], roles: set[str], models: set[str]) -> list[str]:
    """Names in selectors that the access and gateway policies do not know (likely typos)."""
    issues: list[str] = []
    for rule in policy.limits:
        selectors = (("tenants", "tenant", rule.tenants, tenants),
                     ("exclude_tenants", "tenant", rule.exclude_tenants, tenants),
                     ("roles", "role", rule.roles, roles), ("models", "model", rule.models, models))
        for field_name, what, named, known in selectors:
            issues.extend(f"limits.{rule.name}.{field_name}: unknown {what} {name!r}"
                          for name in named or () if name not in known)
    return issues


# -- errors and headers -------------------------------------------------------------------


def rate_limit_headers(limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    """The IETF RateLimit fields (delta-seconds, integers)."""
    reset = 0 if math.isinf(reset_s) else max(0, math.ceil(reset_s))
    return {"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(max(0, remaining)),
            "RateLimit-Reset": str(reset)}


class LimitExceeded(RateLimited):
    """429 with what the front must send: :meth:`headers` (``RateLimit-*`` and ``Retry-After``).

    ``limit_name`` is for audit and metrics only; it is not sent to the client.
    """

    def __init__(self, detail: str, *, reason: str, limit_name: str, limit: int, remaining: int,
                 reset_s: float, retry_after_s: float) -> None:
        super().__init__(detail, reason=reason, retry_after_s=retry_after_s)
        self.limit_name = limit_name
        self.limit = limit
        self.remaining = remaining
        self.reset_s = reset_s

    def headers(self) -> dict[str, str]:
        retry = self.retry_after_s or 0.0
        return {**rate_limit_headers(self.limit, self.remaining, self.reset_s),
                "Retry-After": str(max(1, math.ceil(retry)))}


_DENIAL: Final = {
    "rate": ("ratelimit_exceeded", "too many requests"),
    "quota": ("quota_exceeded", "quota exhausted for this period"),
    "concurrency": ("concurrency_exceeded", "too many requests in flight"),
    "cost": ("cost_limit_exceeded", "too much tensor data for this period"),
    "pre_auth": ("preauth_rate_exceeded", "too many requests from this address"),
}


class RateLimitMetrics(Protocol):
    """Counts outcomes per limit name (policy-chosen, bounded); never a user id.

    Outcomes: ``allowed``, ``limited``, ``backend_denied`` (fail closed), ``backend_allowed``
    (fail open), ``local_allowed`` / ``local_limited`` (fallback to this process).
    """

    def limit_decision(self, limit: str, outcome: str) -> None: ...


class _NoMetrics:
    def limit_decision(self, limit: str, outcome: str) -> None:
        return None


@dataclass(slots=True)
class CallNote:
    """Per-call values the front needs: leases to release and the tightest limit's fields.

    The header strings are formatted once, when the front asks (:attr:`headers`), not for
    every decision offered.
    """

    leases: list[tuple[SharedState, Lease]] = field(default_factory=list)
    # What ``on_call`` charged (rate and quota checks), given back if a cost limit refuses.
    charged: list[tuple[SharedState, RateCheck | QuotaCheck]] = field(default_factory=list)
    tightest: tuple[int, float] | None = None  # (remaining, -reset) of ``best``
    best: LimitDecision | None = None

    def offer(self, decision: LimitDecision) -> None:
        rank = (decision.remaining, -decision.reset_s)
        if self.tightest is None or rank < self.tightest:
            self.tightest = rank
            self.best = decision

    @property
    def headers(self) -> dict[str, str]:
        best = self.best
        return {} if best is None else rate_limit_headers(best.limit, best.remaining, best.reset_s)


# -- compiled limits --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One rule, with its selectors as sets and its fail mode resolved."""

    name: str
    kind: str  # rate | quota | concurrency | cost | pre_auth
    per: tuple[str, ...]
    fail_mode: str
    actions: frozenset[str]
    tenants: frozenset[str] | None
    exclude_tenants: frozenset[str]
    roles: frozenset[str] | None
    models: frozenset[str] | None
    amount: float  # rate or cost per period | quota limit | concurrency cap
    period_s: float  # period of the rate, cost or quota | lease lifetime of a concurrency slot
    capacity: int  # burst | quota limit | cap
    unit: str = ""  # cost limits: elements | bytes

    def applies(self, ctx: RequestContext, principal: Principal) -> bool:
        if ctx.action.value not in self.actions:
            return False
        if self.tenants is not None and principal.tenant not in self.tenants:
            return False
        if principal.tenant in self.exclude_tenants:
            return False
        if self.roles is not None and not (principal.roles & self.roles):
            return False
        if self.models is not None and ctx.model not in self.models and (
                ctx.notes.get(NOTE_REQUESTED_MODEL) not in self.models):
            # SECURITY: a rule on a model also binds calls routed from it to another model.
            return False
        return not ("model" in self.per and ctx.model is None)

    def keys(self, ctx: RequestContext, principal: Principal) -> Iterator[StateKey]:
        """One key per bucket the call falls in (several when per: role and several roles match)."""
        roles = sorted(principal.roles & self.roles) if "role" in self.per and self.roles else [""]
        group = self._group(principal, ctx.model)
        kind = self.state_kind
        for role in roles:
            parts: list[str] = []
            for dim in self.per:
                if dim == "tenant":
                    parts.append(principal.tenant)
                elif dim == "subject":
                    parts.append(principal.subject)
                elif dim == "role":
                    parts.append(role)
                else:
                    parts.append(ctx.model or "")
            yield StateKey(group, kind, tuple(parts))

    @property
    def state_kind(self) -> str:
        """The key namespace of this limit: its name and, but for quotas, its kind.

        # SECURITY: a policy revision may keep a limit's name and change its kind (rate to
        # quota, quota to concurrency...). Each kind stores another structure (a GCRA time,
        # a counter hash, a lease set), so a shared key name made every principal with a live
        # bucket meet a WRONGTYPE (503) until the old key expired: up to a day for a daily
        # quota. The kind in the name gives the new limit fresh buckets. Quotas keep the bare
        # name so that their long-lived counters survive an upgrade (a reset would hand out a
        # second quota); the others hold at most seconds of state.
        """
        return f"rl.{self.name}" if self.kind == "quota" else f"rl.{self.name}.{self.kind}"

    def _group(self, principal: Principal, model: str | None) -> str:
        # Everything a tenant's call charges shares the tenant's slot: one script, one round trip.
        if "tenant" in self.per:
            return f"t:{principal.tenant}"
        if "model" in self.per:
            return f"m:{model}"
        return f"g:{self.name}"

    def check(self, key: StateKey, cost: int = 1) -> LimitCheck:
        if self.kind == "quota":
            return QuotaCheck(key, int(self.amount), int(self.period_s), cost)
        if self.kind == "concurrency":
            return ConcurrencyCheck(key, int(self.amount), self.period_s)
        return RateCheck(key, self.amount, self.period_s, self.capacity, cost)


def _compile(rule: RateRule | QuotaRule | ConcurrencyRule | CostRule, policy: RateLimitPolicy) -> _Compiled:
    unit = ""
    if isinstance(rule, RateRule):
        amount, period_s, capacity = float(rule.rate), float(rule.period_s), rule.capacity
    elif isinstance(rule, QuotaRule):
        amount, period_s, capacity = float(rule.limit), float(QUOTA_PERIODS[rule.period]), rule.limit
    elif isinstance(rule, ConcurrencyRule):
        amount, period_s, capacity = float(rule.limit), float(rule.lease_ttl_s or policy.lease_ttl_s), rule.limit
    else:
        amount, period_s, capacity, unit = float(rule.limit), float(rule.period_s), rule.capacity, rule.unit
    return _Compiled(
        name=rule.name, kind=rule.kind, per=rule.per, fail_mode=rule.on_backend_error or policy.on_backend_error,
        actions=frozenset(rule.actions),
        tenants=frozenset(rule.tenants) if rule.tenants is not None else None,
        exclude_tenants=frozenset(rule.exclude_tenants),
        roles=frozenset(rule.roles) if rule.roles is not None else None,
        models=frozenset(rule.models) if rule.models is not None else None,
        amount=amount, period_s=period_s, capacity=capacity, unit=unit,
    )


# -- enforcement --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Enforcer:
    """Decides compiled limits against the shared state, with per-limit fail modes."""

    state: SharedState
    local: SharedState | None
    metrics: RateLimitMetrics

    async def decide(self, ctx: RequestContext | None, rules: Sequence[_Compiled],
                     checks: Sequence[LimitCheck]) -> tuple[SharedState, Sequence[_Compiled],
                                                           Sequence[LimitCheck], list[LimitDecision]]:
        """The store that decided, the rules and checks it decided, and its decisions."""
        try:
            return self.state, rules, checks, await self.state.run_limits(checks)
        except StateUnavailable as exc:
            return await self._degraded(ctx, rules, checks, exc)

    async def _degraded(self, ctx: RequestContext | None, rules: Sequence[_Compiled], checks: Sequence[LimitCheck],
                        exc: StateUnavailable) -> tuple[SharedState, Sequence[_Compiled],
                                                        Sequence[LimitCheck], list[LimitDecision]]:
        if any(rule.fail_mode == "deny" for rule in rules):
            for rule in rules:
                if rule.fail_mode == "deny":
                    self.metrics.limit_decision(rule.name, "backend_denied")
            # SECURITY: fail closed: a store outage must not become unlimited inference.
            raise DependencyUnavailable(reason="ratelimit_backend_unavailable",
                                        retry_after_s=BACKEND_RETRY_AFTER_S) from exc
        local = [i for i, rule in enumerate(rules) if rule.fail_mode == "local"]
        for rule in rules:
            if rule.fail_mode == "allow":
                self.metrics.limit_decision(rule.name, "backend_allowed")
        if ctx is not None:
            ctx.note("rate_limit.failure_mode", "local" if local else "allowed")
        log.warning("ratelimit_backend_unavailable", kind=exc.kind, fallback="local" if local else "allow")
        if not local or self.local is None:
            return self.state, [], [], []
        kept = [rules[i] for i in local]
        kept_checks = [checks[i] for i in local]
        return self.local, kept, kept_checks, await self.local.run_limits(kept_checks)

    def judge(self, rules: Sequence[_Compiled], decisions: Sequence[LimitDecision], *, local: bool) -> None:
        """Raise for the limit that refused (the longest wait wins); count outcomes."""
        refused = [(rule, d) for rule, d in zip(rules, decisions, strict=True) if not d.allowed]
        prefix = "local_" if local else ""
        if not refused:
            for rule in rules:
                self.metrics.limit_decision(rule.name, f"{prefix}allowed")
            return
        for rule, _ in refused:
            self.metrics.limit_decision(rule.name, f"{prefix}limited")
        rule, decision = max(refused, key=lambda item: item[1].retry_after_s)
        reason, detail = _DENIAL[rule.kind]
        if math.isinf(decision.retry_after_s):
            raise PayloadTooLarge("request cost exceeds the limit's capacity", reason="ratelimit_cost_too_large")
        raise LimitExceeded(detail, reason=reason, limit_name=rule.name, limit=decision.limit,
                            remaining=decision.remaining, reset_s=decision.reset_s,
                            retry_after_s=decision.retry_after_s)


@dataclass(frozen=True, slots=True, eq=False)
class RateLimiter(Stage):
    """The ``rate_limit`` stage: built once per policy revision; state shared by all revisions."""

    name: ClassVar[str] = "rate_limit"
    call_limits: tuple[_Compiled, ...]
    cost_limits: tuple[_Compiled, ...]
    enforcer: _Enforcer
    # Memos of what ``applies``/``keys``/``check`` produce for one caller and call: keyed by
    # every input those read (action, model, the name a flag routed the call from, tenant,
    # subject, roles), so a hit is the same answer; per stage, so a new revision starts empty.
    _call_plans: dict[tuple[Any, ...], tuple[tuple[_Compiled, ...], tuple[LimitCheck, ...]]] = field(
        default_factory=dict, repr=False)
    _cost_plans: dict[tuple[Any, ...], tuple[tuple[_Compiled, tuple[StateKey, ...]], ...]] = field(
        default_factory=dict, repr=False)

    async def on_call(self, ctx: RequestContext) -> None:
        principal = ctx.require_principal()
        memo = _memo_key(ctx, principal)
        plan = self._call_plans.get(memo)
        if plan is None:
            rules: list[_Compiled] = []
            checks: list[LimitCheck] = []
            for rule in self.call_limits:
                if rule.applies(ctx, principal):
                    for key in rule.keys(ctx, principal):
                        rules.append(rule)
                        checks.append(rule.check(key))
            plan = (tuple(rules), tuple(checks))
            _remember(self._call_plans, memo, plan)
        if plan[1]:
            await self._enforce(ctx, plan[0], plan[1])

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        if not self.cost_limits:
            return req
        principal = ctx.require_principal()
        memo = _memo_key(ctx, principal)
        applicable = self._cost_plans.get(memo)
        if applicable is None:
            applicable = tuple((rule, tuple(rule.keys(ctx, principal))) for rule in self.cost_limits
                               if rule.applies(ctx, principal))
            _remember(self._cost_plans, memo, applicable)
        rules: list[_Compiled] = []
        checks: list[LimitCheck] = []
        costs: dict[str, int] = {}
        for rule, keys in applicable:
            cost = costs.get(rule.unit)
            if cost is None:
                cost = costs[rule.unit] = request_cost(req, rule.unit)
            if cost > rule.capacity:
                self.enforcer.metrics.limit_decision(rule.name, "limited")
                await _undo_call_charges(ctx)
                # A request that can never fit is not told to retry: 413, not 429.
                raise PayloadTooLarge(f"request of {cost} {rule.unit} exceeds the limit of {rule.capacity} "
                                      f"per request", reason="ratelimit_cost_too_large")
            if cost == 0:
                continue
            for key in keys:
                rules.append(rule)
                checks.append(rule.check(key, cost))
        if checks:
            ctx.note("rate_limit.cost", costs)
            try:
                await self._enforce(ctx, rules, checks)
            except (LimitExceeded, PayloadTooLarge):
                await _undo_call_charges(ctx)
                raise
        return req

    async def on_complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        """Give back the call's concurrency slots; nothing else is refunded (see the module doc)."""
        await finish_call(ctx)

    async def _enforce(self, ctx: RequestContext, rules: Sequence[_Compiled], checks: Sequence[LimitCheck]) -> None:
        state, kept, kept_checks, decisions = await self.enforcer.decide(ctx, rules, checks)
        self.enforcer.judge(kept, decisions, local=state is not self.enforcer.state)
        note = call_note(ctx)
        for rule, decision, check in zip(kept, decisions, kept_checks, strict=True):
            if decision.lease is not None:
                note.leases.append((state, decision.lease))
            elif rule.kind != "concurrency":
                note.offer(decision)
                if rule.kind in ("rate", "quota") and isinstance(check, RateCheck | QuotaCheck):
                    note.charged.append((state, check))


@dataclass(frozen=True, slots=True, eq=False)
class PreAuthLimiter:
    """Per-client-address limit, called by the front before authentication.

    ``client_addr`` must come from :func:`gateway.fronts.client_addr.client_address` (the
    socket peer, or the rightmost untrusted ``X-Forwarded-For`` hop behind trusted proxies).
    """

    name: ClassVar[str] = "pre_auth_limit"
    rule: _Compiled
    ipv6_prefix: int
    enforcer: _Enforcer
    _checks: dict[str, RateCheck] = field(default_factory=dict, repr=False)  # client_addr -> its check

    async def admit(self, client_addr: str, ctx: RequestContext | None = None) -> None:
        """Raise :class:`LimitExceeded` (429) or ``DependencyUnavailable`` (503), or return."""
        check = self._checks.get(client_addr)
        if check is None:
            bucket = address_bucket(client_addr, self.ipv6_prefix)
            # One slot per address bucket: spreads a flood over the cluster instead of one hot slot.
            check = RateCheck(StateKey(f"a:{bucket}", "rl.pre_auth", (bucket,)), self.rule.amount,
                              self.rule.period_s, self.rule.capacity)
            _remember(self._checks, client_addr, check)
        state, rules, _checks, decisions = await self.enforcer.decide(ctx, (self.rule,), (check,))
        self.enforcer.judge(rules, decisions, local=state is not self.enforcer.state)


# -- the front's side -------------------------------------------------------------------


def _memo_key(ctx: RequestContext, principal: Principal) -> tuple[Any, ...]:
    """Everything :meth:`_Compiled.applies` and :meth:`_Compiled.keys` read about a call.

    # SECURITY: ``applies`` also reads the name a flag routed the call from (a limit on
    # ``digits`` binds calls routed to ``digits_green``). Two flags may route two names to one
    # model; without that name in the key, a call from the unlimited name left a plan with no
    # limit that a call from the limited name then reused (and the other way round).
    """
    return (ctx.action, ctx.model, ctx.notes.get(NOTE_REQUESTED_MODEL), principal.tenant, principal.subject,
            principal.roles)


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= PLAN_CACHE_MAX:
        del memo[next(iter(memo))]
    memo[key] = value


def call_note(ctx: RequestContext) -> CallNote:
    note = ctx.notes.get(NOTE_KEY)
    if not isinstance(note, CallNote):
        note = CallNote()
        ctx.notes[NOTE_KEY] = note
    return note


async def _undo_call_charges(ctx: RequestContext) -> None:
    """Give back the rate and quota units ``on_call`` charged a call a cost limit refused.

    # SECURITY (availability): the call limits are decided before the body is read (a flood
    # of undecodable bodies is refused cheaply), the cost limits after. Without the undo,
    # a client retrying a too-large batch while its cost limit refills would spend its
    # request rate and daily quota on 429s: a refused call is charged nothing.
    Best effort: if the store is down the charge stands (fail closed, never a credit).
    """
    note = ctx.notes.get(NOTE_KEY)
    if not isinstance(note, CallNote) or not note.charged:
        return
    held, note.charged = note.charged, []
    by_state: dict[int, tuple[SharedState, list[RateCheck | QuotaCheck]]] = {}
    for state, check in held:
        by_state.setdefault(id(state), (state, []))[1].append(check)
    for state, checks in by_state.values():
        try:
            await state.undo_limits(checks)
        except StateUnavailable as exc:
            log.warning("ratelimit_undo_failed", kind=exc.kind, checks=len(checks))


def response_headers(ctx: RequestContext) -> dict[str, str]:
    """``RateLimit-*`` for an allowed call (the limit closest to exhaustion); empty if none applied."""
    note = ctx.notes.get(NOTE_KEY)
    return note.headers if isinstance(note, CallNote) else {}  # a fresh dict each time


_RELEASES: set[asyncio.Task[None]] = set()


async def finish_call(ctx: RequestContext) -> None:
    """Give back the call's concurrency slots (``RateLimiter.on_complete`` calls this).

    Shielded: if the caller is cancelled (client gone, shutdown), the release still runs to
    completion in the background. If the store is down the lease simply expires.
    """
    note = ctx.notes.get(NOTE_KEY)
    if not isinstance(note, CallNote) or not note.leases:
        return
    held, note.leases = note.leases, []
    if all(type(state) is MemoryState for state, _ in held):
        # This process's memory never suspends, so a cancellation cannot cut the release
        # short: no background task (and no extra event loop turns) needed.
        await _release(held)
        return
    task = asyncio.ensure_future(_release(held))
    _RELEASES.add(task)
    task.add_done_callback(_RELEASES.discard)
    await asyncio.shield(task)


async def _release(held: list[tuple[SharedState, Lease]]) -> None:
    by_state: dict[int, tuple[SharedState, list[Lease]]] = {}
    for state, lease in held:
        by_state.setdefault(id(state), (state, []))[1].append(lease)
    for state, leases in by_state.values():
        try:
            await state.release(leases)
        except StateUnavailable as exc:
            log.warning("ratelimit_release_failed", kind=exc.kind, leases=len(leases))


def request_cost(req: InferRequest, unit: str) -> int:
    """Elements or bytes of every input tensor: what the model will have to process."""
    if unit == "elements":
        return sum(element_count(t.shape) for t in req.inputs)
    return sum(_tensor_bytes(t) for t in req.inputs)


def _tensor_bytes(tensor: Tensor) -> int:
    if tensor.datatype == "BYTES":
        return sum(len(item) for item in tensor.data.flat)
    return int(tensor.data.nbytes)


# -- building -----------------------------------------------------------------------------


def build_ratelimit_stage(policy: RateLimitPolicy, state: SharedState,
                          metrics_hook: RateLimitMetrics | None = None, *,
                          local_state: SharedState | None = None) -> RateLimiter:
    """The stage of one policy revision.

    ``state`` and ``local_state`` belong to the app lifecycle and are shared by revisions;
    ``local_state`` (the ``local`` fail mode's store) defaults to a fresh :class:`MemoryState`.
    """
    compiled = [_compile(rule, policy) for rule in policy.limits]
    needs_local = any(rule.fail_mode == "local" for rule in compiled)
    enforcer = _Enforcer(state, local_state or (MemoryState() if needs_local else None),
                         metrics_hook or _NoMetrics())
    return RateLimiter(
        call_limits=tuple(r for r in compiled if r.kind != "cost"),
        cost_limits=tuple(r for r in compiled if r.kind == "cost"),
        enforcer=enforcer,
    )


def build_preauth_limiter(policy: RateLimitPolicy, state: SharedState,
                          metrics_hook: RateLimitMetrics | None = None, *,
                          local_state: SharedState | None = None) -> PreAuthLimiter | None:
    """The front's per-address limiter, or ``None`` when the policy sets no ``pre_auth``."""
    rule = policy.pre_auth
    if rule is None:
        return None
    fail_mode = rule.on_backend_error or policy.on_backend_error
    compiled = _Compiled(name="pre_auth", kind="pre_auth", per=(), fail_mode=fail_mode,
                         actions=frozenset(), tenants=None, exclude_tenants=frozenset(), roles=None, models=None,
                         amount=float(rule.rate), period_s=float(rule.period_s), capacity=rule.capacity)
    local = local_state or (MemoryState() if fail_mode == "local" else None)
    return PreAuthLimiter(rule=compiled, ipv6_prefix=rule.ipv6_prefix,
                          enforcer=_Enforcer(state, local, metrics_hook or _NoMetrics()))
