"""The monitor fed directly (no HTTP): clean digits stay ok, shifted digits alarm in time."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.drift.evaluate import DriftState
from gateway.drift.monitor import DriftMonitor
from gateway.drift.policy import DriftPolicy
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics
from tests.drift import TRITON_REPO, Rows, digits_classes, digits_test_split, shipped_digits_policy


class RecordingAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def append(self, record: Mapping[str, Any]) -> int:
        self.records.append(dict(record))
        return len(self.records)


def _monitor(policy: DriftPolicy, **kwargs: Any) -> tuple[DriftMonitor, Metrics]:
    metrics = Metrics()
    monitor = DriftMonitor(metrics, TRITON_REPO, **kwargs)
    monitor.configure({"digits": policy})
    return monitor, metrics


def _feed(monitor: DriftMonitor, x: Rows, step: int) -> list[tuple[int, DriftState | None]]:
    """(rows fed so far, verdict) after each due evaluation; None while collecting."""
    verdicts: list[tuple[int, DriftState | None]] = []
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        if monitor.ingest("digits", chunk, digits_classes(chunk)):
            report = monitor.evaluate("digits")
            assert report is not None
            verdicts.append((start + len(chunk), None if report.collecting else report.state))
    return verdicts


def _brightness(x: Rows, y: np.ndarray, rng: np.random.Generator) -> Rows:
    return np.clip(x + 2, 0, 16).astype(np.float32)


def _noise(x: Rows, y: np.ndarray, rng: np.random.Generator) -> Rows:
    return (x + rng.normal(0.0, 1.0, x.shape)).astype(np.float32)


def _one_class(x: Rows, y: np.ndarray, rng: np.random.Generator) -> Rows:
    zeros = x[y == 0]
    return zeros[rng.integers(0, len(zeros), len(x))]


@pytest.mark.parametrize("shift", [_brightness, _noise, _one_class], ids=["brightness+2", "noise", "one_class"])
async def test_clean_digits_stay_ok_then_shift_alarms_within_the_window(
        shift: Callable[[Rows, np.ndarray, np.random.Generator], Rows]) -> None:
    policy = shipped_digits_policy()
    audit = RecordingAudit()
    monitor, metrics = _monitor(policy, audit=audit)
    x, y = digits_test_split()
    rng = np.random.default_rng(7)

    clean = _feed(monitor, x[rng.permutation(len(x))], policy.evaluate_every)
    judged = [state for _, state in clean if state is not None]
    assert len(judged) >= 4, "clean data must reach real verdicts, not only 'collecting'"
    assert all(state is DriftState.OK for state in judged), clean
    assert metrics.drift_state.labels(model="digits")._value.get() == 0

    shifted = shift(x, y, rng)[: policy.window]
    verdicts = _feed(monitor, shifted, policy.evaluate_every)
    alarm = next((rows for rows, state in verdicts if state is DriftState.CRITICAL), None)
    assert alarm is not None and alarm <= policy.window, verdicts
    assert metrics.drift_state.labels(model="digits")._value.get() == int(DriftState.CRITICAL)

    await asyncio.sleep(0)  # the audit append runs as a task
    changes = [r for r in audit.records if r["event"] == "drift_state_changed"]
    assert changes and changes[0]["from"] == "ok" and changes[-1]["to"] == "critical"
    assert changes[-1]["top_features"] or changes[-1]["output"]


def test_one_class_shows_as_prediction_drift() -> None:
    policy = shipped_digits_policy()
    monitor, metrics = _monitor(policy)
    x, y = digits_test_split()
    zeros = x[y == 0]
    monitor.ingest("digits", zeros, digits_classes(zeros))
    monitor.ingest("digits", zeros, digits_classes(zeros))
    monitor.ingest("digits", zeros, digits_classes(zeros))
    monitor.ingest("digits", zeros, digits_classes(zeros))
    monitor.ingest("digits", zeros, digits_classes(zeros))
    report = monitor.evaluate("digits")
    assert report is not None and report.output is not None
    assert report.output.feature == "output:class"
    assert report.output.state is DriftState.CRITICAL
    assert report.output.window[1] > 0.9  # bin of class 0 (after the open "below" bin)
    assert metrics.drift_psi.labels(model="digits", feature="output:class")._value.get() > policy.critical.psi


def test_exported_features_are_bounded_to_top_k() -> None:
    policy = shipped_digits_policy().model_copy(update={"top_k": 3})
    monitor, metrics = _monitor(policy)
    x, _ = digits_test_split()
    noisy = (x + np.random.default_rng(1).normal(0, 1, x.shape)).astype(np.float32)
    monitor.ingest("digits", noisy, digits_classes(noisy))
    report = monitor.evaluate("digits")
    assert report is not None and report.state is DriftState.CRITICAL
    series = [s for fam in metrics.registry.collect() if fam.name == "gateway_drift_psi" for s in fam.samples]
    features = {s.labels["feature"] for s in series}
    assert len(series) == 4 and "output:class" in features  # top 3 inputs + the output
    assert features - {"output:class"} == {f.feature for f in report.top(3)}


def test_verdict_waits_for_min_samples() -> None:
    policy = shipped_digits_policy()
    monitor, _ = _monitor(policy)
    x, _ = digits_test_split()
    bright = np.clip(x + 2, 0, 16).astype(np.float32)[: policy.min_samples - 1]
    monitor.ingest("digits", bright, digits_classes(bright))
    report = monitor.evaluate("digits")
    assert report is not None and report.collecting and report.state is DriftState.OK
    assert monitor.describe("digits")["status"] == "collecting"


def test_rows_age_out_of_the_time_window() -> None:
    now = [1000.0]
    policy = shipped_digits_policy().model_copy(update={"window_s": 60})
    monitor, _ = _monitor(policy, clock=lambda: now[0])
    x, _ = digits_test_split()
    monitor.ingest("digits", x[:300], digits_classes(x[:300]))
    assert monitor.evaluate("digits").samples == 300  # type: ignore[union-attr]
    now[0] += 61
    report = monitor.evaluate("digits")
    assert report is not None and report.samples == 0 and report.collecting


def test_full_queue_drops_and_counts() -> None:
    monitor, metrics = _monitor(shipped_digits_policy(), queue_size=2)
    x, _ = digits_test_split()
    req = InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (1, 64), x[:1])])
    resp = InferResponse(model_name="digits", model_version="1",
                         outputs=[Tensor("probabilities", "FP32", (1, 10), np.eye(10, dtype=np.float32)[3:4])])
    for _ in range(5):
        monitor.observe(req, resp)  # no consumer running: the queue fills
    assert metrics.drift_dropped.labels(model="digits")._value.get() == 3
    assert monitor.describe("digits")["dropped"] == 3


def test_sampling_rate_and_row_cap() -> None:
    policy = shipped_digits_policy().model_copy(update={"sample_rate": 0.5, "max_rows_per_request": 4})
    seed_rng, check_rng = random.Random(5), random.Random(5)
    monitor, _ = _monitor(policy, rng=seed_rng, queue_size=1000)
    x, _ = digits_test_split()
    req = InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (10, 64), x[:10])])
    resp = InferResponse(model_name="digits", model_version="1", outputs=[])
    for _ in range(200):
        monitor.observe(req, resp)
    expected = sum(check_rng.random() < 0.5 for _ in range(200))
    assert 0 < expected < 200
    queued = monitor._queue.qsize()
    assert queued == expected
    monitor._drain()
    assert monitor.describe("digits")["samples"]["inputs"] == min(policy.window, 4 * expected)


async def test_background_task_consumes_the_wrapped_upstream_call() -> None:
    policy = shipped_digits_policy().model_copy(update={"min_samples": 20, "evaluate_every": 10})
    monitor, metrics = _monitor(policy, tick_s=0.05)
    x, _ = digits_test_split()

    async def upstream(ctx: None, req: InferRequest) -> InferResponse:
        probs = np.eye(10, dtype=np.float32)[digits_classes(req.inputs[0].data).astype(int)]
        return InferResponse(model_name="digits", model_version="1",
                             outputs=[Tensor("probabilities", "FP32", probs.shape, probs)])

    call = monitor.observing(upstream)
    monitor.start()
    try:
        for i in range(0, 64, 16):
            rows = x[i:i + 16]
            await call(None, InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", rows.shape,
                                                                                    rows)]))
        for _ in range(200):
            if monitor.report("digits") is not None and monitor.report("digits").samples == 64:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
    finally:
        await monitor.stop()
    report = monitor.report("digits")
    assert report is not None and report.samples == 64 and report.output_samples == 64
    assert metrics.drift_samples.labels(model="digits")._value.get() == 64


def test_models_without_a_numeric_profile_are_reported_unavailable() -> None:
    metrics = Metrics()
    monitor = DriftMonitor(metrics, TRITON_REPO)
    monitor.configure({"text_echo": DriftPolicy(), "digits": None})
    assert monitor.describe("text_echo") == {"model": "text_echo", "status": "unavailable"}
    assert monitor.describe("digits") == {"model": "digits", "status": "disabled"}


def test_reconfigure_keeps_newest_rows_and_removing_forgets_series() -> None:
    policy = shipped_digits_policy()
    monitor, metrics = _monitor(policy)
    x, _ = digits_test_split()
    monitor.ingest("digits", x[:400], digits_classes(x[:400]))
    monitor.configure({"digits": policy.model_copy(update={"window": 250, "min_samples": 100})})
    report = monitor.evaluate("digits")
    assert report is not None and report.samples == 250
    assert any(f.name == "gateway_drift_psi" and f.samples for f in metrics.registry.collect())
    monitor.configure({})
    assert not [s for f in metrics.registry.collect() if f.name.startswith("gateway_drift_") for s in f.samples
                if s.labels.get("model") == "digits" and not s.name.endswith(("_total", "_created"))]


@pytest.mark.parametrize("bad", [{"min_samples": 600, "window": 500},
                                 {"warning": {"psi": 0.6, "ks": 0.2}, "critical": {"psi": 0.5, "ks": 0.3}},
                                 {"sample_rate": 0}, {"windw": 10}])
def test_policy_rejects_inconsistent_blocks(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DriftPolicy.model_validate(bad)
