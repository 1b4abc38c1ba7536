"""Differential privacy through the HTTP front: noised scores, budgets, 429, the budget endpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.app import SERVICE_KEY
from gateway.settings import Settings

from .conftest import Client
from .test_http_front import audit_records


def risk_body(value: float, rows: int = 1) -> dict[str, object]:
    return {"inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32", "data": [value] * 30 * rows}]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_scores_are_noised_charged_and_refused_when_spent(client: Client, token: Callable[..., str],
                                                                settings: Settings) -> None:
    headers = bearer(token())
    scores = []
    for i in range(5):  # 5 answers x 2 rows = 10 rows = the whole day's ε of 5 at 0.5 per row
        resp = await client.post("/v2/models/risk/infer", json=risk_body(1.0 + i, rows=2), headers=headers)
        assert resp.status == 200, await resp.text()
        scores += (await resp.json())["outputs"][0]["data"]
        assert float(resp.headers["X-Privacy-Budget-Remaining"]) == 5.0 - (i + 1) * 1.0
    # Laplace with b = 2 around probabilities in [0, 1]: answers leave [0, 1]
    assert any(s < 0 or s > 1 for s in scores)
    refused = await client.post("/v2/models/risk/infer", json=risk_body(9.0), headers=headers)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert "privacy budget" in (await refused.json())["error"]
    records = [r for r in audit_records(settings) if r["model"] == "risk"]
    assert [r["eps"] for r in records] == [1.0] * 5 + [0.0]
    assert records[-1]["reason"] == "dp_budget_exhausted"


async def test_exact_repeat_is_free(client: Client, token: Callable[..., str]) -> None:
    headers = bearer(token())
    first = await client.post("/v2/models/risk/infer", json=risk_body(3.0), headers=headers)
    again = await client.post("/v2/models/risk/infer", json=risk_body(3.0), headers=headers)
    assert (await first.json())["outputs"] == (await again.json())["outputs"]
    assert first.headers["X-Privacy-Budget-Remaining"] == again.headers["X-Privacy-Budget-Remaining"]


async def test_budget_endpoint_is_tenant_scoped(client: Client, token: Callable[..., str]) -> None:
    own = await client.get("/v2/privacy/budget", headers=bearer(token()))
    assert own.status == 200
    assert "risk" in str(await own.json())
    other = await client.get("/v2/privacy/budget?tenant=globex", headers=bearer(token()))
    assert other.status == 404
    admin = await client.get("/v2/privacy/budget?tenant=globex", headers=bearer(token(roles=("admin",))))
    assert admin.status == 200
    assert (await client.get("/v2/privacy/budget")).status == 401


async def test_a_privacy_policy_no_float_can_carry_is_refused_at_reload(client: Client, token: Callable[..., str],
                                                                         policy_dir: Path) -> None:
    """Probe (s8): ε 1e-290 per row passed validation, then OpenDP raised inside the reload
    task (an unhandled traceback; `policy check` crashed the same way). Now a policy error:
    the reload is refused and the running revision keeps answering."""
    path = policy_dir / "privacy.yaml"
    text = path.read_text()
    assert "epsilon: 0.5 " in text
    path.write_text(text.replace("epsilon: 0.5 ", "epsilon: 1.0e-290 ", 1))
    assert await client.app[SERVICE_KEY].store.reload("test") is False
    resp = await client.post("/v2/models/risk/infer", json=risk_body(2.0), headers=bearer(token()))
    assert resp.status == 200
    assert float(resp.headers["X-Privacy-Budget-Remaining"]) == 4.5
