"""Loop metrics expose exactly what prometheus_client would, and lose no count from threads."""

from __future__ import annotations

import math
import re
import threading
from typing import ClassVar

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

import gateway.observability.metrics as metrics_module
from gateway.context import Action, RequestContext, StageRecord
from gateway.errors import InputRejected, PermissionDenied
from gateway.kserve import InferRequest, InferResponse
from gateway.observability.loop_metrics import LoopCounter, LoopHistogram
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.stages.base import Mode, Stage

_CREATED = re.compile(r"^(\S+_created(?:\{.*\})?) \S+$", re.MULTILINE)
_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.05)
# Values on and either side of bounds, zero, +Inf, -Inf and NaN (which prometheus_client
# counts in the sum but in no bucket).
_VALUES = (0.0, 0.00001, 0.0000100001, 0.00003, 0.0004, 0.05, 0.0500001, 7.5, math.inf, -math.inf, math.nan,
           0.001, 0.001, 1e-9)


def _text(registry: CollectorRegistry) -> str:
    """The exposition with each ``_created`` timestamp replaced (the only value that differs)."""
    return _CREATED.sub(r"\1 <created>", generate_latest(registry).decode())


def _pair(kind: str, labelnames: tuple[str, ...] = (), **kwargs: object) -> tuple[CollectorRegistry, object,
                                                                                   CollectorRegistry, object]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    if kind == "counter":
        return (ours, LoopCounter("t_events_total", "Events.", labelnames, registry=ours),
                theirs, Counter("t_events_total", "Events.", labelnames, registry=theirs))
    return (ours, LoopHistogram("t_seconds", "Time.", labelnames, registry=ours, **kwargs),  # type: ignore[arg-type]
            theirs, Histogram("t_seconds", "Time.", labelnames, registry=theirs, **kwargs))  # type: ignore[arg-type]


def test_counter_exposition_is_identical() -> None:
    ours_r, ours, theirs_r, theirs = _pair("counter", ("stage", "outcome"))
    for metric in (ours, theirs):
        for stage, outcome, amount in (("authn", "allowed", 1), ("authz", "denied", 1), ("authn", "allowed", 2.5),
                                       ("pii", "shadow_allowed", 0), ("authn", "allowed", 1)):
            metric.labels(stage, outcome).inc(amount)  # type: ignore[attr-defined]
        metric.labels(stage="dp", outcome="allowed").inc()  # type: ignore[attr-defined]
    assert _text(ours_r) == _text(theirs_r)
    assert ours_r.get_sample_value("t_events_total", {"stage": "authn", "outcome": "allowed"}) == 4.5
    assert "<created>" in _text(ours_r)


def test_unlabelled_counter_exposition_is_identical() -> None:
    ours_r, ours, theirs_r, theirs = _pair("counter")
    for metric in (ours, theirs):
        metric.inc()  # type: ignore[attr-defined]
        metric.inc(3)  # type: ignore[attr-defined]
    assert _text(ours_r) == _text(theirs_r)
    assert ours_r.get_sample_value("t_events_total") == 4


@pytest.mark.parametrize("buckets", [_BUCKETS, (0.5, 1.0, math.inf), (-1.0, 0.0, 1.0)])
def test_histogram_exposition_is_identical(buckets: tuple[float, ...]) -> None:
    ours_r, ours, theirs_r, theirs = _pair("histogram", ("stage",), buckets=buckets)
    for metric in (ours, theirs):
        for i, value in enumerate(_VALUES):
            metric.labels("authn" if i % 3 else "pii").observe(value)  # type: ignore[attr-defined]
    assert _text(ours_r) == _text(theirs_r)
    assert "le=\"+Inf\"" in _text(ours_r)


def test_histogram_sum_and_count_match_for_ordinary_values() -> None:
    ours_r, ours, theirs_r, theirs = _pair("histogram", buckets=_BUCKETS)
    values = [0.00002 * k for k in range(1, 400)]
    for metric in (ours, theirs):
        for value in values:
            metric.observe(value)  # type: ignore[attr-defined]
    assert _text(ours_r) == _text(theirs_r)
    assert ours_r.get_sample_value("t_seconds_count") == len(values)
    assert ours_r.get_sample_value("t_seconds_bucket", {"le": "0.0001"}) == 5


def test_misuse_is_refused_as_by_prometheus_client() -> None:
    _, counter, _, _ = _pair("counter", ("stage",))
    _, histogram, _, _ = _pair("histogram", ("stage",), buckets=_BUCKETS)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a").inc(-1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="missing label values"):
        counter.inc()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="missing label values"):
        histogram.observe(1.0)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="exemplars"):
        counter.labels("a").inc(1, exemplar={"trace_id": "abc"})  # type: ignore[attr-defined]


def test_reset_restarts_the_count() -> None:
    registry, counter, _, _ = _pair("counter")
    counter.inc(5)  # type: ignore[attr-defined]
    counter.reset()  # type: ignore[attr-defined]
    counter.inc()  # type: ignore[attr-defined]
    assert registry.get_sample_value("t_events_total") == 1


def test_counts_from_worker_threads_are_not_lost() -> None:
    """The owner (this thread) and 4 workers increment the same children at once."""
    c_reg, counter, _, _ = _pair("counter", ("stage",))
    h_reg, histogram, _, _ = _pair("histogram", ("stage",), buckets=(1.0, 2.0, 4.0))
    c_child = counter.labels("shared")  # type: ignore[attr-defined]
    h_child = histogram.labels("shared")  # type: ignore[attr-defined]
    per_thread, workers = 20_000, 4
    start = threading.Barrier(workers + 1)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            c_child.inc()
            h_child.observe(3.0)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    start.wait()
    for _ in range(per_thread):
        c_child.inc()
        h_child.observe(0.5)
    for t in threads:
        t.join()
    total = per_thread * (workers + 1)
    # CPython rarely interleaves a bare float add, so check the design itself too: the
    # workers' adds went through the locked accumulator, not the owner's unlocked one.
    assert (c_child._own, c_child._foreign) == (per_thread, per_thread * workers)
    assert (sum(h_child._counts), sum(h_child._foreign_counts)) == (per_thread, per_thread * workers)
    assert c_reg.get_sample_value("t_events_total", {"stage": "shared"}) == total
    assert h_reg.get_sample_value("t_seconds_count", {"stage": "shared"}) == total
    assert h_reg.get_sample_value("t_seconds_bucket", {"stage": "shared", "le": "1.0"}) == per_thread
    assert h_reg.get_sample_value("t_seconds_sum", {"stage": "shared"}) == per_thread * 0.5 + per_thread * workers * 3.0


def test_a_child_first_used_by_a_worker_thread_counts_every_thread() -> None:
    registry, counter, _, _ = _pair("counter", ("stage",))
    made: list[object] = []
    worker = threading.Thread(target=lambda: made.append(counter.labels("w")))  # type: ignore[attr-defined]
    worker.start()
    worker.join()
    child = made[0]
    child.inc()  # type: ignore[attr-defined]  # this thread is not the owner: the locked path
    threads = [threading.Thread(target=lambda: [child.inc() for _ in range(5_000)])  # type: ignore[attr-defined]
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.get_sample_value("t_events_total", {"stage": "w"}) == 15_001


class _Refuser(Stage):
    name: ClassVar[str] = "refuser"

    async def on_call(self, ctx: RequestContext) -> None:
        raise PermissionDenied(reason="nope")

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        raise InputRejected(reason="bad_output")


class _Passer(Stage):
    name: ClassVar[str] = "passer"

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        return req


def _reference_metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    """A ``Metrics`` built with prometheus_client's own classes, as before loop metrics."""
    with monkeypatch.context() as patch:
        patch.setattr(metrics_module, "LoopCounter", Counter)
        patch.setattr(metrics_module, "LoopHistogram", Histogram)
        reference = Metrics()
    assert type(reference.stage_decisions) is Counter
    return reference


async def _drive(metrics: Metrics) -> None:
    """A scripted mix of everything the request path records, through the real call sites."""
    pipe = Pipeline("rev", (BoundStage(_Refuser(), Mode.SHADOW), BoundStage(_Passer(), Mode.ENFORCE)), metrics)
    for i in range(3):
        ctx = RequestContext(request_id=f"r{i}", revision="rev", action=Action.INFER, transport="t", client_addr="")
        await pipe.admit(ctx)

        async def upstream(c: RequestContext, r: InferRequest) -> InferResponse:
            return InferResponse("m", "1", [])

        await pipe.infer(ctx, InferRequest("m", "", []), upstream)
    enforce = Pipeline("rev", (BoundStage(_Refuser(), Mode.ENFORCE),), metrics)
    with pytest.raises(PermissionDenied):
        await enforce.admit(RequestContext(request_id="x", revision="rev", action=Action.INFER, transport="t",
                                           client_addr=""))
    for route, code in (("/v2/models/{model}/infer", "200"), ("/v2/models/{model}/infer", "403"), ("/v2", "200")):
        metrics.child(metrics.requests, route, code).inc()
        metrics.requests.labels(route=route, code=code).inc()
        metrics.child(metrics.request_duration, route).observe(0.0031)
    metrics.refusals.labels(reason="permission_denied").inc()
    metrics.child(metrics.upstream_requests, "infer", "ok").inc()
    metrics.child(metrics.upstream_duration, "infer").observe(0.0007)
    metrics.child(metrics.audit_records, "allow").inc()
    metrics.observe("range", "digits", 0.3, False)
    metrics.observe("squeeze", "digits", 2.2, True)
    metrics.limit_decision("per_tenant", "allowed")
    metrics.limit_decision("per_tenant", "limited")


async def test_metrics_page_is_identical_to_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _reference_metrics(monkeypatch)
    ours = Metrics()
    assert type(ours.stage_decisions) is LoopCounter
    await _drive(reference)
    await _drive(ours)
    ours_text = _CREATED.sub(r"\1 <created>", ours.render().decode())
    reference_text = _CREATED.sub(r"\1 <created>", reference.render().decode())
    # Stage durations are measured, so they differ run to run; compare their shape only.
    timing = re.compile(r"^(gateway_stage_duration_seconds_(?:bucket|sum)\{.*\}) \S+$", re.MULTILINE)
    assert timing.sub(r"\1 <t>", ours_text) == timing.sub(r"\1 <t>", reference_text)
    assert 'gateway_stage_decisions_total{outcome="shadow_denied",stage="refuser"} 6.0' in ours_text
    assert 'gateway_stage_decisions_total{outcome="denied",stage="refuser"} 1.0' in ours_text
    assert 'gateway_stage_duration_seconds_count{stage="refuser"} 7.0' in ours_text
    assert 'gateway_requests_total{code="200",route="/v2"} 2.0' in ours_text


async def test_stage_records_are_immutable_and_named() -> None:
    metrics = Metrics()
    ctx = RequestContext(request_id="r", revision="rev", action=Action.INFER, transport="t", client_addr="")
    await Pipeline("rev", (BoundStage(_Refuser(), Mode.SHADOW),), metrics).admit(ctx)
    (record,) = ctx.records
    assert isinstance(record, StageRecord)
    assert (record.stage, record.outcome, record.reason) == ("refuser", "shadow_denied", "nope")
    assert record == StageRecord("refuser", "shadow_denied", "nope", record.duration_s)
    assert record.duration_s >= 0
    with pytest.raises(AttributeError):
        record.outcome = "allowed"  # type: ignore[misc]
