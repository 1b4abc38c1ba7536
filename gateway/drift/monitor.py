"""The drift monitor: sampled copies of traffic in, statistics, gauges and audit records out.

The request path only calls :meth:`DriftMonitor.observe`: a sampling decision, a copy of
at most ``max_rows_per_request`` rows and a ``put_nowait`` on a bounded queue. A full
queue drops the sample and counts it; nothing on the request path waits, allocates
without bound or raises. One background task drains the queue into per-model sliding
windows and every ``evaluate_every`` rows (or on a timer while rows age out) computes
the statistics in a worker thread, then exports ``gateway_drift_*`` and writes an audit
record when a model's state changes.

# SECURITY: the windows hold copies of real inputs (for ``risk``, personal data) and
# the raw model outputs (before DP noise). They live in memory only, are bounded, are
# never logged, and leave the process only as histograms of shares over at least
# ``min_samples`` rows, to holders of ``drift:read`` (an operator permission: the window
# mixes every tenant's traffic). An operator could query the upstream model directly, so
# raw-output aggregates tell them nothing the DP guarantee was protecting against.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from gateway.adversarial.profile import ProfileError
from gateway.drift.evaluate import DriftReport, DriftState, compute_report
from gateway.drift.policy import DriftPolicy
from gateway.drift.reference import OutputReference, Reference, load_reference
from gateway.drift.window import SlidingWindow
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics

__all__ = ["AuditSink", "DriftMonitor"]

log = structlog.get_logger("gateway.drift")

C = TypeVar("C")

DEFAULT_QUEUE_SIZE = 1024
DEFAULT_TICK_S = 5.0
# The consumer waits this long after a sample arrives before draining the queue, so under
# load one wake-up moves many samples into the windows in one update per model (instead
# of a wake-up, a timer and a ring-buffer write per request on the event loop).
DEFAULT_BATCH_S = 0.05


class AuditSink(Protocol):
    async def append(self, record: Mapping[str, Any]) -> int: ...


@dataclass(slots=True)
class _Sample:
    model: str
    inputs: npt.NDArray[np.float32] | None  # rows x features
    outputs: npt.NDArray[np.float32] | None  # rows x 1 (class index or score)
    at: float


class _Track:
    """One model's windows, last report and exported label set. Owned by the event loop."""

    def __init__(self, reference: Reference, policy: DriftPolicy) -> None:
        self.reference = reference
        self.policy = policy
        self.inputs = SlidingWindow(policy.window, reference.n_features, float(policy.window_s))
        self.outputs = SlidingWindow(policy.window, 1, float(policy.window_s))
        self.pending = 0
        self.state = DriftState.OK
        self.report: DriftReport | None = None
        self.exported: set[str] = set()
        self.dropped = 0

    def reconfigure(self, policy: DriftPolicy) -> None:
        if (policy.window, policy.window_s) != (self.policy.window, self.policy.window_s):
            self.inputs = self.inputs.resized(policy.window, float(policy.window_s))
            self.outputs = self.outputs.resized(policy.window, float(policy.window_s))
        self.policy = policy
        self.pending = max(self.pending, 1)  # re-judge under the new thresholds


class DriftMonitor:
    def __init__(self, metrics: Metrics, repo_dir: Path, *, audit: AuditSink | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, tick_s: float = DEFAULT_TICK_S,
                 batch_s: float = DEFAULT_BATCH_S, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.repo_dir = repo_dir
        self.audit = audit
        self.tick_s = tick_s
        self.batch_s = batch_s
        self._clock = clock
        self._wall = wall_clock
        # Sampling is not a security decision: a predictable sample only skews statistics.
        self._rng = rng or random.Random()  # noqa: S311
        self._queue: asyncio.Queue[_Sample] = asyncio.Queue(maxsize=queue_size)
        # Taken off the queue by the consumer, not yet in a window (see _run); flush() sees them.
        self._taken: list[_Sample] = []
        self._tracks: dict[str, _Track] = {}
        self._references: dict[str, Reference] = {}
        self._unavailable: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._pending_audit: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ configuration

    def configure(self, policies: Mapping[str, DriftPolicy | None]) -> None:
        """Apply a policy revision's ``drift:`` blocks (model -> policy, None = off).

        Called at startup and on every applied revision, never per request. A model whose
        profile cannot serve drift is logged and left unmonitored; the revision still applies.
        """
        enabled = {m: p for m, p in policies.items() if p is not None and p.enabled}
        for model in set(self._tracks) - set(enabled):
            self._forget(model)
        self._unavailable.clear()
        for model, policy in enabled.items():
            reference = self._references.get(model)
            if reference is None:
                try:
                    reference = load_reference(self.repo_dir, model)
                except ProfileError as exc:
                    log.error("drift_profile_unusable", model=model, error=str(exc))  # noqa: TRY400 - the message says it all
                    self._unavailable.add(model)
                    continue
                self._references[model] = reference
            track = self._tracks.get(model)
            if track is None:
                self._tracks[model] = _Track(reference, policy)
                self.metrics.drift_state.labels(model=model).set(0)
            elif track.policy != policy:
                track.reconfigure(policy)

    def _forget(self, model: str) -> None:
        track = self._tracks.pop(model)
        for feature in track.exported:
            with contextlib.suppress(KeyError):
                self.metrics.drift_psi.remove(model, feature)
        for gauge in (self.metrics.drift_state, self.metrics.drift_samples):
            with contextlib.suppress(KeyError):
                gauge.remove(model)

    # ------------------------------------------------------------------ request path

    def observe(self, req: InferRequest, resp: InferResponse) -> None:
        """Queue a sampled copy of one successful inference. Never blocks, never raises."""
        track = self._tracks.get(req.model)
        if track is None:
            return
        policy = track.policy
        if policy.sample_rate < 1 and self._rng.random() >= policy.sample_rate:
            return
        try:
            inputs = _input_rows(req.inputs, track.reference, policy.max_rows_per_request)
            outputs = _output_rows(resp.outputs, track.reference.output, policy.max_rows_per_request)
        except (ValueError, TypeError):
            # A shape the profile does not describe: nothing to compare, nothing to fail.
            return
        if inputs is None and outputs is None:
            return
        try:
            self._queue.put_nowait(_Sample(req.model, inputs, outputs, self._clock()))
        except asyncio.QueueFull:
            # SECURITY: bounded: under load the monitor loses samples, never memory or latency.
            track.dropped += 1
            self.metrics.drift_dropped.labels(model=req.model).inc()

    def observing(self, call: Callable[[C, InferRequest], Awaitable[InferResponse]]
                  ) -> Callable[[C, InferRequest], Awaitable[InferResponse]]:
        """Wrap an upstream call so each successful answer is observed after it returns."""

        async def observed(ctx: C, req: InferRequest) -> InferResponse:
            resp = await call(ctx, req)
            self.observe(req, resp)
            return resp

        return observed

    # ------------------------------------------------------------------ consumer side

    def ingest(self, model: str, inputs: npt.NDArray[np.floating] | None,
               outputs: npt.NDArray[np.floating] | None, *, at: float | None = None) -> bool:
        """Add rows to a model's windows; True when an evaluation is due."""
        track = self._tracks.get(model)
        if track is None:
            return False
        now = self._clock() if at is None else at
        if inputs is not None and inputs.shape[0]:
            track.inputs.extend(inputs, now)
        if outputs is not None and outputs.shape[0]:
            track.outputs.extend(outputs.reshape(-1, 1), now)
        track.pending += max(0 if inputs is None else inputs.shape[0], 0 if outputs is None else outputs.shape[0])
        return track.pending >= track.policy.evaluate_every

    def evaluate(self, model: str) -> DriftReport | None:
        """Judge a model's windows now, on the calling thread (tests, and the CLI's file mode)."""
        prepared = self._prepare(model)
        if prepared is None:
            return None
        track, inputs, outputs, wall = prepared
        report = compute_report(track.reference, track.policy, inputs, outputs, wall)
        self._apply(model, track, report)
        return report

    async def evaluate_async(self, model: str) -> DriftReport | None:
        """Judge a model's windows with the statistics computed in a worker thread."""
        prepared = self._prepare(model)
        if prepared is None:
            return None
        track, inputs, outputs, wall = prepared
        report = await asyncio.to_thread(compute_report, track.reference, track.policy, inputs, outputs, wall)
        if self._tracks.get(model) is track:  # not reconfigured away meanwhile
            self._apply(model, track, report)
        return report

    def _prepare(self, model: str) -> tuple[_Track, npt.NDArray[np.float32], npt.NDArray[np.float32], float] | None:
        track = self._tracks.get(model)
        if track is None:
            return None
        now = self._clock()
        track.inputs.evict(now)
        track.outputs.evict(now)
        track.pending = 0
        return track, track.inputs.values(), track.outputs.values()[:, 0], self._wall()

    def _apply(self, model: str, track: _Track, report: DriftReport) -> None:
        previous = track.state
        track.report = report
        track.state = report.state
        self._export(model, track, report)
        if report.state != previous:
            self._record_change(model, previous, report)

    def _export(self, model: str, track: _Track, report: DriftReport) -> None:
        self.metrics.drift_state.labels(model=model).set(int(report.state))
        self.metrics.drift_samples.labels(model=model).set(report.samples)
        # Bounded cardinality: the top-k input features and the output, never every feature.
        shown = {f.feature: f.psi for f in report.top(track.policy.top_k)}
        if report.output is not None:
            shown[report.output.feature] = report.output.psi
        for feature in track.exported - set(shown):
            with contextlib.suppress(KeyError):
                self.metrics.drift_psi.remove(model, feature)
        for feature, value in shown.items():
            self.metrics.drift_psi.labels(model=model, feature=feature).set(value)
        track.exported = set(shown)

    def _record_change(self, model: str, previous: DriftState, report: DriftReport) -> None:
        fields: dict[str, Any] = {
            "event": "drift_state_changed",
            "model": model,
            "from": previous.name.lower(),
            "to": report.state.name.lower(),
            "samples": report.samples,
            "output_samples": report.output_samples,
            "output": None if report.output is None else report.output.summary(),
            "top_features": [f.summary() for f in report.top(3)],
        }
        level = "warning" if report.state > previous else "info"
        getattr(log, level)("drift_state_changed", model=model, previous=fields["from"], state=fields["to"])
        if self.audit is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._append_audit(fields))
        except RuntimeError:
            log.error("drift_audit_without_loop", model=model)  # noqa: TRY400 - a wiring bug, no trace needed
            return
        self._pending_audit.add(task)
        task.add_done_callback(self._pending_audit.discard)

    async def _append_audit(self, fields: dict[str, Any]) -> None:
        assert self.audit is not None  # noqa: S101 - only scheduled with a sink
        try:
            await self.audit.append(fields)
        except Exception as exc:  # noqa: BLE001 - an audit outage must not stop monitoring
            self.metrics.audit_failures.inc()
            log.error("drift_audit_failed", model=fields["model"],  # noqa: TRY400 - expected outcome
                      error=type(exc).__name__)

    # ------------------------------------------------------------------ reading

    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self._tracks))

    def report(self, model: str) -> DriftReport | None:
        track = self._tracks.get(model)
        return None if track is None else track.report

    def describe(self, model: str) -> dict[str, Any]:
        """The body of ``GET /v2/models/{model}/drift``."""
        track = self._tracks.get(model)
        if track is None:
            status = "unavailable" if model in self._unavailable else "disabled"
            return {"model": model, "status": status}
        if track.report is None:
            return {"model": model, "status": "collecting",
                    "samples": {"inputs": len(track.inputs), "outputs": len(track.outputs)},
                    "dropped": track.dropped, "policy": {"min_samples": track.policy.min_samples}}
        return track.report.to_json(dropped=track.dropped)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="drift-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending_audit:
            await asyncio.gather(*self._pending_audit, return_exceptions=True)

    async def flush(self) -> None:
        """Ingest everything queued and evaluate every model now (tests, shutdown reports)."""
        self._drain()
        for model in self.models():
            await self.evaluate_async(model)
        if self._pending_audit:
            await asyncio.gather(*self._pending_audit, return_exceptions=True)

    def _drain(self) -> set[str]:
        """Ingest every sample taken or queued, oldest first; the models now due."""
        samples, self._taken = self._taken, []
        while True:
            try:
                samples.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        by_model: dict[str, list[_Sample]] = {}
        for sample in samples:
            by_model.setdefault(sample.model, []).append(sample)
        due: set[str] = set()
        for model, group in by_model.items():
            if self._ingest_group(model, group):
                due.add(model)
        return due

    def _ingest_group(self, model: str, group: list[_Sample]) -> bool:
        """One model's queued samples in one window update each (as ``ingest`` per sample)."""
        if len(group) == 1:
            only = group[0]
            return self.ingest(model, only.inputs, only.outputs, at=only.at)
        track = self._tracks.get(model)
        if track is None:
            return False
        inputs = [s for s in group if s.inputs is not None and s.inputs.shape[0]]
        outputs = [s for s in group if s.outputs is not None and s.outputs.shape[0]]
        if inputs:
            rows = np.concatenate([s.inputs for s in inputs if s.inputs is not None])
            track.inputs.extend(rows, _row_times([(s.at, _rows(s.inputs)) for s in inputs]))
        if outputs:
            values = np.concatenate([s.outputs.reshape(-1, 1) for s in outputs if s.outputs is not None])
            track.outputs.extend(values, _row_times([(s.at, _rows(s.outputs)) for s in outputs]))
        track.pending += sum(max(_rows(s.inputs), _rows(s.outputs)) for s in group)
        return track.pending >= track.policy.evaluate_every

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=self.tick_s)
            except TimeoutError:
                await self._on_timer()
                continue
            self._taken.append(first)
            try:
                if self.batch_s > 0:
                    await asyncio.sleep(self.batch_s)
            finally:
                due = self._drain()  # also on stop: a sample taken off the queue is kept
            for model in sorted(due):
                await self._guarded(model)

    async def _on_timer(self) -> None:
        """Rows age out without traffic: re-judge models whose windows still hold rows."""
        now = self._clock()
        for model, track in list(self._tracks.items()):
            oldest = [t for t in (track.inputs.oldest_at(), track.outputs.oldest_at()) if t is not None]
            if track.pending or (oldest and min(oldest) < now - float(track.policy.window_s)):
                await self._guarded(model)

    async def _guarded(self, model: str) -> None:
        try:
            await self.evaluate_async(model)
        except Exception:
            # A bug in the statistics must not end monitoring of every model.
            log.exception("drift_evaluation_failed", model=model)


def _rows(values: npt.NDArray[np.float32] | None) -> int:
    return 0 if values is None else int(values.shape[0])


def _row_times(counts: list[tuple[float, int]]) -> npt.NDArray[np.float64]:
    """One timestamp per row: each sample's time repeated over its rows."""
    times = np.fromiter((at for at, _ in counts), dtype=np.float64, count=len(counts))
    repeats = np.fromiter((n for _, n in counts), dtype=np.intp, count=len(counts))
    result: npt.NDArray[np.float64] = np.repeat(times, repeats)
    return result


def _input_rows(tensors: list[Tensor], reference: Reference, limit: int) -> npt.NDArray[np.float32] | None:
    tensor = next((t for t in tensors if t.name == reference.input), None)
    if tensor is None or tensor.datatype not in {"FP16", "FP32", "FP64"}:
        return None
    rows = np.asarray(tensor.data).reshape(-1, reference.n_features)
    return np.array(rows[:limit], dtype=np.float32)  # a copy: the request's buffer stays the request's


def _output_rows(tensors: list[Tensor], reference: OutputReference | None,
                 limit: int) -> npt.NDArray[np.float32] | None:
    if reference is None:
        return None
    tensor = next((t for t in tensors if t.name == reference.name), None)
    if tensor is None or tensor.datatype not in {"FP16", "FP32", "FP64"} or not tensor.shape:
        return None
    rows = np.asarray(tensor.data).reshape(tensor.shape[0], -1)[:limit]
    if reference.kind == "class":
        classes: npt.NDArray[np.float32] = np.argmax(rows, axis=1).astype(np.float32)
        return classes
    return np.array(rows[:, 0], dtype=np.float32)
