"""OpenTelemetry tracing: off by default, and when on one span tree per call with no PII."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import BaseTestServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import SERVICE_KEY, build_app, build_service
from gateway.audit import iter_records
from gateway.observability import tracing
from gateway.observability.tracing import Tracing
from gateway.settings import Settings
from gateway.upstream.model_repo import load_repository
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.conftest import DIGITS_BODY, TRITON_REPO, Client, GatewayTestServer
from tests.support.fake_triton import FakeTriton

PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
ALLOWED_ATTRIBUTES = frozenset({
    "infergate.route", "infergate.transport", "infergate.request_id", "infergate.policy_revision",
    "infergate.model", "infergate.model_version", "infergate.stage", "infergate.outcome", "infergate.reason",
    "infergate.upstream.operation",
})


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    async with FakeTriton([m.metadata for m in load_repository(TRITON_REPO).models]) as server:
        yield server


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(settings: Settings, fake: FakeTriton, exporter: InMemorySpanExporter,
                 aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = build_service(settings, upstream=TritonGrpcUpstream(fake.url))
    service.tracing = Tracing(provider)
    server: BaseTestServer = GatewayTestServer(build_app(settings, service=service))
    return await aiohttp_client(server)


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


async def test_one_infer_is_one_span_tree_below_the_callers_traceparent(
        traced: Client, fake: FakeTriton, exporter: InMemorySpanExporter, auth: dict[str, str],
        settings: Settings) -> None:
    headers = {**auth, "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "X-Request-ID": "trace-one"}
    resp = await traced.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=headers)
    assert resp.status == 200, await resp.text()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(roots) == 1
    root = roots[0]
    assert root.name == "/v2/models/{model}/infer"
    assert root.parent is not None and _hex(root.parent.span_id, 16) == PARENT_SPAN
    assert root.context is not None and _hex(root.context.trace_id, 32) == PARENT_TRACE
    assert all(s.context is not None and _hex(s.context.trace_id, 32) == PARENT_TRACE for s in spans)
    children = [s for s in spans if s is not root]
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in children)

    # One span per stage hook, named like the audit record's stage list, with its outcome.
    record = next(r for r in iter_records(settings.audit_dir) if r.get("request_id") == "trace-one")
    stage_spans = [s for s in children if s.name.startswith("stage ")]
    assert sorted(s.name.removeprefix("stage ") for s in stage_spans) == sorted(st["stage"] for st in record["stages"])
    assert {"authn", "authz", "sanitize", "pii_mask"} <= {s.name.removeprefix("stage ") for s in stage_spans}
    assert all((s.attributes or {}).get("infergate.outcome") == "allowed" for s in stage_spans)

    # The upstream call is a client span, and Triton was told it is the parent.
    upstream = [s for s in children if s.kind == SpanKind.CLIENT]
    assert [s.name for s in upstream] == ["upstream infer"]
    sent = dict(fake.calls[-1].metadata)["traceparent"]
    assert upstream[0].context is not None
    assert sent == f"00-{PARENT_TRACE}-{_hex(upstream[0].context.span_id, 16)}-01"


async def test_spans_carry_no_credentials_tenants_subjects_or_tensors(
        traced: Client, exporter: InMemorySpanExporter, token: Callable[..., str]) -> None:
    bearer = token(sub="zelda-subject")
    resp = await traced.post("/v2/models/digits/infer", json=DIGITS_BODY,
                             headers={"Authorization": f"Bearer {bearer}"})
    assert resp.status == 200
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    assert spans
    for span in spans:
        attributes = dict(span.attributes or {})
        assert set(attributes) <= ALLOWED_ATTRIBUTES, span.name
        text = " ".join([span.name, *map(str, attributes.values()), *(str(e.attributes) for e in span.events)])
        for secret in (bearer, "zelda-subject", "acme", "127.0.0.1", "13.0", "pixels"):
            assert secret not in text, (span.name, secret)


async def test_a_refusal_is_traced_with_its_reason_and_logged_with_the_trace_id(
        traced: Client, exporter: InMemorySpanExporter, auth: dict[str, str]) -> None:
    flat = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [3.0] * 64}]}
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        resp = await traced.post("/v2/models/digits/infer", json=flat, headers=auth)
    assert resp.status == 422
    root = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert root.attributes is not None and root.attributes["infergate.reason"]
    assert root.context is not None
    refused = [e for e in logs if e["event"] == "request_refused"]
    assert refused and refused[0]["trace_id"] == _hex(root.context.trace_id, 32)
    denied = [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("infergate.outcome") == "denied"]
    assert denied and denied[0].attributes is not None and denied[0].attributes["infergate.reason"]


def test_off_unless_configured(tmp_path: Path) -> None:
    assert not Tracing.from_env({}).enabled
    assert not Tracing.from_env({"OTEL_SERVICE_NAME": "x"}).enabled
    assert not Tracing.from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
                                ).enabled
    assert not Tracing.from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}).enabled
    console = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console"})
    otlp = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    try:
        assert console.enabled and otlp.enabled
    finally:
        console.shutdown()
        otlp.shutdown()
    with pytest.raises(RuntimeError, match="only otlp, console or none"):
        Tracing.from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert not tracing.active()  # outside a traced call, call sites take the untraced path


async def test_untraced_gateway_makes_no_spans_and_still_propagates(
        client: Client, auth: dict[str, str]) -> None:
    service = client.app[SERVICE_KEY]
    assert not service.tracing.enabled
    tp = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    resp = await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers={**auth, "traceparent": tp})
    assert resp.status == 200
    assert not tracing.active()
