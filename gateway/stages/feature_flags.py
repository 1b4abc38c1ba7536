"""Feature flags: model routing (canary, blue-green, rollback) and per-stage kill switches.

Runs right after ``authn`` and **before** ``model_exposure`` and ``authz``: it rewrites
``ctx.model``/``ctx.version`` to the variant a flag chooses, so the routed model is the
one exposure and authorization decide on, and every later stage (rate limits, input
checks, detectors, PII, DP) sees it. A canary never skips a stage: there is one pipeline,
and kill switches have no targeting, so they cannot differ between variants. Bind this
stage in ``Mode.ENFORCE`` only: shadow mode would drop the request rewrite of
:meth:`FeatureFlags.on_request` while ``on_call`` has already rewritten the context.

The flags live in ``policies/flags.json``, in flagd's flag-definition format, and are
part of the policy revision: a stage is built from one revision's bytes, so a request
pinned to a revision evaluates that revision's flags, and an edit hot-reloads with the
rest of the policy, atomically.

Routing flag (any key; the metadata makes it one)::

    "digits-version": {
      "state": "ENABLED",
      "variants": {"stable": "1", "canary": "2"},          # versions of gateway.model, or
                                                            # {"model": "digits_green", "version": ""}
      "defaultVariant": "stable",
      "targeting": {"fractional": [["stable", 90], ["canary", 10]]},
      "metadata": {"gateway.model": "digits", "gateway.stable": "stable",
                   "rollback.max_error_rate": 0.05, "rollback.window_s": 60, ...}
    }

- Canary 90/10: ``fractional`` weights; sticky per subject (``targetingKey`` is a hash of
  tenant and subject, no random salt, so the split survives restarts and replicas).
- Blue-green: flip ``defaultVariant`` (no targeting) from ``blue`` to ``green``.
- Instant rollback: set the weights to 100/0, or ``"state": "DISABLED"`` (= stable).
- Targeting by tenant, role or subject: ``{"var": "tenant"}``, ``{"in": ["beta", {"var":
  "roles"}]}``, ``{"var": "subject"}`` (the pseudonym of :func:`targeting_key`).
- Automatic rollback (:mod:`gateway.flags.rollback`): thresholds in ``rollback.*``
  metadata; a breach holds the flag on ``gateway.stable`` until a person edits the flag.

Kill switch: a boolean flag named ``stage.<stage>.enabled`` without targeting; variant
``false`` skips that stage (:meth:`FeatureFlags.kill_switched`). ``authn`` and ``authz``
cannot be switched off in any profile; ``model_exposure``, ``pii_mask`` and ``dp_noise``
not in ``production``. Only stages with such a flag (and a ``false`` variant) in the
reviewed file can be switched.

Provider: ``gateway.yaml`` ``flags.provider`` picks who evaluates (:mod:`gateway.flags.remote`):
the file itself (default), an OFREP service such as a flagd daemon, or another installed
OpenFeature provider. The file stays the allow-list and the fallback: a remote answer
only chooses among its variants, and any failure serves the stable variant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, Protocol

import structlog
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import OpenFeatureError
from openfeature.flag_evaluation import FlagValueType
from openfeature.provider import FeatureProvider
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from gateway.context import NOTE_REQUESTED_MODEL, Action, Principal, RequestContext
from gateway.errors import DependencyUnavailable, GatewayError, NotFound
from gateway.flags.provider import (
    VARIANT_PATTERN,
    CompiledFlag,
    FlagFileError,
    FlagSet,
    Json,
    parse_flag_file,
)
from gateway.flags.remote import ProviderRegistry
from gateway.flags.rollback import (
    HELD_FLAG_FILE,
    HELD_UNAVAILABLE,
    CallOutcome,
    RollbackStore,
    RollbackTracker,
    RollbackTrip,
    Thresholds,
)
from gateway.kserve import InferRequest
from gateway.policy.model import StrictModel
from gateway.policy.schema import NAME_PATTERN, ModelPolicy
from gateway.stages.base import Stage
from gateway.stages.model_exposure import UNKNOWN_MODEL

if TYPE_CHECKING:
    from gateway.policy.loader import PolicySet

__all__ = [
    "FLAGS_FILE",
    "NOTE_KEY",
    "VARIANT_HEADER",
    "CompiledFlags",
    "FeatureFlags",
    "FlagsHooks",
    "FlagsRuntime",
    "NullFlagsHooks",
    "Profile",
    "Route",
    "RouteSettings",
    "RouteTarget",
    "build_flags_stage",
    "compile_flags",
    "flags_audit_fields",
    "served_variant",
    "switchable",
    "targeting_key",
    "variant_headers",
]

log = structlog.get_logger("gateway.flags")

FLAGS_FILE: Final = "flags.json"
NOTE_KEY: Final = "flags"
# Stages kill-switched for this call, decided in on_call ("_": kept out of the audit notes).
SKIP_NOTE: Final = "_flags_kill_switched"
VARIANT_HEADER: Final = "X-Model-Variant"

Profile = Literal["production", "staging", "development"]

# The stages of compile.py's fixed order that a kill switch may name.
KNOWN_STAGES: Final = frozenset({"authn", "model_exposure", "authz", "rate_limit", "sanitize", "adversarial",
                                 "pii_mask", "dp_noise"})
# SECURITY: every later stage needs the principal and a decision on it; compile.py already
# enforces both unconditionally, and a flag must not be a way around that.
NEVER_SWITCHABLE: Final = frozenset({"authn", "authz", "feature_flags"})
# SECURITY: exposure (what is reachable at all), PII masking and DP noise protect data;
# in production a flag edit must not be able to turn them off.
PROTECTED_IN_PRODUCTION: Final = NEVER_SWITCHABLE | {"model_exposure", "pii_mask", "dp_noise"}

_KILL_SWITCH_RE: Final = re.compile(r"^stage\.([a-z_]+)\.enabled$")
_VERSION_RE: Final = re.compile(r"^[0-9]{1,19}$")
_GENERATIONS = itertools.count(1)  # build order of stages in this process (see RollbackTracker)


def switchable(stage_name: str, profile: Profile) -> bool:
    """May a kill switch turn ``stage_name`` off under ``profile``?"""
    if stage_name not in KNOWN_STAGES or stage_name in NEVER_SWITCHABLE:
        return False
    return not (profile == "production" and stage_name in PROTECTED_IN_PRODUCTION)


# -- policy models (the gateway's part of the flagd document: flag metadata) ----------------




Rate = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]


class RouteTarget(StrictModel):
    """Where a variant sends the call: a version of the flag's model, or another model."""

    model: StrictStr = Field(pattern=NAME_PATTERN)
    version: StrictStr = Field("", pattern=r"^([0-9]{1,19})?$", description="'' = the upstream's default.")


class RouteSettings(StrictModel):
    """A routing flag's ``gateway.*`` and ``rollback.*`` metadata keys (typos are errors)."""

    model: StrictStr = Field(alias="gateway.model", pattern=NAME_PATTERN,
                             description="The model name clients call; this flag chooses what serves it.")
    stable: Annotated[StrictStr, Field(pattern=VARIANT_PATTERN)] | None = Field(
        None, alias="gateway.stable",
        description="The variant rollbacks and evaluation errors fall back to; default: defaultVariant.")
    rollback_enabled: StrictBool = Field(True, alias="rollback.enabled")
    window_s: Annotated[StrictFloat | StrictInt, Field(gt=0, le=3600)] = Field(60, alias="rollback.window_s")
    min_requests: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = Field(20, alias="rollback.min_requests")
    max_error_rate: Rate = Field(0.05, alias="rollback.max_error_rate",
                                 description="Share of calls failing with a 5xx; 1 disables the check.")
    max_p99_ms: Annotated[StrictFloat | StrictInt, Field(gt=0)] | None = Field(
        None, alias="rollback.max_p99_ms", description="99th-percentile latency limit; omitted = not checked.")
    max_detector_rate: Rate | None = Field(
        None, alias="rollback.max_detector_rate", description="Share of calls on which an adversarial detector fired.")
    max_pii_rate: Rate | None = Field(
        None, alias="rollback.max_pii_rate", description="Share of calls whose model output contained PII.")
    min_signal_callers: Annotated[StrictInt, Field(ge=1, le=10_000)] = Field(
        3, alias="rollback.min_signal_callers",
        description="Distinct callers that must have produced detector hits (or PII in outputs) before those "
                    "rates may roll the variant back: one client controls what it sends.")

    def thresholds(self) -> Thresholds:
        return Thresholds(
            window_s=float(self.window_s), min_requests=self.min_requests,
            max_error_rate=float(self.max_error_rate),
            max_p99_latency_s=None if self.max_p99_ms is None else self.max_p99_ms / 1000.0,
            max_detector_rate=None if self.max_detector_rate is None else float(self.max_detector_rate),
            max_pii_rate=None if self.max_pii_rate is None else float(self.max_pii_rate),
            enabled=self.rollback_enabled, min_signal_callers=self.min_signal_callers,
        )


_GATEWAY_PREFIXES: Final = ("gateway.", "rollback.")


# -- compiled form ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One routing flag, compiled: variant -> target, and the way back."""

    flag: str
    model: str
    targets: Mapping[str, RouteTarget]
    values: Mapping[str, Json]  # variant -> value as written, to check what a provider returns
    value_type: Literal["string", "object"]
    stable: str
    definition_hash: str
    thresholds: Thresholds
    by_target: Mapping[tuple[str, str], str]  # (model, version) -> variant


@dataclass(frozen=True, slots=True)
class CompiledFlags:
    flag_set: FlagSet
    routes: Mapping[str, Route]  # requested model -> route
    kill_switches: Mapping[str, str]  # stage name -> flag key
    route_only: frozenset[str]  # models reachable only through a flag


def compile_flags(raw: bytes, models: Mapping[str, ModelPolicy], profile: Profile, *,
                  name: str = FLAGS_FILE, dp_models: Collection[str] = ()) -> CompiledFlags:
    """Validate the flag file against the exposed models and the profile; :class:`FlagFileError` if not.

    ``dp_models``: the models of ``privacy.yaml``. A route that touches one of them may only
    choose among versions of that one model (see :func:`_check_dp_route`).
    """
    flag_set = parse_flag_file(raw, name=name)
    issues: list[str] = []
    routes: dict[str, Route] = {}
    kill_switches: dict[str, str] = {}
    for key, flag in flag_set.flags.items():
        where = f"{name}: flags.{key}"
        ours = {k: v for k, v in flag.metadata.items() if k.startswith(_GATEWAY_PREFIXES)}
        if key.startswith("stage."):
            if ours:
                issues.append(f"{where}: a kill switch takes no gateway.*/rollback.* metadata")
            _check_kill_switch(key, flag, profile, kill_switches, issues, where)
        elif ours:
            route = _compile_route(key, flag, ours, models, issues, where)
            if route is None:
                continue
            if route.model in routes:
                issues.append(f"{where}: model {route.model!r} is already routed by {routes[route.model].flag!r}")
                continue
            if not _check_dp_route(route, dp_models, issues, where):
                continue
            routes[route.model] = route
    targets = {t.model for r in routes.values() for t in r.targets.values()}
    for route in routes.values():
        for target in route.targets.values():
            # SECURITY: no chains or loops; a request is routed exactly once.
            if target.model != route.model and target.model in routes:
                issues.append(f"{name}: flags.{route.flag}: target model {target.model!r} is itself routed by "
                              f"{routes[target.model].flag!r}")
    if issues:
        raise FlagFileError(issues)
    return CompiledFlags(flag_set=flag_set, routes=routes, kill_switches=kill_switches,
                         route_only=frozenset(targets - set(routes)))


def _check_dp_route(route: Route, dp_models: Collection[str], issues: list[str], where: str) -> bool:
    """A route on or to a DP-protected model stays within that model's versions.

    Why: noise and budget are looked up by the *routed* model name. A blue-green flag from
    ``tab_dp`` to ``tab_dp_green`` (not in privacy.yaml) would release raw, uncharged
    outputs under the protected name; to another protected model, it would open a second
    budget for the same clients (twice the averaging).
    """
    touched = {route.model, *(t.model for t in route.targets.values())}
    if not touched & set(dp_models) or touched == {route.model}:
        return True
    # SECURITY: no routing flag may take a request out of (or across) a model's DP budget.
    issues.append(f"{where}: model {route.model!r} or a target is DP-protected (privacy.yaml); its variants "
                  "may only be versions of that one model")
    return False


def _check_kill_switch(key: str, flag: CompiledFlag, profile: Profile, out: dict[str, str], issues: list[str],
                       where: str) -> None:
    match = _KILL_SWITCH_RE.match(key)
    if match is None:
        issues.append(f"{where}: flags under 'stage.' must be kill switches named stage.<stage>.enabled")
        return
    stage = match.group(1)
    if stage not in KNOWN_STAGES and stage not in NEVER_SWITCHABLE:
        issues.append(f"{where}: unknown stage {stage!r} (known: {' '.join(sorted(KNOWN_STAGES))})")
        return
    if not switchable(stage, profile):
        why = "in any profile" if stage in NEVER_SWITCHABLE else f"in the {profile} profile"
        issues.append(f"{where}: stage {stage!r} cannot have a kill switch {why}")
        return
    if not all(isinstance(v, bool) for v in flag.variants.values()):
        issues.append(f"{where}: kill switch variants must be true/false")
        return
    if flag.targeting is not None:
        # SECURITY: a targeted kill switch would skip a stage for some tenants or variants only.
        issues.append(f"{where}: a kill switch takes no targeting (it applies to every call)")
        return
    out[stage] = key


def _compile_route(key: str, flag: CompiledFlag, metadata: Mapping[str, Any], models: Mapping[str, ModelPolicy],
                   issues: list[str], where: str) -> Route | None:
    try:
        settings = RouteSettings.model_validate(metadata)
    except ValidationError as exc:
        for err in exc.errors(include_url=False, include_input=False):
            label = ".".join(str(p) for p in err["loc"]) or "metadata"
            unknown = " (unknown gateway key)" if err["type"] == "extra_forbidden" else ""
            issues.append(f"{where}.metadata: {label}: {err['msg']}{unknown}")
        return None
    before = len(issues)
    values = dict(flag.variants)
    kinds = {type(v) for v in values.values()}
    targets: dict[str, RouteTarget] = {}
    value_type: Literal["string", "object"] = "string"
    if kinds == {str}:
        for variant, value in values.items():
            if not isinstance(value, str) or not _VERSION_RE.match(value):
                issues.append(f"{where}.variants.{variant}: a version must be digits, got {value!r}")
                continue
            targets[variant] = RouteTarget(model=settings.model, version=value)
    elif kinds == {dict}:
        value_type = "object"
        for variant, value in values.items():
            try:
                targets[variant] = RouteTarget.model_validate(value)
            except ValidationError as exc:
                for err in exc.errors(include_url=False, include_input=False):
                    label = ".".join(str(p) for p in err["loc"])
                    issues.append(f"{where}.variants.{variant}.{label}: {err['msg']}")
    else:
        issues.append(f"{where}.variants: all variants must be versions (strings) or all "
                      "{\"model\": ..., \"version\": ...} objects")
    stable = settings.stable or flag.default_variant
    if stable is None or stable not in values:
        issues.append(f"{where}: the stable variant ({stable!r}) must be one of the variants; "
                      "set defaultVariant or gateway.stable")
    for variant, target in targets.items():
        policy = models.get(target.model)
        if policy is None:
            issues.append(f"{where}.variants.{variant}: model {target.model!r} is not exposed in gateway.yaml")
        elif target.version and policy.versions is not None and target.version not in policy.versions:
            issues.append(f"{where}.variants.{variant}: version {target.version!r} of {target.model!r} "
                          "is not exposed in gateway.yaml")
    by_target: dict[tuple[str, str], str] = {}
    for variant, target in targets.items():
        previous = by_target.setdefault((target.model, target.version), variant)
        if previous != variant:
            issues.append(f"{where}: variants {previous!r} and {variant!r} route to the same target")
    if len(issues) > before or stable is None:
        return None
    return Route(flag=key, model=settings.model, targets=targets, values=values, value_type=value_type,
                 stable=stable, definition_hash=flag.definition_hash, thresholds=settings.thresholds(),
                 by_target=by_target)


# -- hooks and the app-lifecycle part --------------------------------------------------------


class FlagsHooks(Protocol):
    """The lead's audit and metrics side. Called on the event loop; must not block."""

    def rollback(self, trip: RollbackTrip) -> None:
        """Write an audit record (``trip.audit_fields()``) and count
        ``gateway_canary_rollbacks_total{flag}``."""

    def evaluation_failed(self, flag: str, error: str) -> None:
        """A flag could not be evaluated and the stable variant was served (``error`` is a
        short OpenFeature error code)."""


class NullFlagsHooks:
    def rollback(self, trip: RollbackTrip) -> None:
        return None

    def evaluation_failed(self, flag: str, error: str) -> None:
        return None


@dataclass(slots=True)
class FlagsRuntime:
    """What outlives policy revisions: rollback statistics and overrides, hooks, the subject key.

    ``subject_key``: when set, ``targetingKey`` is an HMAC of tenant and subject, so a
    remote flag service never sees a dictionary-reversible hash. Changing it re-buckets
    every subject; keep it stable (no random default: buckets must survive restarts).
    """

    hooks: FlagsHooks = field(default_factory=NullFlagsHooks)
    tracker: RollbackTracker = field(default_factory=RollbackTracker)
    subject_key: bytes | None = None
    providers: ProviderRegistry = field(default_factory=ProviderRegistry)

    def __post_init__(self) -> None:
        if self.tracker.on_trip is None:
            self.tracker.on_trip = self.hooks.rollback

    async def close(self) -> None:
        """Close remote providers (connection pools, worker threads); at process shutdown."""
        await self.providers.close()

    @classmethod
    def create(cls, hooks: FlagsHooks | None = None, *, store: RollbackStore | None = None,
               subject_key: bytes | None = None) -> FlagsRuntime:
        """The usual construction: ``store`` shares trips between replicas (None = this process)."""
        chosen = hooks if hooks is not None else NullFlagsHooks()
        return cls(hooks=chosen, tracker=RollbackTracker(store=store), subject_key=subject_key)


def targeting_key(tenant: str, subject: str, key: bytes | None = None) -> str:
    """The sticky bucketing key of a principal: same tenant and subject, same key, forever.

    # SECURITY: the raw subject (often an e-mail) never enters the evaluation context; a
    # flag author targets a subject by this value.
    """
    message = b"infergate-flags/v1\x00" + tenant.encode() + b"\x1f" + subject.encode()
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(message).hexdigest()[:32]


# -- the stage ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureFlags(Stage):
    """Chooses the variant that serves a call, rewrites the call to it, and watches its health."""

    name: ClassVar[str] = "feature_flags"
    provider: FeatureProvider
    routes: Mapping[str, Route]
    route_only: frozenset[str]
    kill_switches: Mapping[str, str]
    profile: Profile
    runtime: FlagsRuntime
    revision: str
    generation: int
    by_flag: Mapping[str, Route] = field(default_factory=dict)
    # Stages whose switch in the reviewed file has a ``false`` variant at all.
    may_switch_off: frozenset[str] = frozenset()

    async def on_call(self, ctx: RequestContext) -> None:
        if self.kill_switches:
            ctx.notes[SKIP_NOTE] = await self._decide_kill_switches()
        model = ctx.model
        if model is None:
            return
        route = self.routes.get(model)
        if route is None:
            if model in self.route_only:
                # SECURITY: a canary or green model is reachable only through its flag; a
                # direct call looks like an unknown model (catalogue AUTHZ-17).
                raise NotFound(UNKNOWN_MODEL, reason="flags_route_target_direct")
            return
        principal = ctx.require_principal()
        tracker = self.runtime.tracker
        tracker.observe_definition(route.flag, route.definition_hash, self.generation)
        await tracker.refresh(route.flag, route.definition_hash)
        variant, reason = await self._decide(route, principal, model)
        if ctx.version:
            pinned = route.by_target.get((model, ctx.version))
            if pinned is None:
                # SECURITY: the flag owns this name's versions; "01", "2 " or an unlisted
                # version is no way around the assignment.
                raise NotFound(UNKNOWN_MODEL, reason="flags_version_not_routed")
            if pinned != variant:
                if pinned != route.stable:
                    # SECURITY: no canary forcing by naming its version (AUTHZ-17).
                    raise NotFound(UNKNOWN_MODEL, reason="flags_variant_not_assigned")
                variant, reason = route.stable, "client_pinned"  # opting out to stable is always allowed
        target = route.targets[variant]
        if target.model != model:
            ctx.notes[NOTE_REQUESTED_MODEL] = model
        ctx.model, ctx.version = target.model, target.version
        ctx.note(NOTE_KEY, {"flag": route.flag, "variant": variant, "reason": reason})

    def visible_versions(self, ctx: RequestContext) -> frozenset[str] | None:
        """Versions of a routed model this caller may name: its variant's and the stable one's.

        # SECURITY (AUTHZ-17, API9 inventory): :meth:`on_call` answers a version of another
        # variant (an unassigned canary) with the unknown model's 404, so metadata must not
        # list it either: the version list would announce the canary the call path hides.
        # None (no restriction here) for calls no flag routed, and for routes whose targets
        # are other models or the upstream's default version (no version list to narrow).
        """
        note = ctx.notes.get(NOTE_KEY)
        if not isinstance(note, dict):
            return None
        route = self.by_flag.get(str(note.get("flag")))
        variant = note.get("variant")
        if route is None or not isinstance(variant, str):
            return None
        versions: set[str] = set()
        for name in (route.stable, variant):
            target = route.targets.get(name)
            if target is None or target.model != route.model or not target.version:
                return None
            versions.add(target.version)
        return frozenset(versions)

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        """The upstream call follows the routed context (a copy: the input stays untouched)."""
        if not isinstance(ctx.notes.get(NOTE_KEY), dict) or ctx.model is None:
            return req
        if req.model == ctx.model and req.version == ctx.version:
            return req
        return dataclasses.replace(req, model=ctx.model, version=ctx.version)

    async def on_complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        note = ctx.notes.get(NOTE_KEY)
        if ctx.action is not Action.INFER or not isinstance(note, dict):
            return
        route = self.by_flag.get(str(note.get("flag")))
        variant = note.get("variant")
        if route is None or not isinstance(variant, str):
            return
        # SECURITY: only a failure the variant may have caused counts against it. A refusal
        # of the gateway's own capacity or dependencies (load shedding, per-model in-flight
        # cap, rate limiter or DP ledger down: DependencyUnavailable) says nothing about the
        # variant, and a client who can provoke one (flooding past a model's cap) would
        # otherwise roll a canary back for everyone.
        server_error = (error is not None and error.http_status >= 500
                        and not isinstance(error, DependencyUnavailable))
        detector_hit = _detector_hit(ctx, error)
        # A client's 4xx refused before the model says nothing about the variant.
        if not (error is None or server_error or detector_hit or ctx.notes.get("upstream_called")):
            return
        principal = ctx.principal
        # Length-prefixed, so no (tenant, subject) pair can spell another.
        caller = "" if principal is None else f"{len(principal.tenant)}:{principal.tenant}:{principal.subject}"
        outcome = CallOutcome(error=server_error, latency_s=max(0.0, time.monotonic() - ctx.started),
                              detector_hit=detector_hit, pii_hit=_pii_in_output(ctx), caller=caller)
        trip = self.runtime.tracker.record(route.flag, route.definition_hash, variant, route.stable,
                                           route.thresholds, outcome, revision=self.revision)
        if trip is not None:
            await self.runtime.tracker.publish(trip)

    async def kill_switched(self, stage_name: str) -> bool:
        """True when the policy's kill switch for ``stage_name`` is off. Fails safe: any
        doubt (no switch, protected stage, no ``false`` variant in the file, evaluation
        error, a remote provider down) keeps the stage running."""
        flag = self.kill_switches.get(stage_name)
        # SECURITY: checked again here, so a remote provider cannot switch a protected stage off,
        # nor one whose reviewed flag offers no "off" variant.
        if flag is None or not switchable(stage_name, self.profile) or stage_name not in self.may_switch_off:
            return False
        if self.runtime.tracker.flag_file_fault is not None:
            return False  # SECURITY: the flag file is broken: no switch is trusted, the stage runs
        try:
            details = await self.provider.resolve_boolean_details_async(flag, True, EvaluationContext())
        except Exception as exc:  # noqa: BLE001 - any provider failure keeps the stage on
            self._failed(flag, exc)
            return False
        if details.error_code is not None:
            self.runtime.hooks.evaluation_failed(flag, str(details.error_code))
            return False
        return details.value is False

    async def _decide_kill_switches(self) -> frozenset[str]:
        names = list(self.kill_switches)
        results = await asyncio.gather(*(self.kill_switched(name) for name in names))
        return frozenset(name for name, off in zip(names, results, strict=True) if off)

    def kill_switched_stages(self, ctx: RequestContext, names: Iterable[str]) -> frozenset[str]:
        """The stages to skip for this call, decided once in :meth:`on_call`: every hook of a
        call must agree (a stage whose ``on_call`` took a lease must also get ``on_complete``)."""
        decided = ctx.notes.get(SKIP_NOTE)
        if not isinstance(decided, frozenset):
            return frozenset()
        return frozenset(name for name in names if name in decided)

    async def _decide(self, route: Route, principal: Principal, model: str) -> tuple[str, str]:
        """(variant, reason). Every doubt resolves to the stable variant."""
        held = self.runtime.tracker.held(route.flag, route.definition_hash)
        if held is not None:
            if held in (HELD_UNAVAILABLE, HELD_FLAG_FILE):
                self.runtime.hooks.evaluation_failed(route.flag, held.upper())
            return route.stable, held
        key = targeting_key(principal.tenant, principal.subject, self.runtime.subject_key)
        # SECURITY: only verified identity goes in; no header, cookie or query parameter can
        # choose a variant (AUTHZ-17).
        context = EvaluationContext(targeting_key=key, attributes={
            "tenant": principal.tenant, "roles": sorted(principal.roles), "subject": key, "model": model,
        })
        stable_value = route.values[route.stable]
        try:
            if route.value_type == "string" and isinstance(stable_value, str):
                details: Any = await self.provider.resolve_string_details_async(route.flag, stable_value, context)
            elif isinstance(stable_value, dict):
                # RouteTarget allows only string fields, so this keeps the whole value.
                default: dict[str, FlagValueType] = {k: v for k, v in stable_value.items() if isinstance(v, str)}
                details = await self.provider.resolve_object_details_async(route.flag, default, context)
            else:  # pragma: no cover - compile_flags keeps value types uniform
                return route.stable, "error"
        except Exception as exc:  # noqa: BLE001 - any evaluation failure serves the stable variant
            self._failed(route.flag, exc)
            return route.stable, "error"
        if details.error_code is not None:
            self.runtime.hooks.evaluation_failed(route.flag, str(details.error_code))
            return route.stable, "error"
        variant = details.variant
        if variant is None and details.reason not in {"DEFAULT", "DISABLED", "ERROR"}:
            # A provider that answers with a value only: the file's variants have distinct values.
            variant = next((name for name, value in route.values.items() if value == details.value), None)
        if variant is None:
            return route.stable, str(details.reason or "default").lower()
        # SECURITY: a provider may only pick a variant of the pinned file, with its value.
        if variant not in route.targets or details.value != route.values[variant]:
            self.runtime.hooks.evaluation_failed(route.flag, "UNKNOWN_VARIANT")
            return route.stable, "error"
        return variant, str(details.reason or "static").lower()

    def _failed(self, flag: str, exc: Exception) -> None:
        code = str(exc.error_code) if isinstance(exc, OpenFeatureError) else "GENERAL"
        log.warning("flag_evaluation_failed", flag=flag, error=code, exc_type=type(exc).__name__)
        self.runtime.hooks.evaluation_failed(flag, code)


def _detector_hit(ctx: RequestContext, error: GatewayError | None) -> bool:
    fired = ctx.notes.get("detectors_fired")
    if isinstance(fired, list | tuple) and fired:
        return True
    return error is not None and error.reason == "input_adversarial"


def _pii_in_output(ctx: RequestContext) -> bool:
    """PII found in the model's *output* (``pii_mask``'s ``out`` counts): the input is the client's."""
    note = ctx.notes.get("pii")
    if not isinstance(note, dict):
        return False
    counts = note.get("out")
    return isinstance(counts, dict) and any(isinstance(n, int) and n > 0 for n in counts.values())


# -- helpers for the lead's front, audit and metrics ------------------------------------------


def served_variant(ctx: RequestContext) -> tuple[str, str] | None:
    """(flag, variant) that served this call, or None when no flag routed it."""
    note = ctx.notes.get(NOTE_KEY)
    if not isinstance(note, dict):
        return None
    flag, variant = note.get("flag"), note.get("variant")
    if isinstance(flag, str) and isinstance(variant, str):
        return flag, variant
    return None


def variant_headers(ctx: RequestContext) -> dict[str, str]:
    """``X-Model-Variant`` for the response; variant names are header-safe by schema."""
    served = served_variant(ctx)
    return {VARIANT_HEADER: served[1]} if served else {}


def flags_audit_fields(ctx: RequestContext) -> dict[str, str]:
    note = ctx.notes.get(NOTE_KEY)
    if not isinstance(note, dict):
        return {}
    return {"flag": str(note.get("flag")), "variant": str(note.get("variant")),
            "variant_reason": str(note.get("reason"))}


# -- building -----------------------------------------------------------------------------


def build_flags_stage(raw: bytes, policy: PolicySet, runtime: FlagsRuntime, *, profile: Profile = "production",
                      provider: FeatureProvider | None = None, name: str = FLAGS_FILE) -> FeatureFlags:
    """The stage of one policy revision, from the revision's exact flag-file bytes.

    ``raw`` empty means no ``flags.json``. One side effect, on purpose: an unusable file
    (invalid, or missing after routes were active in this process) marks the runtime's
    tracker so the *active* revision serves stable until a usable file is built
    (:meth:`~gateway.flags.rollback.RollbackTracker.flag_file_failed`); to drop all flags,
    write ``{"flags": {}}``. ``provider`` swaps the
    evaluation for another OpenFeature provider (a flagd daemon, a vendor); routes, kill
    switches and thresholds still come from the reviewed file, and a provider answer
    outside it is treated as an error. Raises :class:`gateway.policy.loader.PolicyError`.
    """
    from gateway.policy.loader import PolicyError, PolicyIssue  # lazy: the loader may one day import stages

    tracker = runtime.tracker
    if not raw and tracker.routing_seen:
        # SECURITY: a vanished flag file is a lost flag store, not "no flags": without it the
        # routed names would go to the upstream's default version (often the newest, the canary).
        tracker.flag_file_failed("flag file missing")
        raise PolicyError([PolicyIssue(name, 1, 1, "missing while routing flags are active; to remove every "
                                       "flag write {\"flags\": {}}", "restore the file")])
    try:
        compiled = compile_flags(raw or b'{"flags": {}}', policy.gateway.models, profile, name=name,
                                 dp_models=frozenset(policy.privacy.models))
    except FlagFileError as exc:
        tracker.flag_file_failed("; ".join(exc.issues))
        raise PolicyError([PolicyIssue(name, 1, 1, issue.removeprefix(f"{name}: ")) for issue in exc.issues]) from exc
    if provider is None:
        try:
            provider = runtime.providers.provider_for(policy.gateway.flags.provider, compiled.flag_set)
        except ValueError as exc:
            raise PolicyError([PolicyIssue("gateway.yaml", 1, 1, f"flags.provider: {exc}")]) from exc
    tracker.flag_file_loaded(routes=bool(compiled.routes))
    may_switch_off = frozenset(stage for stage, key in compiled.kill_switches.items()
                               if any(v is False for v in compiled.flag_set.flags[key].variants.values()))
    return FeatureFlags(
        provider=provider,
        may_switch_off=may_switch_off,
        routes=compiled.routes, route_only=compiled.route_only, kill_switches=compiled.kill_switches,
        profile=profile, runtime=runtime, revision=policy.revision, generation=next(_GENERATIONS),
        by_flag={route.flag: route for route in compiled.routes.values()},
    )
