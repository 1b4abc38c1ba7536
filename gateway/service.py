"""What the gateway does for each kind of call, independent of the wire.

Both fronts (HTTP now, gRPC later) pin a policy snapshot, build a
:class:`RequestContext`, call these methods, and hand the context to :meth:`audit`
when the call ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import structlog

from gateway import __version__
from gateway.audit import SUBJECT_TENANT, AuditAggregator, AuditLog
from gateway.catalog import ModelCatalog
from gateway.conformance import check_request, check_response
from gateway.context import NOTE_REQUESTED_MODEL, Action, RequestContext, RequestIds
from gateway.drift.monitor import DriftMonitor
from gateway.errors import (
    ClientGone,
    DependencyUnavailable,
    GatewayError,
    InternalError,
    NotFound,
    PermissionDenied,
    UpstreamUnavailable,
)
from gateway.fronts.client_addr import NO_PROXIES, TrustedProxies
from gateway.identity.registry import KeySourceRegistry
from gateway.kserve import InferRequest, InferResponse, ModelMetadata, ServerMetadata, newest_version
from gateway.observability import tracing
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import Tracing
from gateway.policy.status import policy_status
from gateway.policy.store import PolicyStore, Snapshot
from gateway.resilience.breaker import Breakers
from gateway.resilience.model_slots import ModelSlots
from gateway.stages.dp_noise import budget_report
from gateway.stages.feature_flags import flags_audit_fields
from gateway.stages.model_exposure import UNKNOWN_MODEL
from gateway.state.base import SharedState, StateUnavailable
from gateway.upstream.base import Upstream
from privacy.dp.ledger import BudgetLedger, LedgerUnavailable
from privacy.pii.redact import redact_text

log = structlog.get_logger("gateway.service")

T = TypeVar("T")


@dataclass(slots=True)
class InferenceService:
    store: PolicyStore
    upstream: Upstream
    catalog: ModelCatalog
    metrics: Metrics
    audit_log: AuditLog
    audit_aggregator: AuditAggregator
    key_sources: KeySourceRegistry
    breakers: Breakers
    dp_ledger: BudgetLedger
    state: SharedState
    trusted_proxies: TrustedProxies = NO_PROXIES
    in_flight: int = 0
    tracing: Tracing = field(default_factory=Tracing)
    drift: DriftMonitor | None = None
    model_slots: ModelSlots = field(default_factory=ModelSlots)
    request_ids: RequestIds = field(default_factory=RequestIds)
    # The revision whose breaker thresholds are in force: they are set once per revision.
    _breakers_for: Snapshot | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_slots.on_shed is None:
            self.model_slots.on_shed = self.metrics.shed.inc

    async def call(self, ctx: RequestContext, snap: Snapshot, route: str, work: Callable[[], Awaitable[T]]) -> T:
        """One authenticated call, for every front: shed, admit, work, audit (see :meth:`_call`)."""
        if not self.tracing.enabled:
            return await self._call(ctx, snap, route, work)
        return await self.tracing.request(ctx, route, lambda: self._call(ctx, snap, route, work))

    async def _call(self, ctx: RequestContext, snap: Snapshot, route: str, work: Callable[[], Awaitable[T]]) -> T:
        """One authenticated call, for every front: shed, admit, work, audit.

        Raises the call's :class:`GatewayError` (already audited and logged); any other
        exception becomes an :class:`InternalError` with the request id. The audit record
        is written before the caller may answer: if it cannot be, the answer is a 503.
        """
        error: GatewayError | None = None
        result: T | None = None
        admitted = False
        gone: asyncio.CancelledError | None = None
        try:
            self._shed_if_full(snap)
            if snap.pipeline.preauth is not None:
                await snap.pipeline.preauth.admit(ctx.client_addr, ctx)
            _refuse_malformed_credential(ctx)
            self.in_flight += 1
            try:
                await snap.pipeline.admit(ctx)
                admitted = True
                result = await work()
            finally:
                self.in_flight -= 1
        except GatewayError as exc:
            error = exc
        except asyncio.CancelledError as exc:
            # The caller went away (client disconnected, server stopping) at an await point:
            # nobody will be answered, but what was done is recorded before cancelling on.
            gone, error = exc, ClientGone()
        except Exception as exc:
            log.exception("internal_error", route=route)
            error = InternalError(reason="internal")
            error.__cause__ = exc
        finally:
            ctx.bearer = None
            # Shielded: a cancelled call (client gone) must still release its slots and refund.
            await asyncio.shield(snap.pipeline.complete(ctx, error))
        if gone is not None:
            # Shielded: a second cancellation (server stopping) must not lose the record.
            await asyncio.shield(self._audit_gone(ctx, route, admitted))
            raise gone
        await self.audit(ctx, route=route, status=200 if error is None else error.http_status, error=error)
        if error is not None:
            self.log_refusal(ctx, error, route)
            raise error
        return result  # type: ignore[return-value]  # set whenever error is None

    async def _audit_gone(self, ctx: RequestContext, route: str, admitted: bool) -> None:
        """The one record of a call whose caller went away before its answer.

        SECURITY (nothing lost): an admitted call keeps its real decision, ``allow`` (with
        its stages, upstream call and ε as they happened), followed by an ``abandoned``
        marker, since no 2xx left; one cancelled before admission was decided is a
        ``deny``. Both carry ``client_gone`` and 499. Nobody is answered: a failed write is
        counted and logged by :meth:`audit`, not raised.
        """
        with contextlib.suppress(GatewayError):
            if admitted:
                await self.audit(ctx, route=route, status=ClientGone.http_status, error=None, gone=True)
            else:
                await self.audit(ctx, route=route, status=ClientGone.http_status, error=ClientGone())

    def _shed_if_full(self, snap: Snapshot) -> None:
        if self.in_flight >= snap.policy.gateway.limits.max_in_flight:
            # SECURITY: shed load before any work; a bounded queue, not unbounded memory.
            self.metrics.shed.inc()
            raise DependencyUnavailable("too many requests in flight", reason="load_shed", retry_after_s=1)

    @staticmethod
    def _model_cap(ctx: RequestContext, snap: Snapshot) -> int | None:
        """``models.<name>.max_in_flight`` for inference calls (AV-11); None = no per-model cap."""
        if ctx.action is not Action.INFER or ctx.model is None:
            return None
        model = snap.policy.gateway.models.get(ctx.model)
        return model.max_in_flight if model is not None else None

    def log_refusal(self, ctx: RequestContext, exc: GatewayError, route: str) -> None:
        self.metrics.refusals.labels(reason=exc.reason).inc()
        level = "error" if exc.http_status >= 500 else "info"
        getattr(log, level)("request_refused", route=route, transport=ctx.transport, status=exc.http_status,
                            reason=exc.reason)

    def pin(self) -> Snapshot:
        """Read the policy reference once; the call keeps this revision to the end."""
        return self.store.current

    async def live(self) -> bool:
        return True

    async def ready(self) -> bool:
        """Ready when a policy is active, the audit trail can be written and the upstream
        says it is ready. (Live stays 200 throughout: nothing a restart would fix.)"""
        try:
            self.store.current  # noqa: B018 - raises before the first load
        except RuntimeError:
            return False
        if not self.audit_log.healthy:
            # SECURITY (AUD-08): every inference would be a 503 audit_unavailable; say so.
            return False
        if self.state.backend != "memory":
            try:
                await self.state.ping()
            except StateUnavailable:
                return False
        try:
            return await self._timed("server_ready", self.upstream.server_ready(timeout_s=1.0))
        except GatewayError:
            return False

    async def server_metadata(self, snap: Snapshot) -> ServerMetadata:
        """The gateway answers for itself; the upstream's identity is not disclosed."""
        return ServerMetadata(name="infergate", version=__version__, extensions=("binary_tensor_data",))

    async def privacy_budget(self, ctx: RequestContext, snap: Snapshot, tenant: str | None) -> dict[str, Any]:
        """A tenant's remaining DP budget: its own principals, or ``budget:admin`` for any."""
        principal = ctx.require_principal()
        target = tenant or principal.tenant
        if target != principal.tenant and not snap.pipeline.allows(ctx, "budget:admin"):
            # SECURITY: another tenant's spending is not enumerable either.
            raise NotFound(reason="budget_other_tenant")
        try:
            return await budget_report(snap.policy.privacy, self.dp_ledger, target)
        except LedgerUnavailable as exc:
            raise DependencyUnavailable("privacy budget store unavailable", reason="dp_ledger_unavailable") from exc

    def policy_status(self, ctx: RequestContext, snap: Snapshot) -> dict[str, Any]:
        """The active revision and the reload history, for ``policy:read`` (admins)."""
        if not snap.pipeline.allows(ctx, "policy:read"):
            # SECURITY: refused like any admin surface, indistinguishable from an unknown route.
            raise NotFound(reason="policy_read_denied")
        return policy_status(self.store, snap)

    def model_drift(self, ctx: RequestContext, snap: Snapshot) -> dict[str, Any]:
        """Drift statistics of a model the caller can see, for ``drift:read`` (operators)."""
        assert ctx.model is not None  # noqa: S101 - the front only routes here with a model
        if not snap.pipeline.allows(ctx, "drift:read"):
            # SECURITY: the windows aggregate every tenant's traffic; an admin surface stays
            # hidden (404) under non_enumeration, otherwise it is refused plainly.
            if snap.policy.access.non_enumeration:
                raise NotFound(reason="drift_read_denied")
            raise PermissionDenied(reason="drift_read_denied")
        if self.drift is None:
            return {"model": ctx.model, "status": "disabled"}
        return self.drift.describe(ctx.model)

    async def model_metadata(self, ctx: RequestContext, snap: Snapshot) -> ModelMetadata:
        assert ctx.model is not None  # noqa: S101 - the front only routes here with a model
        up = snap.policy.gateway.upstream
        return await self.catalog.get(ctx.model, ctx.version, ttl_s=float(up.metadata_cache_s),
                                      timeout_s=float(up.metadata_timeout_s))

    async def pin_version(self, ctx: RequestContext, snap: Snapshot) -> None:
        """Name the version of a call that names none, when policy restricts versions.

        # SECURITY (AUTHZ-04): a call naming no version is served by the upstream's
        # default (Triton: the newest version it has loaded), which may be a version the
        # caller's grant or the model's exposure does not allow: a v1-only grant would be
        # bypassed by leaving the version out. When some versions are off limits, the
        # gateway picks the version itself: the newest allowed one the upstream serves
        # (the upstream's own default whenever that one is allowed). None allowed: 404.
        """
        if ctx.version or ctx.model is None:
            return
        allowed = snap.pipeline.visible_versions(ctx)
        if allowed is None:
            return  # every version is allowed: the upstream's default is fine
        served = (await self.model_metadata(ctx, snap)).versions
        # An upstream that lists no versions (MLServer) is asked for the newest allowed one.
        candidates = [v for v in served if v in allowed] if served else list(allowed)
        if not candidates:
            raise NotFound(UNKNOWN_MODEL, reason="model_version_not_allowed")
        ctx.version = newest_version(candidates)
        ctx.note("version_pinned", ctx.version)

    async def caller_metadata(self, ctx: RequestContext, snap: Snapshot) -> ModelMetadata:
        """The model's metadata as this caller may see it.

        # SECURITY (AUTHZ-10, BOPLA): outputs the caller's grants withhold are not listed,
        # so a restricted role learns neither their names nor their shapes. A role that may
        # read metadata but not infer (nothing released) sees the declared interface.
        """
        await self.pin_version(ctx, snap)
        meta = await self.model_metadata(ctx, snap)
        versions = snap.pipeline.visible_versions(ctx)
        if versions is not None:
            # SECURITY (AUTHZ-04): versions the caller may not call are not listed either.
            meta = replace(meta, versions=tuple(v for v in meta.versions if v in versions))
        meta = replace(meta, name=_shown_model(ctx, meta.name))
        released = snap.pipeline.released_outputs(ctx)
        if not released:
            return meta
        return replace(meta, outputs=tuple(spec for spec in meta.outputs if spec.name in released))

    async def model_ready(self, ctx: RequestContext, snap: Snapshot) -> bool:
        assert ctx.model is not None  # noqa: S101
        await self.pin_version(ctx, snap)
        await self.model_metadata(ctx, snap)  # unknown model -> NotFound, like Triton's 400/404
        return await self._timed(
            "model_ready",
            self.upstream.model_ready(ctx.model, ctx.version,
                                      timeout_s=float(snap.policy.gateway.upstream.metadata_timeout_s)),
        )

    async def infer(self, ctx: RequestContext, snap: Snapshot, req: InferRequest) -> InferResponse:
        """The admitted call's way to the model, holding one of its slots (AV-11) throughout.

        # SECURITY: the slot is taken here, once the front has the whole request, not around
        # the front's work: held from admission, a client uploading its body at 1 byte/s held
        # it for the 30 s body timeout, and 4 such uploads from one tenant answered every
        # other tenant's calls to a model with ``max_in_flight: 4`` "model busy" (503). The
        # cap is for a slow model, not a slow client. After admission, so only a caller
        # allowed to use the model learns it is busy.
        """
        with self.model_slots.hold(ctx.model or "", self._model_cap(ctx, snap)):
            return await self._infer(ctx, snap, req)

    async def _infer(self, ctx: RequestContext, snap: Snapshot, req: InferRequest) -> InferResponse:
        await self.pin_version(ctx, snap)
        if not req.version and ctx.version and req.model == ctx.model:
            # The version admission routed to (a flag) or pin_version chose is the one the
            # upstream is asked for, never its own default.
            req = replace(req, version=ctx.version)
        meta = await self.model_metadata(ctx, snap)
        check_request(req, meta)
        ctx.declared_outputs = tuple(spec.name for spec in meta.outputs)
        timeout = float(snap.policy.gateway.upstream.infer_timeout_s)

        if snap is not self._breakers_for:
            up = snap.policy.gateway.upstream
            self.breakers.configure(up.breaker_failures, float(up.breaker_cooldown_s))
            self._breakers_for = snap

        async def checked(r: InferRequest) -> InferResponse:
            resp = await self.upstream.infer(r, timeout_s=timeout)
            # SECURITY: the answer is checked against the request before any response stage
            # (a bad answer counts as an upstream failure for the breaker, like a garbled one).
            check_response(resp, r, meta)
            return resp

        async def call_upstream(c: RequestContext, r: InferRequest) -> InferResponse:
            c.notes["upstream_called"] = True
            try:
                if tracing.active():
                    return await tracing.upstream("infer", r, lambda: self.breakers.call(
                        r.model, lambda: self._timed("infer", checked(r))))
                return await self.breakers.call(r.model, lambda: self._timed("infer", checked(r)))
            except NotFound as exc:
                raise NotFound(UNKNOWN_MODEL, reason="model_unknown") from exc

        # Drift sees the request as sent upstream and the raw answer (before DP noise), sampled.
        observed = call_upstream if self.drift is None else self.drift.observing(call_upstream)
        resp = await snap.pipeline.infer(ctx, req, observed)
        shown = _shown_model(ctx, resp.model_name)
        return resp if shown == resp.model_name else replace(resp, model_name=shown)

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await call
        except GatewayError as exc:
            outcome = exc.reason
            raise
        except Exception as exc:
            outcome = "unexpected"
            log.exception("upstream_unexpected_error", operation=operation)
            raise UpstreamUnavailable(reason="upstream_unexpected_error") from exc
        finally:
            m = self.metrics
            m.child(m.upstream_requests, operation, outcome).inc()
            m.child(m.upstream_duration, operation).observe(time.perf_counter() - start)

    async def audit(self, ctx: RequestContext, *, route: str, status: int, error: GatewayError | None,
                    gone: bool = False) -> None:
        """Write the call's one audit record. Raises DependencyUnavailable if it cannot:
        fail closed, no answer leaves without its record. ``gone``: an allowed call whose
        caller left before its answer (marked ``abandoned`` once written). The record's
        ``seq`` is left in ``ctx.notes["_audit_seq"]`` for a front that learns later that
        its answer was not delivered."""
        principal = ctx.principal
        decision = "allow" if error is None else "deny"
        record: dict[str, Any] = {
            "request_id": ctx.request_id,
            "policy_revision": ctx.revision,
            "transport": ctx.transport,
            "route": route,
            "action": ctx.action.value,
            # SECURITY: the model name and version come from the client's path; an unknown
            # one ("/v2/models/078-05-1120/infer") is whatever the client typed (PII-04).
            "model": redact_text(ctx.model) if ctx.model else ctx.model,
            "model_version": redact_text(ctx.version) if ctx.version else None,
            # SECURITY: tenant and roles are token claims, verified but free text: an unknown
            # tenant or role ("078-05-1120") is recorded only redacted, like the model name.
            "tenant": redact_text(principal.tenant) if principal else None,
            # Pseudonymized and encrypted by the audit log (the person's key; erasable). The
            # person is (tenant, sub): the tenant as authenticated, unredacted, goes with it
            # (encrypted too, never in clear), so one sub in two tenants is two people.
            "subject_id": principal.subject if principal else None,
            SUBJECT_TENANT: principal.tenant if principal else None,
            "client_addr": ctx.client_addr or None,
            "roles": sorted(redact_text(role) for role in principal.roles) if principal else None,
            "decision": decision,
            "reason": error.reason if error else ("client_gone" if gone else "ok"),
            "status": status,
            "latency_ms": round((time.monotonic() - ctx.started) * 1000, 3),
            "stages": [
                {"stage": r.stage, "outcome": r.outcome, "reason": r.reason, "us": round(r.duration_s * 1e6, 1)}
                for r in ctx.records
            ],
            "upstream_called": bool(ctx.notes.get("upstream_called")),
            # Stage facts: counts, scores, variants, ε; never values (stages note nothing else).
            "notes": {k: v for k, v in ctx.notes.items() if k != "upstream_called" and not k.startswith("_")},
            "eps": _epsilon(ctx),
            **flags_audit_fields(ctx),
        }
        try:
            if principal is None and error is not None:
                # Anonymous refusals may flood: first per (client, reason, minute), then a count.
                await self.audit_aggregator.refusal(record, key=ctx.client_addr or "-")
            else:
                seq = ctx.notes["_audit_seq"] = await self.audit_log.append(record)
                if gone:
                    self.audit_log.mark_abandoned(seq, ctx.request_id, ClientGone.default_reason)
        except GatewayError as exc:
            self.metrics.audit_failures.inc()
            log.error("audit_write_failed", reason=exc.reason)  # noqa: TRY400 - expected outcome, no trace
            raise
        self.metrics.child(self.metrics.audit_records, decision).inc()


def _shown_model(ctx: RequestContext, served: str) -> str:
    """The model name an answer carries: the one the client asked for.

    # SECURITY (AUTHZ-17, API9 inventory): a flag may route a name to another model (blue-green);
    # that model is reachable only through the flag and its own name answers as an unknown model
    # (404), so metadata and inference answers must not announce it either.
    """
    requested = ctx.notes.get(NOTE_REQUESTED_MODEL)
    return requested if isinstance(requested, str) and requested else served


def _refuse_malformed_credential(ctx: RequestContext) -> None:
    """Raise the front's credential error, if it found one.

    # SECURITY (RL-13): called after the pre-auth limit, so a malformed credential (an
    # ``Authorization: Basic ...``, two Authorization headers) is counted per address
    # before its refusal: such a flood is throttled like a flood of bad tokens.
    """
    if ctx.credential_error is not None:
        raise ctx.credential_error


def _epsilon(ctx: RequestContext) -> float:
    """ε charged for this call (0 when nothing was released or it was refunded)."""
    note = ctx.notes.get("dp")
    if isinstance(note, dict):
        value = note.get("epsilon", 0.0)
        return float(value) if isinstance(value, int | float) else 0.0
    return 0.0
