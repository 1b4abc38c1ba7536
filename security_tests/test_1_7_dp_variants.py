"""CATALOGUE §1.7 DP budget, variants on the catalogue world (fake upstream, side gateways).

security_tests/dp/ runs DP-01..DP-10 against a real ``infergate serve`` process; these
are the outsider's variants of them that once failed:

- a gateway restart without Redis refilled every budget (in-memory ledger);
- a routing flag could send a DP-protected model name to a model without noise;
- an upstream NaN was clamped, noised and released as a charged answer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from security_tests.conftest import Tokens
from security_tests.support.side import SideGateway
from security_tests.support.world import PUB_BODY, Client, World
from tests.support.fake_triton import nan_out, ok

RAW = np.array([[0.123456, 0.2, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.076544]], dtype=np.float32)
K_MAX = 10  # ε 5.0 per day, ε 0.5 per row (security_tests/world/policies/privacy.yaml)


def dp_body(rows: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [rows, 20], "datatype": "FP32",
                        "data": [round(0.05 * i, 2) for i in range(20)] * rows}]}


def raw_upstream(world: World) -> None:
    world.fake.set(ok(lambda _inputs: {"probs": RAW}), model="tab_dp")


async def remaining(client: Client, token: str) -> float:
    r = await client.request("GET", "/v2/privacy/budget", token=token)
    assert r.status == 200, r.body
    return float(r.json()["models"]["tab_dp"]["epsilon_remaining"])


def second_gateway(world: World, first: SideGateway, tmp: Path) -> SideGateway:
    """A new gateway process state on the first one's state directory (a restart)."""
    assert first.settings is not None
    shutil.copytree(first.settings.state_dir, tmp / "state")
    return SideGateway(world, tmp).start()


async def test_dp_restart_does_not_refill_the_budget(side_gateways: Callable[..., SideGateway], world: World,
                                                     tokens: Tokens, tmp_path: Path) -> None:
    raw_upstream(world)
    first = side_gateways("first")
    token = tokens.u1()
    assert (await first.client().infer("tab_dp", dp_body(K_MAX), token=token)).status == 200
    assert (await first.client().infer("tab_dp", dp_body(), token=token)).status == 429
    first.stop()
    second = second_gateway(world, first, tmp_path / "second")
    try:
        client = second.client()
        again = await client.infer("tab_dp", dp_body(), token=token)
        assert again.status == 429 and "exhausted" in again.json()["error"]
        assert await remaining(client, token) == 0.0
        assert world.upstream_calls() == 1
        assert second.audit_for(again)[0]["reason"] == "dp_budget_exhausted"
    finally:
        second.check_nl()
        second.stop()


async def test_dp_unreadable_ledger_fails_closed(side_gateways: Callable[..., SideGateway], world: World,
                                                 tokens: Tokens, tmp_path: Path) -> None:
    raw_upstream(world)
    first = side_gateways("first")
    token = tokens.u1()
    assert (await first.client().infer("tab_dp", dp_body(4), token=token)).status == 200
    first.stop()
    assert first.settings is not None
    (first.settings.state_dir / "dp-ledger.json").write_bytes(b'{"format": 1, "accounts": [{"key": ')
    second = second_gateway(world, first, tmp_path / "second")
    try:
        client = second.client()
        dp = await client.infer("tab_dp", dp_body(), token=token)
        assert dp.status == 503 and "Retry-After" in dp.headers  # never a fresh, full budget
        assert second.audit_for(dp)[0]["reason"] == "dp_ledger_unavailable"
        assert (await client.infer("pub_clf", PUB_BODY, token=token)).status == 200  # only DP routes refuse
        assert world.upstream_calls() == 2  # the first gateway's answer and pub_clf
    finally:
        second.check_nl()
        second.stop()


async def test_dp_routing_flag_cannot_leave_the_dp_model(side_gateways: Callable[..., SideGateway], world: World,
                                                         tokens: Tokens) -> None:
    side = side_gateways("flags")
    assert side.settings is not None and side.service is not None
    path = side.settings.policies / "flags.json"
    doc = json.loads(path.read_text())
    doc["flags"]["tab-dp-green"] = {
        "state": "ENABLED",
        "variants": {"blue": {"model": "tab_dp", "version": ""}, "green": {"model": "alpha_fraud", "version": "1"}},
        "defaultVariant": "green", "targeting": {"fractional": [["blue", 0], ["green", 100]]},
        "metadata": {"gateway.model": "tab_dp", "gateway.stable": "green"}}
    path.write_text(json.dumps(doc))
    assert world.loop.run(side.service.store.reload("test")) is False  # refused; last-known-good kept
    assert "DP-protected" in world.logs.text()
    raw_upstream(world)
    r = await side.client().infer("tab_dp", dp_body(), token=tokens.u1())
    assert r.status == 200 and r.json()["model_name"] == "tab_dp"
    values = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
    assert not np.allclose(values, RAW[0], atol=1e-3)  # noised
    assert RAW[0, 0].tobytes() not in r.body and b"0.1234" not in r.body


async def test_dp_non_finite_upstream_answer_is_502_and_refunded(side_gateways: Callable[..., SideGateway],
                                                                 world: World, tokens: Tokens) -> None:
    side = side_gateways("nan")
    client, token = side.client(), tokens.u1()
    world.fake.set(nan_out())
    r = await client.infer("tab_dp", dp_body(), token=token)
    assert r.status == 502 and b"outputs" not in r.body
    [record] = side.audit_for(r)
    assert (record["reason"], record["eps"]) == ("upstream_non_finite", 0.0)
    assert await remaining(client, token) == 5.0  # the reservation was refunded


async def test_dp_raw_score_in_an_upstream_error_reaches_no_log(gw: Client, world: World, tokens: Tokens,
                                                               fresh_breakers: None) -> None:
    """DP-09's error-text side door, on the operator's side: an upstream that quotes the raw
    output in its error message (a Python backend's exception, a shape check) must not put
    the DP model's raw values into a log line (NO-LEAK covers logs)."""
    import grpc

    from tests.support.fake_triton import error

    start = len(world.logs.text())
    world.fake.set(error(grpc.StatusCode.INTERNAL, "probs=[0.8123456, 1.876544e-01] for x at 0x7f00deadbeef"),
                   model="tab_dp")
    r = await gw.infer("tab_dp", dp_body(), token=tokens.u2())
    assert r.status == 502 and b"0.81" not in r.body
    logged = world.logs.text()[start:]
    assert "upstream_grpc_error" in logged  # the operator still learns that and how it failed
    assert "0.8123456" not in logged and "1.876544" not in logged and "8123456" not in logged


async def test_dp_one_account_deleted_in_redis_fails_closed(side_gateways: Callable[..., SideGateway], world: World,
                                                            tokens: Tokens, tmp_path: Path) -> None:
    """DP-08 variant: not FLUSHALL but one account's budget key deleted (``DEL``; eviction,
    ``EXPIRE`` and an older snapshot do the same), the epoch marker intact. The account
    counter went back, so the gateway answers 503 (audited) instead of a fresh budget."""
    from tests.support.redis_server import RedisServer

    server = RedisServer.start(tmp_path / "redis")
    try:
        raw_upstream(world)
        side = side_gateways("redis", redis_url=server.url)
        client, token = side.client(), tokens.u1()
        assert (await client.infer("tab_dp", dp_body(K_MAX), token=token)).status == 200
        assert (await client.infer("tab_dp", dp_body(), token=token)).status == 429
        accounts = [k for k in server.cli("KEYS", "*").split() if ":dp.budget:" in k]
        assert len(accounts) == 1, accounts  # the one (alpha, tab_dp) account (names are hashed)
        assert server.cli("DEL", accounts[0]) == "1"
        dp = await client.infer("tab_dp", dp_body(), token=token)
        assert dp.status == 503 and "Retry-After" in dp.headers, dp.body
        assert side.audit_for(dp)[0]["reason"] == "dp_ledger_unavailable"
        assert (await client.infer("pub_clf", PUB_BODY, token=token)).status == 200  # only DP routes refuse
        assert world.upstream_calls() == 2
    finally:
        server.kill()
