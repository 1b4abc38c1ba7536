"""Fault: the upstream (Triton over gRPC) closes the connection in the middle of a response.

A proxy between the gateway and a fake Triton relays the response HEADERS and half of the
first DATA frame of one ModelInfer answer, then drops both TCP connections. The client
must get a clear 5xx with a JSON error and the request id, the call must be audited and
logged, the model's breaker must count it, and the gateway must answer the next call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import BaseTestServer

from gateway.app import SERVICE_KEY, build_app, build_service
from gateway.audit import iter_records
from gateway.settings import Settings
from gateway.upstream.model_repo import load_repository
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.conftest import DIGITS_BODY, TRITON_REPO, Client, GatewayTestServer
from tests.support.fake_triton import CANARY, FakeTriton
from tests.support.h2_cut_proxy import H2CutProxy


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    async with FakeTriton([m.metadata for m in load_repository(TRITON_REPO).models]) as server:
        yield server


@pytest.fixture
def proxy(fake: FakeTriton) -> Iterator[H2CutProxy]:
    cutter = H2CutProxy("127.0.0.1", fake.port)
    cutter.start()
    try:
        yield cutter
    finally:
        cutter.stop()


@pytest.fixture
async def gw(settings: Settings, proxy: H2CutProxy, policy_dir: Path,
             aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    path = policy_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("infer_timeout_s: 10", "infer_timeout_s: 5\n  breaker_failures: 3"))
    service = build_service(settings, upstream=TritonGrpcUpstream(f"127.0.0.1:{proxy.port}"))
    server: BaseTestServer = GatewayTestServer(build_app(settings, service=service))
    return await aiohttp_client(server)


async def test_stream_cut_mid_response_is_a_clear_audited_counted_5xx_and_the_next_call_succeeds(
        gw: Client, proxy: H2CutProxy, fake: FakeTriton, auth: dict[str, str], settings: Settings) -> None:
    service = gw.app[SERVICE_KEY]
    warm = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)
    assert warm.status == 200  # metadata cached, channel up: the next DATA frame is an infer answer
    calls_before = fake.counts["ModelInfer"]

    proxy.cut_next_response()
    with structlog.testing.capture_logs() as logs:
        resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY,
                             headers={**auth, "X-Request-ID": "cut-mid-response"})
        body = await resp.json()
    assert proxy.cuts == 1
    assert fake.counts["ModelInfer"] == calls_before + 1  # the upstream did answer; the answer was cut
    assert resp.status in (502, 503)
    assert resp.headers["X-Request-ID"] == "cut-mid-response"
    assert resp.content_type == "application/json"
    assert "cut-mid-response" in body["error"]
    assert CANARY not in body["error"]

    (record,) = [r for r in iter_records(settings.audit_dir) if r.get("request_id") == "cut-mid-response"]
    assert record["decision"] == "deny"
    assert record["status"] == resp.status
    assert record["upstream_called"] is True
    assert record["reason"].startswith("upstream_")

    refused = [e for e in logs if e["event"] == "request_refused"]
    assert refused and refused[0]["status"] == resp.status and refused[0]["reason"] == record["reason"]
    assert any(e["event"] == "upstream_grpc_error" for e in logs)

    assert service.breakers.get("digits").failures == 1  # counted towards opening the circuit
    metrics = service.metrics.registry
    assert metrics.get_sample_value("gateway_upstream_requests_total",
                                    {"operation": "infer", "outcome": record["reason"]}) == 1
    assert metrics.get_sample_value("gateway_refusals_total", {"reason": record["reason"]}) == 1

    # The gateway stays up and the next call goes through a new connection.
    assert (await gw.get("/v2/health/live")).status == 200
    again = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)
    assert again.status == 200, await again.text()
    assert service.breakers.get("digits").failures == 0
