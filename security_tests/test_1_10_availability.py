"""CATALOGUE §1.10 Availability / faults: upstream errors, hangs, garbage, breaker, cardinality."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from security_tests.conftest import Tokens
from security_tests.support.side import RedisSide
from security_tests.support.world import DIGITS_BODY, PUB_BODY, Client, World
from tests.support.fake_triton import (
    bad_size,
    error,
    extra_output,
    hang,
    nan_out,
    ok,
    wrong_datatype,
    wrong_shape,
)


@pytest.fixture
def fresh_breakers(world: World) -> Iterator[None]:
    assert world.service is not None
    world.service.breakers._by_model.clear()
    yield
    world.service.breakers._by_model.clear()


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
async def test_av_01_upstream_error(gw: Client, world: World, tokens: Tokens, fresh_breakers: None,
                                    code: grpc.StatusCode) -> None:
    world.fake.set(error(code))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    assert r.status in (502, 503)
    assert set(r.json()) == {"error"}
    assert world.upstream_calls() <= 2  # at most one retry for a stateless model
    rec = world.audit_for(r)[0]
    assert rec["decision"] == "deny" and rec["reason"].startswith("upstream")


async def test_av_02_hang_times_out(gw: Client, world: World, tokens: Tokens, fresh_breakers: None) -> None:
    assert world.settings is not None
    path = world.settings.policies / "gateway.yaml"
    old = path.read_text()
    path.write_text(old.replace("infer_timeout_s: 10", "infer_timeout_s: 1"))
    try:
        assert world.reload() is True
        world.fake.set(hang())
        r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
        assert r.status == 504
        assert world.fake.cancelled["ModelInfer"] >= 1  # the upstream call was cancelled, not left running
    finally:
        world.fake.reset()
        path.write_text(old)
        world.reload()


@pytest.mark.parametrize("behaviour", [wrong_shape, nan_out, bad_size, wrong_datatype, extra_output],
                         ids=lambda b: b.__name__)
async def test_av_04_malformed_upstream(gw: Client, world: World, tokens: Tokens, fresh_breakers: None,
                                        behaviour: object) -> None:
    world.fake.set(behaviour())  # type: ignore[operator]
    r = await gw.infer("digits_clf", DIGITS_BODY, token=tokens.u1())
    assert r.status == 502
    assert b"NaN" not in r.body and b"Infinity" not in r.body


async def test_av_03_close_mid_stream(gw: Client, world: World, tokens: Tokens, fresh_breakers: None) -> None:
    world.fake.set(error(grpc.StatusCode.UNAVAILABLE, "stream reset"))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    assert r.status in (502, 503) and b"outputs" not in r.body


async def test_av_06_breaker_opens(gw: Client, world: World, tokens: Tokens, fresh_breakers: None) -> None:
    world.fake.set(error(grpc.StatusCode.INTERNAL))
    clients = [Client(world, world.next_addr()) for _ in range(4)]
    toks = [world.tokens.rs(sub=f"b{i}.{tokens.suffix}") for i in range(4)]
    got = [await clients[i % 4].infer("pub_clf", PUB_BODY, token=toks[i % 4]) for i in range(20)]
    fast = [r for r in got if r.status == 503]
    assert fast and all(int(r.headers["Retry-After"]) >= 1 for r in fast)
    assert world.upstream_calls() < 20  # the open circuit stopped calling the upstream


async def test_av_13_metrics_cardinality(gw: Client, world: World, tokens: Tokens) -> None:
    names = [f"m{uuid.uuid4().hex[:10]}" for _ in range(300)]
    clients = [Client(world, world.next_addr()) for _ in range(15)]
    for i, name in enumerate(names):
        r = await clients[i % 15].infer(name, PUB_BODY, token=world.tokens.rs(sub=f"n{i % 15}.{tokens.suffix}"))
        assert r.status in (404, 429)
    metrics = (await gw.request("GET", "/metrics")).body
    assert len(metrics) < 1_000_000
    assert not any(name.encode() in metrics for name in names)
    assert world.upstream_calls() == 0
    assert not re.search(rb'model="m[0-9a-f]{10}"', metrics)


async def test_av_05_upstream_down_at_start(world: World, tmp_path: object) -> None:
    """A second gateway whose upstream is not there: live, not ready, no crash."""
    import dataclasses
    from pathlib import Path

    import aiohttp
    from aiohttp import web

    from gateway.app import build_app, runner_for
    from tests.support.gateway_proc import free_port

    assert world.settings is not None
    base = Path(str(tmp_path))
    settings = dataclasses.replace(world.settings, backend=f"grpc://127.0.0.1:{free_port()}",
                                   audit_dir=base / "audit", state_dir=base / "state")

    async def run() -> tuple[int, int]:
        runner = runner_for(build_app(settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v2/health/live") as live, \
                    s.get(f"http://127.0.0.1:{port}/v2/health/ready") as ready:
                return live.status, ready.status
        finally:
            await runner.cleanup()

    assert world.loop.run(run()) == (200, 503)


# -- AV-07/08: Redis faults on the side gateway (real Redis behind a FaultProxy) ---------------

DP_BODY = {"inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP32",
                       "data": [round(0.05 * i, 2) for i in range(20)]}]}


@pytest.fixture
def redis_gw(redis_side: RedisSide) -> Iterator[RedisSide]:
    redis_side.heal()
    yield redis_side
    redis_side.heal()
    redis_side.gateway.restore_policies()
    redis_side.gateway.check_nl()


async def test_av_07_redis_lost_between_limit_and_budget(redis_gw: RedisSide, world: World,
                                                         tokens: Tokens) -> None:
    side = redis_gw
    assert side.gateway.service is not None
    ledger = side.gateway.service.dp_ledger
    real_reserve = ledger.reserve

    async def cut_then_reserve(*args: Any, **kwargs: Any) -> Any:
        side.proxy.reset()  # the rate-limit check has passed; Redis dies before the budget charge
        return await real_reserve(*args, **kwargs)

    gw = side.gateway.client()
    token = tokens.u2(sub=tokens.sub("av07"))
    # tab_dp answers [1, 10] probabilities (§0.2); the side's privacy policy says so.
    side.gateway.edit_policy("privacy.yaml", "width: 1", "width: 10")
    world.fake.set(ok(lambda _inputs: {"probs": np.full((1, 10), 0.1, dtype=np.float32)}))
    ledger.reserve = cut_then_reserve  # type: ignore[method-assign]
    try:
        r = await gw.infer("tab_dp", DP_BODY, token=token)
    finally:
        ledger.reserve = real_reserve  # type: ignore[method-assign]
    assert r.status == 503 and b"outputs" not in r.body  # fail closed, nothing released
    assert world.upstream_calls() == 0
    side.heal()
    good = await gw.infer("tab_dp", DP_BODY, token=token)
    assert good.status == 200, good.body
    # One query's ε charged after Redis came back: the failed attempt charged nothing.
    assert float(good.headers["X-Privacy-Budget-Remaining"]) == pytest.approx(4.5)


def _redis_errors(text: bytes) -> float:
    m = re.search(rb"^gateway_redis_errors_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("fault", ["oom", "readonly"])
async def test_av_08_redis_error_replies(redis_gw: RedisSide, world: World, tokens: Tokens, fault: str) -> None:
    side = redis_gw
    gw = side.gateway.client()
    before = _redis_errors((await gw.request("GET", "/metrics")).body)
    if fault == "oom":
        side.server.cli("CONFIG", "SET", "maxmemory", "1")
    else:
        side.server.cli("REPLICAOF", "127.0.0.1", "1")  # a replica of nothing: READONLY on writes
    try:
        got = [await gw.infer("pub_clf", PUB_BODY, token=tokens.u1()) for _ in range(2)]
        dp = await gw.infer("tab_dp", DP_BODY, token=tokens.u2())
    finally:
        if fault == "oom":
            side.server.cli("CONFIG", "SET", "maxmemory", "0")
        else:
            side.server.cli("REPLICAOF", "NO", "ONE")
    for r in [*got, dp]:
        assert r.status == 503  # classified as a backend failure (same as RL-11), never a 500
        assert side.gateway.audit_for(r)[0]["decision"] == "deny"
    assert world.upstream_calls() == 0
    assert _redis_errors((await gw.request("GET", "/metrics")).body) > before  # the alert metric moved
    side.heal()
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(sub=tokens.sub("ok")))).status == 200
