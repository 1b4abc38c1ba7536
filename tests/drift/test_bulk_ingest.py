"""The consumer moves queued samples into the windows in bulk, with the per-sample result."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.drift.monitor import DriftMonitor
from gateway.drift.policy import DriftPolicy
from gateway.drift.window import SlidingWindow
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics
from tests.drift import TRITON_REPO, digits_classes, digits_test_split, shipped_digits_policy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def _monitor(policy: DriftPolicy, **kwargs: object) -> DriftMonitor:
    monitor = DriftMonitor(Metrics(), TRITON_REPO, clock=Clock(), **kwargs)  # type: ignore[arg-type]
    monitor.configure({"digits": policy})
    return monitor


def _call(rows: np.ndarray) -> tuple[InferRequest, InferResponse]:
    probs = np.eye(10, dtype=np.float32)[digits_classes(rows).astype(int)]
    req = InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", rows.shape, rows)])
    return req, InferResponse("digits", "1", [Tensor("probabilities", "FP32", probs.shape, probs)])


def _state(monitor: DriftMonitor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    track = monitor._tracks["digits"]
    return (track.inputs.values(), track.inputs._at[track.inputs._order()].copy(),
            track.outputs.values(), track.outputs._at[track.outputs._order()].copy(), track.pending)


@pytest.mark.parametrize("window", [500, 70])  # 70: the batch overflows the window
def test_bulk_drain_equals_ingesting_sample_by_sample(window: int) -> None:
    policy = shipped_digits_policy().model_copy(update={"window": window, "min_samples": 20,
                                                        "evaluate_every": 10_000, "max_rows_per_request": 64})
    x, _ = digits_test_split()
    bulk, single = _monitor(policy), _monitor(policy)
    sizes = [1, 3, 1, 16, 2, 1, 40, 5, 1, 7]
    start = 0
    for size in sizes:
        req, resp = _call(x[start:start + size])
        bulk.observe(req, resp)
        single.observe(req, resp)
        start += size
    samples = []
    while not single._queue.empty():
        samples.append(single._queue.get_nowait())
    for sample in samples:  # what the consumer did before: one ingest per sample
        single.ingest(sample.model, sample.inputs, sample.outputs, at=sample.at)
    assert bulk._drain() == set()
    got, want = _state(bulk), _state(single)
    for a, b in zip(got[:4], want[:4], strict=True):
        assert np.array_equal(a, b)
    assert got[4] == want[4] == sum(sizes)
    assert len(got[0]) == min(window, sum(sizes))
    assert np.all(np.diff(got[1]) >= 0)  # timestamps stay ordered: ageing out is a prefix cut


def test_bulk_drain_reports_a_due_evaluation() -> None:
    policy = shipped_digits_policy().model_copy(update={"min_samples": 20, "evaluate_every": 30})
    monitor = _monitor(policy)
    x, _ = digits_test_split()
    for start in range(0, 28, 4):
        monitor.observe(*_call(x[start:start + 4]))
    assert monitor._drain() == set()  # 28 rows: not yet
    monitor.observe(*_call(x[28:32]))
    monitor.observe(*_call(x[32:36]))
    assert monitor._drain() == {"digits"}


def test_window_takes_one_timestamp_per_row() -> None:
    window = SlidingWindow(4, 2, 10.0)
    window.extend(np.arange(12, dtype=np.float32).reshape(6, 2), np.array([1.0, 1.0, 2.0, 3.0, 3.0, 4.0]))
    assert window.values().tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert window.evict(12.5) == 1  # kept rows are at 2.0, 3.0, 3.0, 4.0: one is older than 2.5
    assert window.values().tolist() == [[6, 7], [8, 9], [10, 11]]
    with pytest.raises(ValueError, match="one per row"):
        window.extend(np.zeros((2, 2), dtype=np.float32), np.array([1.0]))


async def test_a_sample_held_by_the_consumer_is_seen_by_flush() -> None:
    """The consumer waits ``batch_s`` with a sample in hand; flush() must still count it."""
    policy = shipped_digits_policy().model_copy(update={"min_samples": 20, "evaluate_every": 10_000})
    monitor = _monitor(policy.model_copy(update={"max_rows_per_request": 64}), batch_s=30.0)
    x, _ = digits_test_split()
    monitor.start()
    try:
        monitor.observe(*_call(x[:25]))
        for _ in range(100):
            if monitor._taken:
                break
            await asyncio.sleep(0)
        assert monitor._taken and monitor._queue.empty()
        monitor.observe(*_call(x[25:50]))
        await monitor.flush()
        report = monitor.report("digits")
        assert report is not None and report.samples == 50
    finally:
        await monitor.stop()
    assert monitor._taken == []
