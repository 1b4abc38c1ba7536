"""Scrape ``/metrics`` of a real gateway after traffic: every documented metric is there.

The documentation is the metrics table of README.md (name, type, labels). This test
checks it both ways against the code (every family ``Metrics()`` registers is in the table,
with the same type and labels) and against a real scrape after traffic that drives each
family: successful calls, refusals, the limiter, DP spending, audit writes, policy
reloads (applied and rejected), the breaker opening and closing, load shedding and a
client leaving mid-response. Every metric the dashboard, the alert rules or the READMEs
name must be in the table. Families no traffic here can drive are listed in NOT_DRIVEN
with the test that drives them; they are still checked for presence and type.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import SERVICE_KEY, build_app, build_service, runner_for
from gateway.errors import UpstreamUnavailable
from gateway.kserve import InferRequest, InferResponse
from gateway.observability.metrics import Metrics
from gateway.settings import Settings
from gateway.upstream.embedded import EmbeddedUpstream
from tests.conftest import DIGIT_ZERO, DIGITS_BODY, ROOT, TRITON_REPO
from tests.deploy.test_deploy_files import EXPECTED_NOT_YET_EXPORTED

README = ROOT / "README.md"
DOCUMENTS = [README, ROOT / "deploy" / "README.md", ROOT / "deploy" / "grafana" / "dashboards" / "infergate.json",
             ROOT / "deploy" / "prometheus" / "alerts.yml"]

# Families this test cannot drive, and where they are driven.
NOT_DRIVEN = {
    "gateway_jwks_events_total": "needs a JWKS issuer: tests/observability/test_jwks_metrics.py",
    "gateway_canary_rollbacks_total": "needs a second model version and failing canary calls (tests/flags)",
    "gateway_flag_evaluation_errors_total": "needs a broken flag rule (tests/flags)",
    "gateway_redis_duration_seconds": "Redis only (the memory backend is not a network hop): tests/state",
    "gateway_redis_errors_total": "Redis only: tests/state",
    "gateway_state_deadline_extended_total": "Redis and a lagging loop: tests/state/test_loop_lag_redis.py",
    "gateway_audit_write_failures_total": "needs a failing disk: tests/audit",
    "gateway_drift_psi": "needs a full drift window (the drift tests)",
    "gateway_drift_state": "needs a full drift window (the drift tests)",
    "gateway_drift_samples": "needs a drift evaluation (the drift tests)",
    "gateway_drift_dropped_total": "needs a full drift queue (the drift tests)",
    "gateway_metrics_denied_total": "needs a client outside metrics.allow_from: security_tests/test_1_11_secrets.py",
    "gateway_connections_refused_total": "needs a connection over limits.max_connections: tests/test_capacity.py",
}

_ROW = re.compile(r"^\| `(gateway_[a-z0-9_]+)` \| (counter|gauge|histogram) \|([^|]*)\|", re.M)


@dataclass(frozen=True)
class Documented:
    type: str
    labels: frozenset[str]


def documented() -> dict[str, Documented]:
    rows = {name: Documented(kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
            for name, kind, labels in _ROW.findall(README.read_text())}
    assert len(rows) >= 20, "README.md lost its metrics table"
    return rows


def _exposed_name(name: str, kind: str) -> str:
    return name + "_total" if kind == "counter" and not name.endswith("_total") else name


class FlakyUpstream(EmbeddedUpstream):
    """The real embedded models, with a switch to fail (breaker) or stall (shedding)."""

    fail = False
    delay_s = 0.0

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse:
        if self.fail:
            raise UpstreamUnavailable(reason="upstream_unavailable", retry_after_s=1.0)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super().infer(request, timeout_s=timeout_s)


@dataclass
class Gateway:
    url: str
    port: int
    upstream: FlakyUpstream
    runner: web.AppRunner
    policy_dir: Path


@pytest.fixture
async def gateway(settings: Settings, policy_dir: Path) -> AsyncIterator[Gateway]:
    path = policy_dir / "gateway.yaml"
    path.write_text(path.read_text()
                    .replace("  max_inputs: 64\n", "  max_inputs: 64\n  max_in_flight: 2\n")
                    .replace("infer_timeout_s: 10", "infer_timeout_s: 10\n  breaker_failures: 1\n"
                             "  breaker_cooldown_s: 0.2"))
    upstream = FlakyUpstream(TRITON_REPO)
    settings = dataclasses.replace(settings, policy_poll_s=3600.0)  # reloads only when the test asks
    service = build_service(settings, upstream=upstream)
    runner = runner_for(build_app(settings, service=service))
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # so a client can leave mid-response
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    port = sock.getsockname()[1]
    try:
        yield Gateway(f"http://127.0.0.1:{port}", port, upstream, runner, policy_dir)
    finally:
        await runner.cleanup()


def _leave_mid_response(port: int, authorization: str) -> bytes:
    """Send a call with a ~1 MB answer, read its first bytes, then reset the connection."""
    payload = json.dumps({"inputs": [{"name": "text", "shape": [250], "datatype": "BYTES",
                                      "data": ["y" * 4000] * 250}]}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /v2/models/text_echo/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
                     + authorization.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                     + b"\r\n\r\n" + payload)
        first = sock.recv(1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return first


async def _drive(gw: Gateway, session: aiohttp.ClientSession, auth: dict[str, str]) -> None:
    infer = f"{gw.url}/v2/models/digits/infer"
    service = gw.runner.app[SERVICE_KEY]
    # Successful calls: every stage, the upstream, the limiter, detector scores, audit (fsync).
    for _ in range(2):
        async with session.post(infer, json=DIGITS_BODY, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
    # A detector fires (flag only): pixels far outside what the training set had there.
    odd = list(DIGIT_ZERO)
    odd[0:8] = [16] * 8
    odd[56:64] = [16] * 8
    async with session.post(infer, json={"inputs": [{**DIGITS_BODY["inputs"][0], "data": odd}]},
                            headers=auth) as resp:
        assert resp.status in (200, 422), await resp.text()
    # Refusals: no token (anonymous, aggregated audit), an unknown model.
    async with session.post(infer, json=DIGITS_BODY) as resp:
        assert resp.status == 401
    async with session.get(f"{gw.url}/v2/models/nope", headers=auth) as resp:
        assert resp.status == 404
    # DP: one risk row charged.
    risk = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
    async with session.post(f"{gw.url}/v2/models/risk/infer", json=risk, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    # Breaker: one failure opens it (breaker_failures: 1), a success after the cooldown closes it.
    gw.upstream.fail = True
    async with session.post(infer, json=DIGITS_BODY, headers=auth) as resp:
        assert resp.status == 503
    gw.upstream.fail = False
    await asyncio.sleep(0.3)
    async with session.post(infer, json=DIGITS_BODY, headers=auth) as resp:
        assert resp.status == 200
    # Load shedding: three slow calls against max_in_flight 2.
    gw.upstream.delay_s = 0.5
    statuses = await asyncio.gather(*(_status(session, infer, auth) for _ in range(3)))
    gw.upstream.delay_s = 0.0
    assert sorted(statuses) == [200, 200, 503]
    # Policy reloads: one applied edit, one rejected edit.
    path = gw.policy_dir / "gateway.yaml"
    good = path.read_text()
    path.write_text(good.replace("  max_dims: 8\n", "  max_dims: 9\n"))
    assert await service.store.reload("test") is True
    path.write_text(good + "\nnot_a_key: 1\n")
    assert await service.store.reload("test") is False
    # A client leaving mid-response.
    first = await asyncio.to_thread(_leave_mid_response, gw.port, auth["Authorization"])
    assert first.startswith(b"HTTP/1.1 200")
    registry = service.metrics.registry
    for _ in range(200):
        if registry.get_sample_value("gateway_response_write_aborts_total",
                                     {"route": "/v2/models/{model}/infer", "reason": "client_gone"}):
            break
        await asyncio.sleep(0.05)
    # The abort is counted inside the handler; the in-flight gauge drops only when the
    # request's middleware unwinds, a moment later.
    for _ in range(200):
        if not registry.get_sample_value("gateway_requests_in_flight"):
            break
        await asyncio.sleep(0.05)


async def _status(session: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> int:
    async with session.post(url, json=DIGITS_BODY, headers=auth) as resp:
        await resp.read()
        return resp.status


def test_the_table_matches_the_code() -> None:
    docs = documented()
    metrics = Metrics()
    code: dict[str, Documented] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = getattr(value, "_type", "")
            code[_exposed_name(value._name, kind)] = Documented(kind, frozenset(getattr(value, "_labelnames", ())))
    assert sorted(set(code) - set(docs)) == [], "exported but not in README.md's metrics table"
    assert sorted(set(docs) - set(code) - set(EXPECTED_NOT_YET_EXPORTED)) == [], "documented but not exported"
    for name in set(docs) & set(code):
        assert docs[name] == code[name], name


def test_every_metric_the_docs_dashboard_and_alerts_name_is_in_the_table() -> None:
    docs = documented()
    for path in DOCUMENTS:
        for used in set(re.findall(r"\bgateway_[a-z0-9_]*[a-z0-9]\b", path.read_text())):
            base = re.sub(r"_(bucket|sum|count)$", "", used)
            assert used in docs or (base in docs and docs[base].type == "histogram"), f"{path.name}: {used}"


async def test_scrape_after_traffic_has_every_documented_family(gateway: Gateway, auth: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        await _drive(gateway, session, auth)
        async with session.get(f"{gateway.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    families = {(_exposed_name(f.name, f.type)): f for f in text_string_to_metric_families(text)}
    docs = documented()
    for name, doc in docs.items():
        if name in EXPECTED_NOT_YET_EXPORTED and name not in families:
            continue
        assert name in families, f"{name} missing from the scrape"
        family = families[name]
        assert family.type == doc.type, name
        if name in NOT_DRIVEN:
            continue
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        assert samples, f"{name}: no series after traffic"
        labels = {k for s in samples for k in s.labels if k != "le"}
        assert labels == doc.labels, (name, labels)
        if doc.type == "counter":
            assert sum(s.value for s in samples) > 0, f"{name} did not move"
        if doc.type == "histogram":
            assert sum(s.value for s in samples if s.name.endswith("_count")) > 0, f"{name} observed nothing"

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in families[name].samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    # What the traffic above must have left, family by family.
    assert value("gateway_refusals_total", reason="authn_missing_token") == 1
    assert value("gateway_load_shed_total") == 1
    assert value("gateway_upstream_requests_total", operation="infer", outcome="upstream_unavailable") == 1
    assert value("gateway_circuit_state", model="digits") == 0  # opened, then closed by the probe
    assert value("gateway_policy_reloads_total", result="applied") == 1
    assert value("gateway_policy_reloads_total", result="rejected") == 1
    assert value("gateway_policy_last_failure_timestamp_seconds") > 0
    assert value("gateway_dp_epsilon_spent_total", model="risk") == pytest.approx(0.5)
    assert value("gateway_dp_budget_remaining", model="risk") == pytest.approx(4.5)
    assert value("gateway_audit_records_total", decision="allow") >= 6
    assert value("gateway_audit_queue_depth") == 0
    assert value("gateway_requests_in_flight") == 1  # this scrape
    assert value("gateway_response_write_aborts_total", reason="client_gone") == 1
    assert value("gateway_ratelimit_decisions_total") > 0
    assert value("gateway_detector_fired_total") > 0
