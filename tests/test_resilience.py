"""Faults: the upstream errors, hangs or answers nonsense; the breaker opens and closes;
shutdown drains in-flight requests without losing a response or an audit record."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import BaseTestServer

from gateway.app import build_app, build_service
from gateway.audit import iter_records
from gateway.errors import UpstreamUnavailable
from gateway.resilience.breaker import Breaker, State
from gateway.settings import Settings
from gateway.upstream.model_repo import load_repository
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.support.fake_triton import CANARY, FakeTriton, error, hang, nan_out, ok, slow, wrong_shape
from tests.support.gateway_proc import start_gateway

from .conftest import DIGITS_BODY as DIGITS
from .conftest import TRITON_REPO, Client, GatewayTestServer


class TestBreakerUnit:
    def test_opens_after_threshold_and_probes_after_cooldown(self) -> None:
        now = [0.0]
        b = Breaker(failure_threshold=3, cooldown_s=5.0, clock=lambda: now[0])
        for _ in range(3):
            b.before()
            b.failure()
        assert b.state is State.OPEN
        with pytest.raises(UpstreamUnavailable) as info:
            b.before()
        assert info.value.retry_after_s == pytest.approx(5.0)
        now[0] = 6.0
        b.before()  # the one probe
        assert b.state is State.HALF_OPEN
        with pytest.raises(UpstreamUnavailable):
            b.before()  # a second caller while the probe is out
        b.success()
        assert b.state is State.CLOSED

    def test_failed_probe_reopens(self) -> None:
        now = [0.0]
        b = Breaker(failure_threshold=1, cooldown_s=1.0, clock=lambda: now[0])
        b.before()
        b.failure()
        now[0] = 2.0
        b.before()
        b.failure()
        assert b.state is State.OPEN
        assert b.opened_at == 2.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    async with FakeTriton([m.metadata for m in load_repository(TRITON_REPO).models]) as server:
        yield server


@pytest.fixture
async def gw(settings: Settings, fake: FakeTriton, policy_dir: Path,
             aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    path = policy_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("infer_timeout_s: 10", "infer_timeout_s: 0.5\n  breaker_failures: 3\n"
                                             "  breaker_cooldown_s: 0.5"))
    service = build_service(settings, upstream=TritonGrpcUpstream(fake.url))
    server: BaseTestServer = GatewayTestServer(build_app(settings, service=service))
    return await aiohttp_client(server)


@pytest.mark.parametrize(
    ("behaviour", "status"),
    [
        (error(grpc.StatusCode.INTERNAL), 502),  # the upstream broke
        (error(grpc.StatusCode.UNAVAILABLE), 503),  # the upstream is away
        (error(grpc.StatusCode.INVALID_ARGUMENT), 422),  # the model refused the input
        (hang(), 504),  # the deadline holds
        (wrong_shape(), 502),  # nonsense answers are not passed on
        (nan_out(), 502),
    ],
)
async def test_upstream_faults_map_to_clear_statuses_without_leaks(
    gw: Client, fake: FakeTriton, auth: dict[str, str], behaviour: object, status: int
) -> None:
    fake.set(behaviour)  # type: ignore[arg-type]
    resp = await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)
    body = await resp.text()
    assert resp.status == status, body
    assert CANARY not in body
    assert "internal" not in json.loads(body)["error"].lower() or status >= 500
    if status in (503, 504):
        assert resp.status != 500


async def test_breaker_opens_fails_fast_then_recovers(gw: Client, fake: FakeTriton, auth: dict[str, str]) -> None:
    fake.set(error(grpc.StatusCode.UNAVAILABLE))
    for _ in range(3):
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 503
    calls = fake.counts["ModelInfer"]
    fast = await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)
    assert fast.status == 503
    assert "Retry-After" in fast.headers
    assert fake.counts["ModelInfer"] == calls  # open: nothing sent upstream
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_circuit_state{model="digits"} 1.0' in metrics
    fake.set(ok())
    await asyncio.sleep(0.6)
    assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 200  # the probe
    assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 200
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_circuit_state{model="digits"} 0.0' in metrics
    # other models were never affected
    risk = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]}
    assert (await gw.post("/v2/models/risk/infer", json=risk, headers=auth)).status == 200


async def test_client_errors_do_not_open_the_breaker(gw: Client, fake: FakeTriton, auth: dict[str, str]) -> None:
    fake.set(error(grpc.StatusCode.INVALID_ARGUMENT))
    for _ in range(5):
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 422
    fake.set(ok())
    assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 200


async def test_upstream_down_is_503_and_health_says_not_ready(gw: Client, fake: FakeTriton,
                                                              auth: dict[str, str]) -> None:
    await fake.stop()
    resp = await gw.post("/v2/models/digits/infer", json=DIGITS, headers=auth)
    assert resp.status in (503, 504)
    assert (await gw.get("/v2/health/ready")).status == 503
    assert (await gw.get("/v2/health/live")).status == 200


async def test_graceful_shutdown_drains_in_flight(fake: FakeTriton, tmp_path: Path) -> None:
    fake.set(slow(1.5))
    # the fake lives on this event loop: start the process from a thread so the loop keeps serving
    gw = await asyncio.to_thread(start_gateway, tmp_path, backend=f"grpc://{fake.url}")
    token = await asyncio.to_thread(gw.token)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.post(
            f"http://{gw.url}/v2/models/digits/infer", json=DIGITS, headers={"Authorization": f"Bearer {token}"}))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if fake.counts["ModelInfer"]:
                break
        gw.proc.send_signal(signal.SIGTERM)
        resp = await pending
        assert resp.status == 200
        await resp.read()
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    records = [r for r in iter_records(gw.audit_dir) if "request_id" in r]
    assert records[-1]["decision"] == "allow"
    assert records[-1]["status"] == 200


async def test_sigterm_refuses_a_request_still_uploading_its_body_at_once(tmp_path: Path) -> None:
    """s8 probe (AV-10 variant): aiohttp's shutdown stops reading connections, so a request
    whose body was still arriving could never complete: it held the shutdown for the 30 s
    body timeout and was answered 408. Now a prompt 503 + Retry-After (nothing of it ran:
    retryable), audited once, and the process exits."""
    import urllib.request

    from tests.support.liveness import eventually

    gw = await asyncio.to_thread(start_gateway, tmp_path, backend=f"local:{TRITON_REPO}")
    token = await asyncio.to_thread(gw.token)
    body = json.dumps(DIGITS).encode()
    reader, writer = await asyncio.open_connection(*gw.url.split(":"))
    writer.write((f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:50])
    await writer.drain()

    def uploading() -> bool:  # this request plus the scrape itself
        with urllib.request.urlopen(f"http://{gw.url}/metrics", timeout=5) as resp:
            return b"gateway_requests_in_flight 2.0" in resp.read()

    await eventually(lambda: uploading(), "the upload in flight", expected_s=5.0)
    gw.proc.send_signal(signal.SIGTERM)
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"Retry-After: 1" in answer
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    records = [r for r in iter_records(gw.audit_dir) if r.get("route") == "/v2/models/{model}/infer"]
    assert [(r["status"], r["reason"]) for r in records] == [(503, "shutting_down")]


async def test_sigterm_with_a_full_house_in_flight_answers_and_records_each_once(fake: FakeTriton,
                                                                                 tmp_path: Path) -> None:
    """AV-10: SIGTERM with as many calls in flight as the shipped policy admits (tenant
    concurrency 16), 6 of them charging the DP budget of ``risk``: every call is answered,
    each has exactly one terminal audit record with its status, and the ε on disk (the
    budget ledger without Redis) is the ε of the answers."""
    from tests.support.liveness import eventually

    fake.set(slow(1.5))
    gw = await asyncio.to_thread(start_gateway, tmp_path, backend=f"grpc://{fake.url}")
    token = await asyncio.to_thread(gw.token)
    risk = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}

    async def call(session: aiohttp.ClientSession, model: str, body: object) -> tuple[int, str]:
        async with session.post(f"http://{gw.url}/v2/models/{model}/infer", json=body,
                                headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            return resp.status, resp.headers["X-Request-ID"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        calls = [asyncio.create_task(call(session, "digits", DIGITS)) for _ in range(10)]
        calls += [asyncio.create_task(call(session, "risk", risk)) for _ in range(6)]
        await eventually(lambda: fake.counts["ModelInfer"] >= 16, "16 calls in flight at the upstream",
                         expected_s=5.0)
        gw.proc.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*calls)
    assert await asyncio.to_thread(gw.proc.wait, 30) == 0
    assert [status for status, _ in answers] == [200] * 16
    records = [r for r in iter_records(gw.audit_dir) if r.get("type") == "request"]
    for status, rid in answers:
        assert [r["status"] for r in records if r.get("request_id") == rid] == [status], rid
    charged = sum(float(r["eps"]) for r in records if r.get("model") == "risk")
    ledger = json.loads((gw.state_dir / "dp-ledger.json").read_bytes())
    [account] = [a for a in ledger["accounts"] if a["key"] == "dp:acme:risk"]
    assert charged == account["used"][0] == 3.0
