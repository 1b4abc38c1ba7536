"""Every Prometheus metric the gateway exports, in one place.

Naming follows the Prometheus guide (prefix, base units, ``_total`` counters). Labels
are bounded: routes are templates, models are only those the policy knows, reasons are
the error taxonomy's codes. No subject, tenant-chosen string or raw path is a label.
Each app owns its registry so tests can build several apps in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from gateway.observability.loop_metrics import LoopCounter, LoopHistogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_M = TypeVar("_M", bound=MetricWrapperBase)
_STAGE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.05)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Series fed on every request are Loop* (loop_metrics.py): the same exposition, but a
        # plain add on the event loop instead of a lock and three calls.
        self.requests = LoopCounter(
            "gateway_requests_total", "Requests answered, by route template and status code.",
            ["route", "code"], registry=r,
        )
        self.request_duration = LoopHistogram(
            "gateway_request_duration_seconds", "Time from request start to response, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.refusals = LoopCounter(
            "gateway_refusals_total", "Requests refused, by reason code.", ["reason"], registry=r,
        )
        self.stage_decisions = LoopCounter(
            "gateway_stage_decisions_total", "Stage outcomes.", ["stage", "outcome"], registry=r,
        )
        self.stage_duration = LoopHistogram(
            "gateway_stage_duration_seconds", "Time spent in each stage hook.",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.upstream_requests = LoopCounter(
            "gateway_upstream_requests_total", "Calls to the upstream, by operation and outcome.",
            ["operation", "outcome"], registry=r,
        )
        self.upstream_duration = LoopHistogram(
            "gateway_upstream_duration_seconds", "Upstream call latency, by operation.",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.policy_reloads = Counter(
            "gateway_policy_reloads_total", "Policy reload attempts, by result (applied|rejected|unchanged).",
            ["result"], registry=r,
        )
        self.policy_reload_failures = Counter(
            "gateway_policy_reload_failures_total",
            "Refused policy reloads, by reason (invalid|vanished|error|unsigned|untrusted|tampered|replayed).",
            ["reason"], registry=r,
        )
        self.policy_info = Gauge(
            "gateway_policy_info", "The active policy revision (value 1).", ["revision"], registry=r,
        )
        self.policy_last_success = Gauge(
            "gateway_policy_last_success_timestamp_seconds", "When the active policy was applied.",
            registry=r,
        )
        self.policy_last_failure = Gauge(
            "gateway_policy_last_failure_timestamp_seconds", "When a policy reload was last rejected.",
            registry=r,
        )
        self.audit_records = LoopCounter(
            "gateway_audit_records_total", "Audit records written, by decision.", ["decision"], registry=r,
        )
        self.audit_failures = Counter(
            "gateway_audit_write_failures_total", "Audit writes that failed.", registry=r,
        )
        self.circuit_state = Gauge(
            "gateway_circuit_state", "Upstream circuit per model: 0 closed, 1 open, 2 half-open.", ["model"],
            registry=r,
        )
        self.shed = Counter(
            "gateway_load_shed_total", "Requests refused because too many were in flight.", registry=r,
        )
        self.detector_score = LoopHistogram(
            "gateway_detector_score", "Adversarial detector scores, by detector and model.",
            ["detector", "model"], buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0), registry=r,
        )
        self.detector_fired = LoopCounter(
            "gateway_detector_fired_total", "Adversarial detector firings, by detector and model.",
            ["detector", "model"], registry=r,
        )
        self.canary_rollbacks = Counter(
            "gateway_canary_rollbacks_total", "Automatic rollbacks of a canary variant, by flag.", ["flag"],
            registry=r,
        )
        self.flag_evaluation_errors = Counter(
            "gateway_flag_evaluation_errors_total", "Flag evaluations that failed safe to the stable variant.",
            ["flag"], registry=r,
        )
        self.ratelimit_decisions = LoopCounter(
            "gateway_ratelimit_decisions_total", "Limiter decisions, by limit name and decision.",
            ["limit", "decision"], registry=r,
        )
        self.redis_duration = Histogram(
            "gateway_redis_duration_seconds", "Shared-state (Redis) operation latency.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25), registry=r,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors_total", "Shared-state (Redis) operations that failed.", registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being processed.", registry=r,
        )
        # Drift (gateway/drift): features are only the top-k per model plus the output.
        self.drift_psi = Gauge(
            "gateway_drift_psi", "Population stability index vs the training profile, top drifting features.",
            ["model", "feature"], registry=r,
        )
        self.drift_state = Gauge(
            "gateway_drift_state", "Drift state per model: 0 ok (or too few samples), 1 warning, 2 critical.",
            ["model"], registry=r,
        )
        self.drift_samples = Gauge(
            "gateway_drift_samples", "Input rows in the model's drift window at the last evaluation.", ["model"],
            registry=r,
        )
        self.drift_dropped = Counter(
            "gateway_drift_dropped_total", "Sampled inferences dropped because the drift queue was full.", ["model"],
            registry=r,
        )
        self.response_write_aborts = Counter(
            "gateway_response_write_aborts_total",
            "Responses not delivered: the client stopped reading (write_timeout) or went away (client_gone).",
            ["route", "reason"], registry=r,
        )
        self.dp_epsilon_spent = Counter(
            "gateway_dp_epsilon_spent_total", "Privacy budget (epsilon) charged for released answers, by model.",
            ["model"], registry=r,
        )
        # SECURITY: by model only; a tenant label would be unbounded (tenants come from
        # tokens) and would disclose which tenant queries what, and how much.
        self.dp_budget_remaining = Gauge(
            "gateway_dp_budget_remaining",
            "Smallest epsilon left in the current period among the tenants seen spending on a model "
            "(the full default budget while none has).", ["model"], registry=r,
        )
        self.audit_queue_depth = Gauge(
            "gateway_audit_queue_depth", "Audit records waiting for the writer.", registry=r,
        )
        self.audit_fsync_duration = Histogram(
            "gateway_audit_fsync_duration_seconds", "Time of one audit group-commit fsync.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r,
        )
        self.dp_budgets = DpBudgetFloor()
        # Configuration hygiene (gateway/startup_checks.py, gateway/fronts/metrics_access.py).
        self.insecure_files = Gauge(
            "gateway_insecure_files", "Unsafe files found at start-up, by kind (secret_file|policy_writable).",
            ["kind"], registry=r,
        )
        for kind in ("secret_file", "policy_writable"):
            self.insecure_files.labels(kind=kind).set(0)
        self.metrics_denied = Counter(
            "gateway_metrics_denied_total",
            "Scrapes of /metrics refused (client not in metrics.allow_from, or a Host the metrics-only listener "
            "does not serve).",
            registry=r,
        )
        # Identity: the JWKS key sources' own counters, copied at scrape time (identity/registry.py).
        self.jwks_events = Counter(
            "gateway_jwks_events_total",
            "JWKS key source events, by event (fetch|fetch_failure|stale_served|wait_cut).",
            ["event"], registry=r,
        )
        self._jwks_seen: dict[str, int] = {}
        self.scrape_hooks: list[Callable[[], None]] = []
        # The HTTP listener's connection cap (resilience/connection_gate.py).
        self.connections_open = Gauge(
            "gateway_connections_open", "Client connections open on the HTTP listener.", registry=r,
        )
        self.connections_refused = Counter(
            "gateway_connections_refused_total",
            "Connections refused at accept time, by cap (max_connections|max_connections_per_ip).",
            ["reason"], registry=r,
        )
        for reason in ("max_connections", "max_connections_per_ip"):
            self.connections_refused.labels(reason=reason)  # alertable from zero, not from absence
        # Event-loop lag (resilience/loop_lag.py): a saturated loop makes every dependency
        # look slow; state deadlines wait out lag (state/redis.py), counted here.
        self.event_loop_lag = LoopHistogram(
            "gateway_event_loop_lag_seconds", "How late a 10 ms event-loop tick ran (the loop's queueing delay).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r,
        )
        self.state_deadline_extended = LoopCounter(
            "gateway_state_deadline_extended_total",
            "Shared-state calls whose op timeout fired while the event loop lagged, by outcome "
            "(extended: kept waiting; answered: Redis replied in the extension; failed: it did not).",
            ["outcome"], registry=r,
        )
        for outcome in ("extended", "answered", "failed"):
            self.state_deadline_extended.labels(outcome=outcome)  # alertable from zero
        # Labelled children of the per-request metrics, see child().
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, cached: ``labels()`` costs ~1.6 µs and a request makes
        about 30 such calls. Only for metrics never cleared or ``remove()``-d (a cached child
        would then be detached) and with bounded label values (the cache keeps them all)."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def observe(self, detector: str, model: str, score: float, fired: bool) -> None:
        """The adversarial stage's DetectorMetrics hook."""
        self.child(self.detector_score, detector, model).observe(score)
        if fired:
            self.child(self.detector_fired, detector, model).inc()

    def limit_decision(self, limit: str, outcome: str) -> None:
        """The rate limiter's metrics hook (limit names come from policy: bounded)."""
        self.child(self.ratelimit_decisions, limit, outcome).inc()

    def connection_opened(self) -> None:
        """The connection gate's hooks (reasons are the gate's two constants: bounded)."""
        self.connections_open.inc()

    def connection_closed(self) -> None:
        self.connections_open.dec()

    def connection_refused(self, reason: str) -> None:
        self.child(self.connections_refused, reason).inc()

    def state_op(self, backend: str, op: str, seconds: float, error: str | None) -> None:
        """The shared-state layer's observer; only the Redis backend is a network hop."""
        if backend == "memory":
            return
        self.redis_duration.observe(seconds)
        if error is not None:
            self.redis_errors.inc()

    def loop_lag(self, seconds: float) -> None:
        """A sink of :class:`~gateway.resilience.loop_lag.LoopLagMonitor` (one call per tick)."""
        self.event_loop_lag.observe(seconds)

    def state_deadline_extension(self, backend: str, op: str, outcome: str) -> None:
        """The shared-state layer's report of a deadline waited out past the loop's lag."""
        del backend, op  # one state backend per process; the outcome is what an operator alerts on
        self.child(self.state_deadline_extended, outcome).inc()

    def set_revision(self, revision: str) -> None:
        """Keep exactly one ``gateway_policy_info`` series: the active revision's."""
        self.policy_info.clear()
        self.policy_info.labels(revision=revision).set(1)

    def dp_spent(self, model: str, epsilon: float) -> None:
        """The DP stage's hook: epsilon charged for one released answer."""
        if epsilon > 0:
            self.dp_epsilon_spent.labels(model=model).inc(epsilon)

    def dp_remaining(self, model: str, tenant: str, remaining: float, period_end_s: float) -> None:
        """The DP stage's hook: a tenant's balance after a charge or a refusal (tenant stays in memory)."""
        self.dp_budgets.update(model, tenant, remaining, period_end_s)

    def dp_budgets_configured(self, full_epsilon: Mapping[str, float]) -> None:
        """The DP stage's hook at compile time: the models with a budget, and what the gauge
        shows for each while nobody has spent (a model dropped from policy disappears)."""
        self.dp_budgets.configure(full_epsilon)

    def copy_jwks_counters(self, totals: Mapping[str, int]) -> None:
        """Advance ``gateway_jwks_events_total`` to the key sources' running totals.

        Why copied, not counted in place: the key sources are identity code with plain int
        counters (no Prometheus dependency). A total that went down (a source replaced by a
        policy reload) restarts the baseline instead of un-counting.
        """
        for event, name in (("fetch", "fetches"), ("fetch_failure", "failures"),
                            ("stale_served", "stale_served"), ("wait_cut", "waits_cut")):
            now = int(totals.get(name, 0))
            delta = now - self._jwks_seen.get(name, 0)
            if delta > 0:
                self.child(self.jwks_events, event).inc(delta)
            self._jwks_seen[name] = now

    def render(self) -> bytes:
        for hook in self.scrape_hooks:
            hook()
        floors = self.dp_budgets.floors(time.time())
        self.dp_budget_remaining.clear()
        for model, value in floors.items():
            self.dp_budget_remaining.labels(model=model).set(value)
        return generate_latest(self.registry)


class DpBudgetFloor:
    """Per model, the lowest balance among tenants in their current period.

    Balances only fall within a period (refunds aside), so the floor is what an operator
    alerts on: the first tenant to run out. Expired periods are dropped at scrape time,
    so a new day shows the full budget again. Tenants are keys in memory, never labels;
    at most ``max_tenants`` per model are kept, the lowest balances first.
    """

    def __init__(self, max_tenants: int = 10_000) -> None:
        self.max_tenants = max_tenants
        self._full: dict[str, float] = {}
        self._balances: dict[str, dict[str, tuple[float, float]]] = {}

    def configure(self, full_epsilon: Mapping[str, float]) -> None:
        self._full = dict(full_epsilon)
        self._balances = {m: b for m, b in self._balances.items() if m in self._full}

    def update(self, model: str, tenant: str, remaining: float, period_end_s: float) -> None:
        balances = self._balances.setdefault(model, {})
        if tenant not in balances and len(balances) >= self.max_tenants:
            highest = max(balances, key=lambda t: balances[t][0])
            if balances[highest][0] <= remaining:
                return
            del balances[highest]
        balances[tenant] = (remaining, period_end_s)

    def floors(self, now: float) -> dict[str, float]:
        out = dict(self._full)
        for model, balances in self._balances.items():
            if model not in out:
                continue
            for tenant in [t for t, (_, end) in balances.items() if end <= now]:
                del balances[tenant]
            if balances:
                out[model] = min(value for value, _ in balances.values())
        return out
