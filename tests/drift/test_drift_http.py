"""Drift through the whole gateway: real inferences feed it, admins read it, the gauges scrape."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.app import SERVICE_KEY, build_app
from gateway.drift.report import fetch, render
from gateway.settings import Settings
from tests.conftest import Client, GatewayTestServer
from tests.drift import digits_test_split

# Small windows so a few batched requests reach a verdict; the statistics are the shipped ones.
TEST_DRIFT = {"window": 90, "window_s": 3600, "min_samples": 40, "evaluate_every": 20, "max_rows_per_request": 64,
              "top_k": 3, "warning": {"psi": 0.3, "ks": 0.2}, "critical": {"psi": 0.5, "ks": 0.3}}


@pytest.fixture
async def gateway(settings: Settings, policy_dir: Path,
                  aiohttp_client: Callable[..., Awaitable[Client]]) -> tuple[Client, Any]:
    path = policy_dir / "gateway.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["models"]["digits"]["drift"] = TEST_DRIFT
    path.write_text(yaml.safe_dump(doc))
    app = build_app(settings)
    client = await aiohttp_client(GatewayTestServer(app))
    return client, app[SERVICE_KEY]


def _bearer(token: Callable[..., str], **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(**kwargs)}"}


async def _infer(client: Client, headers: dict[str, str], rows: np.ndarray) -> None:
    body = {"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.astype(int).ravel().tolist()}]}
    resp = await client.post("/v2/models/digits/infer", json=body, headers=headers)
    assert resp.status == 200, await resp.text()


async def test_drift_endpoint_metrics_and_report(gateway: tuple[Client, Any], token: Callable[..., str]) -> None:
    client, service = gateway
    analyst = _bearer(token, sub="ana", roles=("analyst",))
    admin = _bearer(token, sub="root", roles=("admin",))
    x, y = digits_test_split()

    resp = await client.get("/v2/models/digits/drift", headers=admin)
    assert resp.status == 200 and (await resp.json())["status"] == "collecting"

    # Clean held-out digits, classes mixed: a verdict, and it is ok.
    rng = np.random.default_rng(3)
    clean = x[rng.permutation(len(x))[:90]]
    for start in range(0, 90, 45):
        await _infer(client, analyst, clean[start:start + 45])
    await service.drift.flush()
    resp = await client.get("/v2/models/digits/drift", headers=admin)
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ok", body
    assert body["samples"] == {"inputs": 90, "outputs": 90}
    assert body["output"]["feature"] == "output:class" and len(body["top_features"]) == 3

    # One class only (real zeros, on the pixel grid so nothing refuses them): critical.
    zeros = x[y == 0]
    for _ in range(2):
        await _infer(client, analyst, zeros[:45])
    await service.drift.flush()
    resp = await client.get("/v2/models/digits/drift", headers=admin)
    body = await resp.json()
    assert body["status"] == "critical" and body["output"]["state"] == "critical", body

    metrics = await (await client.get("/metrics")).text()
    assert re.search(r'^gateway_drift_state\{model="digits"\} 2\.0$', metrics, re.M)
    assert re.search(r'^gateway_drift_psi\{feature="output:class",model="digits"\} [0-9.]+$', metrics, re.M)
    assert len(re.findall(r'^gateway_drift_psi\{[^}]*model="digits"', metrics, re.M)) == 4  # top 3 + output
    assert re.search(r'^gateway_drift_samples\{model="digits"\} 90\.0$', metrics, re.M)

    # The CLI's fetch and text rendering against the live gateway.
    status, doc = await fetch(str(client.make_url("/")), "digits", admin["Authorization"].split(" ", 1)[1])
    assert status == 200
    text = render(doc)
    assert "model digits: CRITICAL" in text and "output:class" in text and "#" in text


async def test_drift_endpoint_needs_drift_read(gateway: tuple[Client, Any], token: Callable[..., str],
                                               policy_dir: Path) -> None:
    client, _ = gateway
    analyst = _bearer(token, sub="ana", roles=("analyst",))
    # non_enumeration (shipped): an admin surface the caller lacks looks like nothing at all.
    resp = await client.get("/v2/models/digits/drift", headers=analyst)
    assert resp.status == 404
    assert (await client.get("/v2/models/digits/drift")).status == 401
    # A model the admin's tenant cannot see is unknown, drift:read or not.
    globex_admin = _bearer(token, sub="g", tenant="globex", roles=("admin",))
    assert (await client.get("/v2/models/risk/drift", headers=globex_admin)).status == 404
    ok = await client.get("/v2/models/text_echo/drift", headers=_bearer(token, sub="root", roles=("admin",)))
    assert ok.status == 200 and (await ok.json())["status"] == "disabled"
    assert (await client.post("/v2/models/digits/drift", headers=analyst)).status == 405


async def test_without_non_enumeration_a_missing_permission_is_403(
        settings: Settings, policy_dir: Path, token: Callable[..., str],
        aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    access = policy_dir / "access.yaml"
    access.write_text(access.read_text().replace("non_enumeration: true", "non_enumeration: false"))
    client = await aiohttp_client(GatewayTestServer(build_app(settings)))
    resp = await client.get("/v2/models/digits/drift", headers=_bearer(token, sub="ana", roles=("analyst",)))
    assert resp.status == 403
